"""fastapi-utils compatible names: change ``fastapi_utils.session`` to ``fastapi_sessionmaker.session``.

``context_session(engine)`` here is fastapi-utils' function; the maker's ``db.context_session()``
follows the maker's policy and options and is the one to use in new code.

Example:
    >>> from fastapi_sessionmaker.session import FastAPISessionMaker, context_session, get_engine
    >>> engine = get_engine("sqlite://")
    >>> with context_session(engine) as session:
    ...     session.execute(sa.text("SELECT 1")).scalar()
    1
    >>> engine.dispose()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from fastapi_sessionmaker._engines import engine_kwargs
from fastapi_sessionmaker._sync import FastAPISessionMaker, create_checked_engine
from fastapi_sessionmaker._unit import sync_unit
from fastapi_sessionmaker._urls import resolve_url

__all__ = ["FastAPISessionMaker", "context_session", "get_engine", "get_sessionmaker_for_engine"]


def get_engine(uri: str) -> sa.Engine:
    """A new engine for ``uri`` whose dead pooled connections are replaced on checkout (fastapi-utils name).

    Example:
        >>> engine = get_engine("sqlite:///./app.db")
        >>> engine.url.render_as_string()
        'sqlite+pysqlite:///./app.db'
    """
    url = resolve_url(uri, is_async=False, variable="uri")
    return create_checked_engine(url, engine_kwargs(url, {}, is_async=False), "uri")


def get_sessionmaker_for_engine(engine: sa.Engine) -> sessionmaker[Session]:
    """A sessionmaker bound to ``engine``, with fastapi-utils' ``autoflush=False``.

    Example:
        >>> engine = get_engine("sqlite://")
        >>> SessionLocal = get_sessionmaker_for_engine(engine)
        >>> with SessionLocal() as session:
        ...     session.execute(sa.text("SELECT 1")).scalar()
        1
        >>> engine.dispose()
    """
    return sessionmaker(bind=engine, autoflush=False)


@contextlib.contextmanager
def context_session(engine: sa.Engine) -> Iterator[Session]:
    """A session on ``engine``: commit on success, rollback on error, always closed (fastapi-utils name).

    Kept so code written for fastapi-utils only changes its imports. New code uses the maker's
    ``db.context_session()``: the maker's engine and session options (``expire_on_commit=False``),
    its commit policy, an async twin, and the testing plugin's transaction. This one makes a session
    with fastapi-utils' settings (``autoflush=False``, ``expire_on_commit=True``: objects it loaded
    cannot be read after the block) and always commits on success.

    Example:
        >>> engine = get_engine("sqlite://")
        >>> with context_session(engine) as session:
        ...     _ = session.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        ...     _ = session.execute(sa.text("INSERT INTO t VALUES (1)"))
        >>> with context_session(engine) as session:
        ...     session.execute(sa.text("SELECT x FROM t")).scalar()
        1
        >>> engine.dispose()
    """
    with sync_unit(get_sessionmaker_for_engine(engine)(), commit=True) as session:
        yield session
