"""The session classes request sessions are made of, composed with the class the user configured.

A request session is the configured ``Session`` class (``sqlalchemy.orm.Session``, SQLModel's, the
user's own) with :class:`RequestSessionMixin` in front, and :class:`ReadOnlyMixin` under
``CommitPolicy.READ_ONLY``, and SQLModel's ``exec()`` routed through ``execute`` (:mod:`._sqlmodel`).
The async twin composes its ``sync_session_class`` the same way, so both twins share these rules:

- **One thread at a time** (the sync twin, :class:`LockedMixin`). Every method that can do I/O
  or end the transaction holds a per-session re-entrant lock. The guard ends a session under that
  lock, so a sync endpoint that is still running in its worker thread after its request was
  cancelled never has its session rolled back or closed under its feet: the end waits for the
  running statement, and the endpoint's next call finds the session closed. The async twin's
  sessions run on the event loop's thread only; one task at a time is
  :class:`SerialAsyncSession`'s check, so they skip this layer.
- **After the response has started** (the guard committed or rolled back when the status line
  went out), the session serves reads only and holds no connection between statements: each
  statement runs in a short transaction of its own, its rows are fetched in full and the
  connection goes back to the pool at once, so streaming bodies cannot starve the pool or the
  worker threads. A write there can no longer be committed before the response, so it raises
  :class:`~fastapi_sessionmaker.exceptions.ResponseStartedError` (and is logged) instead of being
  dropped silently.

  The async twin's sessions take these rules only when the response starts: until then the
  session is the configured class as it is (no layer between the endpoint and SQLAlchemy), and
  :func:`mark_response_started` switches it to the composed class that adds them (its
  ``_fsm_armed``). The sync twin's sessions have them from the start, under the lock they need
  anyway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._sqlmodel import ExecThroughExecute, is_sqlmodel_session
from fastapi_sessionmaker.exceptions import (
    ConcurrentSessionUseError,
    ConfigurationError,
    ReadOnlySessionError,
    ResponseStartedError,
)

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = [
    "LockedMixin",
    "ReadOnlyMixin",
    "ReadOnlySession",
    "RequestSessionMixin",
    "SerialAsyncSession",
    "checked_session_class",
    "compose",
    "compose_async",
    "discarded_changes",
    "is_busy",
    "is_closed",
    "mark_closed",
    "mark_response_started",
    "response_started",
    "sync_of",
    "try_lock",
    "unlock",
]

_S = TypeVar("_S", bound=Session)


class ReadOnlyMixin(Session):
    """Refuses to flush ORM changes (``CommitPolicy.READ_ONLY``); composes with any ``Session``."""

    def flush(self, objects: Any = None) -> None:
        """Raise :class:`ReadOnlySessionError` if there is anything to write."""
        if self.new or self.deleted or self.dirty:
            raise ReadOnlySessionError(
                "this session is read-only (CommitPolicy.READ_ONLY): use a session with the "
                "AUTO or MANUAL policy to write"
            )
        super().flush(objects)


class ReadOnlySession(ReadOnlyMixin, Session):
    """A ``Session`` that refuses to flush ORM changes (``CommitPolicy.READ_ONLY``).

    Request sessions under ``CommitPolicy.READ_ONLY`` get this rule composed with the configured
    session class; queries work as usual.

    Example:
        >>> engine = sa.create_engine("sqlite://")
        >>> session = ReadOnlySession(bind=engine)
        >>> session.execute(sa.text("SELECT 1")).scalar()
        1
        >>> session.close()
        >>> engine.dispose()
    """


_STARTED_WRITE = (
    "this request session was committed when the response started (the status line is sent), so "
    "{what} can no longer be stored before the response: write before returning the response "
    "(or before the first item of a streaming endpoint), or use `with maker.context_session()` "
    "for work that belongs to the stream"
)

# Methods that write (refused after the response started) and methods that may do I/O or end the
# transaction (serialised by the lock; reads after the response started get a short transaction).
_WRITES = (
    "add",
    "add_all",
    "delete",
    "delete_all",
    "merge",
    "merge_all",
    "bulk_save_objects",
    "bulk_insert_mappings",
    "bulk_update_mappings",
)
# ``get``, ``get_one`` and ``refresh`` load through ``execute``: after the response started, that
# makes their read a short transaction of its own too.
_LOCKED = (
    *("begin", "begin_nested", "close", "connection", "get", "get_one"),
    *("invalidate", "refresh", "reset", "rollback"),
)  # and ``commit`` (LockedMixin's own)
_READ_ONLY_SQL = ("SELECT", "WITH", "SHOW", "EXPLAIN", "PRAGMA", "VALUES", "TABLE", "DESCRIBE")


def _refuse(what: str) -> ResponseStartedError:
    error = ResponseStartedError(_STARTED_WRITE.format(what=what))
    logger.error("write refused after the response started: %s", what)
    return error


def _locked(name: str) -> Callable[..., Any]:
    def locked(self: LockedMixin, *args: Any, **kwargs: Any) -> Any:
        with self._fsm_lock:
            return getattr(super(LockedMixin, self), name)(*args, **kwargs)

    return functools.wraps(getattr(Session, name))(locked)


def _write(name: str) -> Callable[..., Any]:
    def write(self: RequestSessionMixin, *args: Any, **kwargs: Any) -> Any:
        with self._fsm_lock:
            if self._fsm_started:
                raise _refuse(f"Session.{name}()")
            return getattr(super(RequestSessionMixin, self), name)(*args, **kwargs)

    return functools.wraps(getattr(Session, name))(write)


def _is_read(statement: Any) -> bool:
    """Whether ``statement`` only reads (a SELECT, or textual SQL that starts like one)."""
    if isinstance(statement, sa.TextClause):
        return statement.text.lstrip().lstrip("(").split(None, 1)[0].upper() in _READ_ONLY_SQL
    return bool(getattr(statement, "is_select", False))


def _streams(statement: Any, execution_options: Any) -> bool:
    options = dict(getattr(statement, "_execution_options", None) or {})
    options.update(execution_options or {})
    return bool(options.get("stream_results") or options.get("yield_per"))


def _fetched(result: Any, statement: Any, kwargs: dict[str, Any]) -> Any | None:
    """``result`` with every row fetched, or ``None`` when it was asked to stream (or has no rows)."""
    if _streams(statement, kwargs.get("execution_options")):
        return None
    if isinstance(result, sa.CursorResult) and not result.returns_rows:
        return None
    return result.freeze()()


class RequestSessionMixin(Session):
    """What every request session adds to its configured class (see the module docstring)."""

    _fsm_started = False
    _fsm_buffer = False
    """Fetch every row inside the lock: pysqlite steps its cursor lazily, on the connection, so a
    result still being read when the guard ends the session (a cancelled sync endpoint) would
    share the connection with the guard's thread. Set for the sync twin's SQLite sessions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fsm_lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def _fsm_read_after_start(self, statement: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not _is_read(statement):
            raise _refuse("a statement that is not a SELECT")
        result = super().execute(statement, *args, **kwargs)
        fetched = _fetched(result, statement, kwargs)
        if fetched is None:
            return result  # asked to stream: the connection is held until the session closes
        self._fsm_end_read()
        return fetched

    def _fsm_end_read(self) -> None:
        """End the short read transaction of a statement after the response started."""
        if self.in_transaction() and not self.in_nested_transaction():
            super().commit()  # nothing to write (writes are refused): releases the connection

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        """``Session.execute``, serialised; after the response started, a read of its own."""
        with self._fsm_lock:
            if self._fsm_started:
                return self._fsm_read_after_start(statement, args, kwargs)
            result = super().execute(statement, *args, **kwargs)
            if self._fsm_buffer:  # every row fetched while the lock is held
                fetched = _fetched(result, statement, kwargs)
                return result if fetched is None else fetched
            return result

    def scalars(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        """``Session.scalars``, serialised; after the response started, a read of its own."""
        with self._fsm_lock:
            if self._fsm_started:
                return self._fsm_read_after_start(statement, args, kwargs).scalars()
            if self._fsm_buffer:
                return self.execute(statement, *args, **kwargs).scalars()
            return super().scalars(statement, *args, **kwargs)

    def scalar(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        """``Session.scalar``, serialised; after the response started, a read of its own."""
        with self._fsm_lock:
            if self._fsm_started:
                return self._fsm_read_after_start(statement, args, kwargs).scalar()
            return super().scalar(statement, *args, **kwargs)

    def flush(self, objects: Any = None) -> None:
        """``Session.flush``, serialised; after the response started, changes raise."""
        with self._fsm_lock:
            if self._fsm_started and not _compat.session_is_clean(self):
                raise _refuse("the session's pending changes (a flush)")
            super().flush(objects)


for _name in _WRITES:
    if hasattr(Session, _name):  # ``delete_all`` and ``merge_all`` are new in SQLAlchemy 2.1
        setattr(RequestSessionMixin, _name, _write(_name))


class LockedMixin(RequestSessionMixin):
    """The sync twin's request sessions: every method that may do I/O or end the transaction
    holds the session's lock too (see the module docstring)."""

    def commit(self) -> None:
        """``Session.commit``, under the session's lock, by :func:`._compat.commit` (its short way
        when that is all a commit would do)."""
        with self._fsm_lock:
            _compat.commit(self, super().commit)


for _name in _LOCKED:
    setattr(LockedMixin, _name, _locked(_name))


_COMPOSED: dict[tuple[type[Session], bool, bool, bool, tuple[type[Session], ...]], type[Session]] = {}


def compose(
    base: type[_S],
    read_only: bool,
    *,
    threads: bool,
    buffer_rows: bool = False,
    mixins: tuple[type[Session], ...] = (),
) -> type[_S]:
    """The request-session class for the configured ``base`` (cached: one class per variant).

    ``threads``: the session may be used from worker threads (the sync twin): :class:`LockedMixin`
    from the start. Without threads (the async twin) the class adds no layer until the response
    starts: it is ``base`` with the policy's and the ``mixins``' rules only, and its ``_fsm_armed``
    is the class with :class:`RequestSessionMixin` that :func:`mark_response_started` switches the
    session to.
    ``buffer_rows``: fetch every row of a result before returning it (SQLite, sync twin).
    ``mixins``: more rules, under the request rules (a read replica's routing).
    """
    key = (base, read_only, threads, buffer_rows, mixins)
    composed = _COMPOSED.get(key)
    if composed is None:
        rules: tuple[type, ...] = (
            (ReadOnlyMixin,) if read_only and not issubclass(base, ReadOnlyMixin) else ()
        )
        rules += mixins
        bases: tuple[type, ...] = (LockedMixin if threads else RequestSessionMixin,)
        if is_sqlmodel_session(base):
            bases = (ExecThroughExecute, *bases)
        attributes: dict[str, Any] = {"__module__": base.__module__, "_fsm_buffer": buffer_rows}
        composed = type(f"Request{base.__name__}", (*bases, *rules, base), attributes)
        if not threads:  # the async twin: the same class without the request rules until the start
            attributes = {"__module__": base.__module__, "_fsm_armed": composed}
            composed = type(f"Request{base.__name__}", (*rules, base), attributes)
        _COMPOSED[key] = composed
    return composed  # type: ignore[return-value]


class SerialAsyncSession(AsyncSession):
    """An ``AsyncSession`` that refuses a second task while an operation of the first is running.

    Two overlapping operations on one session fail in driver-specific ways (asyncpg's "another
    operation is in progress", aiomysql's packet errors, silently interleaved transactions on
    aiosqlite); this raises :class:`ConcurrentSessionUseError` instead, naming the helper to use.
    The check is one attribute test per awaited call. The async maker composes it with the
    configured ``class_`` (see :func:`compose_async`).
    """

    _fsm_running: str | None = None
    _fsm_idle: asyncio.Future[None] | None = None

    async def wait_idle(self) -> None:
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


def _serial(name: str, then: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """The checked ``name`` method: ``then`` is what it runs (the next class's method, found once
    when a class is composed); ``None`` looks it up after :class:`SerialAsyncSession` per call."""

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
            if then is None:
                return await getattr(super(SerialAsyncSession, self), name)(*args, **kwargs)
            return await then(self, *args, **kwargs)
        finally:
            self._fsm_running = None
            idle = self._fsm_idle
            if idle is not None:
                self._fsm_idle = None
                if not idle.done():
                    idle.set_result(None)

    return functools.wraps(then or getattr(AsyncSession, name))(serial)


for _name in _SERIAL_METHODS:
    if hasattr(AsyncSession, _name):  # ``delete_all`` and ``merge_all`` are new in SQLAlchemy 2.1
        setattr(SerialAsyncSession, _name, _serial(_name))

_COMPOSED_ASYNC: dict[type[AsyncSession], type[AsyncSession]] = {}


async def _commit(session: AsyncSession) -> None:
    """``AsyncSession.commit``: the sync session's commit in a greenlet, by
    :func:`._compat.commit` (its short way when that is all a commit would do)."""
    await AsyncSession.run_sync(session, _compat.commit)


def compose_async(base: type[AsyncSession]) -> type[AsyncSession]:
    """The configured ``AsyncSession`` class with :class:`SerialAsyncSession`'s check in front.

    Each checked method of the composed class calls ``base``'s own directly (what ``super()``
    finds there), without a lookup per call; ``commit``, unless ``base`` has its own, commits
    the sync session through :func:`._compat.commit`.
    """
    if issubclass(base, SerialAsyncSession):
        return base
    composed = _COMPOSED_ASYNC.get(base)
    if composed is None:
        attributes: dict[str, Any] = {"__module__": base.__module__}
        names = [name for name in _SERIAL_METHODS if hasattr(AsyncSession, name)]
        if hasattr(base, "exec"):  # SQLModel's AsyncSession.exec (it does not call execute)
            names.append("exec")
        for name in names:
            then = getattr(base, name)
            if name == "commit" and then is AsyncSession.commit:
                then = _commit  # what AsyncSession.commit does, by its short way when it can
            attributes[name] = _serial(name, then)
        composed = type(f"Serial{base.__name__}", (SerialAsyncSession, base), attributes)
        _COMPOSED_ASYNC[base] = composed
    return composed


def checked_session_class(cls: Any, *, is_async: bool) -> type[Any]:
    """``cls`` if it can be the maker's session class (``session_class=``), else a one-line error."""
    maker = "AsyncFastAPISessionMaker" if is_async else "FastAPISessionMaker"
    wanted, other = (AsyncSession, Session) if is_async else (Session, AsyncSession)
    if isinstance(cls, type) and issubclass(cls, wanted):
        return cls
    if isinstance(cls, type) and issubclass(cls, other):
        hint = (
            "give an AsyncSession class (SQLModel's: sqlmodel.ext.asyncio.session.AsyncSession), or "
            "use FastAPISessionMaker for a Session class"
            if is_async
            else "give a Session class (SQLModel's: sqlmodel.Session), or use AsyncFastAPISessionMaker "
            "for an AsyncSession class"
        )
        raise ConfigurationError(f"{maker}(session_class={cls.__name__}) is the other twin's class: {hint}")
    raise ConfigurationError(
        f"{maker}(session_class={cls!r}): give a subclass of {wanted.__module__}.{wanted.__name__}"
    )


def is_busy(session: Any) -> bool:
    """Whether another task is running an operation on ``session`` (a :class:`SerialAsyncSession`):
    a plain check, so that an idle session is ended without awaiting anything first."""
    return getattr(session, "_fsm_running", None) is not None


def sync_of(session: Any) -> Session:
    """The ``Session`` behind ``session`` (itself, or an ``AsyncSession``'s ``sync_session``)."""
    return getattr(session, "sync_session", session)  # type: ignore[no-any-return]


def mark_closed(session: Any) -> None:
    """Remember that ``session`` (sync or async) was ended and closed by its unit of work."""
    sync_of(session)._fsm_closed = True  # type: ignore[attr-defined]


def is_closed(session: Any) -> bool:
    """Whether ``session``'s unit of work has closed it."""
    return bool(getattr(sync_of(session), "_fsm_closed", False))


def response_started(session: Any) -> bool:
    """Whether ``session`` is a request session whose response has started."""
    target = sync_of(session)
    return isinstance(target, RequestSessionMixin) and target._fsm_started


def mark_response_started(session: Any) -> None:
    """From now on ``session`` (sync or async) serves reads only, without holding a connection.

    An async twin's session takes the request rules here (:func:`compose`): its class becomes the
    one that adds them, a change of class only (the two differ in methods, not in layout).
    """
    target = sync_of(session)
    armed = getattr(type(target), "_fsm_armed", None)
    if armed is not None:
        target._fsm_lock = threading.RLock()  # type: ignore[attr-defined]  # as RequestSessionMixin.__init__
        target.__class__ = armed
    if isinstance(target, RequestSessionMixin):
        target._fsm_started = True


def discarded_changes(session: Any) -> bool:
    """Whether ``session`` holds ORM changes made after the response started (about to be lost)."""
    target = sync_of(session)
    return (
        isinstance(target, RequestSessionMixin)
        and target._fsm_started
        and not _compat.session_is_clean(target)
    )


def try_lock(session: Any) -> bool:
    """Take ``session``'s lock without waiting (True) or report that a thread is using it."""
    lock = getattr(session, "_fsm_lock", None)
    return lock is None or bool(lock.acquire(blocking=False))


def unlock(session: Any) -> None:
    """Release what :func:`try_lock` took."""
    lock = getattr(session, "_fsm_lock", None)
    if lock is not None:
        lock.release()
