"""Cancellation-safe cleanup: work that runs to its end even if the request is cancelled, and a look
at the ASGI ``receive`` channel that never waits."""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
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


class _Refusing:
    """What the calling task waits on while the cleanup waits on ``future``: ``future`` itself for
    the event loop (its callbacks, its loop, its outcome), but its ``cancel()`` is refused.

    A task whose waiter refuses ``cancel()`` remembers the cancellation (``_must_cancel``) and
    delivers it when the waiter is done, as it does for an :class:`_Unstoppable` task; the
    cleanup's own future is never cancelled by it.
    """

    __slots__ = ("_asyncio_future_blocking", "_future")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future
        self._asyncio_future_blocking = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def add_done_callback(self, fn: Callable[..., object], *, context: Any = None) -> None:
        self._future.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[..., object]) -> int:
        return self._future.remove_done_callback(fn)

    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def result(self) -> Any:
        return self._future.result()

    def exception(self) -> BaseException | None:
        return self._future.exception()

    def cancel(self, msg: Any = None) -> bool:
        return False


@types.coroutine
def _in_place(coro: Coroutine[Any, Any, _T], task: asyncio.Task[Any]) -> Generator[Any, None, _T]:
    """Run ``coro`` in the calling ``task`` to its end, whatever cancels the task meanwhile.

    Each future ``coro`` waits on is handed to the task behind a :class:`_Refusing` front, so a
    ``task.cancel()`` never reaches it; the ``CancelledError`` the task then throws in once that
    future is done is kept from ``coro`` (which goes on with the future's outcome) and raised when
    ``coro`` has ended. A future that is cancelled by its own owner still cancels ``coro``'s wait.
    No task, no extra loop turn: the calling task is woken by the cleanup's own futures.
    """
    cancelling: Callable[[], int] = task.cancelling  # type: ignore[attr-defined]  # Python >= 3.11
    requested = cancelling()
    kept: asyncio.CancelledError | None = None  # the task's cancellation, raised at the end
    thrown: BaseException | None = None
    pending = False  # woken while ``future`` is not done yet: wait for it again
    future: asyncio.Future[Any] | None = None
    while True:
        if not pending:
            try:
                waited = coro.send(None) if thrown is None else coro.throw(thrown)
            except StopIteration as done:
                if kept is not None:
                    raise kept from None
                return cast("_T", done.value)
            except BaseException as error:
                if kept is not None and not isinstance(error, asyncio.CancelledError):
                    logger.error("cleanup failed while the request was cancelled", exc_info=error)
                    raise kept from None
                raise
            thrown = None
            future = waited if getattr(waited, "_asyncio_future_blocking", None) else None
        pending = False
        if future is not None:
            future._asyncio_future_blocking = False
            waited = _Refusing(future)
        try:
            yield waited
        except GeneratorExit:
            coro.close()
            raise
        except asyncio.CancelledError as error:
            owners = future is not None and future.cancelled()  # cancelled by whoever made it
            # The task's (the first one kept, with its message: anyio knows its own by it);
            # with the owner's, the task's too when the task was cancelled meanwhile.
            if kept is None and (not owners or cancelling() > requested):
                kept = error
            if owners:  # coro's own: it gets it where it waits
                thrown = asyncio.CancelledError()
            else:
                pending = future is not None and not future.done()
        except BaseException as error:  # the future's exception: coro's own, as ``await`` gives it
            thrown = error


async def run_to_completion(
    function: Callable[..., Coroutine[Any, Any, _T]], *args: Any, here: bool = False
) -> _T:
    """Await ``function(*args)`` to its end even if the calling task is cancelled meanwhile.

    ``anyio.CancelScope(shield=True)`` stops anyio's cancel scopes but not a plain asyncio
    ``task.cancel()`` (``asyncio.timeout``, ``wait_for``, a server cancelling its tasks): a second
    cancellation would interrupt a commit or a rollback halfway. On asyncio the work runs in a
    task of its own that refuses cancellation (:class:`_Unstoppable`); a cancellation received
    meanwhile is re-raised once the work is done, so the caller never returns before its cleanup
    finished.

    ``here=True`` (Python >= 3.11): the work runs in the calling task instead, every wait of it
    shielded from ``cancel()`` (:func:`_in_place`): no task and no extra loop turn. Only for work
    that awaits no anyio checkpoint (our own code, SQLAlchemy and the asyncio drivers): anyio would
    see the caller's cancel scopes, and wait for a cancellation that is never delivered to it.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()  # inline: one call less
    except RuntimeError:  # another event loop (trio): anyio's shield covers every cancellation
        loop = None
    if loop is None:
        with anyio.CancelScope(shield=True):
            result = await function(*args)
        return result
    if here and _IN_PLACE:
        current = asyncio.current_task(loop)
        if current is not None:
            return await _in_place(function(*args), current)
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


# ``Task.cancelling()`` (Python >= 3.11) tells the task's own cancellations from a future's.
_IN_PLACE = sys.version_info >= (3, 11)


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
    """What ``awaitable`` gives by the next loop iteration, else ``None`` (it is then cancelled,
    as ``task.cancel()`` would undo its wait).

    A wait of its own, woken by whichever comes first, the message or the next iteration: it
    needs no ``cancel()`` of the calling task, which a cleanup run in place refuses.
    """
    future = asyncio.ensure_future(awaitable, loop=loop)
    if not future.done():
        turn = loop.create_future()

        def wake(_: object = None) -> None:
            if not turn.done():
                turn.set_result(None)

        handle = loop.call_soon(wake)
        future.add_done_callback(wake)
        try:
            await turn
        finally:
            handle.cancel()
            future.remove_done_callback(wake)
            undone = not future.done()
            if undone:
                future.cancel()
        if undone:
            return None
    return future.result()
