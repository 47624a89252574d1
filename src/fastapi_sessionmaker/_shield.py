"""Cancellation-safe cleanup: work that runs to its end even if the request is cancelled, and a look
at the ASGI ``receive`` channel that never waits."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import anyio
from starlette.types import Message, Receive

logger = logging.getLogger("fastapi_sessionmaker")

__all__ = ["poll_receive", "run_to_completion"]

_T = TypeVar("_T")


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio): anyio's shield covers every cancellation
        return None


class _Unstoppable(asyncio.Task):  # type: ignore[type-arg]
    """A task that refuses ``cancel()``: the cleanup it runs ends as it would without one.

    A task awaiting it that is cancelled meanwhile asks it to cancel too, is refused, and so
    keeps waiting; asyncio then delivers that task's cancellation when this one is done. That is
    ``asyncio.shield`` without its second future and the two loop turns it costs on every
    request.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


# A name of our own: asyncio would format one ("Task-<n>") for every request.
_NAME = "fastapi_sessionmaker cleanup"
# Python >= 3.12 starts the task at once, up to its first wait (one loop turn saved).
_EAGER: dict[str, Any] = {"eager_start": True} if sys.version_info >= (3, 12) else {}


async def run_to_completion(function: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
    """Await ``function(*args)`` to its end even if the calling task is cancelled meanwhile.

    ``anyio.CancelScope(shield=True)`` stops anyio's cancel scopes but not a plain asyncio
    ``task.cancel()`` (``asyncio.timeout``, ``wait_for``, a server cancelling its tasks): a second
    cancellation would interrupt a commit or a rollback halfway. On asyncio the work runs in a task
    of its own that refuses cancellation (:class:`_Unstoppable`); a cancellation received
    meanwhile is re-raised once the work is done, so the caller never returns before its cleanup
    finished.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()  # inline: one call less
    except RuntimeError:  # another event loop (trio): anyio's shield covers every cancellation
        loop = None
    if loop is None:
        with anyio.CancelScope(shield=True):
            result = await function(*args)
        return result
    task: asyncio.Task[_T] = _Unstoppable(function(*args), loop=loop, name=_NAME, **_EAGER)
    if task.done():  # finished without waiting (Python >= 3.12 starts it eagerly): no task switch
        return task.result()
    try:
        return await task
    except asyncio.CancelledError:
        if not task.done():  # pragma: no cover - asyncio delivers it only once the task is done
            raise
        if not task.cancelled() and task.exception() is not None:
            logger.error("cleanup failed while the request was cancelled", exc_info=task.exception())
        raise


async def poll_receive(receive: Receive) -> Message | None:
    """The next ASGI message if the server has one ready, ``None`` if ``receive`` would wait.

    On asyncio, ``receive()`` is run one step, in the calling task and without the event loop
    (:func:`_step_once`): no loop turn is spent. Anything but a coroutine, and other event loops,
    are interrupted instead: see :func:`_interrupted_receive`. A server that knows the client is
    gone answers ``http.disconnect`` at once.
    """
    loop = _asyncio_loop()
    if loop is None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            return await receive()
        return None
    awaitable = receive()
    if isinstance(awaitable, Coroutine):
        return _step_once(awaitable)
    return await _interrupted_receive(loop, awaitable)


def _step_once(coro: Coroutine[Any, Any, Message]) -> Message | None:
    """What ``coro`` returns without waiting, else ``None``, ``coro`` then undone as if cancelled.

    This is one step of what the calling task would do, run by hand: ``coro`` runs up to its
    first suspension in the task itself (``asyncio.current_task()``, the context and anyio's
    scopes are the task's). If it suspends, nothing else has run yet and the task never learns of
    the future it waits on; ``coro`` then gets what ``task.cancel()`` delivers at that point (the
    future cancelled, ``CancelledError`` raised where it waits), so ``asyncio.Queue``,
    ``Event`` and the servers' own ``receive`` clean up as after a cancellation. The task's own
    cancellation state is never touched: a real ``cancel()`` of the task is not consumed.
    """
    try:
        waited = coro.send(None)
    except StopIteration as done:
        return cast("Message", done.value)
    if getattr(waited, "_asyncio_future_blocking", None) is not None:  # a future (None: sleep(0))
        waited._asyncio_future_blocking = False
        waited.cancel()
    try:
        coro.throw(asyncio.CancelledError())
    except StopIteration as done:  # it caught the cancellation and answered anyway
        return cast("Message", done.value)
    except asyncio.CancelledError:
        return None
    coro.close()  # it caught the cancellation and waits again: not a message ready now
    return None


async def _interrupted_receive(
    loop: asyncio.AbstractEventLoop, awaitable: Awaitable[Message]
) -> Message | None:
    """Await ``awaitable``, interrupted at the next loop iteration by a plain ``task.cancel()``
    (far cheaper than a cancelled anyio scope); ``None`` if it was."""
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def interrupt() -> None:
        nonlocal fired
        fired = True
        asyncio.Task.cancel(task)  # the base method: it interrupts an _Unstoppable task too

    handle = loop.call_soon(interrupt)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not fired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()
        return None
    finally:
        handle.cancel()
