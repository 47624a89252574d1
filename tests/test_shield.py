"""``run_to_completion``: cleanup that a cancellation cannot cut in half, in a task of its own or,
with ``here=True`` (Python >= 3.11), in the calling task itself (issue 14: no task and no extra
loop turn per request)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import anyio
import pytest

from fastapi_sessionmaker._shield import poll_receive, run_to_completion

DEADLINE = 5.0
in_place_only = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is new in 3.11")
both = pytest.mark.parametrize("here", [False, True], ids=["task", "here"])


def run(scenario: Any) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(DEADLINE):
            return await scenario()

    return asyncio.run(bounded())


@in_place_only
def test_here_runs_in_the_calling_task_and_creates_none() -> None:
    async def scenario() -> None:
        caller = asyncio.current_task()
        seen: list[asyncio.Task[Any] | None] = []
        tasks: list[int] = []

        async def work() -> str:
            seen.append(asyncio.current_task())
            tasks.append(len(asyncio.all_tasks()))
            future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(future.set_result, "done")
            return await future

        before = len(asyncio.all_tasks())
        assert await run_to_completion(work, here=True) == "done"
        assert seen == [caller]
        assert tasks == [before]
        assert await run_to_completion(work) == "done"  # the default: a task of its own
        assert seen[1] is not caller
        assert tasks[1] == before + 1

    run(scenario)


@both
def test_a_cancellation_waits_for_the_work_then_is_raised(here: bool) -> None:
    """``task.cancel()`` meanwhile: the work's own waits are not interrupted, it ends, and the
    caller is cancelled after it (``cancelling()`` as asyncio counts it)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        entered = asyncio.Event()
        gate = loop.create_future()
        steps: list[str] = []

        async def work() -> None:
            entered.set()
            steps.append(await gate)
            await asyncio.sleep(0)  # a bare yield after the cancellation: not interrupted either
            steps.append("after")

        async def caller() -> None:
            await run_to_completion(work, here=here)
            steps.append("returned")  # pragma: no cover - the cancellation is raised instead

        task = asyncio.create_task(caller())
        await entered.wait()
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # twice: both are kept until the work has ended
        await asyncio.sleep(0)
        assert not task.done()
        gate.set_result("gate")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["gate", "after"]
        assert task.cancelled()

    run(scenario)


@both
def test_asyncio_timeout_around_it_still_times_out(here: bool) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate = loop.create_future()
        ended: list[bool] = []

        async def work() -> None:
            await gate
            ended.append(True)

        loop.call_later(0.05, lambda: gate.set_result(None))
        with pytest.raises(asyncio.TimeoutError):  # asyncio.timeout() on 3.12+, a task on 3.11
            await asyncio.wait_for(run_to_completion(work, here=here), 0.01)
        assert ended == [True]
        task = asyncio.current_task()
        assert task is not None
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0  # the timeout took back its own cancellation

    run(scenario)


@both
def test_a_future_cancelled_by_its_owner_cancels_only_that_wait(here: bool) -> None:
    """A future of the work cancelled by whoever made it is the work's own business: it sees
    ``CancelledError`` where it waits, and the caller is not cancelled when the work handles it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def work() -> str:
            future = loop.create_future()
            loop.call_soon(future.cancel)
            try:
                await future
            except asyncio.CancelledError:
                return "handled"
            return "not reached"  # pragma: no cover

        assert await run_to_completion(work, here=here) == "handled"
        await asyncio.sleep(0)  # no cancellation left behind for the caller

    run(scenario)


@both
def test_a_future_exception_reaches_the_work_as_await_gives_it(here: bool) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def work() -> None:
            future = loop.create_future()
            loop.call_soon(future.set_exception, LookupError("from the driver"))
            await future

        with pytest.raises(LookupError, match="from the driver"):
            await run_to_completion(work, here=here)

    run(scenario)


@both
def test_work_that_fails_while_cancelled_is_logged_and_the_cancellation_raised(
    here: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        entered = asyncio.Event()
        gate = loop.create_future()

        async def work() -> None:
            entered.set()
            await gate
            raise RuntimeError("the rollback failed")

        task = asyncio.create_task(run_to_completion(work, here=here))
        await entered.wait()
        task.cancel()
        await asyncio.sleep(0)
        gate.set_result(None)
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="fastapi_sessionmaker"):
        run(scenario)
    failures = [r for r in caplog.records if "cleanup failed while the request was cancelled" in r.message]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "the rollback failed" in str(failures[0].exc_info[1])


@both
def test_an_anyio_cancel_scope_delivered_again_and_again_waits_too(here: bool) -> None:
    """anyio re-sends ``cancel()`` at every loop iteration until its scope is left."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        steps: list[str] = []

        async def work() -> None:
            for _ in range(5):  # several waits, each across several loop iterations
                future = loop.create_future()
                loop.call_later(0.002, future.set_result, None)
                await future
            steps.append("ended")

        with anyio.CancelScope() as scope:
            scope.cancel()
            await run_to_completion(work, here=here)
            steps.append("returned")  # pragma: no cover
        assert steps == ["ended"]
        assert scope.cancelled_caught

    run(scenario)


@both
def test_the_first_cancellation_is_the_one_raised_with_its_message(here: bool) -> None:
    """anyio recognises its own cancellation by its message: a later future cancelled by its
    owner inside the work must not replace it (the scope would not catch what it raised)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        steps: list[str] = []

        async def work() -> None:
            first = loop.create_future()
            loop.call_later(0.005, first.set_result, None)
            await first  # anyio's cancellation arrives meanwhile, and is kept
            second = loop.create_future()
            loop.call_soon(second.cancel)
            try:
                await second
            except asyncio.CancelledError:
                steps.append("its own future cancelled, handled")

        with anyio.CancelScope() as scope:
            scope.cancel()
            await run_to_completion(work, here=here)
        assert steps == ["its own future cancelled, handled"]
        assert scope.cancelled_caught

    run(scenario)


@in_place_only
def test_a_receive_that_is_not_a_coroutine_is_polled_in_place_without_a_deadlock() -> None:
    """The poll of a receive that returns a future (not a coroutine) waits one loop turn of its
    own: it must not rely on ``cancel()`` of the calling task, which the in-place cleanup refuses."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        ready = loop.create_future()
        ready.set_result({"type": "http.disconnect"})

        async def work() -> tuple[Any, Any]:
            return await poll_receive(lambda: pending), await poll_receive(lambda: ready)

        assert await run_to_completion(work, here=True) == (None, {"type": "http.disconnect"})
        assert pending.cancelled()  # the wait undone, as a cancellation undoes it

    run(scenario)
