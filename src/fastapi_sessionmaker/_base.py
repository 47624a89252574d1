"""What the sync and async makers share without I/O: configuration, the cached engine and
sessionmaker, the request dependencies, joining a test's connection, and the pool-sized limiter."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.engine import URL

from fastapi_sessionmaker._engines import engine_kwargs
from fastapi_sessionmaker._guard import chain_lifespan, registry_for
from fastapi_sessionmaker._multidb import check_two_phase
from fastapi_sessionmaker._observe import Observer, make_observer
from fastapi_sessionmaker._pgbouncer import PgBouncerMode, check_pgbouncer
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._replicas import (
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_MAX_LAG,
    ReplicaSet,
    install_positions,
)
from fastapi_sessionmaker._request import (
    ErrorMapper,
    F,
    current_state,
    dependency_for,
    session_of,
    with_session,
)
from fastapi_sessionmaker._sessions import checked_session_class
from fastapi_sessionmaker._settings import DatabaseSettings
from fastapi_sessionmaker._urls import render_url, resolve_url
from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import TracerProvider

    from fastapi_sessionmaker.alembic import Migrations

__all__ = ["Limiter", "MakerBase"]


class Limiter:
    """An asyncio semaphore sized to the pool, taken *before* a sync request enters a worker thread.

    Requests beyond the pool's capacity wait on the event loop (up to ``pool_timeout``), not in a
    worker thread blocked on the pool: the threads that hold connections can always get the
    thread hops they need to give them back, so the pool cannot deadlock. One semaphore per event
    loop (test clients start a loop per request).

    With ``threads=True`` (sync request sessions) the semaphore is also kept below the event loop's
    worker-thread count (anyio's default limiter, read when the loop first asks): every request
    session can hold a thread while it waits on a database lock (a SQLite writer, a row lock), and
    the session holding that lock still needs a thread hop to commit it. With as many sessions as
    threads, the holder would wait for a thread that waits for it, until the database's lock
    timeout.
    """

    __slots__ = ("_semaphores", "capacity", "threads", "timeout")

    def __init__(self, capacity: int | None, timeout: float, *, threads: bool = False) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self.threads = threads
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._semaphores = weakref.WeakKeyDictionary()

    def size(self) -> int:
        """How many sessions may be open at once on the running event loop."""
        if not self.threads:
            assert self.capacity is not None
            return self.capacity
        spare = max(1, int(anyio.to_thread.current_default_thread_limiter().total_tokens) - 1)
        return spare if self.capacity is None else min(self.capacity, spare)

    async def acquire(self) -> asyncio.Semaphore:
        """Wait for a free slot; ``sqlalchemy.exc.TimeoutError`` after ``pool_timeout`` seconds.

        Returns the semaphore to release.
        """
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores.setdefault(loop, asyncio.Semaphore(self.size()))
        if not semaphore.locked():
            await semaphore.acquire()
            return semaphore
        try:
            await asyncio.wait_for(semaphore.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise sa.exc.TimeoutError(
                f"no database connection became free within {self.timeout:g} s ({self._describe()})"
            ) from None
        return semaphore

    def _describe(self) -> str:
        if not self.threads:
            return f"pool capacity {self.capacity}"
        threads = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
        pool = "no pool limit" if self.capacity is None else f"pool capacity {self.capacity}"
        return (
            f"{self.size()} request sessions at once: {pool}, {threads} worker threads "
            "(anyio.to_thread.current_default_thread_limiter().total_tokens) less one"
        )


EngineT = TypeVar("EngineT")
FactoryT = TypeVar("FactoryT")


class MakerBase(Generic[EngineT, FactoryT]):
    """What :class:`FastAPISessionMaker` and its async twin share without I/O: configuration, the
    cached engine and sessionmaker, the request dependencies, joining a test's connection."""

    is_async: bool = False
    lifecycle: Any
    """The lifecycle of this maker's transactions (:mod:`._unit`): what the request guard calls."""

    def __init__(
        self,
        database_uri: str | URL | None = None,
        *,
        settings: DatabaseSettings | None = None,
        name: str = "default",
        policy: CommitPolicy | str = CommitPolicy.AUTO,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        session_class: type[Any] | None = None,
        sqlite_foreign_keys: bool = True,
        replica_uris: Sequence[str | URL] | None = None,
        replica_max_lag: int | None = DEFAULT_MAX_LAG,
        replica_check_interval: float = DEFAULT_CHECK_INTERVAL,
        pgbouncer: PgBouncerMode | None = None,
        two_phase: bool | None = None,
        stats: bool = False,
        slow_query_ms: float | None = None,
        slow_request_ms: float | None = None,
        tracing: bool | TracerProvider = False,
    ) -> None:
        if database_uri is None and settings is None:
            settings = DatabaseSettings.named(name)  # DATABASE_* or DATABASE_<NAME>_*
        options: dict[str, Any] = {}
        variable = "database_uri"  # errors name where the URL came from
        if settings is not None:
            if database_uri is None:
                database_uri = settings.url()
                variable = settings.variable("uri" if settings.uri is not None else "scheme")
            options.update(settings.engine_options())
            pgbouncer = pgbouncer or settings.pgbouncer
            if slow_query_ms is None:
                slow_query_ms = settings.slow_query_ms
            if slow_request_ms is None:
                slow_request_ms = settings.slow_request_ms
        if database_uri is None:  # pragma: no cover - settings always give a URL
            raise ConfigurationError("DATABASE_URI is not set")
        options.update(engine_options or {})
        self._url: URL | None = None
        self._assign_uri(database_uri, variable)  # a bad URL or driver fails here, not at first use
        self.name = name
        self.policy = CommitPolicy(policy)
        self.engine_options: dict[str, Any] = options
        self.sqlite_foreign_keys = sqlite_foreign_keys
        """Whether the maker's SQLite connections enforce foreign keys (``PRAGMA foreign_keys=ON``)."""
        self.pgbouncer: PgBouncerMode | None = check_pgbouncer(pgbouncer, self.url, variable=variable)
        """``"transaction"``: the engine's drivers are set up for PgBouncer in transaction mode."""
        self._engine_kwargs()  # an engine option the preset cannot take fails here, not at first use
        if two_phase is None:
            two_phase = settings.two_phase if settings is not None else False
        if two_phase:
            check_two_phase(self.url, variable=f"two_phase=True for database {name!r}")
        self.two_phase = two_phase
        """Whether a request writing to this and other databases prepares first (two-phase commit)."""
        # fastapi-utils' and the FastAPI tutorial's SessionLocal: no autoflush, no expiry on commit.
        self.session_options: dict[str, Any] = {"expire_on_commit": False, "autoflush": False}
        if two_phase:
            self.session_options["twophase"] = True
        self.session_options.update(session_options or {})
        if session_class is not None:
            if "class_" in self.session_options:
                raise ConfigurationError(
                    "give the session class once: session_class=... or session_options={'class_': ...}"
                )
            self.session_options["class_"] = checked_session_class(session_class, is_async=self.is_async)
        self.observer: Observer | None = make_observer(
            name=name,
            stats=stats,
            slow_query_ms=slow_query_ms,
            slow_request_ms=slow_request_ms,
            tracing=tracing,
        )
        """What this maker observes (``stats``, slow logs, ``tracing``); ``None``: nothing, at no cost."""
        if self.observer is not None:
            self.observer.trace_sessions(self.session_options, self.url, is_async=self.is_async)
        self._engine: EngineT | None = None
        self._sessionmaker: FactoryT | None = None
        # Creating the cached engine (and sessionmaker) on first use is one step for all threads:
        # threads racing on a new maker would otherwise each make an engine, and the ones that lose
        # keep the connection their thread used in a pool nobody disposes.
        self._cache_lock = threading.RLock()
        self._dependencies: dict[tuple[CommitPolicy | None, int], Any] = {}
        # Set by :meth:`join` while a test runs: every session this maker hands out joins the
        # test's connection (``join_transaction_mode="create_savepoint"``).
        self._joined: FactoryT | None = None
        self._joined_engine: EngineT | None = None
        self.dependency: Any = self.depends()
        """``Depends`` for the request session: ``Annotated[Session, db.dependency]``."""
        self.replicas: ReplicaSet | None = None
        """The read replicas (``replica_uris`` or ``DATABASE_REPLICA_URIS``), if any."""
        replica_variable = "replica_uris"
        if replica_uris is None and settings is not None:
            replica_uris, replica_variable = settings.replica_urls(), "DATABASE_REPLICA_URIS"
            if settings.replica_max_lag is not None:
                replica_max_lag = settings.replica_max_lag
            if settings.replica_check_interval is not None:
                replica_check_interval = settings.replica_check_interval
        if replica_uris:
            self.replicas = self._replica_set(
                replica_uris, replica_variable, replica_max_lag, replica_check_interval
            )

    def _replica_set(
        self, uris: Sequence[str | URL], variable: str, max_lag: int | None, check_interval: float
    ) -> ReplicaSet:
        if isinstance(uris, (str, URL)):
            raise ConfigurationError(f'{variable}: give a list of URLs, e.g. ["postgresql://replica1/db"]')
        urls = [resolve_url(uri, is_async=self.is_async, variable=variable) for uri in uris]
        for url in (self.url, *urls):
            if url.get_backend_name() != "postgresql":
                raise ConfigurationError(
                    f"{variable}: read replicas need PostgreSQL streaming standbys, but "
                    f"{render_url(url)} is {url.get_backend_name()}: leave {variable} out for it"
                )
        return ReplicaSet(
            urls,
            database=self.name,
            is_async=self.is_async,
            make_engine=lambda url: self._engine_for(url, variable),
            primary=lambda: self.cached_engine,
            max_lag=max_lag,
            check_interval=check_interval,
        )

    def _assign_uri(self, database_uri: str | URL, variable: str) -> None:
        self._url = resolve_url(database_uri, is_async=self.is_async, variable=variable)
        self._database_uri = database_uri
        self._variable = variable

    @property
    def database_uri(self) -> str | URL:
        """The database URL as given; assign a new one as with fastapi-utils.

        The new URL is checked at once (:class:`ConfigurationError` naming ``database_uri``) and
        :meth:`get_new_engine` uses it from then on. An engine already cached keeps its URL until
        :meth:`reset_cache` (or :meth:`dispose`) disposes it; the next :attr:`cached_engine` and
        :attr:`cached_sessionmaker` then use the new URL. Assigning alone closes nothing, so
        requests running on the old engine are not cut off.

        Example:
            >>> from fastapi_sessionmaker import FastAPISessionMaker
            >>> db = FastAPISessionMaker("sqlite:///./a.db")
            >>> db.database_uri = "sqlite:///./b.db"
            >>> db.reset_cache()
            >>> db.cached_engine.url.database
            './b.db'
            >>> db.dispose()
        """
        return self._database_uri

    @database_uri.setter
    def database_uri(self, value: str | URL) -> None:
        self._assign_uri(value, "database_uri")

    @property
    def url(self) -> URL:
        """The resolved URL of :attr:`database_uri` (driver filled in); show it with :meth:`safe_url`."""
        if self._url is None:  # pragma: no cover - resolved on assignment
            self._url = resolve_url(self._database_uri, is_async=self.is_async, variable=self._variable)
        return self._url

    def safe_url(self) -> str:
        """The URL as text with the password and secret query values masked: safe for logs and errors."""
        return render_url(self.url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.safe_url()!r}, name={self.name!r})"

    def _engine_kwargs(self, url: URL | None = None, variable: str | None = None) -> dict[str, Any]:
        """Engine options for ``url`` (default: the maker's); errors name ``variable`` (default:
        the maker's own, e.g. ``DATABASE_URI``; a replica's is ``replica_uris``)."""
        return engine_kwargs(
            url or self.url,
            self.engine_options,
            is_async=self.is_async,
            pgbouncer=self.pgbouncer,
            variable=variable or self._variable,
        )

    # -- the cached engine and sessionmaker (fastapi-utils names) ---------------------------
    @property
    def cached_engine(self) -> EngineT:
        """The engine, created on first access and reused (the test's while joined)."""
        if self._joined_engine is not None:
            return self._joined_engine
        engine = self._engine
        if engine is None:
            with self._cache_lock:
                if self._engine is None:
                    self._engine = self.get_new_engine()
                engine = self._engine
        return engine

    @property
    def cached_sessionmaker(self) -> FactoryT:
        """The sessionmaker bound to :attr:`cached_engine`, created on first access and reused."""
        if self._joined is not None:
            return self._joined
        factory = self._sessionmaker
        if factory is None:
            with self._cache_lock:
                if self._sessionmaker is None:
                    self._sessionmaker = self.get_new_sessionmaker(self.cached_engine)
                factory = self._sessionmaker
        return factory

    def get_new_engine(self) -> EngineT:
        """A new engine with this maker's options."""
        return self._engine_for(self.url, self._variable)

    def _engine_for(self, url: URL, variable: str) -> EngineT:
        raise NotImplementedError

    def get_new_sessionmaker(self, engine: EngineT | None) -> FactoryT:
        """A new sessionmaker bound to ``engine`` (the cached engine when ``None``)."""
        raise NotImplementedError

    def _forget(self) -> EngineT | None:
        """Forget the cached engine and sessionmaker (the caller disposes the engine returned)."""
        with self._cache_lock:
            engine, self._engine, self._sessionmaker = self._engine, None, None
        self.lifecycle.slot.reset()
        return engine

    # -- testing ---------------------------------------------------------------------------
    def join(self, connection: Any = None, *, engine: Any = None) -> None:
        """Hand out sessions joined to ``connection`` (a test's transaction) until :meth:`leave`.

        The app's commits then release SAVEPOINTs inside the test's outer transaction, which the
        test rolls back; one session at a time uses the connection. With only ``engine``, the
        maker uses that engine (the testing plugin's start-up check). Used by
        :mod:`fastapi_sessionmaker.testing`; call it for a maker the plugin does not install.
        """
        if connection is None:
            self._joined, self._joined_engine = None, engine
            self.lifecycle.slot.join(False)
            return
        options = {**self.session_options, "join_transaction_mode": "create_savepoint"}
        self._joined = self._sessionmaker_class()(bind=connection, **options)
        self._joined_engine = connection.engine
        self.lifecycle.slot.join(True)

    def leave(self) -> None:
        """Stop handing out sessions joined to a test's connection (see :meth:`join`)."""
        self._joined = self._joined_engine = None
        self.lifecycle.slot.join(False)

    def _sessionmaker_class(self) -> Any:
        raise NotImplementedError

    def depends(self, *, policy: CommitPolicy | str | None = None, retries: int = 0) -> Any:
        """A ``Depends`` for this maker's request session, optionally with its own policy.

        Args:
            policy: The commit policy of this endpoint's session (default: the maker's).
            retries: Re-run the whole request up to this many times when a serialization
                failure or deadlock (see :func:`is_retryable`) rolls it back *before* the status
                line was sent (in the endpoint or at the commit), with a jittered backoff. The
                request body is replayed; nothing is ever retried after the response started.

        Example:
            >>> from typing import Annotated
            >>> from sqlalchemy.orm import Session
            >>> from fastapi_sessionmaker import FastAPISessionMaker
            >>> db = FastAPISessionMaker("sqlite://")
            >>> ReadSession = Annotated[Session, db.depends(policy="read_only")]
            >>> RetriedSession = Annotated[Session, db.depends(retries=3)]
        """
        if retries < 0:
            raise ValueError(f"retries={retries}: give 0 (no retry) or more")
        key = (None if policy is None else CommitPolicy(policy), retries)
        if key not in self._dependencies:
            self._dependencies[key] = Depends(dependency_for(lambda state: self, key[0], retries))
        return self._dependencies[key]

    @overload
    def with_session(self, endpoint: F, /) -> F: ...

    @overload
    def with_session(
        self, endpoint: None = None, /, *, policy: CommitPolicy | str | None = None, retries: int = 0
    ) -> Callable[[F], F]: ...

    def with_session(
        self,
        endpoint: F | None = None,
        /,
        *,
        policy: CommitPolicy | str | None = None,
        retries: int = 0,
    ) -> F | Callable[[F], F]:
        """Declare that an endpoint uses this maker's request session as :attr:`session`, without
        a dependency (the style of fastapi-async-sqlalchemy's ``db.session``).

        Written below the route decorator. The route's guard opens the session before the route
        runs (its dependencies can use it too) and commits it before the status line exactly like
        a ``DBSession`` parameter (the same session, if the route takes both). FastAPI solves no
        dependency for it, which saves about 15 µs per request (``benchmarks/dependency_cost.py``).
        An exception raised through the endpoint rolls back, whatever response a handler makes
        of it. The route must exist when the app starts (the guard is installed then). A sync
        maker's session waits for a request body to be complete, as a ``DBSession`` parameter
        does, so a slow upload holds no pool slot.

        Args:
            endpoint: The endpoint (the decorator written without arguments).
            policy: The commit policy of this endpoint's session (default: the maker's).
            retries: As in :meth:`depends`: re-run the request after a serialization failure or
                deadlock that rolled it back before the status line was sent.

        Example:
            >>> from fastapi import FastAPI
            >>> from fastapi_sessionmaker import FastAPISessionMaker
            >>> db = FastAPISessionMaker("sqlite://")
            >>> app = FastAPI()
            >>> db.init_app(app)
            >>> @app.get("/answer")
            ... @db.with_session
            ... def answer() -> int:
            ...     return db.session.execute(sa.text("SELECT 42")).scalar_one()
        """
        if retries < 0:
            raise ValueError(f"retries={retries}: give 0 (no retry) or more")
        declared = (self, None if policy is None else CommitPolicy(policy), retries)

        def decorate(function: F) -> F:
            return with_session(function, declared)

        return decorate if endpoint is None else decorate(endpoint)

    def _request_session(self) -> Any:
        return session_of(self)

    def init_app(
        self,
        app: FastAPI,
        *,
        check_on_startup: bool = True,
        error_mapper: ErrorMapper | None = None,
        migrations: Migrations | None = None,
    ) -> None:
        """Install this maker on ``app``: commit before the response, map errors, lifespan.

        Adds the request guard (once per app), makes this maker the default for
        :data:`DBSession`, and runs :meth:`lifespan` around the app's own lifespan.

        Args:
            app: The FastAPI application.
            check_on_startup: Fail start-up with a one-line error when the database is down.
            error_mapper: Turns a database error into a :class:`Problem` (or ``None``).
            migrations: Run (or check) Alembic's migrations at start-up, under a database lock,
                and report a schema behind head as not ready (:mod:`fastapi_sessionmaker.alembic`).
        """
        registry = registry_for(app, error_mapper=error_mapper)
        registry.add(self)
        if migrations is not None:  # chained first: it runs after the start-up check, inside it
            migrations.install(app, self)
        if self.replicas is not None:  # read-your-writes headers (outside the guard)
            install_positions(app, self)
        if self.observer is not None:
            self.observer.install(registry)
        chain_lifespan(app, self.lifespan if check_on_startup else self._dispose_at_shutdown)

    @contextlib.asynccontextmanager
    async def _dispose_at_shutdown(self, app: Any = None) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self._adispose()

    def lifespan(self, app: Any = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Check the database at start-up and dispose the pool at shutdown."""
        raise NotImplementedError

    async def _adispose(self) -> None:
        raise NotImplementedError

    def _task_policy(self) -> CommitPolicy:
        """The policy of this request's session of this maker, else the maker's (``task_session``)."""
        state = current_state()
        if state is not None:
            for entry in state.entries:
                if entry.maker is self:
                    return entry.policy
        return self.policy
