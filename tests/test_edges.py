"""The promises at their edges: a SQLite lock never freezes the event loop, a cancelled sync endpoint
never has its session ended under its feet, streams cannot starve the pool, streaming bodies never
drop a write silently, one request has one session however it asks, WebSockets get a clear answer.

Each test runs a real uvicorn on 127.0.0.1 against SQLite, PostgreSQL and MariaDB; every wait is
bounded.
"""

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker, NotInstalledError
from fastapi_sessionmaker._base import Limiter
from tests.conftest import Maker, MakerFactory, checked_out, pool_of, wait_until
from tests.models import User, reset_tables, stored_emails

Serve = Callable[..., httpx.Client]
DEADLINE = 20.0


def timed(client: httpx.Client, method: str, path: str, results: dict[str, Any], delay: float) -> None:
    time.sleep(delay)
    started = time.monotonic()
    try:
        status: int | str = client.request(method, path).status_code
    except httpx.HTTPError as exc:  # pragma: no cover - reported by the assertion
        status = type(exc).__name__
    results[path] = (status, time.monotonic() - started)


# -- 1. a commit that must flush never runs on the event loop -----------------------------------
def test_a_commit_waiting_for_a_write_lock_never_freezes_the_server(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    """``/a`` holds the write lock for 0.3 s; ``/b`` reads, then adds a row; ``/ping`` must not wait.

    Before the fix, ``/b``'s commit was judged I/O-free (its read opened no SQLite transaction) and
    ran on the event loop, where its flush waited 5 s for ``/a``'s lock, which needed the loop.
    """
    reset_tables(sync_engine)
    maker = FastAPISessionMaker(database_url)
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    @app.post("/a")
    def a(session: Db) -> str:
        session.add(User(email="a@x"))
        session.flush()
        time.sleep(0.3)
        return "a"

    @app.post("/b")
    def b(session: Db) -> str:
        session.scalar(sa.select(sa.func.count()).select_from(User))
        session.add(User(email="b@x"))
        return "b"

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    client = serve(app)
    results: dict[str, Any] = {}
    jobs = [
        threading.Thread(target=timed, args=(client, "POST", "/a", results, 0.0)),
        threading.Thread(target=timed, args=(client, "POST", "/b", results, 0.05)),
        threading.Thread(target=timed, args=(client, "GET", "/ping", results, 0.15)),
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(DEADLINE)
    try:
        assert results["/ping"][0] == 200
        assert results["/ping"][1] < 1.0, results  # the loop was free (it froze for ~4.9 s)
        assert results["/a"][0] == 200, results
        assert results["/b"][0] == 200, results
        assert results["/b"][1] < 3.0, results  # /b waited for /a's lock in a thread, not 5 s
        assert stored_emails(sync_engine) == ["a@x", "b@x"]
    finally:
        maker.dispose()


# -- 1b. more writers than worker threads: the lock holder always gets its thread hop -----------
class Count(BaseModel):
    n: int


def test_more_writers_on_one_row_than_worker_threads_never_deadlock(
    database_url: str, sync_engine: sa.Engine, serve: Serve
) -> None:
    """12 sync requests update one row with 4 worker threads and a pool of 10.

    Each holds the row lock (SQLite: the write lock) from its UPDATE until the guard commits, after
    FastAPI validated the response model in another thread hop; a waiting writer holds a thread.
    Before the fix 10 sessions could be open: 4 writers held every thread, the holder waited for a
    thread to validate its response, PostgreSQL waited for ever, SQLite and MariaDB until their
    lock timeouts (503s). Now no more sessions are open than worker threads less one.
    """
    with sync_engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS fsm_counter")
        connection.exec_driver_sql("CREATE TABLE fsm_counter (id INTEGER PRIMARY KEY, n INTEGER)")
        connection.exec_driver_sql("INSERT INTO fsm_counter VALUES (1, 0)")
    # Every lock wait ends after 5 s (PostgreSQL's would last for ever), so a deadlock shows as
    # 503s and the test stops by itself; the requests pass in well under a second.
    lock_timeout = {
        "sqlite": {"timeout": 5},
        "postgresql": {"options": "-c lock_timeout=5000"},
        "mysql": {"init_command": "SET innodb_lock_wait_timeout=5"},
    }
    connect_args = lock_timeout[sa.make_url(database_url).get_backend_name()]
    options = {"pool_size": 10, "max_overflow": 0, "pool_timeout": 30, "connect_args": connect_args}
    maker = FastAPISessionMaker(database_url, engine_options=options)

    @contextlib.asynccontextmanager
    async def few_threads(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4
        yield

    app = FastAPI(lifespan=few_threads)
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    @app.post("/count")
    def count(session: Db) -> Count:
        session.execute(sa.text("UPDATE fsm_counter SET n = n + 1 WHERE id = 1"))
        return Count(n=1)  # validated by FastAPI in a worker thread, the row still locked

    client = serve(app)

    async def main() -> list[int | str]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=DEADLINE) as http:

            async def one() -> int | str:
                try:
                    return (await http.post("/count")).status_code
                except httpx.HTTPError as exc:
                    return type(exc).__name__

            return list(await asyncio.gather(*(one() for _ in range(12))))

    try:
        statuses = asyncio.run(main())
        assert statuses == [200] * 12, statuses
        with sync_engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT n FROM fsm_counter").scalar() == 12
    finally:
        maker.dispose()
        with sync_engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS fsm_counter")


def test_sync_request_slots_are_the_pool_and_the_worker_threads_less_one() -> None:
    """The cap the test above relies on, and the error once every slot is taken."""

    async def main() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4
        assert Limiter(10, 0.05, threads=True).size() == 3  # the threads less one
        assert Limiter(None, 0.05, threads=True).size() == 3  # no pool limit: the threads still
        assert Limiter(2, 0.05, threads=True).size() == 2  # the pool when it is smaller
        assert Limiter(10, 0.05).size() == 10  # not bound to threads: the pool alone
        limiter = Limiter(10, 0.05, threads=True)
        for _ in range(3):
            await limiter.acquire()
        with pytest.raises(
            sa.exc.TimeoutError, match=r"3 request sessions at once: pool capacity 10, 4 worker"
        ):
            await limiter.acquire()

    asyncio.run(main())


# -- 2. a cancelled sync endpoint keeps its session until its statement is done ----------------
class Timeout:
    """A timeout middleware outside the guard: ``asyncio.timeout`` around the app, then 504."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.seconds)
        except asyncio.TimeoutError:
            if not started:
                await send({"type": "http.response.start", "status": 504, "headers": []})
                await send({"type": "http.response.body", "body": b"timeout"})


@pytest.mark.parametrize("style", ["parameter", "declared"])
def test_a_timeout_cancelling_a_sync_endpoint_never_ends_its_session_concurrently(
    database_url: str, sync_engine: sa.Engine, serve: Serve, style: str
) -> None:
    """The endpoint keeps using its session in its worker thread after the 504 went out; the same
    with the session declared (``@maker.with_session``, read as ``maker.session``).

    Before the fix the guard rolled back and closed that session from another thread at the same
    time: SQLite segfaulted the server, MariaDB answered ``Packet sequence number wrong``.
    """
    reset_tables(sync_engine)
    maker = FastAPISessionMaker(database_url, engine_options={"pool_size": 2, "max_overflow": 0})
    app = FastAPI()
    maker.init_app(app)
    app.add_middleware(Timeout, seconds=0.15)
    Db = Annotated[Any, maker.dependency]
    finished: list[str] = []
    errors: list[str] = []

    def work(n: int, session: Any) -> str:
        ends = time.monotonic() + 0.4  # runs on well after the 504 went out
        i = 0
        try:
            while time.monotonic() < ends:
                i += 1
                session.add(User(email=f"{n}-{i}@x"))
                session.flush()
                session.scalars(sa.select(User.email).limit(5)).all()
        except sa.exc.InvalidRequestError as exc:
            if "closed" not in str(exc):  # closed under the lock between two statements: expected
                errors.append(repr(exc))
        except Exception as exc:  # anything else is a session ended under the thread's feet
            errors.append(repr(exc))
        finished.append(str(n))
        return "done"

    if style == "parameter":

        @app.post("/slow/{n}")
        def slow(n: int, session: Db) -> str:
            return work(n, session)
    else:

        @app.post("/slow/{n}")
        @maker.with_session
        def slow_declared(n: int) -> str:
            return work(n, maker.session)

    @app.get("/count")
    def count(session: Db) -> int:
        return int(session.scalar(sa.select(sa.func.count()).select_from(User)) or 0)

    client = serve(app)
    try:
        statuses = {n: client.post(f"/slow/{n}").status_code for n in range(6)}
        assert set(statuses.values()) <= {200, 504}, statuses
        if sys.version_info >= (3, 11):
            # Python 3.10: anyio's shield absorbs the cancellation until the thread returns, so the
            # request completes (and commits) late instead; the session is never shared either way.
            assert set(statuses.values()) == {504}, statuses
        wait_until(lambda: len(finished) == 6, "every endpoint thread to finish", DEADLINE)
        assert errors == []
        assert client.get("/count").status_code == 200  # the server is alive and its pool works
        wait_until(lambda: checked_out(pool_of(maker)) == 0, "every connection back", DEADLINE)
        committed = {email.split("-")[0] for email in stored_emails(sync_engine)}
        assert committed == {str(n) for n, status in statuses.items() if status == 200}
    finally:
        maker.dispose()


# -- 3. the documented streaming pattern holds with more streams than worker threads -----------
def stream_app(maker: Maker, *, threads: int | None = None) -> FastAPI:
    """The documented streaming pattern; ``threads``: the worker threads the app runs with."""
    from fastapi.responses import StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if threads is not None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(lifespan=lifespan)
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    query = sa.select(User.email).order_by(User.email)
    if maker.is_async:

        @app.get("/events")
        async def events_async(session: Db) -> StreamingResponse:
            async def stream() -> AsyncIterator[str]:
                for email in await session.scalars(query):
                    yield f"data: {email}\n\n"
                    await asyncio.sleep(0.01)

            return StreamingResponse(stream(), media_type="text/event-stream")
    else:

        @app.get("/events")
        def events_sync(session: Db) -> StreamingResponse:
            def stream() -> Iterator[str]:  # docs/lifetimes.md's pattern
                for email in session.scalars(query):
                    yield f"data: {email}\n\n"
                    time.sleep(0.01)

            return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def test_100_concurrent_streams_querying_on_a_pool_of_2(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": f"{i}@x", "name": ""} for i in range(3)])
    maker = make_maker(engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 30})
    client = serve(stream_app(maker))
    expected = "".join(f"data: {i}@x\n\n" for i in range(3))

    async def one(http: httpx.AsyncClient) -> str:
        try:
            response = await http.get("/events")
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return response.text if response.status_code == 200 else str(response.status_code)

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=40, limits=limits) as http:
            return list(await asyncio.wait_for(asyncio.gather(*(one(http) for _ in range(100))), 60))

    bodies = asyncio.run(main())
    failures = [body for body in bodies if body != expected]
    assert not failures, f"{len(failures)} of 100 streams failed: {sorted(set(failures))[:3]}"


def test_more_sync_streams_than_worker_threads_with_a_pool_larger_than_them(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Serve
) -> None:
    """12 streams, 4 worker threads, a pool of 10: the session cap (threads less one), not the
    pool, is what binds, and every stream still completes."""
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": f"{i}@x", "name": ""} for i in range(3)])
    maker = make_maker(engine_options={"pool_size": 10, "max_overflow": 0, "pool_timeout": 30})
    client = serve(stream_app(maker, threads=4))
    expected = "".join(f"data: {i}@x\n\n" for i in range(3))

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=12, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=DEADLINE, limits=limits) as http:

            async def one() -> str:
                try:
                    response = await http.get("/events")
                except httpx.HTTPError as exc:
                    return type(exc).__name__
                return response.text if response.status_code == 200 else str(response.status_code)

            return list(await asyncio.gather(*(one() for _ in range(12))))

    bodies = asyncio.run(main())
    assert bodies == [expected] * 12, sorted(set(bodies))[:3]


# -- 4. a write in a streaming body is refused loudly, never dropped --------------------------
def test_a_write_in_an_endpoint_that_yields_fails_loudly_and_stores_nothing(
    maker: Maker, sync_engine: sa.Engine, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI streams endpoints that ``yield`` (JSON Lines): their body runs after the commit."""
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    if maker.is_async:

        @app.get("/items")
        async def items_async(session: Db) -> AsyncIterator[dict[str, str]]:
            yield {"n": "1"}
            session.add(User(email="streamed@x"))
            await session.flush()
            yield {"n": "2"}
    else:

        @app.get("/items")
        def items_sync(session: Db) -> Iterator[dict[str, str]]:
            yield {"n": "1"}
            session.add(User(email="streamed@x"))
            session.flush()
            yield {"n": "2"}

    client = serve(app)
    with caplog.at_level(logging.ERROR, logger="fastapi_sessionmaker"):
        body = ""
        try:
            with client.stream("GET", "/items") as response:
                assert response.status_code == 200
                for text in response.iter_text():
                    body += text
        except httpx.HTTPError:
            pass  # the stream is cut off: the client cannot take it for complete
        wait_until(lambda: any("write refused" in r.getMessage() for r in caplog.records), "the log line")
    assert '"2"' not in body
    assert stored_emails(sync_engine) == []


def test_a_changed_object_after_the_response_started_is_logged_not_dropped_silently(
    maker: Maker, sync_engine: sa.Engine, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """An attribute change cannot be refused when it is made: it is reported when the session ends."""
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": "a@x", "name": "old"}])
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    if maker.is_async:

        @app.get("/rename")
        async def rename_async(session: Db) -> AsyncIterator[dict[str, str]]:
            user = (await session.scalars(sa.select(User))).one()
            yield {"name": user.name}
            user.name = "new"
    else:

        @app.get("/rename")
        def rename_sync(session: Db) -> Iterator[dict[str, str]]:
            user = session.scalars(sa.select(User)).one()
            yield {"name": user.name}
            user.name = "new"

    client = serve(app)
    with caplog.at_level(logging.ERROR, logger="fastapi_sessionmaker"):
        assert client.get("/rename").status_code == 200
        wait_until(lambda: any("discarded" in r.getMessage() for r in caplog.records), "the log line")
    with sync_engine.connect() as connection:
        assert connection.scalar(sa.select(User.name)) == "old"


def test_reads_in_a_streaming_body_still_work_and_hold_no_connection(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": "a@x", "name": "n"}])
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    held: list[int] = []
    query = sa.select(User)
    if maker.is_async:

        @app.get("/read")
        async def read_async(session: Db) -> AsyncIterator[dict[str, str]]:
            yield {"n": "0"}
            user = (await session.scalars(query)).one()
            count = await session.scalar(sa.select(sa.func.count()).select_from(User))
            same = await session.get(User, user.id)
            held.append(checked_out(pool_of(maker)))
            yield {"email": user.email, "count": str(count), "same": str(same is user)}
    else:

        @app.get("/read")
        def read_sync(session: Db) -> Iterator[dict[str, str]]:
            yield {"n": "0"}
            user = session.scalars(query).one()
            count = session.scalar(sa.select(sa.func.count()).select_from(User))
            same = session.get(User, user.id)
            held.append(checked_out(pool_of(maker)))
            yield {"email": user.email, "count": str(count), "same": str(same is user)}

    client = serve(app)
    response = client.get("/read")
    assert response.status_code == 200
    assert response.text.splitlines()[-1] == '{"email":"a@x","count":"1","same":"True"}'
    assert held == [0]


# -- 11. one maker, one request, one session ----------------------------------------------------
def test_get_db_and_db_session_in_one_request_share_one_session(
    maker: Maker, sync_engine: sa.Engine, serve: Serve
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    if isinstance(maker, AsyncFastAPISessionMaker):
        async_maker = maker

        async def get_db() -> AsyncIterator[Any]:
            async for session in async_maker.get_db():
                yield session

        @app.post("/both")
        async def both_async(session: Db, other: Annotated[Any, Depends(get_db)]) -> bool:
            session.add(User(email="one@x"))
            await session.flush()
            other.add(User(email="two@x"))
            await other.flush()
            return session is other
    else:
        sync_maker = maker

        def get_db_sync() -> Iterator[Any]:
            yield from sync_maker.get_db()

        @app.post("/both")
        def both_sync(other: Annotated[Any, Depends(get_db_sync)], session: Db) -> bool:
            other.add(User(email="two@x"))
            other.flush()
            session.add(User(email="one@x"))
            session.flush()
            return session is other

    client = serve(app)
    started = time.monotonic()
    response = client.post("/both")
    assert response.status_code == 200, response.text
    assert response.json() is True
    assert time.monotonic() - started < 3.0  # no second connection waiting on the first's lock
    assert stored_emails(sync_engine) == ["one@x", "two@x"]


# -- 12. WebSockets ------------------------------------------------------------------------------
def test_a_request_session_in_a_websocket_endpoint_is_refused_with_what_to_use(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, session: Db) -> None:  # pragma: no cover - never runs
        await websocket.accept()

    with (
        TestClient(app) as client,
        pytest.raises(NotInstalledError, match="context_session"),
        client.websocket_connect("/ws"),
    ):
        pass  # pragma: no cover - the connection is refused


def test_the_documented_websocket_pattern_opens_a_short_session_per_message(
    maker: Maker, sync_engine: sa.Engine
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        async for email in websocket.iter_text():
            if isinstance(maker, AsyncFastAPISessionMaker):
                async with maker.context_session() as session:
                    session.add(User(email=email))
            else:
                assert isinstance(maker, FastAPISessionMaker)
                with maker.context_session() as sync_session:
                    sync_session.add(User(email=email))
            await websocket.send_text(f"stored {email}")

    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        socket.send_text("ws1@x")
        assert socket.receive_text() == "stored ws1@x"
        assert checked_out(pool_of(maker)) == 0
        socket.send_text("ws2@x")
        assert socket.receive_text() == "stored ws2@x"
    assert stored_emails(sync_engine) == ["ws1@x", "ws2@x"]
