"""The async twin: ``AsyncSession`` per request with the same names and the same rule."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from fastapi_sessionmaker._base import (
    Limiter,
    MakerBase,
    enforce_sqlite_foreign_keys,
    install_liveness_check,
    missing_driver,
    unknown_driver,
)
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._sessions import compose
from fastapi_sessionmaker._shield import run_to_completion
from fastapi_sessionmaker._sync import unavailable
from fastapi_sessionmaker.exceptions import ConcurrentSessionUseError, ConfigurationError

__all__ = ["AsyncFastAPISessionMaker"]


class SerialAsyncSession(AsyncSession):
    """An ``AsyncSession`` that refuses a second task while an operation of the first is running.

    Two overlapping operations on one session fail in driver-specific ways (asyncpg's "another
    operation is in progress", aiomysql's packet errors, silently interleaved transactions on
    aiosqlite); this raises :class:`ConcurrentSessionUseError` instead, naming the helper to use.
    The check is one attribute test per awaited call. The async maker's sessions are of this class.
    """

    _fsm_running: str | None = None
    _fsm_idle: asyncio.Future[None] | None = None

    async def _wait_idle(self) -> None:
        """Wait until the operation another task is running on this session has ended."""
        while self._fsm_running is not None:
            if self._fsm_idle is None:
                self._fsm_idle = asyncio.get_running_loop().create_future()
            await self._fsm_idle


# The awaitable AsyncSession methods that do the work; ``scalars``, ``stream_scalars`` and
# ``aclose`` call these, so they are checked too (and may nest without a false alarm).
_SERIAL_METHODS = (
    "close",
    "commit",
    "connection",
    "delete",
    "delete_all",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "merge_all",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "stream",
)


def _serial(name: str, method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def serial(self: SerialAsyncSession, *args: Any, **kwargs: Any) -> Any:
        running = self._fsm_running
        if running is not None:
            raise ConcurrentSessionUseError(
                f"AsyncSession.{name}() was called while {running}() is still running in another "
                "task: one session runs one operation at a time. Give each concurrent task its "
                "own session with `async with maker.task_session() as session:` (it commits when "
                "the task succeeds, rolls back on error)."
            )
        self._fsm_running = name
        try:
            return await method(self, *args, **kwargs)
        finally:
            self._fsm_running = None
            idle = self._fsm_idle
            if idle is not None:
                self._fsm_idle = None
                if not idle.done():
                    idle.set_result(None)

    return serial


for _name in _SERIAL_METHODS:
    if hasattr(AsyncSession, _name):  # ``delete_all`` and ``merge_all`` are new in SQLAlchemy 2.1
        setattr(SerialAsyncSession, _name, _serial(_name, getattr(AsyncSession, _name)))


class AsyncFastAPISessionMaker(MakerBase):
    """The async twin of :class:`FastAPISessionMaker`: the same names, ``AsyncSession`` inside.

    ``postgresql://`` uses asyncpg (psycopg 3 if asyncpg is missing), ``mysql://`` aiomysql,
    ``sqlite://`` aiosqlite, so one ``DATABASE_URI`` serves both twins.

    Example:
        >>> from typing import Annotated
        >>> from fastapi import FastAPI
        >>> from sqlalchemy.ext.asyncio import AsyncSession
        >>> db = AsyncFastAPISessionMaker("sqlite:///./example.db")
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> DbSession = Annotated[AsyncSession, db.dependency]
    """

    is_async = True

    def __init__(self, database_uri: str | sa.URL | None = None, **kwargs: Any) -> None:
        super().__init__(database_uri, **kwargs)
        self.session_options.setdefault("class_", SerialAsyncSession)
        self._engine: AsyncEngine | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None

    @property
    def cached_engine(self) -> AsyncEngine:
        """The async engine, created on first access and reused."""
        if self._joined_engine is not None:
            return self._joined_engine  # type: ignore[no-any-return]
        if self._engine is None:
            self._engine = self.get_new_engine()
        return self._engine

    @property
    def cached_sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """The ``async_sessionmaker`` bound to :attr:`cached_engine`."""
        if self._joined is not None:
            return self._joined  # type: ignore[no-any-return]
        if self._sessionmaker is None:
            self._sessionmaker = self.get_new_sessionmaker(self.cached_engine)
        return self._sessionmaker

    def get_new_engine(self) -> AsyncEngine:
        """A new async engine with this maker's options (dead pooled connections replaced on checkout)."""
        try:
            kwargs = self._engine_kwargs()
            engine = create_async_engine(self.url, **kwargs)
        except sa.exc.NoSuchModuleError:
            raise unknown_driver(self.url, is_async=True, variable=self._variable) from None
        except ImportError as exc:
            raise missing_driver(self.url, exc.name, is_async=True, variable=self._variable) from None
        except sa.exc.InvalidRequestError:
            raise ConfigurationError(
                f"{self._variable} uses {self.url.drivername!r}, which is not an async driver: use "
                "e.g. postgresql+asyncpg, mysql+aiomysql or sqlite+aiosqlite (or leave the "
                "driver out)"
            ) from None
        install_liveness_check(engine.sync_engine, kwargs)
        if self.sqlite_foreign_keys:
            enforce_sqlite_foreign_keys(engine.sync_engine)
        return engine

    def get_new_sessionmaker(self, engine: AsyncEngine | None) -> async_sessionmaker[AsyncSession]:
        """A new ``async_sessionmaker`` bound to ``engine`` (the cached engine when ``None``)."""
        return async_sessionmaker(bind=engine or self.cached_engine, **self.session_options)

    async def get_db(self) -> AsyncIterator[AsyncSession]:
        """Generator dependency in the fastapi-utils style: commit after the endpoint.

        Under a plain ``Depends`` the commit runs after the response; after :meth:`init_app` it
        yields the request's session (the one ``AsyncDBSession`` gets), committed before the
        response.
        """
        state = current_state()
        if state is not None:  # the guard commits (or rolls back) the request's one session
            yield state.share(self)
            return
        async with self._unit_of_work(self.cached_sessionmaker(), commit=True) as session:
            yield session

    @contextlib.asynccontextmanager
    async def context_session(self) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` for code outside requests, with the same commit policy.

        Example:
            >>> import asyncio
            >>> async def main() -> int:
            ...     db = AsyncFastAPISessionMaker("sqlite://")
            ...     async with db.context_session() as session:
            ...         value = (await session.execute(sa.text("SELECT 1"))).scalar_one()
            ...     await db.dispose()
            ...     return value
            >>> asyncio.run(main())
            1
        """
        commit = self.policy.should_commit(status=None, raised=False)
        async with self._unit_of_work(self.cached_sessionmaker(), commit=commit) as session:
            yield session

    @contextlib.asynccontextmanager
    async def task_session(self, *, policy: CommitPolicy | str | None = None) -> AsyncIterator[AsyncSession]:
        """A short-lived session of its own for one of several concurrent tasks.

        One ``AsyncSession`` runs one operation at a time, so tasks started with
        ``asyncio.gather`` or a task group must not share the request's session (that raises
        :class:`ConcurrentSessionUseError`). Each task opens its own session here, on its own
        connection: it commits when the block ends without an exception (under ``AUTO``), rolls
        back otherwise, and is closed, shielded from cancellation. It is its own unit of work:
        it commits when the task succeeds, whatever the response status turns out to be.

        Args:
            policy: The commit policy; by default the one of this request's session of this maker
                (e.g. ``READ_ONLY`` under ``depends(policy="read_only")``), else the maker's.

        Example:
            >>> import asyncio
            >>> async def main() -> list[int]:
            ...     db = AsyncFastAPISessionMaker("sqlite:///./tasks.db")
            ...     async def one(n: int) -> int:
            ...         async with db.task_session() as session:
            ...             result = await session.execute(sa.text("SELECT :n"), {"n": n})
            ...             return int(result.scalar_one())
            ...     values = await asyncio.gather(one(1), one(2), one(3))
            ...     await db.dispose()
            ...     return values
            >>> asyncio.run(main())
            [1, 2, 3]
        """
        chosen = self._task_policy() if policy is None else CommitPolicy(policy)
        commit = chosen.should_commit(status=None, raised=False)
        async with self._unit_of_work(self._new_request_session(chosen), commit=commit) as session:
            yield session

    @contextlib.asynccontextmanager
    async def _unit_of_work(self, session: AsyncSession, *, commit: bool) -> AsyncIterator[AsyncSession]:
        """Yield ``session``; then commit (or roll back when ``commit`` is False), roll back on
        error, and always close, each run to completion even if the task is cancelled. The one
        async rule for sessions outside the request guard (the twin of ``_sync.unit_of_work``)."""
        try:
            yield session
        except BaseException:
            await run_to_completion(self._end_unit, session, False)
            raise
        await run_to_completion(self._end_unit, session, commit)

    async def _end_unit(self, session: AsyncSession, commit: bool) -> None:
        try:
            await self._end_transaction(session, commit)
        finally:
            await self._close_session(session)

    async def reset_cache(self) -> None:
        """Forget the cached engine and sessionmaker, disposing the old engine's pool."""
        await self.dispose()

    async def dispose(self) -> None:
        """Close the pool's connections and forget the engine; the next use makes a new one."""
        engine, self._engine, self._sessionmaker = self._engine, None, None
        self._reset_limiter()
        if engine is not None:
            await engine.dispose()

    async def check_connection(self) -> None:
        """Run ``SELECT 1``; raise :class:`DatabaseUnavailableError` with a one-line reason."""
        try:
            async with self.cached_engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise unavailable(self, exc) from exc

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Check the database at start-up, dispose the pool at shutdown (``init_app`` uses it)."""
        await self.check_connection()
        try:
            yield
        finally:
            await self.dispose()

    async def _adispose(self) -> None:
        await self.dispose()

    # -- testing ---------------------------------------------------------------------------
    def _join(self, connection: AsyncConnection | None) -> None:
        """Hand out sessions joined to ``connection`` (``None``: back to the maker's own engine).

        Used by :mod:`fastapi_sessionmaker.testing`; see the sync twin.
        """
        if connection is None:
            self._joined = self._joined_engine = self._joined_limiter = None
            return
        options = {**self.session_options, "join_transaction_mode": "create_savepoint"}
        self._joined = async_sessionmaker(bind=connection, **options)
        self._joined_engine = connection.engine
        self._joined_limiter = Limiter(1, 30.0)  # one connection: one request session at a time

    # -- request sessions ------------------------------------------------------------------
    def _new_request_session(self, policy: CommitPolicy) -> AsyncSession:
        factory = self.cached_sessionmaker
        sync_class = compose(
            factory.kw.get("sync_session_class") or Session, policy is CommitPolicy.READ_ONLY
        )
        return factory.class_(**{**factory.kw, "sync_session_class": sync_class, "close_resets_only": False})

    def _request_limiter(self) -> Limiter | None:
        if self._joined_limiter is not None:
            return self._joined_limiter
        # Async requests wait for the pool on the event loop already; only a single shared
        # connection (SQLite in memory) must be handed to one session at a time.
        if not self._limiter_ready:
            pool = self.cached_engine.sync_engine.pool
            self._limiter = Limiter(1, 30.0) if isinstance(pool, StaticPool) else None
            self._limiter_ready = True
        return self._limiter

    async def _end_transaction(self, session: AsyncSession, commit: bool) -> None:
        if isinstance(session, SerialAsyncSession) and session._fsm_running is not None:
            await session._wait_idle()  # a task still running on the session: let it end first
        if not session.in_transaction():
            return
        if not commit:
            await session.rollback()
            return
        try:
            await session.commit()
        except BaseException:
            await session.rollback()
            raise

    async def _close_session(self, session: AsyncSession) -> None:
        if isinstance(session, SerialAsyncSession) and session._fsm_running is not None:
            await session._wait_idle()
        if session.in_transaction():
            await session.close()
        else:
            # No transaction, so no connection: closing does no I/O and needs no greenlet
            # (one fewer greenlet switch per request, measured in benchmarks/).
            session.sync_session.close()
