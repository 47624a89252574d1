"""What the sync and async makers share: URL checks, engine defaults, the pool-sized limiter."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import select
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from fastapi_sessionmaker._fastapi import ErrorMapper, chain_lifespan, dependency_for, registry_for
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fastapi_sessionmaker._settings import DatabaseSettings

# The driver used when the URL names none, per (backend, async), with the extra that installs it.
_DEFAULT_DRIVERS: dict[tuple[str, bool], str] = {
    ("postgresql", False): "psycopg",
    ("postgresql", True): "asyncpg",
    ("mysql", False): "pymysql",
    ("mysql", True): "aiomysql",
    ("mariadb", False): "pymysql",
    ("mariadb", True): "aiomysql",
    ("sqlite", False): "pysqlite",
    ("sqlite", True): "aiosqlite",
}
_ASYNC_FALLBACK = {("postgresql", True): "psycopg"}  # psycopg 3 is async too
_DRIVER_MODULES = {
    "psycopg": ("psycopg", "postgres"),
    "psycopg2": ("psycopg2", "psycopg2-binary (not an extra: pip install psycopg2-binary)"),
    "asyncpg": ("asyncpg", "asyncpg"),
    "pymysql": ("pymysql", "mysql"),
    "aiomysql": ("aiomysql", "mysql"),
    "asyncmy": ("asyncmy", "asyncmy (not an extra: pip install asyncmy)"),
    "aiosqlite": ("aiosqlite", "aiosqlite"),
    "pysqlite": ("sqlite3", "none: sqlite3 ships with Python"),
}
_KNOWN_BACKENDS = ("postgresql", "mysql", "mariadb", "sqlite")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Drivers that only work with one twin: a sync driver under the async maker or the reverse.
_ASYNC_ONLY_DRIVERS = frozenset({"asyncpg", "aiomysql", "asyncmy", "aiosqlite", "psycopg_async"})
_SYNC_ONLY_DRIVERS = frozenset(
    {"psycopg2", "psycopg2cffi", "pg8000", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"}
    | {"cymysql", "pysqlite", "pysqlcipher", "pyodbc"}
)


def parse_url(database_uri: str | URL, *, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri`` and check its dialect; :class:`ConfigurationError` naming ``variable``."""
    try:
        url = make_url(database_uri)
    except (sa.exc.ArgumentError, ValueError):
        # ValueError: e.g. a port that is not a number. Never echo the value: it may hold a password.
        raise ConfigurationError(
            f"{variable} is not a valid database URL (expected e.g. "
            "'postgresql://user:password@host:5432/name' or 'sqlite:///./app.db')"
        ) from None
    backend = url.get_backend_name()
    if backend not in _KNOWN_BACKENDS:
        raise ConfigurationError(
            f"{variable} names an unknown database dialect {backend!r}: use one of "
            + ", ".join(_KNOWN_BACKENDS)
        )
    return url


def resolve_url(database_uri: str | URL, *, is_async: bool, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri`` and fill in an installed driver when it names none.

    ``postgresql://`` becomes ``postgresql+psycopg://`` (sync) or ``postgresql+asyncpg://`` (async,
    psycopg when asyncpg is missing), ``mysql://`` and ``mariadb://`` use PyMySQL / aiomysql and
    ``sqlite://`` aiosqlite when async, so one ``DATABASE_URI`` serves both twins.
    """
    url = parse_url(database_uri, variable=variable)
    backend = url.get_backend_name()
    driver = url.get_driver_name() if "+" in url.drivername else None
    if driver is None:
        driver = _DEFAULT_DRIVERS[(backend, is_async)]
        fallback = _ASYNC_FALLBACK.get((backend, is_async))
        if fallback and not _installed(_DRIVER_MODULES[driver][0]) and _installed(fallback):
            driver = fallback
        url = url.set(drivername=f"{backend}+{driver}")
    wrong_twin = _SYNC_ONLY_DRIVERS if is_async else _ASYNC_ONLY_DRIVERS
    if driver in wrong_twin:
        kind, maker = (
            ("a sync", "AsyncFastAPISessionMaker") if is_async else ("an async", "FastAPISessionMaker")
        )
        suggested = f"{backend}+{_DEFAULT_DRIVERS[(backend, is_async)]}"
        raise ConfigurationError(
            f"{variable} uses {backend}+{driver}, {kind} driver, with {maker}: use {suggested}, "
            f"or leave the driver out ({backend}://...) and each maker picks its own"
        )
    module_extra = _DRIVER_MODULES.get(driver)
    if module_extra is not None and not _installed(module_extra[0]):
        module, extra = module_extra
        hint = f"pip install 'fastapi-sessionmaker[{extra}]'" if " " not in extra else extra
        raise ConfigurationError(
            f"{variable} uses the {backend}+{driver} driver, but {module!r} is not installed: {hint}"
        )
    return url


def unknown_driver(url: URL, *, is_async: bool, variable: str = "DATABASE_URI") -> ConfigurationError:
    """The one-line error for a driver SQLAlchemy has no dialect for, naming the usual one."""
    backend = url.get_backend_name()
    suggested = f"{backend}+{_DEFAULT_DRIVERS[(backend, is_async)]}"
    return ConfigurationError(
        f"{variable} names a driver SQLAlchemy does not know: {url.drivername!r}: use {suggested}, "
        f"or leave the driver out ({backend}://...)"
    )


def engine_kwargs(url: URL, options: Mapping[str, Any], *, is_async: bool) -> dict[str, Any]:
    """Our defaults under the caller's options: SQLite in memory on one connection.

    ``pool_pre_ping`` is not set: unless the caller sets it, :func:`install_liveness_check` gives
    the same protection for a fraction of the cost (``pool_pre_ping=True`` asks for SQLAlchemy's
    ping on every checkout, ``False`` for no check at all).
    """
    kwargs: dict[str, Any] = {}
    memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if url.get_backend_name() == "sqlite" and memory:  # also "file:name?mode=memory&uri=true"
        # One shared in-memory database; the maker's limiter gives the one connection to one
        # session at a time, so a request never sees (or commits) another request's work.
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False}
    kwargs.update(options)
    if kwargs.get("echo"):
        kwargs.setdefault("hide_parameters", True)  # SQL echo never prints bound values by default
    return kwargs


_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def _poller(fd: int) -> Callable[[], bool]:
    poller = select.poll()  # not select.select(): it fails for descriptors above 1023
    poller.register(fd, _READABLE)
    return lambda: bool(poller.poll(0))


def _dead_probe(dbapi_connection: Any) -> Callable[[], bool] | None:
    """A cheap "was this idle connection closed by the server?" test, or None if unknown.

    An idle database connection has nothing to say: a readable socket means the server closed it
    (or is closing it). Built once per DBAPI connection.
    """
    inner = getattr(dbapi_connection, "_connection", None)  # SQLAlchemy's async adapters
    for candidate in (dbapi_connection, inner):
        if candidate is None:
            continue
        transport = getattr(candidate, "_transport", None)  # asyncpg
        if transport is None:
            transport = getattr(getattr(candidate, "_writer", None), "transport", None)  # aiomysql
        if transport is not None:
            sock = transport.get_extra_info("socket")
            readable = _poller(sock.fileno()) if sock is not None else (lambda: False)
            return lambda: transport.is_closing() or readable()
        sock = getattr(candidate, "_sock", None)  # PyMySQL
        if sock is not None:
            readable = _poller(sock.fileno())
            return lambda: candidate._sock is None or readable()
        fileno = getattr(candidate, "fileno", None)  # psycopg 3
        if callable(fileno) and hasattr(candidate, "closed"):
            readable = _poller(fileno())
            return lambda: bool(candidate.closed) or readable()
    return None


def install_liveness_check(engine: sa.Engine, kwargs: Mapping[str, Any]) -> None:
    """Check each pooled connection on checkout without a round trip to the database.

    When an idle connection's socket is readable or closed, the server has closed it (restart,
    ``pg_terminate_backend``, ``wait_timeout``): the pool replaces it, and the connections older
    than it, before any statement fails. Drivers whose socket cannot be reached get SQLAlchemy's
    ping instead. SQLite needs no check. An explicit ``pool_pre_ping`` in ``kwargs`` wins.
    """
    if engine.dialect.name == "sqlite" or "pool_pre_ping" in kwargs:
        return
    dialect = engine.dialect

    def liveness_check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        cached = record.info.get("fastapi_sessionmaker.probe")
        if cached is None or cached[0] is not dbapi_connection:
            cached = (dbapi_connection, _dead_probe(dbapi_connection))
            record.info["fastapi_sessionmaker.probe"] = cached
        probe = cached[1]
        if probe is None:
            if not dialect.do_ping(dbapi_connection):  # pragma: no cover - do_ping raises or True
                raise sa.exc.InvalidatePoolError("the database did not answer a ping")
        elif probe():
            raise sa.exc.InvalidatePoolError("the database closed this connection while it was idle")

    sa.event.listen(engine, "checkout", liveness_check)


def checks_liveness(engine: sa.Engine) -> bool:
    """Whether dead pooled connections of ``engine`` are caught on checkout (ours or pre-ping)."""
    return bool(engine.pool._pre_ping) or any(
        getattr(listener, "__name__", "") == "liveness_check" for listener in engine.pool.dispatch.checkout
    )


def pool_capacity(engine: sa.Engine) -> int | None:
    """How many connections ``engine``'s pool can hand out at once (None: no fixed limit)."""
    pool = engine.pool
    if isinstance(pool, StaticPool):
        return 1
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if callable(size) and isinstance(overflow, int):
        capacity = size()
        if overflow < 0 or capacity <= 0:
            return None
        return int(capacity) + overflow
    return None


class Limiter:
    """An asyncio semaphore sized to the pool, taken *before* a sync request enters a worker thread.

    Requests beyond the pool's capacity wait on the event loop (up to ``pool_timeout``), not in a
    worker thread blocked on the pool: the threads that hold connections can always get the
    thread hops they need to give them back, so the pool cannot deadlock. One semaphore per event
    loop (test clients start a loop per request).
    """

    __slots__ = ("_semaphores", "capacity", "timeout")

    def __init__(self, capacity: int, timeout: float) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._semaphores = weakref.WeakKeyDictionary()

    async def acquire(self) -> asyncio.Semaphore:
        """Wait for a free slot; ``sqlalchemy.exc.TimeoutError`` after ``pool_timeout`` seconds.

        Returns the semaphore to release.
        """
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores.setdefault(loop, asyncio.Semaphore(self.capacity))
        if not semaphore.locked():
            await semaphore.acquire()
            return semaphore
        try:
            await asyncio.wait_for(semaphore.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise sa.exc.TimeoutError(
                f"no database connection became free within {self.timeout:g} s "
                f"(pool capacity {self.capacity})"
            ) from None
        return semaphore


def dependency_of(alias: Any) -> Callable[..., Any]:
    """The callable behind a session dependency: the key to use in ``app.dependency_overrides``.

    ``alias`` is an ``Annotated[..., Depends(...)]`` alias (:data:`DBSession`,
    :data:`AsyncDBSession`, one of your own) or a ``Depends`` (``db.dependency``,
    ``db.depends(policy=...)``). Each is a different dependency: override the one your endpoints take.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi_sessionmaker import DBSession, dependency_of
        >>> app = FastAPI()
        >>> app.dependency_overrides[dependency_of(DBSession)] = lambda: "a session of your own"
    """
    from fastapi import params

    for candidate in getattr(alias, "__metadata__", (alias,)):
        if isinstance(candidate, params.Depends) and candidate.dependency is not None:
            return candidate.dependency
    raise TypeError(
        f"dependency_of({alias!r}): expected Depends(...) or an Annotated[..., Depends(...)] alias "
        "such as DBSession"
    )


class MakerBase:
    """Configuration shared by :class:`FastAPISessionMaker` and its async twin."""

    is_async: bool = False

    def __init__(
        self,
        database_uri: str | URL | None = None,
        *,
        settings: DatabaseSettings | None = None,
        name: str = "default",
        policy: CommitPolicy | str = CommitPolicy.AUTO,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        if database_uri is None and settings is None:
            from fastapi_sessionmaker._settings import DatabaseSettings

            settings = DatabaseSettings()
        options: dict[str, Any] = {}
        if settings is not None:
            if database_uri is None:
                database_uri = settings.url()
            options.update(settings.engine_options())
        if database_uri is None:  # pragma: no cover - settings always give a URL
            raise ConfigurationError("DATABASE_URI is not set")
        options.update(engine_options or {})
        self.database_uri = database_uri
        self.name = name
        self.policy = CommitPolicy(policy)
        self.engine_options: dict[str, Any] = options
        self.session_options: dict[str, Any] = {"expire_on_commit": False}
        self.session_options.update(session_options or {})
        self._url: URL | None = None
        self._limiter: Limiter | None = None
        self._limiter_ready = False
        self._dependencies: dict[CommitPolicy | None, Any] = {}
        # Set by ``fastapi_sessionmaker.testing`` while a test runs: every session this maker hands
        # out joins the test's connection (``join_transaction_mode="create_savepoint"``).
        self._joined: Any = None
        self._joined_engine: Any = None
        self._joined_limiter: Limiter | None = None
        self.dependency: Any = self.depends()
        """``Depends`` for the request session: ``Annotated[Session, db.dependency]``."""

    @property
    def url(self) -> URL:
        """The resolved URL (driver filled in); render it with ``hide_password=True``."""
        if self._url is None:
            self._url = resolve_url(self.database_uri, is_async=self.is_async)
        return self._url

    def safe_url(self) -> str:
        """The URL as text with the password masked: safe for logs and errors."""
        try:
            return self.url.render_as_string(hide_password=True)
        except ConfigurationError:
            return "<invalid DATABASE_URI>"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.safe_url()!r}, name={self.name!r})"

    def _engine_kwargs(self) -> dict[str, Any]:
        return engine_kwargs(self.url, self.engine_options, is_async=self.is_async)

    def _reset_limiter(self) -> None:
        self._limiter = None
        self._limiter_ready = False

    def depends(self, *, policy: CommitPolicy | str | None = None) -> Any:
        """A ``Depends`` for this maker's request session, optionally with its own policy.

        Example:
            >>> from typing import Annotated
            >>> from sqlalchemy.orm import Session
            >>> from fastapi_sessionmaker import FastAPISessionMaker
            >>> db = FastAPISessionMaker("sqlite://")
            >>> ReadSession = Annotated[Session, db.depends(policy="read_only")]
        """
        key = None if policy is None else CommitPolicy(policy)
        if key not in self._dependencies:
            self._dependencies[key] = Depends(dependency_for(lambda state: self, key))
        return self._dependencies[key]

    def init_app(
        self,
        app: FastAPI,
        *,
        check_on_startup: bool = True,
        error_mapper: ErrorMapper | None = None,
    ) -> None:
        """Install this maker on ``app``: commit before the response, map errors, lifespan.

        Adds the request guard (once per app), makes this maker the default for
        :data:`DBSession`, and runs :meth:`lifespan` around the app's own lifespan.

        Args:
            app: The FastAPI application.
            check_on_startup: Fail start-up with a one-line error when the database is down.
            error_mapper: Turns a database error into a :class:`Problem` (or ``None``).
        """
        registry = registry_for(app, error_mapper=error_mapper)
        registry.add(self)
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
        from fastapi_sessionmaker._fastapi import current_state

        state = current_state()
        if state is not None:
            for entry in state.entries:
                if entry.maker is self and entry.shared:
                    return entry.policy
        return self.policy

    # The guard's view of a maker (see ``_fastapi.RequestMaker``); each twin implements these.
    def _new_request_session(self, policy: CommitPolicy) -> Any:
        raise NotImplementedError

    def _request_limiter(self) -> Limiter | None:
        raise NotImplementedError

    async def _end_transaction(self, session: Any, commit: bool) -> None:
        raise NotImplementedError

    async def _close_session(self, session: Any) -> None:
        raise NotImplementedError
