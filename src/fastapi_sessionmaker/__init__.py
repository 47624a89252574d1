"""SQLAlchemy sessions for FastAPI that commit before the response is sent.

Example:
    >>> import sqlalchemy as sa
    >>> from fastapi import FastAPI
    >>> from fastapi_sessionmaker import DBSession, FastAPISessionMaker
    >>> db = FastAPISessionMaker("sqlite:///./example.db")
    >>> app = FastAPI()
    >>> db.init_app(app)
    >>> @app.get("/answer")
    ... def answer(session: DBSession) -> int:
    ...     return session.execute(sa.text("SELECT 42")).scalar_one()
"""

from typing import Annotated as _Annotated

from fastapi import Depends as _Depends
from sqlalchemy.ext.asyncio import AsyncSession as _AsyncSession
from sqlalchemy.orm import Session as _Session

from fastapi_sessionmaker._async import AsyncFastAPISessionMaker as AsyncFastAPISessionMaker
from fastapi_sessionmaker._errors import Problem as Problem
from fastapi_sessionmaker._errors import default_error_mapper as default_error_mapper
from fastapi_sessionmaker._errors import is_retryable as is_retryable
from fastapi_sessionmaker._health import health_router as health_router
from fastapi_sessionmaker._health import pool_stats as pool_stats
from fastapi_sessionmaker._local import set_local as set_local
from fastapi_sessionmaker._local import use_schemas as use_schemas
from fastapi_sessionmaker._notfound import get_or_404 as get_or_404
from fastapi_sessionmaker._notfound import one_or_404 as one_or_404
from fastapi_sessionmaker._observe import RequestStats as RequestStats
from fastapi_sessionmaker._observe import request_stats as request_stats
from fastapi_sessionmaker._oncommit import on_commit as on_commit
from fastapi_sessionmaker._oncommit import on_rollback as on_rollback
from fastapi_sessionmaker._policy import CommitPolicy as CommitPolicy
from fastapi_sessionmaker._request import default_async_session as _default_async_session
from fastapi_sessionmaker._request import default_sync_session as _default_sync_session
from fastapi_sessionmaker._request import dependency_of as dependency_of
from fastapi_sessionmaker._sessions import ReadOnlySession as ReadOnlySession
from fastapi_sessionmaker._settings import DatabaseSettings as DatabaseSettings
from fastapi_sessionmaker._sync import FastAPISessionMaker as FastAPISessionMaker
from fastapi_sessionmaker.exceptions import ConcurrentSessionUseError as ConcurrentSessionUseError
from fastapi_sessionmaker.exceptions import ConfigurationError as ConfigurationError
from fastapi_sessionmaker.exceptions import DatabaseUnavailableError as DatabaseUnavailableError
from fastapi_sessionmaker.exceptions import FastAPISessionMakerError as FastAPISessionMakerError
from fastapi_sessionmaker.exceptions import MigrationError as MigrationError
from fastapi_sessionmaker.exceptions import NotFoundError as NotFoundError
from fastapi_sessionmaker.exceptions import NotInstalledError as NotInstalledError
from fastapi_sessionmaker.exceptions import ReadOnlySessionError as ReadOnlySessionError
from fastapi_sessionmaker.exceptions import ResponseStartedError as ResponseStartedError
from fastapi_sessionmaker.exceptions import SessionClosedError as SessionClosedError
from fastapi_sessionmaker.exceptions import TransactionSettingsError as TransactionSettingsError
from fastapi_sessionmaker.guid_type import GUID as GUID
from fastapi_sessionmaker.guid_type import GUID_DEFAULT_SQLITE as GUID_DEFAULT_SQLITE
from fastapi_sessionmaker.guid_type import (
    GUID_SERVER_DEFAULT_POSTGRESQL as GUID_SERVER_DEFAULT_POSTGRESQL,
)
from fastapi_sessionmaker.guid_type import (
    async_setup_guids_postgresql as async_setup_guids_postgresql,
)
from fastapi_sessionmaker.guid_type import setup_guids_postgresql as setup_guids_postgresql
from fastapi_sessionmaker.session import context_session as context_session
from fastapi_sessionmaker.session import get_engine as get_engine
from fastapi_sessionmaker.session import (
    get_sessionmaker_for_engine as get_sessionmaker_for_engine,
)

DBSession = _Annotated[_Session, _Depends(_default_sync_session)]
"""The request's ``Session`` from the app's first installed ``FastAPISessionMaker``."""

AsyncDBSession = _Annotated[_AsyncSession, _Depends(_default_async_session)]
"""The request's ``AsyncSession`` from the app's first installed ``AsyncFastAPISessionMaker``."""

__all__ = [
    "GUID",
    "GUID_DEFAULT_SQLITE",
    "GUID_SERVER_DEFAULT_POSTGRESQL",
    "AsyncDBSession",
    "AsyncFastAPISessionMaker",
    "CommitPolicy",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DBSession",
    "DatabaseSettings",
    "DatabaseUnavailableError",
    "FastAPISessionMaker",
    "FastAPISessionMakerError",
    "MigrationError",
    "NotFoundError",
    "NotInstalledError",
    "Problem",
    "ReadOnlySession",
    "ReadOnlySessionError",
    "RequestStats",
    "ResponseStartedError",
    "SessionClosedError",
    "TransactionSettingsError",
    "async_setup_guids_postgresql",
    "context_session",
    "default_error_mapper",
    "dependency_of",
    "get_engine",
    "get_or_404",
    "get_sessionmaker_for_engine",
    "health_router",
    "is_retryable",
    "on_commit",
    "on_rollback",
    "one_or_404",
    "pool_stats",
    "request_stats",
    "set_local",
    "setup_guids_postgresql",
    "use_schemas",
]
