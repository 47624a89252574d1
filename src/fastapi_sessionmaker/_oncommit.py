"""Side effects after the commit: ``on_commit`` and ``on_rollback`` callbacks of a session.

A callback is registered on a session and kept with the transaction it was registered in. When
the unit of work ends (:mod:`._unit`: the guard at the status line, ``context_session()``,
``task_session()``, ``get_db()``) the outcome decides which callbacks run: after a commit the
``on_commit`` ones, after a rollback the ``on_rollback`` ones, each in the order of registration.
A request's callbacks run after its response has been sent. An ``on_commit`` callback registered
inside a SAVEPOINT that is rolled back is discarded; an explicit ``session.commit()`` (the
``MANUAL`` policy) settles the callbacks registered before it. A failing callback is logged once
and does not stop the others.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import Session, SessionTransaction

from fastapi_sessionmaker._sessions import is_closed, response_started, sync_of
from fastapi_sessionmaker._tracing import callback_name, callback_span
from fastapi_sessionmaker.exceptions import ResponseStartedError, SessionClosedError

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["Callback", "capture", "on_commit", "on_rollback", "run_async", "run_sync", "settle"]

Callback = Callable[[], Any]
"""A callable without arguments, sync or async."""


class _Callbacks:
    """The callbacks of one session: pending ones with their SAVEPOINT, and those ready to run."""

    __slots__ = ("commit", "ready", "rollback")

    def __init__(self) -> None:
        self.commit: list[tuple[Callback, SessionTransaction | None]] = []
        self.rollback: list[Callback] = []
        self.ready: list[Callback] = []

    def committed(self) -> None:
        self.ready.extend(callback for callback, _ in self.commit)
        self.commit.clear()
        self.rollback.clear()

    def rolled_back(self) -> None:
        self.ready.extend(self.rollback)
        self.commit.clear()
        self.rollback.clear()

    def discard_within(self, savepoint: SessionTransaction) -> None:
        self.commit = [(cb, where) for cb, where in self.commit if not _within(where, savepoint)]

    # Session events (installed on the session when its first callback is registered).
    def after_commit(self, session: Session) -> None:
        if session.get_nested_transaction() is None:  # the root committed (not a RELEASE)
            self.committed()

    def after_soft_rollback(self, session: Session, previous: SessionTransaction) -> None:
        if previous.nested:
            self.discard_within(previous)
        elif previous.parent is None:
            self.rolled_back()


def _within(where: SessionTransaction | None, savepoint: SessionTransaction) -> bool:
    while where is not None:
        if where is savepoint:
            return True
        where = where.parent
    return False


def _target(session: Any) -> Session:
    target = sync_of(session)
    if not isinstance(target, Session):
        raise TypeError(f"on_commit/on_rollback need a Session or an AsyncSession, not {type(session)!r}")
    return target


def _callbacks(target: Session, *, create: bool) -> _Callbacks | None:
    callbacks: _Callbacks | None = getattr(target, "_fsm_callbacks", None)
    if callbacks is None and create:
        callbacks = target._fsm_callbacks = _Callbacks()  # type: ignore[attr-defined]
        sa.event.listen(target, "after_commit", callbacks.after_commit)
        sa.event.listen(target, "after_soft_rollback", callbacks.after_soft_rollback)
    return callbacks


def _check(target: Session, what: str) -> None:
    if is_closed(target):
        raise SessionClosedError(
            f"{what}() on a session that is closed: its transaction has ended, so the callback "
            "could never run. Register it while the session's unit of work is open."
        )
    if response_started(target):
        raise ResponseStartedError(
            f"{what}() after the response started: the request's session was already committed "
            "(or rolled back) when the status line was sent. Register it before returning."
        )


def on_commit(session: Any, callback: Callback) -> None:
    """Run ``callback`` once ``session``'s transaction has committed; never if it rolls back.

    ``callback`` takes no arguments and may be sync (run in a worker thread inside requests) or
    async (awaited). On a request session it runs after the response was sent; on
    ``context_session()``, ``task_session()`` and ``get_db()`` sessions right after the commit.

    Example:
        >>> from fastapi_sessionmaker import FastAPISessionMaker, on_commit
        >>> db = FastAPISessionMaker("sqlite://")
        >>> sent = []
        >>> with db.context_session() as session:
        ...     on_commit(session, lambda: sent.append("welcome e-mail"))
        ...     sent.append("still in the transaction")
        >>> sent
        ['still in the transaction', 'welcome e-mail']
        >>> db.dispose()
    """
    target = _target(session)
    _check(target, "on_commit")
    callbacks = _callbacks(target, create=True)
    assert callbacks is not None
    callbacks.commit.append((callback, target.get_nested_transaction()))


def on_rollback(session: Any, callback: Callback) -> None:
    """Run ``callback`` once ``session``'s transaction has rolled back, for any reason.

    A raised exception, a returned error status, a failed commit or a client that went away all
    roll back; see :func:`on_commit` for when and how callbacks run.

    Example:
        >>> from fastapi_sessionmaker import FastAPISessionMaker, on_rollback
        >>> db = FastAPISessionMaker("sqlite://")
        >>> undone = []
        >>> try:
        ...     with db.context_session() as session:
        ...         on_rollback(session, lambda: undone.append("release the reservation"))
        ...         raise ValueError("payment declined")
        ... except ValueError:
        ...     pass
        >>> undone
        ['release the reservation']
        >>> db.dispose()
    """
    target = _target(session)
    _check(target, "on_rollback")
    callbacks = _callbacks(target, create=True)
    assert callbacks is not None
    callbacks.rollback.append(callback)


def settle(session: Any, committed: bool) -> list[Callback]:
    """Apply the unit of work's outcome to what is still pending; the callbacks to run, in order."""
    callbacks = _callbacks(sync_of(session), create=False)
    if callbacks is None:
        return []
    if committed:
        callbacks.committed()
    else:
        callbacks.rolled_back()
    ready, callbacks.ready = callbacks.ready, []
    return ready


# -- running --------------------------------------------------------------------------------------
class _Capture:
    def __init__(self, execute: bool) -> None:
        self.execute = execute
        self.callbacks: list[Callback] = []


_captures: list[_Capture] = []
_captures_lock = threading.Lock()


class capture:
    """Record every callback about to run (the testing plugin's ``fsm_on_commit`` uses it).

    ``execute=False`` records them without running them.
    """

    def __init__(self, *, execute: bool = True) -> None:
        self._capture = _Capture(execute)

    def __enter__(self) -> list[Callback]:
        with _captures_lock:
            _captures.append(self._capture)
        return self._capture.callbacks

    def __exit__(self, *exc: object) -> None:
        with _captures_lock:
            _captures.remove(self._capture)


def _to_run(callbacks: list[Callback]) -> list[Callback]:
    if not _captures:
        return callbacks
    with _captures_lock:
        for active in _captures:
            active.callbacks.extend(callbacks)
        execute = all(active.execute for active in _captures)
    return callbacks if execute else []


def _failed(callback: Callback, where: str, database: str) -> None:
    name = callback_name(callback)
    logger.error(
        "callback %s after the transaction failed on %s (database %r)",
        name,
        where,
        database,
        exc_info=True,
        extra={"callback": name, "path": where, "database": database},
    )


def _is_async(callback: Callback) -> bool:
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        getattr(callback, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


async def run_async(callbacks: list[Callback], *, where: str, database: str) -> None:
    """Run ``callbacks`` in order: async ones awaited, sync ones in a worker thread."""
    for callback in _to_run(callbacks):
        try:
            with callback_span(callback, where, database):
                if _is_async(callback):
                    await callback()
                else:
                    result = await anyio.to_thread.run_sync(callback)
                    if inspect.isawaitable(result):
                        await result
        except Exception:
            _failed(callback, where, database)


def run_sync(callbacks: list[Callback], *, where: str, database: str) -> None:
    """Run ``callbacks`` in order in this thread (async ones in an event loop of their own)."""
    for callback in _to_run(callbacks):
        try:
            with callback_span(callback, where, database):
                result = callback()
                if inspect.isawaitable(result):
                    _run_awaitable(result)
        except Exception:
            _failed(callback, where, database)


def _run_awaitable(awaitable: Awaitable[Any]) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_await(awaitable))
        return
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    raise RuntimeError(
        "an async callback on a sync session used inside a running event loop cannot be awaited "
        "here: use the async maker, or a sync callback"
    )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
