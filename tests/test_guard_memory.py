"""What the guard leaves behind after a request: nothing that callbacks could keep alive.

asyncio copies the current context into every callback scheduled during a request (uvicorn's
keep-alive timer is one, alive for seconds). The guard's context variable therefore holds only
a weak reference to the request's state: a finished request's objects are freed by reference
counting at once, not kept alive until the timer fires (under load, that retention promoted them
into the old GC generations and full collections of ~30 ms showed up in the p99).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import gc
import weakref
from pathlib import Path

from fastapi import FastAPI
from starlette.types import Message

from fastapi_sessionmaker import DBSession, FastAPISessionMaker
from fastapi_sessionmaker._request import RequestState, current_state


async def _get(app: FastAPI, path: str) -> int:
    status = 0
    done = asyncio.Event()

    async def receive() -> Message:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return status


def test_a_callback_scheduled_during_a_request_does_not_keep_its_state_alive(tmp_path: Path) -> None:
    app = FastAPI()
    FastAPISessionMaker(f"sqlite:///{tmp_path / 'db.sqlite'}").init_app(app, check_on_startup=False)
    seen: list[weakref.ref[RequestState]] = []
    timers: list[asyncio.TimerHandle] = []

    @app.get("/ping")
    async def ping(session: DBSession) -> str:  # a request session: the guard is on this route
        state = current_state()
        assert state is not None
        seen.append(weakref.ref(state))
        # like uvicorn's keep-alive timer: scheduled inside the request, copies its context
        timers.append(asyncio.get_running_loop().call_later(3600, lambda: None))
        return "pong"

    async def scenario() -> None:
        gc.disable()  # only reference counting may free the state
        try:
            assert await _get(app, "/ping") == 200
            assert timers
            assert not timers[0].cancelled()
            assert seen[0]() is None, "the request's state outlived the request"
        finally:
            gc.enable()
            for timer in timers:
                timer.cancel()

    asyncio.run(scenario())
