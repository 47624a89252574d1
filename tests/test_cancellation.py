"""Cancellation safety: disconnects, timeouts and cancelled tasks leave no connection or transaction.

Against a real uvicorn on 127.0.0.1 (disconnects, timeouts) and by driving the ASGI app directly
(cancellation arriving *during* the cleanup). After each, nothing is checked out of the pool, no
transaction is open on the server (PostgreSQL ``pg_stat_activity``, MariaDB ``innodb_trx``, a
SQLite write lock) and the request's write is not stored.
"""

import asyncio
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import anyio
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_sessionmaker import AsyncFastAPISessionMaker, on_commit, on_rollback
from tests.conftest import Databases, Maker, Server, checked_out, pool_of, wait_until
from tests.models import User, reset_tables, stored_emails

DEADLINE = 10.0  # seconds: every wait in this module is bounded by it


def open_transactions(engine: sa.Engine) -> int:
    """Transactions left open on the test database by other connections (0 when clean)."""
    backend = engine.dialect.name
    if backend == "postgresql":
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND (state LIKE 'idle in transaction%' OR xact_start IS NOT NULL)"
        )
    elif backend in ("mysql", "mariadb"):
        query = (
            "SELECT count(*) FROM information_schema.innodb_trx t JOIN information_schema.processlist p "
            "ON p.id = t.trx_mysql_thread_id WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()"
        )
    else:
        # SQLite: a transaction that wrote holds the write lock; BEGIN IMMEDIATE would time out.
        lite = sqlite3.connect(str(engine.url.database), timeout=0.5)
        try:
            lite.execute("BEGIN IMMEDIATE")
            lite.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return 1
        finally:
            lite.close()
        return 0
    with engine.connect() as connection:
        return int(connection.execute(sa.text(query)).scalar_one())


def assert_clean(maker: Maker, engine: sa.Engine) -> None:
    assert checked_out(pool_of(maker)) == 0, pool_of(maker).status()
    assert open_transactions(engine) == 0
    assert stored_emails(engine) == []


class Finished:
    """Outermost ASGI layer: sets ``event`` when a request has left the app (guard included)."""

    def __init__(self, app: ASGIApp, event: threading.Event) -> None:
        self.app = app
        self.event = event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.event.set()


@pytest.fixture
def uvicorn_server() -> Iterator[Callable[[FastAPI], tuple[Server, str]]]:
    """Like ``serve``, but hands out the server too (to see when it noticed a disconnect)."""
    servers: list[Server] = []

    def start(app: FastAPI) -> tuple[Server, str]:
        server = Server(app)
        servers.append(server)
        return server, server.start()

    yield start
    for server in servers:
        server.stop()


def disconnecting_app(
    maker: Maker, entered: threading.Event, release: threading.Event, outcome: list[str] | None = None
) -> FastAPI:
    """``POST /write/{email}`` flushes a user (transaction open), then waits for ``release``.

    With ``outcome``, the request's ``on_commit`` / ``on_rollback`` callbacks append to it.
    """
    app = FastAPI()
    maker.init_app(app)
    Session = Annotated[Any, maker.dependency]

    def register(session: Any) -> None:
        if outcome is not None:
            on_commit(session, lambda: outcome.append("commit"))
            on_rollback(session, lambda: outcome.append("rollback"))

    if maker.is_async:

        @app.post("/write/{email}")
        async def write_async(email: str, session: Session) -> dict[str, str]:
            register(session)
            session.add(User(email=email))
            await session.flush()
            entered.set()
            assert await anyio.to_thread.run_sync(release.wait, DEADLINE)
            return {"email": email}
    else:

        @app.post("/write/{email}")
        def write_sync(email: str, session: Session) -> dict[str, str]:
            register(session)
            session.add(User(email=email))
            session.flush()
            entered.set()
            assert release.wait(DEADLINE)
            return {"email": email}

    return app


@pytest.mark.parametrize("twin", ["async", "sync"])
def test_client_gone_before_the_commit_rolls_back(
    maker: Maker, sync_engine: sa.Engine, uvicorn_server: Callable[[FastAPI], tuple[Server, str]]
) -> None:
    reset_tables(sync_engine)
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    outcome: list[str] = []
    app = disconnecting_app(maker, entered, release, outcome)
    app.add_middleware(Finished, event=finished)
    server, base_url = uvicorn_server(app)
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as client:
        client.sendall(b"POST /write/gone@x HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        assert entered.wait(DEADLINE)
    # uvicorn keeps running the endpoint (it does not cancel it); once it has seen the
    # disconnect, let the endpoint return: the guard must roll back instead of committing.
    wait_until(lambda: not server.server.server_state.connections, "uvicorn to see the disconnect")
    release.set()
    assert finished.wait(DEADLINE)
    assert_clean(maker, sync_engine)
    assert outcome == ["rollback"]  # the side effects of a write the client never saw: undone


@pytest.mark.parametrize("twin", ["async", "sync"])
def test_client_still_there_gets_the_commit(
    maker: Maker, sync_engine: sa.Engine, uvicorn_server: Callable[[FastAPI], tuple[Server, str]]
) -> None:
    """The control case: the same request with the client waiting commits (and says 200)."""
    reset_tables(sync_engine)
    entered, release = threading.Event(), threading.Event()
    release.set()
    _, base_url = uvicorn_server(disconnecting_app(maker, entered, release))
    import httpx

    with httpx.Client(base_url=base_url, timeout=DEADLINE) as client:
        assert client.post("/write/kept@x").status_code == 200
    assert stored_emails(sync_engine) == ["kept@x"]
    assert checked_out(pool_of(maker)) == 0


class Timeout:
    """A middleware that gives each request ``seconds``, then answers 504 (asyncio or anyio)."""

    def __init__(self, app: ASGIApp, seconds: float, kind: str) -> None:
        self.app = app
        self.seconds = seconds
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.kind == "asyncio":  # a plain task.cancel() of the request's task
            try:
                await asyncio.wait_for(self.app(scope, receive, send), self.seconds)
            except asyncio.TimeoutError:
                await self.gateway_timeout(send)
        else:  # an anyio cancel scope, delivered again at every await until it is left
            with anyio.move_on_after(self.seconds) as scope_:
                await self.app(scope, receive, send)
            if scope_.cancelled_caught:
                await self.gateway_timeout(send)

    @staticmethod
    async def gateway_timeout(send: Send) -> None:
        await send({"type": "http.response.start", "status": 504, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("twin", ["async"])
@pytest.mark.parametrize("kind", ["asyncio", "anyio"])
def test_request_cancelled_by_a_timeout_middleware(
    kind: str, maker: Maker, sync_engine: sa.Engine, uvicorn_server: Callable[[FastAPI], tuple[Server, str]]
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    app.add_middleware(Timeout, seconds=0.3, kind=kind)
    never = threading.Event()

    @app.post("/slow/{email}")
    async def slow(email: str, session: Annotated[AsyncSession, maker.dependency]) -> dict[str, str]:
        session.add(User(email=email))
        await session.flush()
        await asyncio.sleep(DEADLINE)  # the workload the timeout cancels
        never.set()
        return {"email": email}

    _, base_url = uvicorn_server(app)
    import httpx

    with httpx.Client(base_url=base_url, timeout=DEADLINE) as client:
        assert client.post("/slow/late@x").status_code == 504
    assert not never.is_set()
    assert_clean(maker, sync_engine)


@pytest.mark.parametrize("twin", ["async"])
def test_timeout_inside_the_endpoint_rolls_back(
    maker: Maker, sync_engine: sa.Engine, uvicorn_server: Callable[[FastAPI], tuple[Server, str]]
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    @app.post("/slow/{email}")
    async def slow(email: str, session: Annotated[AsyncSession, maker.dependency]) -> dict[str, str]:
        session.add(User(email=email))
        await session.flush()
        try:
            await asyncio.wait_for(asyncio.Event().wait(), 0.1)
        except asyncio.TimeoutError:
            raise HTTPException(504, "upstream too slow") from None
        return {"email": email}  # pragma: no cover

    _, base_url = uvicorn_server(app)
    import httpx

    with httpx.Client(base_url=base_url, timeout=DEADLINE) as client:
        assert client.post("/slow/late@x").status_code == 504
    assert_clean(maker, sync_engine)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_query_cancelled_mid_flight_on_postgresql(
    driver: str, databases: Databases, uvicorn_server: Callable[[FastAPI], tuple[Server, str]]
) -> None:
    """A timeout that interrupts a running statement: the connection is not reused half-way."""
    url = databases.url("postgresql").replace("postgresql://", f"postgresql+{driver}://")
    engine = sa.create_engine(databases.url("postgresql").replace("postgresql://", "postgresql+psycopg://"))
    maker = AsyncFastAPISessionMaker(url, engine_options={"pool_size": 1, "max_overflow": 0})
    try:
        reset_tables(engine)
        app = FastAPI()
        maker.init_app(app)

        @app.post("/sleep/{email}")
        async def sleep(email: str, session: Annotated[AsyncSession, maker.dependency]) -> dict[str, str]:
            session.add(User(email=email))
            await session.flush()
            try:
                await asyncio.wait_for(session.execute(sa.text("SELECT pg_sleep(5)")), 0.2)
            except asyncio.TimeoutError:
                raise HTTPException(504, "query too slow") from None
            return {"email": email}  # pragma: no cover

        @app.get("/count")
        async def count(session: Annotated[AsyncSession, maker.dependency]) -> int:
            return int((await session.execute(sa.select(sa.func.count()).select_from(User))).scalar_one())

        _, base_url = uvicorn_server(app)
        import httpx

        with httpx.Client(base_url=base_url, timeout=DEADLINE) as client:
            started = time.monotonic()
            assert client.post("/sleep/late@x").status_code == 504
            assert time.monotonic() - started < 4  # the statement was cancelled, not waited for
            # The pool's only connection works for the next request.
            assert client.get("/count").json() == 0
        assert_clean(maker, engine)
    finally:
        engine.dispose()


# -- cancellation arriving during the cleanup itself (ASGI driven directly) ----------------------


async def _request(app: ASGIApp, path: str, sent: list[Message]) -> None:
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays: never disconnects
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)


@pytest.mark.parametrize("twin", ["async"])
@pytest.mark.parametrize("kind", ["task.cancel", "anyio"])
def test_cleanup_survives_cancellation_during_the_cleanup(
    kind: str, maker: Maker, sync_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second ``task.cancel()`` (or anyio's repeated delivery) while the guard rolls back."""
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    entered = asyncio.Event()
    in_cleanup = asyncio.Event()
    gate = asyncio.Event()
    rolled_back: list[bool] = []

    @app.post("/write")
    async def write(session: Annotated[AsyncSession, maker.dependency]) -> None:
        session.add(User(email="cancelled@x"))
        await session.flush()
        entered.set()
        await asyncio.sleep(DEADLINE)

    end_transaction = maker.lifecycle.end

    async def slow_end_transaction(session: AsyncSession, commit: bool) -> None:
        in_cleanup.set()
        # The cleanup is in progress (and awaiting) when the cancellation comes.
        await asyncio.wait_for(gate.wait(), DEADLINE)
        await end_transaction(session, commit)
        rolled_back.append(not commit)

    monkeypatch.setattr(maker.lifecycle, "end", slow_end_transaction)

    async def scenario() -> None:
        sent: list[Message] = []
        try:
            with anyio.fail_after(DEADLINE):
                if kind == "task.cancel":
                    task = asyncio.create_task(_request(app, "/write", sent))
                    await entered.wait()
                    task.cancel()
                    await in_cleanup.wait()
                    task.cancel()  # a second cancellation, now during the cleanup
                    await asyncio.sleep(0)
                    gate.set()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    assert task.cancelled()
                else:
                    request_scope = anyio.CancelScope()

                    async def run() -> None:
                        with request_scope:
                            await _request(app, "/write", sent)

                    async with anyio.create_task_group() as group:
                        group.start_soon(run)
                        await entered.wait()
                        request_scope.cancel()
                        await in_cleanup.wait()
                        await asyncio.sleep(0)
                        gate.set()
            assert sent == []  # no response: the request was cancelled
            assert rolled_back == [True]
            assert checked_out(pool_of(maker)) == 0
        finally:
            await maker.dispose()

    asyncio.run(scenario())
    assert open_transactions(sync_engine) == 0
    assert stored_emails(sync_engine) == []


@pytest.mark.parametrize("twin", ["async"])
def test_commit_is_not_interrupted_by_task_cancel(
    maker: Maker, sync_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the guard has started to commit, a ``task.cancel()`` waits for the commit to end."""
    assert isinstance(maker, AsyncFastAPISessionMaker)
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    in_commit = asyncio.Event()
    gate = asyncio.Event()

    @app.post("/write")
    async def write(session: Annotated[AsyncSession, maker.dependency]) -> dict[str, str]:
        session.add(User(email="committed@x"))
        return {"ok": "yes"}

    end_transaction = maker.lifecycle.end

    async def slow_end_transaction(session: AsyncSession, commit: bool) -> None:
        if commit:
            in_commit.set()
            await asyncio.wait_for(gate.wait(), DEADLINE)
        await end_transaction(session, commit)

    monkeypatch.setattr(maker.lifecycle, "end", slow_end_transaction)

    async def scenario() -> list[Message]:
        sent: list[Message] = []
        try:
            with anyio.fail_after(DEADLINE):
                task = asyncio.create_task(_request(app, "/write", sent))
                await in_commit.wait()
                task.cancel()
                await asyncio.sleep(0)
                gate.set()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert checked_out(pool_of(maker)) == 0
        finally:
            await maker.dispose()
        return sent

    sent = asyncio.run(scenario())
    assert sent == []  # cancelled: the status line never went out ...
    assert stored_emails(sync_engine) == ["committed@x"]  # ... but the commit was not torn in half
    assert open_transactions(sync_engine) == 0
