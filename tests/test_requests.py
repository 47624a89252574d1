"""Request behaviour: commit before the response, the commit policy, one session per request, errors.

Every test runs on SQLite, PostgreSQL and MariaDB with the sync and the async twin, against a real
uvicorn on 127.0.0.1; the ``client_for`` tests also run under Starlette's ``TestClient`` with
``raise_server_exceptions=False`` to show that a test client sees the status a real client gets.

Connections go back to the pool when the transaction ends, which is before the status line, so
each test checks the pool right after its last response (``make_maker`` checks again at teardown).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import AsyncDBSession, CommitPolicy, DBSession, ReadOnlySessionError
from tests.conftest import Maker, MakerFactory, checked_out, pool_of
from tests.models import User, reset_tables, stored_emails

# Starlette 1.x builds TestClient on httpx2: a client of either kind has .get/.post and .json().
ClientFactory = Callable[[FastAPI], "httpx.Client | TestClient"]
Body = Callable[[Session], Any]
PROBLEM_JSON = "application/problem+json"


@pytest.fixture(params=["uvicorn", "testclient"])
def client_for(request: pytest.FixtureRequest, serve: Callable[..., httpx.Client]) -> Iterator[ClientFactory]:
    """``client_for(app)``: a real uvicorn, or ``TestClient(raise_server_exceptions=False)``."""
    opened: list[TestClient] = []

    def open_client(app: FastAPI) -> httpx.Client | TestClient:
        if request.param == "uvicorn":
            return serve(app)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # runs the lifespan: start-up check, dispose at shutdown
        opened.append(client)
        return client

    yield open_client
    for client in reversed(opened):
        client.__exit__(None, None, None)


def new_app(maker: Maker) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)
    return app


def route(
    app: FastAPI, maker: Maker, path: str, body: Body, *, method: str = "POST", dep: Any = None
) -> None:
    """Add an endpoint at ``path`` returning ``body(session)`` with the request session.

    The sync twin gets a ``def`` endpoint, the async twin an ``async def`` one that runs ``body``
    through ``AsyncSession.run_sync``. ``dep`` is a ``Depends`` (``maker.dependency``,
    ``maker.depends(policy=...)``); ``None`` uses the ``DBSession`` / ``AsyncDBSession`` alias.
    """
    endpoint: Callable[..., Any]
    if maker.is_async and dep is None:

        async def async_alias(session: AsyncDBSession) -> Any:
            return await session.run_sync(body)

        endpoint = async_alias
    elif maker.is_async:

        async def async_dep(session: Annotated[AsyncSession, dep]) -> Any:
            return await session.run_sync(body)

        endpoint = async_dep
    elif dep is None:

        def sync_alias(session: DBSession) -> Any:
            return body(session)

        endpoint = sync_alias
    else:

        def sync_dep(session: Annotated[Session, dep]) -> Any:
            return body(session)

        endpoint = sync_dep
    app.add_api_route(path, endpoint, methods=[method])


def assert_pool_idle(maker: Maker) -> None:
    pool = pool_of(maker)
    assert checked_out(pool) == 0, pool.status()


def mapped_records(caplog: pytest.LogCaptureFixture, status: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "fastapi_sessionmaker"
        and r.getMessage().startswith(f"database error mapped to {status}")
    ]


def add_and_flush(*emails: str) -> Body:
    def body(session: Session) -> None:
        session.add_all(User(email=email) for email in emails)
        session.flush()

    return body


def test_write_is_visible_to_the_next_request(
    maker: Maker, sync_engine: sa.Engine, client_for: ClientFactory
) -> None:
    reset_tables(sync_engine)
    app = new_app(maker)
    route(app, maker, "/users", lambda s: s.add(User(email="a@x", name="Ada")))
    route(app, maker, "/users", lambda s: sorted(s.scalars(sa.select(User.name))), method="GET")
    client = client_for(app)

    assert client.post("/users").status_code == 200
    assert client.get("/users").json() == ["Ada"]
    assert stored_emails(sync_engine) == ["a@x"]
    assert_pool_idle(maker)


def test_unique_violation_without_commit_is_409_and_stores_nothing(
    maker: Maker, sync_engine: sa.Engine, client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_sessionmaker")
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"id": "0" * 32, "email": "a@x", "name": ""}])
    app = new_app(maker)
    # No flush, no commit: the violation only shows up in the commit the guard runs.
    route(
        app,
        maker,
        "/users",
        lambda s: s.add_all([User(email="b@x"), User(email="a@x")]),
        dep=maker.dependency,
    )
    client = client_for(app)

    response = client.post("/users")

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["status"] == 409
    assert response.json()["title"] == "Conflict"
    assert stored_emails(sync_engine) == ["a@x"]
    records = mapped_records(caplog, 409)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "IntegrityError" in records[0].getMessage()
    assert "/users" in records[0].getMessage()
    assert_pool_idle(maker)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_deferred_unique_constraint_fails_at_commit_409(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    with sync_engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS fsm_deferred"))
        connection.execute(
            sa.text(
                "CREATE TABLE fsm_deferred (id serial PRIMARY KEY, code text NOT NULL, "
                "CONSTRAINT fsm_deferred_code UNIQUE (code) DEFERRABLE INITIALLY DEFERRED)"
            )
        )

    def insert_twice(session: Session) -> int:
        for _ in range(2):
            session.execute(sa.text("INSERT INTO fsm_deferred (code) VALUES ('x')"))
        return int(session.execute(sa.text("SELECT count(*) FROM fsm_deferred")).scalar_one())

    app = new_app(maker)
    route(app, maker, "/codes", insert_twice)
    client = serve(app)

    response = client.post("/codes")

    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    with sync_engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM fsm_deferred")).scalar_one() == 0
    assert_pool_idle(maker)


def test_http_exception_after_a_write_stores_nothing(
    maker: Maker, sync_engine: sa.Engine, client_for: ClientFactory
) -> None:
    reset_tables(sync_engine)

    def write_then_404(session: Session) -> None:
        add_and_flush("a@x")(session)
        raise HTTPException(status_code=404, detail="no such thing")

    app = new_app(maker)
    route(app, maker, "/users", write_then_404, dep=maker.dependency)
    client = client_for(app)

    response = client.post("/users")

    assert response.status_code == 404
    assert response.json() == {"detail": "no such thing"}
    assert stored_emails(sync_engine) == []
    assert_pool_idle(maker)


@pytest.mark.parametrize(
    ("policy", "stored"),
    [(CommitPolicy.AUTO, []), (CommitPolicy.COMMIT_UNLESS_RAISED, ["a@x"])],
)
def test_returned_error_response_rolls_back_unless_policy_says_commit(
    make_maker: MakerFactory,
    sync_engine: sa.Engine,
    client_for: ClientFactory,
    policy: CommitPolicy,
    stored: list[str],
) -> None:
    reset_tables(sync_engine)
    maker = make_maker(policy=policy)

    def write_then_return_422(session: Session) -> JSONResponse:
        add_and_flush("a@x")(session)
        return JSONResponse({"detail": "returned, not raised"}, status_code=422)

    app = new_app(maker)
    route(app, maker, "/users", write_then_return_422)
    client = client_for(app)

    response = client.post("/users")

    assert response.status_code == 422
    assert response.json() == {"detail": "returned, not raised"}
    assert stored_emails(sync_engine) == stored
    assert_pool_idle(maker)


class HandledError(Exception):
    pass


@pytest.mark.parametrize("inner_http_middleware", [False, True], ids=["plain", "inner-http-middleware"])
def test_exception_with_a_handler_returning_200_still_rolls_back(
    maker: Maker, sync_engine: sa.Engine, client_for: ClientFactory, inner_http_middleware: bool
) -> None:
    # With ``inner_http_middleware``, an ``@app.middleware("http")`` added before ``init_app`` sits
    # inside the guard and relays the response from another task: the raise must still be
    # recorded where it happened.
    reset_tables(sync_engine)

    def write_then_raise(session: Session) -> None:
        add_and_flush("a@x")(session)
        raise HandledError

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled": type(exc).__name__}, status_code=200)

    app = FastAPI()
    relayed: list[int] = []
    if inner_http_middleware:

        @app.middleware("http")
        async def relay(request: Request, call_next: Any) -> Any:
            response = await call_next(request)
            relayed.append(response.status_code)
            return response

    maker.init_app(app)
    app.add_exception_handler(HandledError, handler)
    route(app, maker, "/users", write_then_raise)
    client = client_for(app)

    response = client.post("/users")

    assert response.status_code == 200
    assert response.json() == {"handled": "HandledError"}
    assert relayed == ([200] if inner_http_middleware else [])
    assert stored_emails(sync_engine) == []
    assert_pool_idle(maker)


def test_raised_http_exception_rolls_back_under_commit_unless_raised(
    make_maker: MakerFactory, sync_engine: sa.Engine, client_for: ClientFactory
) -> None:
    # The status alone (404) cannot tell a raised error from a returned one: the policy commits
    # returned 4xx responses, so only the record of the raise keeps this write out.
    reset_tables(sync_engine)
    maker = make_maker(policy=CommitPolicy.COMMIT_UNLESS_RAISED)

    def write_then_raise_404(session: Session) -> None:
        add_and_flush("a@x")(session)
        raise HTTPException(status_code=404, detail="raised, not returned")

    app = new_app(maker)
    route(app, maker, "/users", write_then_raise_404)
    client = client_for(app)

    response = client.post("/users")

    assert response.status_code == 404
    assert stored_emails(sync_engine) == []
    assert_pool_idle(maker)


def test_manual_policy_stores_only_what_the_endpoint_committed(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)

    def commit_one_flush_another(session: Session) -> str:
        session.add(User(email="committed@x"))
        session.commit()
        add_and_flush("flushed@x")(session)
        return "ok"

    app = new_app(maker)
    route(app, maker, "/users", commit_one_flush_another, dep=maker.depends(policy=CommitPolicy.MANUAL))
    client = serve(app)

    response = client.post("/users")

    assert response.status_code == 200
    assert response.json() == "ok"
    assert stored_emails(sync_engine) == ["committed@x"]
    assert_pool_idle(maker)


def test_read_only_policy_reads_but_refuses_flushes(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"id": "1" * 32, "email": "a@x", "name": "Ada"}])

    def read_only_app(maker: Maker) -> FastAPI:
        app = new_app(maker)
        route(app, maker, "/users", lambda s: list(s.scalars(sa.select(User.name))), method="GET")
        route(app, maker, "/users", add_and_flush("b@x"))
        return app

    maker = make_maker(policy="read_only")
    client = serve(read_only_app(maker))

    assert client.get("/users").json() == ["Ada"]
    response = client.post("/users")

    assert response.status_code == 500
    assert stored_emails(sync_engine) == ["a@x"]
    assert_pool_idle(maker)
    # The test client's default re-raises: the 500 above is the read-only refusal. (A maker of
    # its own: an async engine's connections belong to the event loop that opened them.)
    with (
        TestClient(read_only_app(make_maker(policy="read_only"))) as test_client,
        pytest.raises(ReadOnlySessionError, match="read-only"),
    ):
        test_client.post("/users")
    assert stored_emails(sync_engine) == ["a@x"]


def test_dependencies_of_one_request_share_one_session(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)
    app = new_app(maker)
    if maker.is_async:

        async def async_sub(session: AsyncDBSession) -> AsyncSession:
            session.add(User(email="sub@x"))
            return session

        @app.post("/shared")
        async def shared_async(
            by_maker: Annotated[AsyncSession, maker.dependency],
            by_alias: AsyncDBSession,
            by_sub: Annotated[AsyncSession, Depends(async_sub)],
        ) -> list[int]:
            by_maker.add(User(email="endpoint@x"))
            return [id(by_maker), id(by_alias), id(by_sub)]
    else:

        def sync_sub(session: DBSession) -> Session:
            session.add(User(email="sub@x"))
            return session

        @app.post("/shared")
        def shared_sync(
            by_maker: Annotated[Session, maker.dependency],
            by_alias: DBSession,
            by_sub: Annotated[Session, Depends(sync_sub)],
        ) -> list[int]:
            by_maker.add(User(email="endpoint@x"))
            return [id(by_maker), id(by_alias), id(by_sub)]

    client = serve(app)

    response = client.post("/shared")

    assert response.status_code == 200
    assert len(set(response.json())) == 1, response.json()
    assert stored_emails(sync_engine) == ["endpoint@x", "sub@x"]
    assert_pool_idle(maker)


def test_non_database_exception_is_500_and_stores_nothing(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)

    def write_then_fail(session: Session) -> None:
        add_and_flush("a@x")(session)
        raise RuntimeError("not a database error")

    app = new_app(maker)
    route(app, maker, "/users", write_then_fail, dep=maker.dependency)
    client = serve(app)

    response = client.post("/users")

    assert response.status_code == 500
    assert stored_emails(sync_engine) == []
    assert_pool_idle(maker)


def test_a_mistake_in_the_sql_is_500_not_503(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client], caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite and the MySQL drivers raise OperationalError for an unknown column: still not "retry later".
    caplog.set_level(logging.WARNING, logger="fastapi_sessionmaker")
    reset_tables(sync_engine)
    app = new_app(maker)
    route(app, maker, "/bad", lambda s: s.execute(sa.text("SELECT no_such_column FROM fsm_users")).all())
    client = serve(app)

    response = client.post("/bad")

    assert response.status_code == 500
    assert "retry-after" not in response.headers
    assert response.headers["content-type"] == PROBLEM_JSON
    assert len(mapped_records(caplog, 500)) == 1
    assert_pool_idle(maker)


def test_pool_timeout_is_503_with_retry_after(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    maker = make_maker(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3})
    entered, release = threading.Event(), threading.Event()
    app = new_app(maker)
    if maker.is_async:

        @app.get("/hold")
        async def hold_async(session: AsyncDBSession) -> int:
            value = (await session.execute(sa.text("SELECT 1"))).scalar_one()
            entered.set()
            assert await anyio.to_thread.run_sync(release.wait, 10.0)
            return int(value)
    else:

        @app.get("/hold")
        def hold_sync(session: DBSession) -> int:
            value = session.execute(sa.text("SELECT 1")).scalar_one()
            entered.set()
            assert release.wait(10.0)
            return int(value)

    route(app, maker, "/other", lambda s: s.execute(sa.text("SELECT 2")).scalar_one(), method="GET")
    client = serve(app)

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        holder = executor.submit(client.get, "/hold")
        try:
            assert entered.wait(10.0), "the first request never got its connection"
            response = client.get("/other")
        finally:
            release.set()
        assert holder.result(timeout=15.0).json() == 1

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == PROBLEM_JSON
    assert client.get("/other").json() == 2  # the pool recovers once the holder is done
    assert_pool_idle(maker)


PASSWORD = "Pw-n0t-in-l0gs-7f3a"


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound to us, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_unreachable_database_is_503_logged_once_without_the_password(
    make_maker: MakerFactory,
    database_url: str,
    refused_port: int,
    serve: Callable[..., httpx.Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    url = sa.make_url(database_url).set(password=PASSWORD, port=refused_port, database="fsm_nowhere")
    maker = make_maker(url.render_as_string(hide_password=False))
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)
    route(app, maker, "/users", lambda s: list(s.scalars(sa.select(User.email))), method="GET")
    client = serve(app)

    response = client.get("/users")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["status"] == 503
    assert PASSWORD not in response.text
    records = mapped_records(caplog, 503)
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.__dict__["path"] == "/users"
    assert record.__dict__["error_class"] in record.getMessage()
    assert record.__dict__["error_class"] in {"OperationalError", "ConnectionRefusedError", "OSError"}
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in (r.getMessage() + (r.exc_text or "")) for r in caplog.records)
    assert PASSWORD not in repr(maker)
    assert_pool_idle(maker)
