"""Read replicas (PostgreSQL streaming hot standbys): read-only sessions routed to a healthy replica,
lag bounds, conflicts re-run elsewhere, and read-your-writes across requests by WAL position.

- **Routing.** A maker given ``replica_uris`` composes :class:`ReplicaMixin` into its read-only
  request sessions (``CommitPolicy.READ_ONLY``, request sessions and ``task_session``). At the
  first statement of each of its transactions such a session binds to the next healthy replica
  (round robin), else to the primary. Every other session uses the primary.
- **Health.** :class:`ReplicaSet` checks each replica (reachable, ``pg_is_in_recovery()``, and
  lag in bytes: the primary's ``pg_current_wal_lsn()`` minus the replica's
  ``pg_last_wal_replay_lsn()``) at most every ``check_interval`` seconds, in a background thread
  (sync twin) or task (async twin) started by a read that finds the last check too old; a read
  never waits for it. A replica that fails a read with a connection error is skipped at once.
- **Re-runs.** A read that fails on a replica with a recovery conflict (SQLSTATE 40001, also the
  "terminating connection" variant) or a connection error is rolled back and run again on the next
  healthy replica, finally on the primary: one place, :func:`_routed`.
- **Read-your-writes.** :class:`PositionMiddleware` (installed by ``init_app`` for makers with
  replicas) puts the primary's WAL insert position after a request's commit in the response header
  ``X-DB-Position``; a read-only request that sends it back is served by a replica that has
  replayed that position (checked on the session's own connection), else by the primary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker._errors import Problem, error_code, is_connection_error, send_problem
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker._urls import render_url, scrubbed_line
from fastapi_sessionmaker.exceptions import ConfigurationError, ReadOnlySessionError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_MAX_LAG",
    "POSITION_HEADER",
    "PositionMiddleware",
    "Replica",
    "ReplicaMixin",
    "ReplicaSet",
    "install_positions",
    "parse_position",
    "position_header",
]

logger = logging.getLogger("fastapi_sessionmaker")

DEFAULT_MAX_LAG = 16 * 1024 * 1024
"""Bytes of WAL a replica may be behind the primary before it is skipped (one WAL segment)."""
DEFAULT_CHECK_INTERVAL = 1.0
"""Seconds between two health checks of the replicas (at most one check at a time)."""
POSITION_HEADER = "X-DB-Position"
"""The read-your-writes header of the maker named ``default`` (``X-DB-Position-<name>`` otherwise)."""

_POSITION = re.compile(r"^\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$")
_REPLAY = sa.text("SELECT CAST(pg_last_wal_replay_lsn() AS text)")
_STATUS = "SELECT pg_is_in_recovery(), CAST(pg_last_wal_replay_lsn() AS text)"
_PRIMARY_POSITION = "SELECT CAST(pg_current_wal_lsn() AS text)"
# Read-your-writes: the insert position is at or after the end of the commit record just written,
# also under synchronous_commit = off (where the written position may not have reached it yet).
_COMMIT_POSITION = "SELECT CAST(pg_current_wal_insert_lsn() AS text)"

_wanted: ContextVar[dict[str, int] | None] = ContextVar("fastapi_sessionmaker_positions", default=None)


def parse_position(text: str) -> int:
    """A WAL position (``pg_lsn`` text such as ``16/B374D848``) as a number; ``ValueError`` if not one.

    Example:
        >>> parse_position("1/0") - parse_position("0/FFFFFFFF")
        1
    """
    match = _POSITION.match(text)
    if match is None:
        raise ValueError(f"{text[:40]!r} is not a WAL position such as 0/16B3748")
    return int(match.group(1), 16) << 32 | int(match.group(2), 16)


def position_header(database: str) -> str:
    """The header that carries ``database``'s WAL position: ``X-DB-Position`` for ``default``."""
    return POSITION_HEADER if database == "default" else f"{POSITION_HEADER}-{database}"


class DriverRefusedError(sa.exc.DisconnectionError):
    """The driver refused to connect to a replica with the options of its URL (a ``TypeError``
    or ``ValueError`` from its ``connect()``, e.g. asyncpg given a libpq option it does not
    take): the replica is skipped, like one that is down, until its URL is fixed."""


# What a read or a check on a replica can fail with and still leave the request to the others.
_FAILED = (sa.exc.DBAPIError, sa.exc.DisconnectionError, OSError)


def _refusals_as_down(engine: sa.Engine, url: sa.URL) -> None:
    """Make the driver's ``TypeError`` / ``ValueError`` at connect a :class:`DriverRefusedError`
    (``engine`` is a replica's, or an async one's ``sync_engine``). psycopg reports an option it
    does not take as a database error, which marks the replica down already; asyncpg raises
    ``TypeError``, which failed the read (a 500) and every later check of all the replicas, while
    the report kept saying "ok"."""
    dialect = engine.dialect  # this engine's own instance: the pool calls its connect()
    connect = dialect.connect

    def refused_as_down(*cargs: Any, **cparams: Any) -> Any:
        try:
            return connect(*cargs, **cparams)
        except (TypeError, ValueError) as exc:
            raise DriverRefusedError(
                f"the driver refused this replica's URL ({type(exc).__name__}: "
                f"{scrubbed_line(exc, url)}): check its options"
            ) from exc

    dialect.connect = refused_as_down  # type: ignore[method-assign]


def _down_reason(exc: BaseException) -> str:
    """The report's reason for a replica found down by ``exc``."""
    if isinstance(exc, DriverRefusedError):
        return f"down: {exc.args[0]}"  # says which option to look at; no secret (scrubbed)
    return f"down: {type(exc).__name__}"


def _rerunnable(exc: BaseException) -> bool:
    """Whether a read that failed with ``exc`` on a replica may run again elsewhere: a recovery
    conflict (40001, a running query cancelled or an idle connection terminated) or a lost
    connection."""
    return error_code(exc) == "40001" or is_connection_error(exc)


class Replica:
    """One replica: its URL, its engine (created on first use) and what the last check found."""

    def __init__(self, url: sa.URL, index: int) -> None:
        self.url = url
        self.index = index
        self.engine: Any = None
        self.healthy = True  # until a check or a failed read says otherwise
        self.reason: str | None = None
        self.lag: int | None = None
        self.failed_at = float("-inf")  # time.monotonic() of the last read that found it down

    def describe(self) -> str:
        """``replica <n> (<URL without secrets>)`` for logs."""
        return f"replica {self.index + 1} ({render_url(self.url)})"


class ReplicaSet:
    """The replicas of one maker: engines, health, the round robin and the routing session mixin."""

    def __init__(
        self,
        urls: Sequence[sa.URL],
        *,
        database: str,
        is_async: bool,
        make_engine: Callable[[sa.URL], Any],
        primary: Callable[[], Any],
        max_lag: int | None = DEFAULT_MAX_LAG,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        if max_lag is not None and max_lag < 0:
            raise ConfigurationError(
                f"replica_max_lag={max_lag}: give bytes (0 or more), or None for no bound"
            )
        if check_interval <= 0:
            raise ConfigurationError(f"replica_check_interval={check_interval}: give seconds above 0")
        self.replicas = [Replica(url, index) for index, url in enumerate(urls)]
        self.database = database
        self.is_async = is_async
        self.max_lag = max_lag
        self.check_interval = check_interval
        self._make_engine = make_engine
        self._primary = primary
        self._turn = itertools.count()
        self._checking = threading.Lock()
        self._next_check = 0.0
        self._engines_lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # A weak reference: the composed session classes are cached for the process, the maker
        # (and so its replica set) need not be.
        routing = {"replica_set": weakref.proxy(self)}
        self.mixin: type[ReplicaMixin] = type("ReplicaRouting", (ReplicaMixin,), routing)
        """The session mixin that routes this maker's read-only sessions (see :class:`ReplicaMixin`)."""

    # -- engines ---------------------------------------------------------------------------
    def engine_of(self, replica: Replica) -> Any:
        """The replica's engine (sync or async, like the maker's), created on first use."""
        if replica.engine is None:
            with self._engines_lock:
                if replica.engine is None:
                    engine = self._make_engine(replica.url)
                    _refusals_as_down(engine.sync_engine if self.is_async else engine, replica.url)
                    replica.engine = engine
        return replica.engine

    def bind_of(self, replica: Replica) -> sa.Engine:
        """The sync ``Engine`` a ``Session`` binds to (an async engine's ``sync_engine``)."""
        engine = self.engine_of(replica)
        return engine.sync_engine if self.is_async else engine  # type: ignore[no-any-return]

    def _take_engines(self) -> list[Any]:
        with self._engines_lock:
            engines = [r.engine for r in self.replicas if r.engine is not None]
            for replica in self.replicas:
                replica.engine = None
        return engines

    def dispose(self) -> None:
        """Dispose every replica's engine (sync twin) after a running check ended; the next use
        makes new ones. The maker disposes its replicas before its primary engine, so that no
        check opens either again meanwhile."""
        acquired = self._checking.acquire(timeout=30)
        try:
            for engine in self._take_engines():
                engine.dispose()
        finally:
            if acquired:
                self._checking.release()

    async def adispose(self) -> None:
        """Dispose every replica's engine (async twin), a running check cancelled first."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in self._take_engines():
            await engine.dispose()

    # -- choosing --------------------------------------------------------------------------
    def candidates(self, tried: Iterable[Replica] = ()) -> list[Replica]:
        """The healthy replicas not in ``tried``, in round-robin order (the next one first)."""
        self._maybe_check()
        skip = set(map(id, tried))
        healthy = [r for r in self.replicas if r.healthy and id(r) not in skip]
        if len(healthy) > 1:
            start = next(self._turn) % len(healthy)
            healthy = healthy[start:] + healthy[:start]
        return healthy

    def wanted_position(self) -> int | None:
        """The WAL position the current request asked to read after (its ``X-DB-Position``)."""
        wanted = _wanted.get()
        return None if wanted is None else wanted.get(self.database)

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """A read on ``replica`` failed with ``exc`` and runs again elsewhere; skip it if it is down."""
        if is_connection_error(exc):
            replica.failed_at = time.monotonic()  # a check that looked before this cannot undo it
            self._mark(replica, False, _down_reason(exc))
        logger.warning(
            "read on %s of database %r failed (%s, code %s): running it again on another server",
            replica.describe(),
            self.database,
            type(exc).__name__,
            error_code(exc) or "none",
            extra={"database": self.database, "error_class": type(exc).__name__},
        )

    def _mark(self, replica: Replica, healthy: bool, reason: str | None) -> None:
        was, replica.healthy, replica.reason = replica.healthy, healthy, reason
        if was and not healthy:
            logger.warning("%s of database %r is skipped: %s", replica.describe(), self.database, reason)
        elif healthy and not was:
            logger.warning("%s of database %r serves reads again", replica.describe(), self.database)

    # -- health checks ---------------------------------------------------------------------
    def _maybe_check(self) -> None:
        """Start a background check when the last one is older than ``check_interval``."""
        if time.monotonic() < self._next_check or not self._checking.acquire(blocking=False):
            return
        self._next_check = time.monotonic() + self.check_interval
        if not self.is_async:
            threading.Thread(target=self._check_in_background, daemon=True).start()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (an async engine used from a plain thread)
            self._checking.release()
            return
        task = loop.create_task(self._acheck_in_background())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_in_background(self) -> None:
        try:
            self._check_all()
        except Exception:  # pragma: no cover - _check_all catches database errors itself
            logger.exception("checking the replicas of database %r failed", self.database)
        finally:
            self._checking.release()

    async def _acheck_in_background(self) -> None:
        try:
            await self._acheck_all()
        except Exception:  # pragma: no cover
            logger.exception("checking the replicas of database %r failed", self.database)
        finally:
            self._checking.release()

    def _judge(self, replica: Replica, row: Any, primary: int | None, looked_at: float) -> None:
        """Mark ``replica`` by its status ``row``, read at ``looked_at`` (``time.monotonic()``); a
        read that found it down after that moment wins over a healthy verdict."""
        in_recovery, replay = row
        if not in_recovery:
            replica.lag = None
            self._mark(replica, False, "not a standby (pg_is_in_recovery() is false)")
            return
        if replay is None:
            replica.lag = None
            self._mark(replica, False, "replays no WAL")
            return
        replica.lag = None if primary is None else max(0, primary - parse_position(replay))
        if self.max_lag is not None and replica.lag is not None and replica.lag > self.max_lag:
            self._mark(replica, False, f"lags {replica.lag} bytes behind the primary (max {self.max_lag})")
            return
        if replica.failed_at > looked_at:  # it went down while this check was running
            return
        self._mark(replica, True, None)

    def _down(self, replica: Replica, exc: BaseException) -> None:
        replica.lag = None
        text = scrubbed_line(exc, replica.url)
        logger.debug("check of %s failed: %s: %s", replica.describe(), type(exc).__name__, text)
        self._mark(replica, False, _down_reason(exc))

    def check(self) -> None:
        """Check every replica now (sync twin): reachable, a standby, within the lag bound."""
        with self._checking:
            self._next_check = time.monotonic() + self.check_interval
            self._check_all()

    async def acheck(self) -> None:
        """Check every replica now (async twin); a background check may run meanwhile."""
        self._next_check = time.monotonic() + self.check_interval
        await self._acheck_all()

    def _check_all(self) -> None:
        rows: list[tuple[Replica, Any, float]] = []
        for replica in self.replicas:  # replicas first: the lag measured is never too small
            looked_at = time.monotonic()
            try:
                with self.engine_of(replica).connect() as connection:
                    rows.append((replica, connection.exec_driver_sql(_STATUS).one(), looked_at))
            except _FAILED as exc:
                self._down(replica, exc)
        primary = self._primary_lsn(lambda: self._scalar_sync(self._primary(), _PRIMARY_POSITION))
        for replica, row, looked_at in rows:
            self._judge(replica, row, primary, looked_at)

    async def _acheck_all(self) -> None:
        rows: list[tuple[Replica, Any, float]] = []
        for replica in self.replicas:
            looked_at = time.monotonic()
            try:
                async with self.engine_of(replica).connect() as connection:
                    rows.append((replica, (await connection.exec_driver_sql(_STATUS)).one(), looked_at))
            except _FAILED as exc:
                self._down(replica, exc)
        try:
            text = await self._scalar_async(self._primary(), _PRIMARY_POSITION)
            primary = None if text is None else parse_position(text)
        except (sa.exc.DBAPIError, OSError) as exc:
            primary = self._no_primary(exc)
        for replica, row, looked_at in rows:
            self._judge(replica, row, primary, looked_at)

    def _primary_lsn(self, read: Callable[[], str | None]) -> int | None:
        try:
            text = read()
        except (sa.exc.DBAPIError, OSError) as exc:
            return self._no_primary(exc)
        return None if text is None else parse_position(text)

    def _no_primary(self, exc: BaseException) -> int | None:
        """Log that the primary did not answer: the lag is unknown (``None``)."""
        logger.warning(
            "replica lag of database %r not measured: the primary did not answer (%s)",
            self.database,
            type(exc).__name__,
        )
        return None

    @staticmethod
    def _scalar_sync(engine: sa.Engine, sql: str) -> Any:
        with engine.connect() as connection:
            return connection.exec_driver_sql(sql).scalar()

    @staticmethod
    async def _scalar_async(engine: Any, sql: str) -> Any:
        async with engine.connect() as connection:
            return (await connection.exec_driver_sql(sql)).scalar()

    async def commit_position(self) -> str | None:
        """The primary's WAL insert position now (after a commit): the read-your-writes token."""
        try:
            if self.is_async:
                value = await self._scalar_async(self._primary(), _COMMIT_POSITION)
            else:
                value = await anyio.to_thread.run_sync(self._scalar_sync, self._primary(), _COMMIT_POSITION)
        except (sa.exc.DBAPIError, OSError) as exc:
            logger.warning(
                "no %s header: the WAL position of database %r could not be read after the commit (%s)",
                position_header(self.database),
                self.database,
                type(exc).__name__,
            )
            return None
        return None if value is None else str(value)

    def report(self) -> list[dict[str, Any]]:
        """What the last check found, per replica: URL (no secrets), status, reason, lag in bytes."""
        return [
            {
                "url": render_url(replica.url),
                "status": "ok" if replica.healthy else "skipped",
                "reason": replica.reason,
                "lag_bytes": replica.lag,
            }
            for replica in self.replicas
        ]


# -- the routing session ------------------------------------------------------------------------
def _routed(name: str) -> Callable[..., Any]:
    def routed(self: ReplicaMixin, statement: Any, *args: Any, **kwargs: Any) -> Any:
        call = getattr(super(ReplicaMixin, self), name)
        if not isinstance(self._fsm_primary, sa.Engine):  # joined to a test's connection
            return call(statement, *args, **kwargs)
        if getattr(statement, "is_dml", False) or isinstance(statement, sa.schema.ExecutableDDLElement):
            raise ReadOnlySessionError(
                "this session reads from a replica (CommitPolicy.READ_ONLY), where nothing can be "
                "written: run INSERT, UPDATE, DELETE and DDL in a session with the AUTO or MANUAL policy"
            )
        tried: list[Replica] = []
        if not self.in_transaction():
            self._fsm_route(tried)
        while True:
            try:
                return call(statement, *args, **kwargs)
            except _FAILED as exc:
                replica = self._fsm_replica
                if replica is None or not _rerunnable(exc):
                    raise
                self.replica_set.failed(replica, exc)
                tried.append(replica)
                self.rollback()
                self._fsm_route(tried)

    routed.__name__ = name
    routed.__doc__ = f"``Session.{name}`` on this transaction's replica; run again elsewhere on a conflict."
    return routed


class ReplicaMixin(Session):
    """Binds each transaction of a read-only session to a healthy replica (see the module docstring).

    ``execute``, ``scalars`` and ``scalar`` (and what loads through them: ``get``, lazy loads)
    choose the server when a transaction begins; the whole transaction stays on it.
    """

    replica_set: ClassVar[ReplicaSet]
    _fsm_replica: Replica | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fsm_primary = self.bind

    @property
    def replica(self) -> Replica | None:
        """The replica this session's transaction reads from (``None``: the primary)."""
        return self._fsm_replica

    def _fsm_route(self, tried: list[Replica]) -> None:
        """Bind to the next healthy replica not in ``tried`` that has replayed the position the
        request asked for (if any), else to the primary."""
        replicas = self.replica_set
        wanted = replicas.wanted_position()
        for replica in replicas.candidates(tried):
            self.bind, self._fsm_replica = replicas.bind_of(replica), replica
            if wanted is None:
                return
            try:  # on this transaction's own connection: the read that follows sees at least this
                replayed = super().execute(_REPLAY).scalar()
            except _FAILED as exc:
                if not _rerunnable(exc):
                    raise
                replicas.failed(replica, exc)
                replayed = None
            if replayed is not None and parse_position(replayed) >= wanted:
                return
            tried.append(replica)
            self.rollback()
        self.bind, self._fsm_replica = self._fsm_primary, None


for _name in ("execute", "scalars", "scalar"):
    setattr(ReplicaMixin, _name, _routed(_name))


# -- read-your-writes across requests ------------------------------------------------------------
class PositionMiddleware:
    """Reads ``X-DB-Position`` into the request's context; adds it to responses after a commit.

    Installed (once per app) by ``init_app`` of a maker with replicas, outside the request guard:
    when the guard lets the status line out, the request's sessions have committed. An invalid
    position is answered with a 400 problem before the app runs.
    """

    def __init__(self, app: ASGIApp, makers: list[Any]) -> None:
        self.app = app
        self.makers = makers  # install_positions appends to it
        self._names: dict[bytes, str] = {}
        self._named = 0  # how many makers _names covers

    def _headers(self) -> dict[bytes, str]:
        """Each maker's position header (lower-case bytes) to its name, rebuilt when one is added."""
        if self._named != len(self.makers):
            self._names = {position_header(m.name).lower().encode(): m.name for m in self.makers}
            self._named = len(self.makers)
        return self._names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted: dict[str, int] = {}
        names = self._headers()
        for key, value in scope.get("headers", ()):
            name = names.get(key)
            if name is None:
                continue
            try:
                wanted[name] = parse_position(value.decode("latin-1"))
            except ValueError as exc:
                await _bad_position(send, position_header(name), exc)
                return
        token = _wanted.set(wanted or None)
        try:
            await self.app(scope, receive, self._sender(send))
        finally:
            _wanted.reset(token)

    def _sender(self, send: Send) -> Callable[[Message], Any]:
        async def send_with_position(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = await self._positions()
                if extra:
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_position

    async def _positions(self) -> list[tuple[bytes, bytes]]:
        state = current_state()
        if state is None:
            return []
        headers = []
        for entry in state.entries:
            replicas = getattr(entry.maker, "replicas", None)
            if replicas is None or not entry.committed or entry.policy is CommitPolicy.READ_ONLY:
                continue
            position = await replicas.commit_position()
            if position is not None:
                headers.append((position_header(entry.maker.name).lower().encode(), position.encode()))
        return headers


async def _bad_position(send: Send, header: str, exc: ValueError) -> None:
    detail = f"{header}: {exc}; send back the value of a previous response's {header} header, or none"
    problem = Problem(400, "Bad Request", detail)
    logger.warning("request refused: invalid %s header", header)
    await send_problem(send, problem)


def install_positions(app: FastAPI, maker: Any) -> None:
    """Add :class:`PositionMiddleware` to ``app`` (once) and let it serve ``maker``'s positions."""
    makers: list[Any] | None = getattr(app.state, "fastapi_sessionmaker_replicas", None)
    if makers is None:
        makers = []
        app.state.fastapi_sessionmaker_replicas = makers
        app.add_middleware(PositionMiddleware, makers=makers)
    if maker not in makers:
        makers.append(maker)
