"""The lifecycle of one transaction: a session opened, then committed or rolled back, then closed.

Every session this package hands out goes through here: request sessions (the guard ends them when
the status line is due, see :mod:`._guard`), ``context_session()``, ``task_session()`` and
``get_db()``. Each maker has one lifecycle object (:class:`SyncLifecycle` or its twin
:class:`AsyncLifecycle`) behind the :class:`Lifecycle` interface the guard calls. Around it:
after-commit callbacks (:mod:`._oncommit`, settled and run by the ends here), per-transaction
settings (:mod:`._local`, applied at every begin) and retries (:mod:`._retry` for units outside
requests, the guard for ``depends(retries=...)``).

The one rule: commit only when asked to, roll back on any failure (a failed commit included, then
re-raise it unchanged), always close, and never interrupt an ending half-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._base import Limiter
from fastapi_sessionmaker._engines import pool_capacity
from fastapi_sessionmaker._oncommit import run_async, run_sync, settle
from fastapi_sessionmaker._policy import CommitPolicy
from fastapi_sessionmaker._sessions import compose, is_busy, mark_closed, try_lock, unlock
from fastapi_sessionmaker._shield import run_to_completion

if TYPE_CHECKING:
    from fastapi_sessionmaker._async import AsyncFastAPISessionMaker
    from fastapi_sessionmaker._sync import FastAPISessionMaker

__all__ = ["AsyncLifecycle", "Lifecycle", "SyncLifecycle", "sync_unit"]

_TEST_LIMITER_TIMEOUT = 30.0


class Lifecycle(Protocol):
    """What the request guard needs from a maker's lifecycle, sync or async."""

    def open(self, policy: CommitPolicy) -> Any:
        """A new request session under ``policy`` (no connection is taken yet)."""

    def limiter(self) -> Limiter | None:
        """The pool-sized slot a request session waits for on the event loop, if any."""

    async def end(self, session: Any, commit: bool) -> None:
        """Commit (``commit=True``) or roll back; a failed commit is rolled back and re-raised."""

    async def close(self, session: Any) -> None:
        """Close the session: its connection goes back to the pool."""

    def close_now(self, session: Any) -> bool:
        """Close the session here if that needs no I/O and no wait (whether it did); else
        leave it to :meth:`close`."""


class _LimiterSlot:
    """The limiter of one maker: sized to its pool on first use, forgotten on dispose."""

    def __init__(self) -> None:
        self.limiter: Limiter | None = None
        self.ready = False
        self.joined: Limiter | None = None  # a test's one connection: one session at a time

    def reset(self) -> None:
        self.limiter = None
        self.ready = False

    def join(self, joined: bool) -> None:
        self.joined = Limiter(1, _TEST_LIMITER_TIMEOUT) if joined else None


# -- sync ---------------------------------------------------------------------------------------
def end_sync(session: Session, commit: bool) -> None:
    """Commit or roll back ``session``; a failed commit is rolled back, then re-raised unchanged."""
    if not commit:
        session.rollback()
        return
    try:
        _compat.commit(session)
    except BaseException:
        session.rollback()
        raise


@contextlib.contextmanager
def sync_unit(session: Session, *, commit: bool, database: str = "?") -> Iterator[Session]:
    """Yield ``session``; then commit (or roll back when ``commit`` is False), roll back on error,
    and always close: the sync rule for sessions outside the request guard. Its ``on_commit`` /
    ``on_rollback`` callbacks run right after, in this thread."""
    committed = False
    try:
        try:
            yield session
        except BaseException:
            try:
                session.rollback()
            finally:
                _close_sync(session)
            raise
        try:
            end_sync(session, commit)
            committed = commit
        finally:
            _close_sync(session)
    finally:
        run_sync(settle(session, committed), where="a unit of work", database=database)


def _close_sync(session: Session) -> None:
    try:
        session.close()
    finally:
        mark_closed(session)


_SESSION_HOOKS = (
    "before_commit",
    "after_commit",
    "after_transaction_end",
    "after_rollback",
    "after_soft_rollback",
)


def _ends_without_io(session: Session) -> bool:
    """Whether ending ``session``'s transaction can neither block nor run user code.

    True when every DBAPI connection the session holds reports that no database transaction is
    open (pysqlite begins one only at the first write, so a SQLite read ends with a commit that
    does nothing), nothing is waiting to be flushed (a flush is a write, and a SQLite write can
    wait seconds for another request's lock) and no listener would run: then the commit is done
    on the event loop instead of in a worker thread. Any doubt (another driver, pending changes, a
    session or engine event) means a hop.
    """
    if not _compat.session_is_clean(session):
        return False
    connections = _compat.transaction_connections(session)
    # The driver first: for every database but SQLite this answers at once, on the hot path.
    if not connections or any(
        getattr(c.connection.dbapi_connection, "in_transaction", None) is not False for c in connections
    ):
        return False
    dispatch = session.dispatch
    if any(getattr(dispatch, name) for name in _SESSION_HOOKS):
        return False
    return not any(
        c.dispatch.commit
        or c.dispatch.rollback
        or c.engine.pool.dispatch.checkin
        or c.engine.pool.dispatch.reset
        for c in connections
    )


class SyncLifecycle:
    """The transactions of a :class:`~fastapi_sessionmaker.FastAPISessionMaker`.

    A request session's end runs on the event loop when it can neither block nor run user code
    (a SQLite read), else in a worker thread, where it waits (under the session's lock) for a
    statement another thread is still running: a sync endpoint whose request was cancelled.
    """

    def __init__(self, maker: FastAPISessionMaker) -> None:
        self.maker = maker
        self.slot = _LimiterSlot()

    def open(self, policy: CommitPolicy) -> Session:
        """A new request session: the configured class, composed with the request rules."""
        factory = self.maker.cached_sessionmaker
        sqlite = self.maker.url.get_backend_name() == "sqlite"
        read_only = policy is CommitPolicy.READ_ONLY
        mixins = (self.maker.replicas.mixin,) if read_only and self.maker.replicas is not None else ()
        cls = compose(factory.class_, read_only, threads=True, buffer_rows=sqlite, mixins=mixins)
        return cls(**{**factory.kw, "close_resets_only": False})

    def limiter(self) -> Limiter | None:
        """A slot per pooled connection and worker thread, taken on the event loop before the thread."""
        slot = self.slot
        if slot.joined is not None:
            return slot.joined
        if not slot.ready:
            engine = self.maker.cached_engine
            capacity = pool_capacity(engine)
            # Also below the worker-thread count, pool limit or not (see Limiter).
            slot.limiter = Limiter(capacity, _compat.pool_timeout(engine.pool), threads=True)
            slot.ready = True
        return slot.limiter

    async def end(self, session: Session, commit: bool) -> None:
        """Commit or roll back a request session; no thread hop when nothing can wait."""
        if not session.in_transaction():
            return
        if try_lock(session):  # no thread is running a statement on it
            try:
                if _ends_without_io(session):
                    end_sync(session, commit)  # nothing to wait for: no thread hop
                    return
            finally:
                unlock(session)
        await anyio.to_thread.run_sync(end_sync, session, commit)

    async def close(self, session: Session) -> None:
        """Close a request session (in a worker thread when that may do I/O or wait)."""
        if not self.close_now(session):
            await anyio.to_thread.run_sync(_close_sync, session)

    def close_now(self, session: Session) -> bool:
        """Close ``session`` on the event loop when no thread is using it and closing does no
        I/O; whether it did."""
        if try_lock(session):
            try:
                if not session.in_transaction() or _ends_without_io(session):
                    _close_sync(session)
                    return True
            finally:
                unlock(session)
        return False

    def unit(self, session: Session, *, commit: bool) -> contextlib.AbstractContextManager[Session]:
        """The unit of work of a session outside the guard (``context_session()``, ...)."""
        return sync_unit(session, commit=commit, database=self.maker.name)


# -- async --------------------------------------------------------------------------------------
class AsyncLifecycle:
    """The transactions of an :class:`~fastapi_sessionmaker.AsyncFastAPISessionMaker`.

    Every end and close runs to completion even if the task is cancelled meanwhile.
    """

    def __init__(self, maker: AsyncFastAPISessionMaker) -> None:
        self.maker = maker
        self.slot = _LimiterSlot()

    def open(self, policy: CommitPolicy) -> AsyncSession:
        """A new request session: the configured classes, composed with the request rules."""
        factory = self.maker.cached_sessionmaker
        # The configured class's own sync class (SQLModel's AsyncSession: ``sqlmodel.Session``).
        base: type[Session] = factory.kw.get("sync_session_class") or factory.class_.sync_session_class
        read_only = policy is CommitPolicy.READ_ONLY
        mixins = (self.maker.replicas.mixin,) if read_only and self.maker.replicas is not None else ()
        sync_class = compose(base, read_only, threads=False, mixins=mixins)
        return factory.class_(**{**factory.kw, "sync_session_class": sync_class, "close_resets_only": False})

    def limiter(self) -> Limiter | None:
        """Async requests wait for the pool on the event loop already: only a single shared
        connection (SQLite in memory, a test's connection) is handed to one session at a time."""
        slot = self.slot
        if slot.joined is not None:
            return slot.joined
        if not slot.ready:
            pool = self.maker.cached_engine.sync_engine.pool
            slot.limiter = Limiter(1, _TEST_LIMITER_TIMEOUT) if isinstance(pool, StaticPool) else None
            slot.ready = True
        return slot.limiter

    async def end(self, session: AsyncSession, commit: bool) -> None:
        """Commit or roll back; a failed commit is rolled back, then re-raised unchanged."""
        if is_busy(session):  # a task still running on the session: let it end first
            await session.wait_idle()  # type: ignore[attr-defined]
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

    async def close(self, session: AsyncSession) -> None:
        """Close the session; without a transaction no I/O (and no greenlet) is needed."""
        if is_busy(session):
            await session.wait_idle()  # type: ignore[attr-defined]
        try:
            if session.in_transaction():
                await session.close()
            else:
                session.sync_session.close()  # no transaction: see close_now()
        finally:
            mark_closed(session)

    def close_now(self, session: AsyncSession) -> bool:
        """Close ``session`` here when no task is running on it and it holds no transaction (so
        no connection: no I/O and no greenlet, one greenlet switch fewer per request); whether
        it did."""
        if is_busy(session) or session.in_transaction():
            return False
        try:
            session.sync_session.close()
        finally:
            mark_closed(session)
        return True

    async def _end_and_close(self, session: AsyncSession, commit: bool) -> None:
        committed = False
        try:
            await self.end(session, commit)
            committed = commit
        finally:
            try:
                await self.close(session)
            finally:
                callbacks = settle(session, committed)
                if callbacks:
                    await run_async(callbacks, where="a unit of work", database=self.maker.name)

    @contextlib.asynccontextmanager
    async def unit(self, session: AsyncSession, *, commit: bool) -> AsyncIterator[AsyncSession]:
        """The unit of work of a session outside the guard, run to completion if cancelled; its
        ``on_commit`` / ``on_rollback`` callbacks run right after."""
        try:
            yield session
        except BaseException:
            await run_to_completion(self._end_and_close, session, False)
            raise
        await run_to_completion(self._end_and_close, session, commit)
