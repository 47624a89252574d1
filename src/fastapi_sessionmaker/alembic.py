"""Alembic with the app's own database settings: ``env.py`` in one call, migrations at start-up.

* :func:`run_migrations` is the whole body of a project's ``env.py``: online or offline
  (``alembic upgrade head --sql``), on a sync or an async engine, with the URL the app uses
  (``DATABASE_URI`` or its parts, or a maker you pass), so ``sqlalchemy.url`` in ``alembic.ini``
  stays empty and no password is written twice.
* :class:`Migrations` is the opt-in start-up step, ``db.init_app(app, migrations=Migrations(...))``:
  it upgrades to head (or only checks the schema is there) under a database lock, so N workers
  that start at once migrate exactly once, and the health route then reports a schema behind
  head as not ready.

Needs the ``alembic`` extra: ``pip install 'fastapi-sessionmaker[alembic]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import anyio
import sqlalchemy as sa

try:
    from alembic import command, context
    from alembic.config import Config
    from alembic.script import ScriptDirectory
except ImportError as exc:  # tests/test_alembic.py hides Alembic in a subprocess
    raise ImportError(
        f"fastapi_sessionmaker.alembic needs Alembic ({exc.name} is missing): "
        "pip install 'fastapi-sessionmaker[alembic]'"
    ) from None

from fastapi_sessionmaker._async import AsyncFastAPISessionMaker
from fastapi_sessionmaker._base import MakerBase
from fastapi_sessionmaker._guard import chain_lifespan
from fastapi_sessionmaker._locks import database_lock
from fastapi_sessionmaker._readiness import add_readiness_check
from fastapi_sessionmaker._settings import DatabaseSettings
from fastapi_sessionmaker._sync import FastAPISessionMaker
from fastapi_sessionmaker.exceptions import ConfigurationError, MigrationError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["Migrations", "run_migrations"]

AnyMaker: TypeAlias = FastAPISessionMaker | AsyncFastAPISessionMaker
Mode: TypeAlias = Literal["upgrade", "check"]

logger = logging.getLogger("fastapi_sessionmaker")

_MODES = ("upgrade", "check")
DEFAULT_LOCK_TIMEOUT = 300.0
"""Seconds a worker waits for another one's migrations before it gives up (:class:`MigrationError`)."""


def lock_name(version_table: str = "alembic_version", schema: str | None = None) -> str:
    """The migration lock's name: one per database (:mod:`._locks`) and version table."""
    return f"alembic:{schema}.{version_table}" if schema else f"alembic:{version_table}"


def _settings_maker() -> AnyMaker:
    """A maker from ``DATABASE_*``: the async twin when ``DATABASE_URI`` names an async driver."""
    settings = DatabaseSettings()
    try:
        is_async = bool(getattr(settings.url().get_dialect(), "is_async", False))
    except (sa.exc.NoSuchModuleError, ImportError):
        is_async = False  # the sync maker names the problem in one line
    return AsyncFastAPISessionMaker(settings=settings) if is_async else FastAPISessionMaker(settings=settings)


def run_migrations(
    target_metadata: sa.MetaData | None = None,
    maker: AnyMaker | None = None,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    **options: Any,
) -> None:
    """Run Alembic's migrations from ``env.py``, online or offline, with the app's database.

    The database is ``maker``'s, or, without one, the one the ``DATABASE_*`` variables name (the
    same settings as the app: an async driver such as ``postgresql+asyncpg://`` in
    ``DATABASE_URI`` gives an async engine). ``sqlalchemy.url`` in ``alembic.ini`` is not read.

    * **Online** (``alembic upgrade head``): on a fresh engine of the maker (sync, or async through
      ``connection.run_sync``), disposed at the end; the maker's own pool is not touched. The
      migrations run under the same database lock as :class:`Migrations`, so a CLI upgrade and
      workers starting at once never migrate twice. Under :class:`Migrations` (or any caller that
      sets ``config.attributes["connection"]``), they run on that connection instead.
    * **Offline** (``alembic upgrade head --sql``): SQL with literal values, written to stdout;
      nothing connects. The URL (and its password) is never printed.

    Args:
        target_metadata: Your models' ``MetaData`` (for ``alembic revision --autogenerate``).
        maker: The app's maker (default: one built from the ``DATABASE_*`` variables).
        lock_timeout: Seconds to wait for another process's migrations (online).
        options: More ``context.configure()`` options: ``render_as_batch=True`` for SQLite's
            ``ALTER TABLE``, ``compare_type``, ``version_table``...

    Example::

        # env.py
        from fastapi_sessionmaker.alembic import run_migrations
        from myapp.models import Base

        run_migrations(Base.metadata)
    """
    configure: dict[str, Any] = {"target_metadata": target_metadata, **options}
    if context.is_offline_mode():
        url = (maker or _settings_maker()).url
        context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **configure)
        with context.begin_transaction():
            context.run_migrations()
        return
    given = context.config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _migrate(given, configure)
        return
    version_table = str(options.get("version_table", "alembic_version"))
    schema = options.get("version_table_schema")

    def locked(connection: sa.Connection) -> None:
        with database_lock(connection, lock_name(version_table, schema), timeout=lock_timeout):
            _migrate(connection, configure)

    chosen = maker or _settings_maker()
    if isinstance(chosen, AsyncFastAPISessionMaker):
        asyncio.run(_run_async(chosen, locked))
        return
    engine = chosen.get_new_engine()
    try:
        with engine.connect() as connection:
            locked(connection)
    finally:
        engine.dispose()


def _migrate(connection: sa.Connection, configure: dict[str, Any]) -> None:
    context.configure(connection=connection, **configure)
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():  # a connection the caller gave, or non-transactional DDL
        connection.commit()


async def _run_async(maker: AsyncFastAPISessionMaker, body: Callable[[sa.Connection], None]) -> None:
    engine = maker.get_new_engine()
    try:
        async with engine.connect() as connection:
            await connection.run_sync(body)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class _Schema:
    current: tuple[str, ...]
    head: tuple[str, ...]
    status: Literal["current", "behind", "ahead"]

    def report(self) -> dict[str, Any]:
        return {"status": self.status, "current": list(self.current), "head": list(self.head)}

    def describe(self) -> str:
        current = ", ".join(self.current) or "<none>"
        return f"at revision {current}, the migrations' head is {', '.join(self.head) or '<none>'}"


class Migrations:
    """Alembic's migrations at start-up, under a database lock, and readiness that knows them.

    Give it to ``init_app``: at start-up (after the connection check) one connection of the maker
    takes a database-wide lock (PostgreSQL ``pg_advisory_lock``, MariaDB/MySQL ``GET_LOCK``,
    SQLite a file lock beside the database), reads the current revision and, in ``"upgrade"``
    mode, runs ``alembic upgrade heads`` on that connection when the schema is behind. Workers
    that start at once wait for the lock, then find the schema at head and do nothing: the
    migrations run exactly once. In ``"check"`` mode nothing is changed and a schema behind head
    stops the start-up with :class:`MigrationError` naming the current and head revisions. A
    schema *ahead* of this code (a newer release migrated it) is logged as a warning and starts.

    Afterwards the health route (:func:`health_router`) reports the database not ready (503,
    ``"not_ready"``) while its schema is behind head, with the ``current`` and ``head``
    revisions: the head is read once from the script directory, the current revision is one
    query per check.

    Args:
        config: The ``alembic.ini`` path (relative to the working directory) or an Alembic
            ``Config``. Its ``env.py`` should call :func:`run_migrations` (any ``env.py`` that uses
            ``config.attributes["connection"]`` works).
        mode: ``"upgrade"`` (migrate to head) or ``"check"`` (refuse to start when behind).
        lock_timeout: Seconds to wait for another process's migrations.
        version_table: Alembic's version table, if your ``env.py`` renames it.
        version_table_schema: Its schema, if not the default one.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi_sessionmaker import FastAPISessionMaker, health_router
        >>> from fastapi_sessionmaker.alembic import Migrations
        >>> db = FastAPISessionMaker("sqlite:///./app.db")
        >>> app = FastAPI()
        >>> db.init_app(app, migrations=Migrations("alembic.ini", mode="check"))
        >>> app.include_router(health_router())
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Config = "alembic.ini",
        *,
        mode: Mode = "upgrade",
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        version_table: str = "alembic_version",
        version_table_schema: str | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r}: use 'upgrade' (migrate at start-up) or 'check' (only check)")
        if not lock_timeout > 0:
            raise ValueError(f"lock_timeout={lock_timeout!r}: give the seconds to wait, more than 0")
        self.config = config
        self.mode: Mode = mode
        self.lock_timeout = float(lock_timeout)
        self.version_table = version_table
        self.version_table_schema = version_table_schema
        self._heads: tuple[str, ...] | None = None
        self._known: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"Migrations({self.config!r}, mode={self.mode!r})"

    def alembic_config(self) -> Config:
        """A fresh Alembic ``Config`` (or the one given); :class:`ConfigurationError` when the file
        is missing."""
        if isinstance(self.config, Config):
            return self.config
        path = os.fspath(self.config)
        if not os.path.isfile(path):
            raise ConfigurationError(
                f"Migrations: no Alembic config at {path!r} (from {os.getcwd()!r}): give the path of "
                "your alembic.ini, e.g. Migrations(Path(__file__).parent / 'alembic.ini')"
            )
        return Config(path)

    def heads(self) -> tuple[str, ...]:
        """The head revisions of the script directory, read once and cached."""
        if self._heads is None:
            script = ScriptDirectory.from_config(self.alembic_config())
            self._known = frozenset(revision.revision for revision in script.walk_revisions())
            self._heads = tuple(sorted(script.get_heads()))
        return self._heads

    def install(self, app: FastAPI, maker: MakerBase[Any, Any]) -> None:
        """Run :meth:`apply` at ``app``'s start-up and add the schema to its readiness.

        ``maker.init_app(app, migrations=...)`` calls it.
        """
        if not isinstance(maker, (FastAPISessionMaker, AsyncFastAPISessionMaker)):
            raise TypeError(f"Migrations.install: {maker!r} is not a FastAPISessionMaker or its async twin")

        @contextlib.asynccontextmanager
        async def step() -> AsyncIterator[None]:
            await self.apply(maker)
            yield

        chain_lifespan(app, step)
        add_readiness_check(maker, self.readiness)

    async def apply(self, maker: AnyMaker) -> None:
        """Upgrade (or check) ``maker``'s database now, under the database lock.

        What the start-up step runs; call it from a script or a release job as
        ``asyncio.run(migrations.apply(db))``. Raises :class:`MigrationError` in ``"check"`` mode
        when the schema is behind, or when the lock is not free within ``lock_timeout``.
        """
        if isinstance(maker, AsyncFastAPISessionMaker):
            async with maker.cached_engine.connect() as connection:
                await connection.run_sync(self._apply)
            return

        def run() -> None:
            with maker.cached_engine.connect() as connection:
                self._apply(connection)

        await anyio.to_thread.run_sync(run)

    def _apply(self, connection: sa.Connection) -> None:
        name = lock_name(self.version_table, self.version_table_schema)
        with database_lock(connection, name, timeout=self.lock_timeout):
            schema = self._schema(connection)
            if schema.status == "behind" and self.mode == "upgrade":
                logger.info("migrating database %s: %s", connection.engine.url.database, schema.describe())
                config = self.alembic_config()
                config.attributes["connection"] = connection
                try:
                    command.upgrade(config, "heads")
                finally:
                    del config.attributes["connection"]
                if connection.in_transaction():
                    connection.commit()
                schema = self._schema(connection)
        if schema.status == "behind":
            raise MigrationError(
                f"the schema of database {connection.engine.url.database!r} is behind: {schema.describe()}; "
                + (
                    "run `alembic upgrade head`, or start with Migrations(mode='upgrade')"
                    if self.mode == "check"
                    else "the upgrade did not reach it (does env.py use config.attributes['connection']?)"
                )
            )
        if schema.status == "ahead":
            logger.warning(
                "database %s is ahead of this code's migrations: %s",
                connection.engine.url.database,
                schema.describe(),
            )

    def _current(self, connection: sa.Connection) -> tuple[str, ...]:
        """The database's revisions: one query (two when the version table does not exist yet)."""
        table = sa.table(self.version_table, sa.column("version_num"), schema=self.version_table_schema)
        try:
            rows = connection.execute(sa.select(table.c.version_num)).scalars().all()
        except sa.exc.DBAPIError:
            connection.rollback()
            if sa.inspect(connection).has_table(self.version_table, schema=self.version_table_schema):
                raise
            return ()
        finally:
            connection.rollback()
        return tuple(sorted(str(row) for row in rows))

    def _schema(self, connection: sa.Connection) -> _Schema:
        head = self.heads()
        current = self._current(connection)
        if set(current) == set(head):
            status: Literal["current", "behind", "ahead"] = "current"
        elif all(revision in self._known for revision in current):
            status = "behind"
        else:
            status = "ahead"
        return _Schema(current=current, head=head, status=status)

    async def readiness(self, maker: AnyMaker) -> tuple[str | None, dict[str, Any]]:
        """The health route's check: ``"schema behind head"`` (not ready) or ``None``, and the revisions."""
        if isinstance(maker, AsyncFastAPISessionMaker):
            async with maker.cached_engine.connect() as connection:
                schema = await connection.run_sync(self._schema)
        else:

            def read() -> _Schema:
                with maker.cached_engine.connect() as connection:
                    return self._schema(connection)

            schema = await anyio.to_thread.run_sync(read, abandon_on_cancel=True)
        reason = "schema behind head" if schema.status == "behind" else None
        return reason, {"schema": schema.report()}
