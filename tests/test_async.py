"""The async twin beyond the shared behaviour: one session per task, and its docs page.

``asyncio.gather`` over one ``AsyncSession`` raises :class:`ConcurrentSessionUseError` (instead of
driver-specific failures), and ``maker.task_session()`` gives each task its own session under the
same commit policy. On SQLite (aiosqlite), PostgreSQL (asyncpg) and MariaDB (aiomysql).
"""

import asyncio
import gc
import logging
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_sessionmaker import (
    AsyncDBSession,
    AsyncFastAPISessionMaker,
    ConcurrentSessionUseError,
    ReadOnlySessionError,
)
from tests.conftest import Maker, checked_out, pool_of
from tests.models import User, reset_tables, stored_emails

ASYNC = pytest.mark.parametrize("twin", ["async"])

DOCS = Path(__file__).resolve().parent.parent / "docs" / "async.md"


@ASYNC
def test_gather_over_one_session_raises_a_clear_error(maker: Maker) -> None:
    assert isinstance(maker, AsyncFastAPISessionMaker)

    async def scenario() -> None:
        try:
            with pytest.raises(ConcurrentSessionUseError, match=r"task_session\(\)") as caught:
                async with maker.context_session() as session:
                    await asyncio.gather(
                        session.execute(sa.text("SELECT 1")),
                        session.execute(sa.text("SELECT 2")),
                    )
            assert "execute() is still running in another task" in str(caught.value)
            # The first statement was allowed to finish, then everything was rolled back and closed.
            assert checked_out(pool_of(maker)) == 0
        finally:
            await maker.dispose()

    asyncio.run(scenario())


@ASYNC
def test_one_task_after_another_is_fine(maker: Maker) -> None:
    """Only overlapping use is refused: sequential awaits and ``scalars`` (which nests) work."""
    assert isinstance(maker, AsyncFastAPISessionMaker)

    async def scenario() -> list[int]:
        try:
            async with maker.context_session() as session:
                first = (await session.execute(sa.text("SELECT 1"))).scalar_one()
                rest = list(await session.scalars(sa.text("SELECT 2")))
                return [first, *rest]
        finally:
            await maker.dispose()

    assert asyncio.run(scenario()) == [1, 2]


@ASYNC
def test_gather_over_the_request_session_is_a_500_and_rolls_back(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    errors: list[BaseException] = []

    @app.post("/gather")
    async def gather(session: Annotated[AsyncSession, maker.dependency]) -> None:
        session.add(User(email="lost@x"))
        try:
            await asyncio.gather(session.flush(), session.execute(sa.text("SELECT 1")))
        except ConcurrentSessionUseError as exc:
            errors.append(exc)
            raise

    client = serve(app)
    assert client.post("/gather").status_code == 500
    assert len(errors) == 1
    assert stored_emails(sync_engine) == []
    assert checked_out(pool_of(maker)) == 0


@ASYNC
def test_task_sessions_commit_each_task(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    async def create(email: str) -> str:
        async with maker.task_session() as session:
            session.add(User(email=email))
            await session.flush()
            return email

    @app.post("/many")
    async def many(session: Annotated[AsyncSession, maker.dependency]) -> list[str]:
        # The request session and three task sessions, each on its own connection.
        session.add(User(email="request@x"))
        return list(await asyncio.gather(create("a@x"), create("b@x"), create("c@x")))

    @app.post("/one-fails")
    async def one_fails() -> list[str]:
        # a@x exists: 409. Wait for both tasks (plain gather returns at the first error while the
        # other task still runs), then raise the failure.
        results = await asyncio.gather(create("d@x"), create("a@x"), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [str(result) for result in results]

    client = serve(app)
    response = client.post("/many")
    assert response.status_code == 200
    assert response.json() == ["a@x", "b@x", "c@x"]
    assert stored_emails(sync_engine) == ["a@x", "b@x", "c@x", "request@x"]
    # Each task is its own unit of work: the failing one rolled back, the other committed.
    conflict = client.post("/one-fails")
    assert conflict.status_code == 409
    assert stored_emails(sync_engine) == ["a@x", "b@x", "c@x", "d@x", "request@x"]
    assert checked_out(pool_of(maker)) == 0


@ASYNC
def test_task_session_follows_the_request_policy(maker: Maker, sync_engine: sa.Engine) -> None:
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    @app.post("/read-only")
    async def read_only(session: Annotated[AsyncSession, maker.depends(policy="read_only")]) -> int:
        await session.execute(sa.text("SELECT 1"))
        async with maker.task_session() as task:
            task.add(User(email="refused@x"))
            await task.flush()
        return 0  # pragma: no cover

    @app.post("/manual")
    async def manual() -> int:
        async with maker.task_session(policy="manual") as task:
            task.add(User(email="not-committed@x"))
            await task.flush()
        return 1

    with TestClient(app) as client:
        with pytest.raises(ReadOnlySessionError):
            client.post("/read-only")
        assert client.post("/manual").json() == 1
    assert stored_emails(sync_engine) == []


@ASYNC
def test_task_session_outside_requests_uses_the_maker_policy(maker: Maker, sync_engine: sa.Engine) -> None:
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)

    async def scenario() -> None:
        async def create(email: str) -> None:
            async with maker.task_session() as session:
                session.add(User(email=email))

        try:
            await asyncio.gather(*(create(f"{n}@x") for n in range(3)))
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert stored_emails(sync_engine) == ["0@x", "1@x", "2@x"]


# -- docs/async.md ---------------------------------------------------------------------------


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)


def test_docs_have_the_examples_we_test() -> None:
    assert len(python_blocks()) == 4


def test_docs_quick_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_async_quick_start"}
    exec(python_blocks()[0], namespace)
    app = namespace["app"]
    assert isinstance(app, FastAPI)
    with TestClient(app, raise_server_exceptions=False) as client:
        created = client.post("/notes", params={"text": "hello"})
        assert created.status_code == 201
        assert client.get(f"/notes/{created.json()['id']}").json() == {"id": 1, "text": "hello"}
        assert client.post("/notes", params={"text": "hello"}).status_code == 409


class HangUpBeforeTheStatusLine:
    """Innermost middleware: holds the status line back until the server reports the disconnect."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def held_send(message: Any) -> None:
            if message["type"] == "http.response.start" and scope["path"] == "/payments":
                while (await asyncio.wait_for(receive(), 10))["type"] != "http.disconnect":
                    pass
            await send(message)

        await self.app(scope, receive, held_send)


def test_docs_disconnect_example_rolls_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., httpx.Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_async_disconnect"}
    exec(python_blocks()[0] + python_blocks()[1], namespace)
    app = namespace["app"]
    assert isinstance(app, FastAPI)
    # Between the endpoint and the guard (the guard sits on the route's handle): the status line
    # is held until the client has hung up, like slow work at the end of the endpoint.
    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/payments")
    route.app = HangUpBeforeTheStatusLine(route.app)
    client = serve(app)
    host, port = str(client.base_url).removeprefix("http://").split(":")
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(b"POST /payments?amount=5 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        deadline = time.monotonic() + 10
        while not any("client disconnected before the commit" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the guard never saw the disconnect"
            time.sleep(0.01)
    assert client.get("/payments/count").json() == 0  # the hung-up payment was rolled back


def test_docs_task_session_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_async_tasks"}
    exec(python_blocks()[0] + python_blocks()[2], namespace)
    app = namespace["app"]
    assert isinstance(app, FastAPI)
    with TestClient(app) as client:
        client.post("/notes", params={"text": "a"})
        client.post("/notes", params={"text": "b"})
        assert client.get("/dashboard").json() == {"notes": 2, "longest": 1}


def test_docs_relationships_in_a_response_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_async_relationships"}
    exec(python_blocks()[0] + python_blocks()[3], namespace)
    app: FastAPI = namespace["app"]
    shelf_cls, shelf_out = namespace["Shelf"], namespace["ShelfOut"]

    @app.get("/shelves/{shelf_id}/not-loaded", response_model=shelf_out)
    async def not_loaded(shelf_id: int, session: AsyncDBSession) -> Any:
        return await session.get(shelf_cls, shelf_id)  # what the page warns about

    with TestClient(app) as client:
        engine = sa.create_engine("sqlite:///./notes.db")
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO shelves (id, name) VALUES (1, 'poetry')"))
            connection.execute(sa.text("INSERT INTO books (title, shelf_id) VALUES ('b', 1), ('a', 1)"))
        engine.dispose()
        expected = {"name": "poetry", "books": [{"title": "a"}, {"title": "b"}]}
        assert client.get("/shelves/1").json() == expected
        assert client.get("/shelves/1/by-id").json() == expected
        assert client.get("/shelves/2").status_code == 404
        with warnings.catch_warnings():
            # The lazy load's driver coroutine is never awaited: collect it here, not in a later test.
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ResponseValidationError, match="MissingGreenlet"):
                client.get("/shelves/1/not-loaded")
            gc.collect()
    asyncio.run(namespace["db"].dispose())
