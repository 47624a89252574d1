"""``@maker.with_session`` and ``maker.session``: the request session without a dependency.

The route's guard opens the declared session before the route runs and commits it before the
status line, like a ``DBSession`` parameter; the decorated endpoint records an exception raised
through it, so a handler's 2xx made of an exception still rolls back. Both twins, SQLite,
PostgreSQL and MariaDB.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import inspect
from typing import Annotated, Any

import psycopg
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.types import Message

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker
from fastapi_sessionmaker._request import RequestState
from fastapi_sessionmaker.exceptions import NotInstalledError
from tests import declared_app
from tests.conftest import Maker, MakerFactory
from tests.models import User, reset_tables, stored_emails
from tests.test_route_guard import guarded


def test_a_declared_session_commits_before_the_response(maker: Maker, sync_engine: sa.Engine) -> None:
    """A sync endpoint in a worker thread, an async one on the loop: a unique violation at the
    commit is a 409 problem response, never a 201; the string annotations of a module with
    ``from __future__ import annotations`` resolve."""
    reset_tables(sync_engine)
    app = declared_app.build(maker)
    with TestClient(app) as client:
        first = client.post("/users", json={"email": "a@x"})
        assert (first.status_code, first.json()) == (201, {"email": "a@x", "same_session": True})
        again = client.post("/users", json={"email": "a@x"})
        assert again.status_code == 409, again.text
        assert again.headers["content-type"] == "application/problem+json"
        assert client.get("/missing").status_code == 404
    assert stored_emails(sync_engine) == ["a@x"]
    assert guarded(app) == {"/users": True, "/missing": True}


def test_the_decorated_endpoint_runs_with_the_endpoints_globals() -> None:
    """FastAPI 0.121 resolves string annotations in ``endpoint.__globals__`` as it is given."""
    maker = FastAPISessionMaker("sqlite://")

    def endpoint(body: "declared_app.NewUser") -> None: ...

    async def endpoint_async() -> None: ...

    for function in (endpoint, endpoint_async):
        decorated = maker.with_session(function)
        assert decorated.__globals__ is function.__globals__
        assert inspect.unwrap(decorated) is function
        assert inspect.signature(decorated) == inspect.signature(function)
        assert inspect.iscoroutinefunction(decorated) is inspect.iscoroutinefunction(function)


def test_an_endpoint_object_with_an_async_call_stays_async(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    class Endpoint:
        async def __call__(self) -> bool:
            return maker.session is not None

    app.get("/object")(maker.with_session(Endpoint()))
    with TestClient(app) as client:
        assert client.get("/object").json() is True


def test_dependencies_of_a_declared_route_get_the_same_session(maker: Maker, sync_engine: sa.Engine) -> None:
    """The session is open before the route runs: a dependency reads through ``maker.session``,
    and a ``DBSession``-style parameter of the same maker is the same session, committed once."""
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    seen: list[Any] = []

    def repository() -> Any:
        seen.append(maker.session)
        return maker.session

    @app.post("/users")
    @maker.with_session
    async def create(
        email: str,
        repo: Annotated[Any, Depends(repository)],
        session: Annotated[Any, maker.dependency],
    ) -> bool:
        repo.add(User(email=email))
        return repo is session is maker.session

    with TestClient(app) as client:
        assert client.post("/users", params={"email": "dep@x"}).json() is True
        assert client.post("/users", params={"email": "dep@x"}).status_code == 409
    assert stored_emails(sync_engine) == ["dep@x"]
    assert len(seen) == 2
    assert seen[0] is not seen[1]  # one session per request


def test_an_exception_a_handler_turns_into_a_200_rolls_back(maker: Maker, sync_engine: sa.Engine) -> None:
    """The endpoint raised after its flush: its response is the handler's 200, its write is not stored."""
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    class Shrugged(Exception):
        pass

    @app.exception_handler(Shrugged)
    async def shrug(request: Request, exc: Shrugged) -> JSONResponse:
        return JSONResponse({"shrugged": True})

    if isinstance(maker, AsyncFastAPISessionMaker):

        @app.post("/users")
        @maker.with_session
        async def create_async(email: str) -> None:
            maker.session.add(User(email=email))
            await maker.session.flush()
            raise Shrugged

    else:

        @app.post("/users")
        @maker.with_session
        def create_sync(email: str) -> None:
            maker.session.add(User(email=email))
            maker.session.flush()
            raise Shrugged

    with TestClient(app) as client:
        response = client.post("/users", params={"email": "lost@x"})
        assert (response.status_code, response.json()) == (200, {"shrugged": True})
    assert stored_emails(sync_engine) == []


def test_a_declared_read_only_session_does_not_write(maker: Maker, sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)

    @app.post("/users")
    @maker.with_session(policy="read_only")
    async def create(email: str) -> None:
        maker.session.add(User(email=email))
        flushed = maker.session.flush()
        if inspect.isawaitable(flushed):
            await flushed

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/users", params={"email": "ro@x"}).status_code == 500
    assert stored_emails(sync_engine) == []


def test_a_declared_session_with_retries_runs_the_request_again(maker: Maker, sync_engine: sa.Engine) -> None:
    """A serialization failure before the status line: the whole request runs again, once."""
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    attempts: list[Any] = []

    @app.post("/users")
    @maker.with_session(retries=2)
    async def create(email: str) -> int:
        attempts.append(maker.session)
        maker.session.add(User(email=email))
        if len(attempts) == 1:
            raise sa.exc.OperationalError("UPDATE ...", {}, psycopg.errors.SerializationFailure())
        return len(attempts)

    with TestClient(app) as client:
        assert client.post("/users", params={"email": "again@x"}).json() == 2
    assert stored_emails(sync_engine) == ["again@x"]
    assert attempts[0] is not attempts[1]  # each attempt has a session of its own


def test_the_session_outside_a_declared_route_says_what_to_do(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    @app.get("/undeclared")
    async def undeclared(session: Annotated[Any, maker.dependency]) -> None:
        other = type(maker)("sqlite://", name="other")  # a maker this route declares nothing of
        other.session  # noqa: B018

    with TestClient(app) as client, pytest.raises(NotInstalledError, match="does not declare it"):
        client.get("/undeclared")
    with pytest.raises(NotInstalledError, match=r"no guarded request.*context_session\(\)"):
        maker.session  # noqa: B018


def test_a_declared_route_of_an_app_that_observes_opens_its_session(
    make_maker: MakerFactory, sync_engine: sa.Engine
) -> None:
    """With ``stats=True`` the guard sits in front of the whole app; the declared route's own
    guard only opens the session, into that guard's request."""
    reset_tables(sync_engine)
    maker = make_maker(stats=True)
    app = declared_app.build(maker)
    with TestClient(app) as client:
        assert client.post("/users", json={"email": "seen@x"}).status_code == 201
        assert client.post("/users", json={"email": "seen@x"}).status_code == 409
    assert stored_emails(sync_engine) == ["seen@x"]


def test_a_maker_is_declared_once_per_endpoint() -> None:
    maker = AsyncFastAPISessionMaker("sqlite://")

    async def endpoint() -> None: ...

    with pytest.raises(TypeError, match="already declares a session of this maker"):
        maker.with_session(maker.with_session(endpoint))
    with pytest.raises(ValueError, match="retries=-1"):
        maker.with_session(retries=-1)
    asyncio.run(maker.dispose())


@pytest.mark.parametrize("stats", [False, True], ids=["route-guard", "stats"])
def test_a_sync_declared_session_takes_its_pool_slot_once_the_body_is_complete(
    database_url: str, sync_engine: sa.Engine, stats: bool
) -> None:
    """A slow upload holds no pool slot: the guard opens a sync maker's declared session when the
    request body is complete (a ``DBSession`` parameter is solved after FastAPI read the body),
    also when the guard in front of the whole app (``stats=True``) serves the request."""
    reset_tables(sync_engine)
    maker = FastAPISessionMaker(database_url, stats=stats)
    app = declared_app.build(maker)

    async def scenario() -> tuple[int, int, list[Message]]:
        async with app.router.lifespan_context(app):
            rest = asyncio.Event()
            waiting = asyncio.Event()
            calls = 0

            async def receive() -> Message:
                nonlocal calls
                calls += 1
                if calls == 1:
                    return {"type": "http.request", "body": b'{"email": "sl', "more_body": True}
                waiting.set()
                await rest.wait()
                return {"type": "http.request", "body": b'ow@x"}', "more_body": False}

            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/users",
                "raw_path": b"/users",
                "root_path": "",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "state": {},
                "app": app,
            }
            request = asyncio.create_task(app(scope, receive, send))
            await asyncio.wait_for(waiting.wait(), 10)
            limiter = maker.lifecycle.limiter()
            assert limiter is not None
            semaphore = limiter._semaphores.get(asyncio.get_running_loop())
            free_during_upload = limiter.size() if semaphore is None else semaphore._value
            rest.set()
            await asyncio.wait_for(request, 10)
            return free_during_upload, limiter.size(), sent

    free, size, sent = asyncio.run(scenario())
    assert free == size  # no slot taken while the body was still coming
    assert sent[0]["status"] == 201, sent
    assert stored_emails(sync_engine) == ["slow@x"]


def test_a_body_the_endpoint_never_reads_still_gets_its_declared_session(
    make_maker: MakerFactory, sync_engine: sa.Engine
) -> None:
    """A POST with a body and no body parameter (FastAPI never reads it): the session opens where
    it is first used, as ``get_db()``'s does; a dependency of a body route sees the same one."""
    reset_tables(sync_engine)
    maker = make_maker()
    app = FastAPI()
    maker.init_app(app)

    def repository() -> Any:
        return maker.session

    @app.post("/touch", status_code=201)
    @maker.with_session
    def touch(email: str, repo: Annotated[Any, Depends(repository)]) -> bool:
        maker.session.add(User(email=email))
        return repo is maker.session

    with TestClient(app) as client:
        response = client.post("/touch", params={"email": "t@x"}, json={})
        assert (response.status_code, response.json()) == (201, True)
        assert client.post("/touch", params={"email": "t@x"}, json={}).status_code == 409
    assert stored_emails(sync_engine) == ["t@x"]


def test_a_pool_timeout_while_the_body_completes_is_a_503_not_a_bad_body(
    database_url: str, sync_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI turns an error raised while it reads the body into a 400: the guard keeps the
    error of a declared session it could not open and raises it where the session is used."""
    reset_tables(sync_engine)
    maker = FastAPISessionMaker(database_url)  # only a sync maker's session waits for the body
    app = declared_app.build(maker)

    async def timed_out(self: RequestState, *args: Any) -> Any:
        raise sa.exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached")

    monkeypatch.setattr(RequestState, "open", timed_out)
    with TestClient(app) as client:
        response = client.post("/users", json={"email": "late@x"})
    assert response.status_code == 503, response.text
    assert stored_emails(sync_engine) == []
