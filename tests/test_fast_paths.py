"""The guard's fast paths (issue 14) keep every guarantee: commits with a client that stays
connected on a server that is polled (not uvicorn), a cancellation arriving during a commit that
runs in its own task, and endpoints without a session untouched."""

import asyncio
import sys
import time
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Scope

from fastapi_sessionmaker import AsyncFastAPISessionMaker, _compat
from tests.conftest import Maker, checked_out, pool_of
from tests.models import User, reset_tables, stored_emails

DEADLINE = 5.0


class NewUser(BaseModel):
    email: str


async def _request(app: ASGIApp, method: str, path: str, body: bytes, sent: list[Message]) -> None:
    """One request as a server other than uvicorn makes it: ``receive`` waits until the response
    is complete (the client stays), so the guard must poll it without waiting."""
    requested = False
    complete = asyncio.Event()
    # A guard that waited on receive would wait forever (a commit cannot be cancelled): after
    # DEADLINE the client leaves instead, and the request fails its assertions rather than hang.
    asyncio.get_running_loop().call_later(DEADLINE, complete.set)

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    assert _compat.server_disconnected(receive) is None  # not uvicorn: the poll path
    await app(scope, receive, send)


def test_a_commit_with_the_client_still_there_is_polled_without_waiting(
    maker: Maker, sync_engine: sa.Engine
) -> None:
    """The disconnect check runs inside the commit's own task: it must still not wait on receive
    (the app read the body, so the server has nothing ready until the response is complete)."""
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    Session = Annotated[Any, maker.dependency]

    if maker.is_async:

        @app.post("/write")
        async def write_async(data: NewUser, session: Session) -> dict[str, bool]:
            session.add(User(email=data.email))
            await session.flush()
            return {"ok": True}
    else:

        @app.post("/write")
        def write_sync(data: NewUser, session: Session) -> dict[str, bool]:
            session.add(User(email=data.email))
            session.flush()
            return {"ok": True}

    async def scenario() -> list[Message]:
        sent: list[Message] = []
        try:
            started = time.monotonic()
            await _request(app, "POST", "/write", b'{"email": "stays@x"}', sent)
            assert time.monotonic() - started < DEADLINE
            assert checked_out(pool_of(maker)) == 0
        finally:
            if isinstance(maker, AsyncFastAPISessionMaker):
                await maker.dispose()  # on this loop, which its connections belong to
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    assert stored_emails(sync_engine) == ["stays@x"]


def test_the_poll_runs_receive_one_step_and_undoes_a_wait_like_a_cancellation() -> None:
    """``poll_receive`` steps ``receive()`` in the calling task, without the event loop: a message
    ready is returned; a receive that would wait is undone as ``task.cancel()`` would undo it
    (asyncio's queues and events forget their waiter), and the task's own cancellation is kept."""
    from fastapi_sessionmaker._shield import poll_receive

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ready: Message = {"type": "http.request", "body": b"", "more_body": False}

        async def at_once() -> Message:
            return ready

        assert await poll_receive(at_once) is ready

        queue: asyncio.Queue[Message] = asyncio.Queue()
        assert await poll_receive(queue.get) is None
        assert not queue._getters  # type: ignore[attr-defined]  # the waiter was removed
        queue.put_nowait(ready)
        assert await poll_receive(queue.get) is ready  # a later message is not lost

        event = asyncio.Event()

        async def on_event() -> Message:
            await event.wait()
            return ready

        assert await poll_receive(on_event) is None
        assert not event._waiters

        async def answers_when_cancelled() -> Message:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return {"type": "http.disconnect"}
            raise AssertionError("not reached")  # pragma: no cover

        assert await poll_receive(answers_when_cancelled) == {"type": "http.disconnect"}

        async def after_sleep_0() -> Message:
            await asyncio.sleep(0)  # suspends without a future: it would wait a loop turn
            return ready

        assert await poll_receive(after_sleep_0) is None

        # Not a coroutine: awaited, interrupted at the next loop turn.
        pending = loop.create_future()
        assert await poll_receive(lambda: pending) is None
        done = loop.create_future()
        done.set_result(ready)
        assert await poll_receive(lambda: done) is ready

        task = asyncio.current_task()
        assert task is not None
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0  # no poll left a cancellation behind

    asyncio.run(scenario())


def test_the_poll_keeps_a_cancellation_the_task_already_received() -> None:
    """A ``task.cancel()`` pending when the guard polls is delivered at the task's next wait."""
    from fastapi_sessionmaker._shield import poll_receive

    async def waits() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("not reached")  # pragma: no cover

    async def polled() -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        assert await poll_receive(waits) is None  # one step: no wait, so not interrupted
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            return "cancelled at the next wait"
        return "cancellation lost"

    async def scenario() -> str:
        return await asyncio.get_running_loop().create_task(polled())

    assert asyncio.run(scenario()) == "cancelled at the next wait"


@pytest.mark.parametrize("twin", ["async"])
def test_the_async_commit_runs_in_the_request_task_itself(maker: Maker, sync_engine: sa.Engine) -> None:
    """Python >= 3.11: the async twin's commit is run in the request's own task (no task of its
    own, no extra loop turn), still shielded from cancellation (``tests/test_shield.py``,
    ``tests/test_cancellation.py``); Python 3.10 gives it a task of its own."""
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    tasks: dict[str, Any] = {}

    def on_commit(connection: sa.Connection) -> None:
        tasks["commit"] = asyncio.current_task()

    sa.event.listen(maker.cached_engine.sync_engine, "commit", on_commit)

    @app.post("/write")
    async def write(data: NewUser, session: Annotated[Any, maker.dependency]) -> dict[str, bool]:
        tasks["endpoint"] = asyncio.current_task()
        session.add(User(email=data.email))
        return {"ok": True}

    async def scenario() -> list[Message]:
        sent: list[Message] = []
        try:
            await _request(app, "POST", "/write", b'{"email": "here@x"}', sent)
        finally:
            await maker.dispose()
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 200
    assert stored_emails(sync_engine) == ["here@x"]
    assert tasks["commit"] is not None
    assert (tasks["commit"] is tasks["endpoint"]) is (sys.version_info >= (3, 11))
