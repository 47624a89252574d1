"""The async twin: ``AsyncSession`` per request with the same names and the same rule."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from fastapi_sessionmaker._base import MakerBase
from fastapi_sessionmaker._engines import enforce_sqlite_foreign_keys
from fastapi_sessionmaker._fork import fork_safe
from fastapi_sessionmaker._liveness import install_liveness_check
from fastapi_sessionmaker._multidb import discard_on_failed_prepare, in_doubt, resolve_in_doubt
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._retry import run_async
from fastapi_sessionmaker._sessions import compose_async
from fastapi_sessionmaker._sqlite import install_writer_queue, skip_idle_ends, terminate_in_order
from fastapi_sessionmaker._sync import unavailable
from fastapi_sessionmaker._unit import AsyncLifecycle
from fastapi_sessionmaker._urls import missing_driver, unknown_driver
from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import IsolationLevel

__all__ = ["AsyncFastAPISessionMaker"]

T = TypeVar("T")


class AsyncFastAPISessionMaker(MakerBase[AsyncEngine, async_sessionmaker[AsyncSession]]):
    """The async twin of :class:`FastAPISessionMaker`: the same names, ``AsyncSession`` inside.

    ``postgresql://`` uses asyncpg (psycopg 3 if asyncpg is missing), ``mysql://`` aiomysql,
    ``sqlite://`` aiosqlite, so one ``DATABASE_URI`` serves both twins. It takes the same
    arguments as :class:`FastAPISessionMaker`; ``session_class=`` takes an ``AsyncSession``
    subclass, e.g. SQLModel's ``sqlmodel.ext.asyncio.session.AsyncSession``.

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
        self.lifecycle: AsyncLifecycle = AsyncLifecycle(self)
        super().__init__(database_uri, **kwargs)
        self.session_options["class_"] = compose_async(self.session_options.get("class_", AsyncSession))

    def get_new_engine(self) -> AsyncEngine:
        """A new async engine with this maker's options (dead pooled connections replaced on checkout)."""
        return self._engine_for(self.url, self._variable)

    def _engine_for(self, url: sa.URL, variable: str) -> AsyncEngine:
        try:
            kwargs = self._engine_kwargs(url, variable)
            engine = create_async_engine(url, **kwargs)
        except sa.exc.NoSuchModuleError:
            raise unknown_driver(url, is_async=True, variable=variable) from None
        except ImportError as exc:
            raise missing_driver(url, exc.name, is_async=True, variable=variable) from None
        except sa.exc.InvalidRequestError:
            raise ConfigurationError(
                f"{variable} uses {url.drivername!r}, which is not an async driver: use "
                "e.g. postgresql+asyncpg, mysql+aiomysql or sqlite+aiosqlite (or leave the "
                "driver out)"
            ) from None
        install_liveness_check(engine.sync_engine, kwargs)
        if self.sqlite_foreign_keys:
            enforce_sqlite_foreign_keys(engine.sync_engine)
        skip_idle_ends(engine.sync_engine)
        install_writer_queue(engine.sync_engine, kwargs.get("connect_args"))
        terminate_in_order(engine.sync_engine)
        fork_safe(engine.sync_engine)
        if self.two_phase:
            discard_on_failed_prepare(engine.sync_engine)
        if self.observer is not None:
            self.observer.instrument(engine.sync_engine)
        return engine

    def get_new_sessionmaker(self, engine: AsyncEngine | None) -> async_sessionmaker[AsyncSession]:
        """A new ``async_sessionmaker`` bound to ``engine`` (the cached engine when ``None``)."""
        return async_sessionmaker(bind=engine or self.cached_engine, **self.session_options)

    def _sessionmaker_class(self) -> type[async_sessionmaker[AsyncSession]]:
        return async_sessionmaker

    @property
    def session(self) -> AsyncSession:
        """The current request's session, in an endpoint declared with :meth:`with_session`
        (or in a dependency of it); :class:`NotInstalledError` anywhere else.

        Example:
            >>> from fastapi import FastAPI
            >>> db = AsyncFastAPISessionMaker("sqlite://")
            >>> app = FastAPI()
            >>> db.init_app(app)
            >>> @app.get("/answer")
            ... @db.with_session
            ... async def answer() -> int:
            ...     return (await db.session.execute(sa.text("SELECT 42"))).scalar_one()
        """
        session: AsyncSession = self._request_session()
        return session

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
        async with self.lifecycle.unit(self.cached_sessionmaker(), commit=True) as session:
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
        async with self.lifecycle.unit(self.cached_sessionmaker(), commit=commit) as session:
            yield session

    async def run_in_transaction(
        self,
        fn: Callable[[AsyncSession], Awaitable[T]],
        /,
        *,
        attempts: int = 5,
        isolation_level: IsolationLevel | None = None,
    ) -> T:
        """Run ``await fn(session)`` in a transaction of its own, again after a serialization
        failure or a deadlock; return what it returned once the transaction committed.

        The async twin of ``FastAPISessionMaker.run_in_transaction``: a fresh ``AsyncSession``
        and transaction from :meth:`context_session` each attempt, ``attempts`` at most, a
        jittered exponential backoff between them (``asyncio.sleep``: the event loop goes on),
        the last error re-raised unchanged, any other error at once.

        Args:
            fn: The work: a coroutine function taking the session.
            attempts: How many times ``fn`` may run in all (1: no retry).
            isolation_level: This transaction's level, e.g. ``"SERIALIZABLE"``; not applied
                while the maker is joined to a test's transaction.

        Example:
            >>> import asyncio
            >>> async def main() -> int:
            ...     db = AsyncFastAPISessionMaker("sqlite://")
            ...     async def count(session: AsyncSession) -> int:
            ...         return (await session.execute(sa.text("SELECT 41 + 1"))).scalar_one()
            ...     value = await db.run_in_transaction(count, isolation_level="SERIALIZABLE")
            ...     await db.dispose()
            ...     return value
            >>> asyncio.run(main())
            42
        """
        level = None if self._joined is not None else isolation_level
        return await run_async(
            self.context_session, fn, attempts=attempts, isolation_level=level, database=self.name
        )

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
        async with self.lifecycle.unit(self.lifecycle.open(chosen), commit=commit) as session:
            yield session

    async def reset_cache(self) -> None:
        """Forget the cached engine and sessionmaker, disposing the old engine's pool."""
        await self.dispose()

    async def dispose(self) -> None:
        """Close the pool's connections and forget the engine; the next use makes a new one."""
        if self.replicas is not None:
            await self.replicas.adispose()
        engine = self._forget()
        if engine is not None:
            await engine.dispose()

    async def in_doubt(self) -> list[str]:
        """The ids of the prepared (two-phase) transactions waiting on this database's server
        (the twin of ``FastAPISessionMaker.in_doubt``)."""
        async with self.cached_engine.connect() as connection:
            return await connection.run_sync(in_doubt)

    async def resolve_in_doubt(self, xid: str, *, commit: bool = True) -> None:
        """Commit (or with ``commit=False`` roll back) the prepared transaction ``xid``."""
        async with self.cached_engine.connect() as connection:
            await connection.run_sync(resolve_in_doubt, xid, commit)

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
