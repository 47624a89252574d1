"""Testing toolkit: a pytest plugin that runs each test in a transaction rolled back afterwards.

The plugin is registered through the ``pytest11`` entry point and stays inert until configured
(``-p fastapi_sessionmaker.testing`` loads it when plugin autoloading is off). Configure it::

    [tool.pytest.ini_options]
    fsm_database_url = "postgresql://postgres@127.0.0.1/myapp"
    fsm_app = "myapp.main:app"
    fsm_metadata = "myapp.models:Base.metadata"

Example:
    >>> def test_create_user(fsm_client, fsm_session):  # doctest: +SKIP
    ...     assert fsm_client.post("/users", json={"email": "a@example.com"}).status_code == 201
    ...     assert fsm_session.scalar(sa.select(sa.func.count(User.id))) == 1

See ``docs/testing.md``.
"""

from __future__ import annotations

from fastapi_sessionmaker._oncommit import capture as capture_on_commit
from fastapi_sessionmaker.testing._database import TestDatabase as TestDatabase
from fastapi_sessionmaker.testing.plugin import _fsm_join_app as _fsm_join_app
from fastapi_sessionmaker.testing.plugin import fsm_app as fsm_app
from fastapi_sessionmaker.testing.plugin import fsm_async_client as fsm_async_client
from fastapi_sessionmaker.testing.plugin import fsm_async_connection as fsm_async_connection
from fastapi_sessionmaker.testing.plugin import fsm_async_engine as fsm_async_engine
from fastapi_sessionmaker.testing.plugin import fsm_async_session as fsm_async_session
from fastapi_sessionmaker.testing.plugin import fsm_client as fsm_client
from fastapi_sessionmaker.testing.plugin import fsm_connection as fsm_connection
from fastapi_sessionmaker.testing.plugin import fsm_database as fsm_database
from fastapi_sessionmaker.testing.plugin import fsm_database_url as fsm_database_url
from fastapi_sessionmaker.testing.plugin import fsm_engine as fsm_engine
from fastapi_sessionmaker.testing.plugin import fsm_metadata as fsm_metadata
from fastapi_sessionmaker.testing.plugin import fsm_on_commit as fsm_on_commit
from fastapi_sessionmaker.testing.plugin import fsm_session as fsm_session
from fastapi_sessionmaker.testing.plugin import join_connection as join_connection
from fastapi_sessionmaker.testing.plugin import pytest_addoption as pytest_addoption
from fastapi_sessionmaker.testing.plugin import pytest_configure as pytest_configure
from fastapi_sessionmaker.testing.plugin import (
    pytest_load_initial_conftests as pytest_load_initial_conftests,
)
from fastapi_sessionmaker.testing.plugin import pytest_report_header as pytest_report_header

__all__ = [
    "TestDatabase",
    "capture_on_commit",
    "fsm_app",
    "fsm_async_client",
    "fsm_async_connection",
    "fsm_async_engine",
    "fsm_async_session",
    "fsm_client",
    "fsm_connection",
    "fsm_database",
    "fsm_database_url",
    "fsm_engine",
    "fsm_metadata",
    "fsm_on_commit",
    "fsm_session",
    "join_connection",
]
