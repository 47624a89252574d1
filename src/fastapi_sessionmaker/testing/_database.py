"""The test database: one per run and xdist worker, created before the first test, dropped after."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from fastapi_sessionmaker._engines import enforce_sqlite_foreign_keys, engine_kwargs
from fastapi_sessionmaker._sqlite import install_writer_queue
from fastapi_sessionmaker._urls import render_url, resolve_url
from fastapi_sessionmaker.exceptions import ConfigurationError

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_ASYNC_DRIVERS = frozenset({"asyncpg", "aiomysql", "asyncmy", "aiosqlite"})


def worker_suffix() -> str:
    """``_gw0``, ``_gw1``... under pytest-xdist, ``""`` otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return f"_{worker}" if worker else ""


def is_memory(url: URL) -> bool:
    """True for an in-memory SQLite URL (``sqlite://``, ``sqlite:///:memory:``)."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_savepoints(engine: sa.Engine) -> None:
    """Make SAVEPOINTs work on pysqlite / aiosqlite: SQLAlchemy emits ``BEGIN`` itself.

    The ``sqlite3`` module only sends ``BEGIN`` before DML, so a ``RELEASE SAVEPOINT`` outside an
    explicit transaction commits for good. This is SQLAlchemy's documented recipe ("Serializable
    isolation / Savepoints / Transactional DDL"), applied to the test engines only.
    """

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN")


class TestDatabase:
    """The database the tests run in, derived from the configured URL.

    The configured database itself is never written to: the tests use ``test_<name>`` beside it
    (``test_<name>_gw0``... under xdist), a SQLite file ``test_<stem>.db`` in the same folder, or a
    shared in-memory SQLite database for ``sqlite://``.

    Example:
        >>> TestDatabase("postgresql://app:secret@db.internal/shop").safe_url()
        'postgresql+psycopg://app:***@db.internal/test_shop...'
    """

    __test__ = False  # not a pytest test class

    def __init__(self, url: str | URL, *, create: bool = True) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigurationError(
                "fsm_database_url is not a valid database URL (expected e.g. "
                "'postgresql://user@host/name' or 'sqlite:///./app.db')"
            ) from None
        if "+" in parsed.drivername and parsed.get_driver_name() in _ASYNC_DRIVERS:
            parsed = parsed.set(drivername=parsed.get_backend_name())  # each twin picks its driver
        base = resolve_url(parsed, is_async=False, variable="fsm_database_url")
        self.backend = base.get_backend_name()
        self.create = create
        self.keeper: sa.Connection | None = None
        self.path: Path | None = None
        suffix = worker_suffix()
        if is_memory(base):
            name = f"fsm_memory_{os.getpid()}{suffix}"
            self.url = base.set(
                database=f"file:{name}", query={"mode": "memory", "cache": "shared", "uri": "true"}
            )
        elif self.backend == "sqlite":
            path = Path(str(base.database))
            if create:
                path = path.with_name(f"test_{path.stem}{suffix}{path.suffix}")
            self.path = path
            self.url = base.set(database=str(path))
        else:
            name = str(base.database or "")
            if create:
                name = f"test_{name}{suffix}"
            if not _NAME.match(name):
                raise ConfigurationError(
                    f"fsm_database_url: the database name {name!r} may only hold letters, digits and _"
                )
            self.url = base.set(database=name)

    # -- life cycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Create the database (dropping a stale one of the same name)."""
        if not self.create:
            return
        if self.path is not None:
            self._remove_files()
        elif self.backend != "sqlite":
            with self._admin() as connection:
                quoted = connection.dialect.identifier_preparer.quote(str(self.url.database))
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")
                connection.exec_driver_sql(f"CREATE DATABASE {quoted}")

    def teardown(self) -> None:
        """Drop the database (or remove the SQLite file)."""
        self.close_keeper()
        if not self.create:
            return
        if self.path is not None:
            self._remove_files()
        elif self.backend != "sqlite":
            with self._admin() as connection:
                quoted = connection.dialect.identifier_preparer.quote(str(self.url.database))
                if self.backend == "postgresql":
                    connection.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": self.url.database},
                    )
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted}")

    def close_keeper(self) -> None:
        """Close the connection that keeps an in-memory database alive (before its engine is disposed:
        a connection checked in after ``dispose()`` goes back to the old pool and is never closed)."""
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None

    def _remove_files(self) -> None:
        assert self.path is not None
        for extra in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{extra}").unlink()

    @contextlib.contextmanager
    def _admin(self) -> Any:
        database = "postgres" if self.backend == "postgresql" else None
        # URL.set() ignores None: _replace() really drops the database name (MariaDB).
        url = self.url._replace(database=database)
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as connection:
                yield connection
        finally:
            admin.dispose()

    # -- engines ----------------------------------------------------------------------------
    def engine(self) -> sa.Engine:
        """A sync engine on the test database (savepoints working on SQLite)."""
        kwargs = engine_kwargs(self.url, {}, is_async=False)
        if self.backend == "sqlite" and self.path is None:
            # A shared in-memory database: separate connections see the same tables as long as
            # one of them stays open (the keeper).
            kwargs.update(poolclass=QueuePool, connect_args={"check_same_thread": False})
        engine = sa.create_engine(self.url, **kwargs)
        enforce_sqlite_foreign_keys(engine)  # as the app's makers do
        install_writer_queue(engine, kwargs.get("connect_args"))  # as well
        if self.backend == "sqlite":
            sqlite_savepoints(engine)
            if self.path is None:
                self.keeper = engine.connect()
        return engine

    def async_engine(self) -> AsyncEngine:
        """An async engine on the test database, without a pool (event loops come and go)."""
        url = resolve_url(self.url.set(drivername=self.backend), is_async=True, variable="fsm_database_url")
        kwargs = engine_kwargs(url, {}, is_async=True)
        kwargs.pop("connect_args", None)
        kwargs["poolclass"] = NullPool
        engine = create_async_engine(url, **kwargs)
        enforce_sqlite_foreign_keys(engine.sync_engine)
        if self.backend == "sqlite":
            sqlite_savepoints(engine.sync_engine)
        return engine

    def url_like(self, configured: str | URL) -> str:
        """The test database's URL with the driver of ``configured`` (or none, like it), password included.

        This is what the plugin puts in ``DATABASE_URI``: a URL without a driver serves sync and
        async makers alike, as the configured one did.

        Example:
            >>> TestDatabase("postgresql://app@db.internal/shop").url_like("postgresql://")
            'postgresql://app@db.internal/test_shop...'
        """
        url = self.url.set(drivername=sa.make_url(configured).drivername)
        return url.render_as_string(hide_password=False)

    def safe_url(self) -> str:
        """The test database's URL with the password and secret query values masked."""
        return render_url(self.url)
