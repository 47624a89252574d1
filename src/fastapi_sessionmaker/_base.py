"""What the sync and async makers share: URL checks, engine defaults, the pool-sized limiter."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import select
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote, quote_plus

import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from fastapi_sessionmaker._guard import chain_lifespan, registry_for
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import ErrorMapper, current_state, dependency_for
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
# The DBAPI module of each driver and the fix when it is missing (an extra, or the package).
_DRIVER_MODULES = {
    "psycopg": ("psycopg", "pip install 'fastapi-sessionmaker[postgres]'"),
    "psycopg2": ("psycopg2", "pip install psycopg2-binary (not an extra)"),
    "pg8000": ("pg8000", "pip install pg8000 (not an extra)"),
    "asyncpg": ("asyncpg", "pip install 'fastapi-sessionmaker[asyncpg]'"),
    "pymysql": ("pymysql", "pip install 'fastapi-sessionmaker[mysql]'"),
    "aiomysql": ("aiomysql", "pip install 'fastapi-sessionmaker[mysql]'"),
    "asyncmy": ("asyncmy", "pip install asyncmy (not an extra)"),
    "mysqldb": ("MySQLdb", "pip install mysqlclient (not an extra)"),
    "mysqlconnector": ("mysql.connector", "pip install mysql-connector-python (not an extra)"),
    "mariadbconnector": ("mariadb", "pip install mariadb (not an extra)"),
    "aiosqlite": ("aiosqlite", "pip install 'fastapi-sessionmaker[aiosqlite]'"),
    "pysqlite": ("sqlite3", "sqlite3 ships with Python: use a Python built with it"),
}
_KNOWN_BACKENDS = ("postgresql", "mysql", "mariadb", "sqlite")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # "mysql.connector" without "mysql"
        return False


# Query keys whose values are secrets (``?password=...`` works with psycopg and PyMySQL).
_SECRET_KEY_PARTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential")
MASK = "***"


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


def url_secrets(url: URL) -> list[str]:
    """The secrets in ``url``: its password and the values of query keys that look secret."""
    secrets = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if _secret_key(key):
            secrets.extend(v for v in _values(value) if v)
    return secrets


def render_url(url: str | URL) -> str:
    """The one way this package shows a URL: the password and secret-looking query values masked.

    Example:
        >>> render_url("postgresql://app:pw@db:5432/shop?sslpassword=pw2&application_name=api")
        'postgresql://app:***@db:5432/shop?application_name=api&sslpassword=***'
    """
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<invalid database URL>"
    text = parsed.set(query={}).render_as_string(hide_password=True)
    if parsed.query:
        text += "?" + "&".join(
            f"{quote_plus(key)}={MASK if _secret_key(key) else quote_plus(element)}"
            for key in sorted(parsed.query)
            for element in _values(parsed.query[key])
        )
    return text


def scrub(text: str, url: URL | None) -> str:
    """``text`` with every secret of ``url`` replaced by ``***``, as written or URL-encoded."""
    if url is None:
        return text
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return text


# Drivers that only work with one twin: a sync driver under the async maker or the reverse.
_ASYNC_ONLY_DRIVERS = frozenset({"asyncpg", "aiomysql", "asyncmy", "aiosqlite", "psycopg_async"})
_SYNC_ONLY_DRIVERS = frozenset(
    {"psycopg2", "psycopg2cffi", "pg8000", "pymysql", "mysqldb", "mysqlconnector", "mariadbconnector"}
    | {"cymysql", "pysqlite", "pysqlcipher", "pyodbc"}
)


def parse_url(database_uri: str | URL, *, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri`` and check its dialect and port; :class:`ConfigurationError` naming
    ``variable``."""
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
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ConfigurationError(f"{variable} has port {url.port}: a port is a number from 1 to 65535")
    return url


def missing_driver(
    url: URL, module: str | None, *, is_async: bool, variable: str = "DATABASE_URI", hint: str | None = None
) -> ConfigurationError:
    """The one-line error for a driver whose DBAPI module is not installed, naming the fix."""
    backend = url.get_backend_name()
    driver = url.get_driver_name()
    default = _DEFAULT_DRIVERS[(backend, is_async)]
    fix = hint or (f"pip install the package that provides {module!r}" if module else "install it")
    if driver != default:
        fix += f", or use {backend}+{default} (leave the driver out: {backend}://...)"
    what = f"{module!r} is not installed" if module else "its module cannot be imported"
    return ConfigurationError(f"{variable} uses the {backend}+{driver} driver, but {what}: {fix}")


def resolve_url(database_uri: str | URL, *, is_async: bool, variable: str = "DATABASE_URI") -> URL:
    """Parse ``database_uri``, fill in an installed driver when it names none, check the driver.

    ``postgresql://`` becomes ``postgresql+psycopg://`` (sync) or ``postgresql+asyncpg://`` (async,
    psycopg when asyncpg is missing), ``mysql://`` and ``mariadb://`` use PyMySQL / aiomysql and
    ``sqlite://`` aiosqlite when async, so one ``DATABASE_URI`` serves both twins. A driver that
    SQLAlchemy does not know, or whose module is not installed, is a :class:`ConfigurationError`
    naming ``variable`` and the fix, never the URL.
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
    module_hint = _DRIVER_MODULES.get(driver)
    if module_hint is not None:
        if not _installed(module_hint[0]):
            raise missing_driver(
                url, module_hint[0], is_async=is_async, variable=variable, hint=module_hint[1]
            )
        return url
    # Any other driver: SQLAlchemy must know it, and its DBAPI module must import.
    try:
        dialect = url.get_dialect(_is_async=is_async)
    except sa.exc.NoSuchModuleError:
        raise unknown_driver(url, is_async=is_async, variable=variable) from None
    if is_async and not getattr(dialect, "is_async", False):
        raise ConfigurationError(
            f"{variable} uses {url.drivername!r}, which is not an async driver: use "
            f"{backend}+{_DEFAULT_DRIVERS[(backend, True)]}, or leave the driver out ({backend}://...)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise missing_driver(url, exc.name, is_async=is_async, variable=variable) from None
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


def enforce_sqlite_foreign_keys(engine: sa.Engine) -> None:
    """Run ``PRAGMA foreign_keys=ON`` on every new SQLite connection of ``engine``.

    SQLite ignores ``FOREIGN KEY`` and ``ON DELETE`` unless each connection turns them on. Every
    engine this package creates calls this (an async engine passes its ``sync_engine``: the
    listener works for pysqlite and aiosqlite alike); other databases are left as they are. It is
    a "connect" listener: it runs once per new DBAPI connection, never at checkout or commit.

    Example:
        >>> engine = sa.create_engine("sqlite://")
        >>> enforce_sqlite_foreign_keys(engine)
        >>> with engine.connect() as connection:
        ...     connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
        1
    """
    if engine.dialect.name != "sqlite":
        return

    def sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    sa.event.listen(engine, "connect", sqlite_foreign_keys)


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
        sqlite_foreign_keys: bool = True,
    ) -> None:
        if database_uri is None and settings is None:
            from fastapi_sessionmaker._settings import DatabaseSettings

            settings = DatabaseSettings()
        options: dict[str, Any] = {}
        variable = "database_uri"  # errors name where the URL came from
        if settings is not None:
            if database_uri is None:
                database_uri = settings.url()
                variable = "DATABASE_URI" if settings.uri is not None else "DATABASE_SCHEME"
            options.update(settings.engine_options())
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
        # fastapi-utils' and the FastAPI tutorial's SessionLocal: no autoflush, no expiry on commit.
        self.session_options: dict[str, Any] = {"expire_on_commit": False, "autoflush": False}
        self.session_options.update(session_options or {})
        self._engine: EngineT | None = None
        self._sessionmaker: FactoryT | None = None
        self._dependencies: dict[CommitPolicy | None, Any] = {}
        # Set by :meth:`join` while a test runs: every session this maker hands out joins the
        # test's connection (``join_transaction_mode="create_savepoint"``).
        self._joined: FactoryT | None = None
        self._joined_engine: EngineT | None = None
        self.dependency: Any = self.depends()
        """``Depends`` for the request session: ``Annotated[Session, db.dependency]``."""

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

    def _engine_kwargs(self) -> dict[str, Any]:
        return engine_kwargs(self.url, self.engine_options, is_async=self.is_async)

    # -- the cached engine and sessionmaker (fastapi-utils names) ---------------------------
    @property
    def cached_engine(self) -> EngineT:
        """The engine, created on first access and reused (the test's while joined)."""
        if self._joined_engine is not None:
            return self._joined_engine
        if self._engine is None:
            self._engine = self.get_new_engine()
        return self._engine

    @property
    def cached_sessionmaker(self) -> FactoryT:
        """The sessionmaker bound to :attr:`cached_engine`, created on first access and reused."""
        if self._joined is not None:
            return self._joined
        if self._sessionmaker is None:
            self._sessionmaker = self.get_new_sessionmaker(self.cached_engine)
        return self._sessionmaker

    def get_new_engine(self) -> EngineT:
        """A new engine with this maker's options."""
        raise NotImplementedError

    def get_new_sessionmaker(self, engine: EngineT | None) -> FactoryT:
        """A new sessionmaker bound to ``engine`` (the cached engine when ``None``)."""
        raise NotImplementedError

    def _forget(self) -> EngineT | None:
        """Forget the cached engine and sessionmaker (the caller disposes the engine returned)."""
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
        state = current_state()
        if state is not None:
            for entry in state.entries:
                if entry.maker is self and entry.shared:
                    return entry.policy
        return self.policy
