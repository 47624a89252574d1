"""SQLite specifics: one writer at a time per database file in this process, and aiosqlite
transaction ends that have nothing to end answered without its thread (:func:`skip_idle_ends`).

SQLite lets one connection write at a time; the others wait in its busy handler, which polls with
sleeps of up to 100 ms and is not fair. A request session that flushed holds the write lock across
the hops that follow (FastAPI's response validation, our commit), and 31 writers polling
meanwhile can make the holder's own ``COMMIT`` wait for seconds; with 64 async writers some waited
past the 5 s busy timeout ("database is locked"). So every engine this package creates on a SQLite
*file* (pysqlite, and aiosqlite for the async twin) gets a :class:`WriterQueue` shared by every
engine of the process on the same file: before a connection's first writing statement it waits its
turn there (first come, first served; a thread's wait releases the GIL, an aiosqlite connection's
is awaited on its event loop), and it gives the turn back as soon as it is no longer in a
transaction.

What it never does: make a read wait; raise on its own (a wait longer than the connection's busy
timeout proceeds without the turn, and SQLite's busy handler and the driver's own error decide, as
without the queue); block an event loop; touch ``:memory:`` databases (one connection anyway). It
is in-process only: several worker processes on one file still meet SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import operator
import os
import re
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import await_only

__all__ = [
    "WriterQueue",
    "database_file",
    "install_writer_queue",
    "skip_idle_ends",
    "terminate_in_order",
    "writer_queue_of",
]

DEFAULT_BUSY_TIMEOUT = 5.0  # pysqlite's default ``timeout`` connect argument, in seconds

_READ, _WRITE, _BEGIN, _WITH = 0, 1, 2, 3
_WRITE_WORDS = frozenset(
    {"INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "VACUUM", "REINDEX", "ANALYZE"}
)
# Leading whitespace and SQL comments, then the first two words.
_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?(?:\*/|\Z))*([A-Za-z]+)(?:\s+([A-Za-z]+))?", re.S)
_DML = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.I)
_PREFIX = 200  # characters enough to classify every statement but a ``WITH ...``


@functools.lru_cache(maxsize=1024)
def _prefix_kind(prefix: str) -> int:
    match = _LEADING.match(prefix)
    if match is None:
        return _READ
    first = match.group(1).upper()
    if first in _WRITE_WORDS:
        return _WRITE
    if first == "BEGIN":
        second = (match.group(2) or "").upper()
        return _WRITE if second in ("IMMEDIATE", "EXCLUSIVE") else _BEGIN
    if first == "SAVEPOINT":  # outside a transaction it starts one, deferred like BEGIN
        return _BEGIN
    if first == "WITH":
        return _WITH
    return _READ


def statement_kind(statement: str) -> int:
    """0 (a read), 1 (a write), 2 (a deferred ``BEGIN`` / ``SAVEPOINT``) for the SQL ``statement``.

    Writes are ``INSERT``, ``UPDATE``, ``DELETE``, ``REPLACE`` (and their upsert forms), DDL,
    ``VACUUM`` / ``REINDEX`` / ``ANALYZE``, ``BEGIN IMMEDIATE`` / ``EXCLUSIVE``, and a ``WITH ...``
    that contains one of the DML words; leading whitespace and comments are skipped.

    Example:
        >>> statement_kind("/* x */ INSERT INTO t VALUES (1)"), statement_kind("SELECT 1")
        (1, 0)
    """
    kind = _prefix_kind(statement[:_PREFIX])
    if kind == _WITH:
        return _WRITE if _DML.search(statement) else _READ
    return kind


def _in_transaction(dbapi_connection: Any, *, closed: bool = False) -> bool:
    """Whether a sqlite3 connection holds a transaction; ``closed`` if it is closed."""
    try:
        return bool(dbapi_connection.in_transaction)
    except sqlite3.Error:  # closed
        return closed


def _raw(connection: Any) -> Any:
    """The DBAPI connection under a pool's proxy (the dialect's methods get either)."""
    return getattr(connection, "dbapi_connection", connection)


class WriterQueue:
    """The write turn of one SQLite database file in this process, held by one DBAPI connection.

    First come, first served: :meth:`release` hands the turn to the longest waiter. Ownership
    belongs to a DBAPI connection, not a thread (a request session writes in one worker thread
    and commits in another).

    Example:
        >>> queue = WriterQueue("/tmp/example.db")
        >>> first, second = object(), object()
        >>> queue.acquire(first, timeout=1.0), queue.acquire(second, timeout=0.0)
        (True, False)
        >>> queue.release(first)
        >>> queue.acquire(second, timeout=0.0)
        True
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._reset()

    def _reset(self) -> None:
        self._mutex = threading.Lock()
        self._owner: Any = None
        # (wake, connection): ``wake()`` tells the waiter the turn is its own, False if it is gone.
        self._waiters: collections.deque[tuple[Callable[[], bool], Any]] = collections.deque()
        # id()s of connections in a transaction they began with a deferred BEGIN and nothing since:
        # they hold no SQLite lock yet, so waiting for the turn cannot deadlock with its owner.
        self._fresh: set[int] = set()

    @property
    def owner(self) -> Any:
        """The DBAPI connection that holds the turn, or None."""
        return self._owner

    def acquire(self, connection: Any, timeout: float) -> bool:
        """Take the turn for ``connection``, waiting at most ``timeout`` seconds; False if not.

        True at once when ``connection`` already holds it.
        """
        with self._mutex:
            if self._taken(connection) or timeout <= 0:
                return self._owner is connection
            waiter = threading.Lock()
            waiter.acquire()
            entry = (functools.partial(_unlock, waiter), connection)
            self._waiters.append(entry)
        waiter.acquire(timeout=timeout)  # released by release() when the turn is handed over
        return self._settled(entry)

    async def acquire_async(self, connection: Any, timeout: float) -> bool:
        """:meth:`acquire` for a connection on an event loop: the wait is the loop's, not a thread's.

        Cancelled meanwhile, it gives back a turn it was handed and raises.
        """
        with self._mutex:
            if self._taken(connection) or timeout <= 0:
                return self._owner is connection
            loop = asyncio.get_running_loop()
            turn = loop.create_future()
            entry = (functools.partial(_wake, loop, turn), connection)
            self._waiters.append(entry)
        timer = loop.call_later(timeout, _settle, turn)
        try:
            await turn
        except BaseException:
            if self._settled(entry):  # handed over meanwhile: to the next one
                self.release(connection)
            raise
        finally:
            timer.cancel()
        return self._settled(entry)

    def _taken(self, connection: Any) -> bool:
        """Under the mutex: whether ``connection`` holds the turn, taking it when nobody does or waits."""
        if self._owner is None and not self._waiters:
            self._owner = connection
        return self._owner is connection

    def _settled(self, entry: tuple[Callable[[], bool], Any]) -> bool:
        """After a wait: whether the turn was handed over, else the waiter leaves the line."""
        with self._mutex:
            if self._owner is entry[1]:
                return True
            self._waiters.remove(entry)  # timed out and not handed over
            return False

    def release(self, connection: Any) -> None:
        """Give the turn of ``connection`` to the next waiter (nothing if it does not hold it)."""
        if self._owner is not connection:  # the common case, without the mutex
            self._fresh.discard(id(connection))
            return
        with self._mutex:
            self._fresh.discard(id(connection))
            if self._owner is not connection:
                return
            while self._waiters:
                wake, self._owner = self._waiters[0]
                self._waiters.popleft()
                if wake():
                    return
            self._owner = None

    def __repr__(self) -> str:
        return f"<WriterQueue {self.path!r} owned={self._owner is not None} waiting={len(self._waiters)}>"


def _unlock(waiter: threading.Lock) -> bool:
    waiter.release()
    return True


def _settle(turn: asyncio.Future[None]) -> None:
    if not turn.done():
        turn.set_result(None)


def _wake(loop: asyncio.AbstractEventLoop, turn: asyncio.Future[None]) -> bool:
    """Hand the turn to a waiter on ``loop`` (from any thread); False if that loop is closed."""
    try:
        loop.call_soon_threadsafe(_settle, turn)
    except RuntimeError:  # the loop is closed: nobody waits there any more
        return False
    return True


_queues: weakref.WeakValueDictionary[str, WriterQueue] = weakref.WeakValueDictionary()
_queues_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary[sa.Engine, WriterQueue] = weakref.WeakKeyDictionary()


def database_file(url: URL) -> str | None:
    """The resolved absolute path of the SQLite file ``url`` opens; None for an in-memory database.

    Example:
        >>> import os
        >>> database_file(sa.make_url("sqlite:////tmp/a.db")) == os.path.realpath("/tmp/a.db")
        True
        >>> database_file(sa.make_url("sqlite://")) is None
        True
    """
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # a URI filename (?uri=true)
        parts = urllib.parse.urlsplit(database)
        if "memory" in urllib.parse.parse_qs(parts.query).get("mode", []):
            return None
        database = urllib.parse.unquote(parts.path)
        if not database or database == ":memory:":
            return None
    return os.path.realpath(os.path.abspath(database))


def _busy_timeout(engine: sa.Engine, connect_args: Mapping[str, Any]) -> float:
    _, params = engine.dialect.create_connect_args(engine.url)  # the URL's ?timeout=
    params.update(connect_args)
    timeout = params.get("timeout", DEFAULT_BUSY_TIMEOUT)
    try:
        return max(float(timeout), 0.0)
    except (TypeError, ValueError):
        return DEFAULT_BUSY_TIMEOUT


def writer_queue_of(engine: sa.Engine) -> WriterQueue | None:
    """The :class:`WriterQueue` installed on ``engine``, or None."""
    return _installed.get(engine)


def install_writer_queue(
    engine: sa.Engine, connect_args: Mapping[str, Any] | None = None
) -> WriterQueue | None:
    """Make the writers of ``engine`` take turns with every engine of this process on the same file.

    Only for a sync pysqlite engine on a file (not ``:memory:``, not ``StaticPool``); anything
    else is left as it is and gets None. ``connect_args`` are the ``create_engine`` ones, for the
    busy timeout (pysqlite's ``timeout``, else the URL's ``?timeout=``, else 5 s): a writer waits
    that long for its turn, then goes ahead without it. Installing twice is a no-op.

    Example:
        >>> engine = sa.create_engine("sqlite:///./app.db")
        >>> queue = install_writer_queue(engine)
        >>> with engine.begin() as connection:
        ...     _ = connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
        >>> queue.owner is None  # given back when the transaction ended
        True
        >>> engine.dispose()
    """
    dialect = engine.dialect
    driver = _DRIVERS.get(dialect.driver) if dialect.name == "sqlite" else None
    if driver is None:
        return None
    if isinstance(engine.pool, StaticPool) or engine in _installed:
        return _installed.get(engine)
    path = database_file(engine.url)
    if path is None:
        return None
    with _queues_lock:
        queue = _queues.get(path)
        if queue is None:
            queue = _queues[path] = WriterQueue(path)
    _installed[engine] = queue
    _listen(engine, queue, _busy_timeout(engine, connect_args or {}), driver)
    return queue


class _Driver:
    """How the queue reaches a driver's connections: pysqlite's own, or aiosqlite's through
    SQLAlchemy's adapter (whose methods run in a greenlet on the event loop, where a wait for
    the turn is awaited, never a thread blocked)."""

    def __init__(
        self,
        connection_of: Callable[[Any], Any],
        in_transaction: Callable[[Any], bool],
        acquire: Callable[[WriterQueue, Any, float], bool],
    ) -> None:
        self.connection_of = connection_of  # a cursor's DBAPI connection (what the pool holds)
        self.in_transaction = in_transaction  # whether that connection holds a transaction
        self.acquire = acquire


def _aiosqlite_sqlite3(adapted: Any) -> Any:
    """The sqlite3 connection under SQLAlchemy's aiosqlite adapter (None: closed)."""
    return getattr(getattr(adapted, "_connection", None), "_connection", None)


def _aiosqlite_in_transaction(adapted: Any) -> bool:
    raw = _aiosqlite_sqlite3(adapted)
    return raw is not None and _in_transaction(raw)


def _acquire_awaited(queue: WriterQueue, connection: Any, timeout: float) -> bool:
    """The turn for an aiosqlite connection, in SQLAlchemy's greenlet on the event loop: taken at
    once when it is free (no greenlet switch), else awaited."""
    if queue.acquire(connection, 0.0):
        return True
    return timeout > 0 and bool(await_only(queue.acquire_async(connection, timeout)))


_DRIVERS = {
    "pysqlite": _Driver(operator.attrgetter("connection"), _in_transaction, WriterQueue.acquire),
    "aiosqlite": _Driver(
        operator.attrgetter("_adapt_connection"), _aiosqlite_in_transaction, _acquire_awaited
    ),
}


def _listen(engine: sa.Engine, queue: WriterQueue, timeout: float, driver: _Driver) -> None:
    """Wrap the statement, commit and rollback methods of ``engine``'s own dialect instance.

    Not engine events: a ``before_cursor_execute`` listener takes SQLAlchemy off its fast path for
    every statement (about 20 µs per SQLite read request); a wrapped ``do_execute`` costs one call.
    """
    dialect = engine.dialect  # this engine's own instance: the pool's reset calls it too
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, _queued(getattr(dialect, name), queue, timeout, driver))
    setattr(dialect, "do_commit", _released_after(dialect.do_commit, queue, driver, commit=True))  # noqa: B010
    setattr(dialect, "do_rollback", _released_after(dialect.do_rollback, queue, driver, commit=False))  # noqa: B010

    def release(dbapi_connection: Any, *args: Any) -> None:
        if dbapi_connection is not None:
            queue.release(dbapi_connection)

    def on_checkout(dbapi_connection: Any, *args: Any) -> None:
        # A turn its transaction's end did not give back (a commit through the driver itself).
        _after_statement(queue, dbapi_connection, driver)

    sa.event.listen(engine, "checkout", on_checkout)
    # No "checkin" or "reset" listener: a session whose end runs no listener ends on the event
    # loop (_unit); the pool's rollback on return goes through the dialect's do_rollback below.
    for name in ("close", "invalidate", "soft_invalidate", "detach", "close_detached"):
        sa.event.listen(engine, name, release)


def _wait_for_turn(
    queue: WriterQueue, dbapi_connection: Any, statement: str, context: Any, timeout: float, driver: _Driver
) -> None:
    """Before a statement of a connection that does not hold the turn: wait for it if it writes."""
    if context is not None and (context.isinsert or context.isupdate or context.isdelete or context.isddl):
        kind = _WRITE
    else:
        kind = statement_kind(statement)
    in_transaction = driver.in_transaction(dbapi_connection)
    fresh = queue._fresh
    key = id(dbapi_connection)
    # Waiting is safe only while this connection holds no SQLite lock: outside a transaction
    # (pysqlite's implicit BEGIN comes inside the driver's execute), or right after a deferred
    # BEGIN. Otherwise the owner's COMMIT may be waiting for our SHARED lock: only try.
    if in_transaction:
        unlocked = key in fresh
        if unlocked:
            fresh.discard(key)
    else:
        unlocked = True
        if kind == _BEGIN:
            fresh.add(key)
        elif fresh:
            fresh.discard(key)
    if kind == _WRITE:
        driver.acquire(queue, dbapi_connection, timeout if unlocked else 0.0)


def _after_statement(queue: WriterQueue, dbapi_connection: Any, driver: _Driver) -> None:
    """After a statement, failed or not: no transaction left (autocommit), no turn kept."""
    if queue._owner is dbapi_connection and not driver.in_transaction(dbapi_connection):
        queue.release(dbapi_connection)


def _queued(method: Any, queue: WriterQueue, timeout: float, driver: _Driver) -> Any:
    """``method`` (a dialect's ``do_execute`` / ``do_executemany`` / ``do_execute_no_params``,
    called as SQLAlchemy calls them: the context last) with the writer's turn taken before and
    given back after (autocommit, a failed statement outside a transaction)."""

    at = 0 if method.__name__ == "do_execute_no_params" else 1  # where the context is, after the SQL

    connection_of = driver.connection_of

    @functools.wraps(method)
    def wrapper(cursor: Any, statement: str, *arguments: Any) -> None:
        dbapi_connection = connection_of(cursor)
        if queue._owner is not dbapi_connection:
            context = arguments[at] if len(arguments) > at else None
            _wait_for_turn(queue, dbapi_connection, statement, context, timeout, driver)
        try:
            method(cursor, statement, *arguments)
        finally:
            if queue._owner is dbapi_connection:
                _after_statement(queue, dbapi_connection, driver)

    return wrapper


def _released_after(method: Any, queue: WriterQueue, driver: _Driver, *, commit: bool) -> Any:
    @functools.wraps(method)
    def wrapper(dbapi_connection: Any) -> None:
        try:
            method(dbapi_connection)
        except BaseException:
            raw = _raw(dbapi_connection)
            if commit and driver.in_transaction(raw):
                # A failed COMMIT (a deferred foreign key, SQLITE_BUSY) leaves SQLite's transaction
                # open with its write lock, while SQLAlchemy considers it over: the pool would
                # take the connection back without a rollback, and lock every writer out.
                # The COMMIT's own error is raised below; this rollback's (sqlite3's or aiosqlite
                # adapter's, awaited in this greenlet) would only hide it.
                with contextlib.suppress(Exception):
                    raw.rollback()
            raise
        finally:
            queue.release(_raw(dbapi_connection))

    return wrapper


def _after_fork_in_child() -> None:
    # No thread of the parent survives the fork, and the connections are the parent's: no turn
    # (and no mutex) held at fork time stays held in the child.
    for queue in list(_queues.values()):
        queue._reset()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python; Windows cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _is_aiosqlite(dialect: Any) -> bool:
    return dialect.name == "sqlite" and dialect.driver == "aiosqlite"  # type: ignore[no-any-return]


def skip_idle_ends(engine: sa.Engine) -> bool:
    """Answer an aiosqlite ``commit()`` or ``rollback()`` with no SQLite transaction open on the
    event loop, without the round trip through aiosqlite's thread.

    sqlite3's own ``commit()`` and ``rollback()`` do nothing then (they ask SQLite first), so the
    skipped hop changes nothing but its cost: two thread switches and a loop turn. That is the
    case after every read (pysqlite opens a transaction before the first write only) and at every
    pool return after a commit (the pool's reset rollback). ``engine`` is the ``sync_engine`` of
    an async engine; anything but aiosqlite is left as it is (False).

    Reading ``in_transaction`` on the loop is exact because no statement of the connection is
    running then: SQLAlchemy awaits each one, and one interrupted by a cancellation (still
    running in aiosqlite's thread) invalidates the connection, which is never used again.
    """
    dialect = engine.dialect
    if not _is_aiosqlite(dialect):
        return False
    for name in ("do_commit", "do_rollback"):
        setattr(dialect, name, _unless_idle(getattr(dialect, name)))
    return True


def _unless_idle(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(dbapi_connection: Any) -> None:
        raw = _aiosqlite_sqlite3(_raw(dbapi_connection))
        # Closed meanwhile (or no sqlite3 connection): the driver's own call says what follows.
        if raw is not None and not _in_transaction(raw, closed=True):
            return
        method(dbapi_connection)

    return wrapper


def terminate_in_order(engine: sa.Engine) -> bool:
    """An aiosqlite connection that SQLAlchemy terminates is rolled back and closed in aiosqlite's
    own thread, after whatever that thread is still running, and nobody waits for it.

    SQLAlchemy terminates (invalidates) a connection whose statement was interrupted by a
    cancellation (``asyncio.timeout``, a timeout middleware, anyio's cancel scopes). The statement
    runs to its end in aiosqlite's thread anyway, and then:

    - sqlite3's ``close()`` of a connection whose statement is still open (the interrupted one's
      cursor is never finalized) only makes it a zombie (``sqlite3_close_v2``) that keeps its
      transaction, and with it SQLite's write lock, until a garbage collection frees that cursor:
      every other writer gets "database is locked" until then;
    - SQLAlchemy's terminate first awaits a graceful ``close()``, which waits for the statement;
      cancelled again meanwhile (anyio delivers a cancellation at every await, ``wait_for``
      cancels twice), it calls aiosqlite's ``stop()``. With aiosqlite 0.22 the graceful close that
      starts after ``stop()`` then waits forever (its own ``stop()`` is never answered), and
      ``stop()`` may skip the close of the sqlite3 connection.

    Here a ``rollback()`` and a ``close()`` of the sqlite3 connection are queued in its thread,
    then ``stop()``: they run in that order as soon as the statement has ended, and the cancelled
    request ends at once. ``engine`` is the ``sync_engine`` of an async engine; anything but
    aiosqlite is left as it is (False).
    """
    dialect = engine.dialect
    if not _is_aiosqlite(dialect):
        return False
    dialect.do_terminate = _in_order(dialect.do_terminate)  # type: ignore[method-assign]
    return True


def _in_order(method: Any) -> Any:
    @functools.wraps(method)
    def terminate(dbapi_connection: Any) -> None:
        driver: Any = getattr(_raw(dbapi_connection), "_connection", None)  # the aiosqlite.Connection
        raw = getattr(driver, "_connection", None)  # its sqlite3 connection (None: closed)
        calls = getattr(driver, "_tx", None)  # the calls its thread runs, in order
        if raw is None or calls is None or not hasattr(driver, "stop"):
            method(dbapi_connection)  # closed already, or another aiosqlite: SQLAlchemy's own
            return
        calls.put_nowait((None, raw.rollback))  # no future: nothing waits for them
        calls.put_nowait((None, raw.close))
        driver.stop()

    return terminate
