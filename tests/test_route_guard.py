"""Where the guard sits: on each route that takes a request session, and nowhere else.

``init_app`` installs the guard on the ``handle`` of every route one of whose dependants has a
request session or a dependency with ``yield`` (``get_db()`` and wrappers of it), when the app
builds its middleware stack. A route without one is FastAPI's alone: no layer, no object, no
context variable (benchmarks/: the no-database endpoint against bare FastAPI). Each guarded route
still commits before its response: a unique violation at the commit is a 409, never a 200.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from fastapi_sessionmaker import AsyncDBSession, AsyncFastAPISessionMaker, DBSession, _compat, dependency_of
from fastapi_sessionmaker._guard import SessionGuard
from fastapi_sessionmaker._request import current_state
from fastapi_sessionmaker.exceptions import NotInstalledError
from tests.conftest import Maker, MakerFactory
from tests.models import User, reset_tables, stored_emails


def guarded(app: FastAPI) -> dict[str, bool]:
    """The path of each route (as declared, without prefixes) -> whether the guard is on its handle."""
    found: dict[str, bool] = {}

    def walk(routes: Any) -> None:
        for route, dependant in _compat.api_routes(routes):
            if dependant is None:
                walk(route.routes)
            else:
                found[route.path] = isinstance(route.__dict__.get("handle"), SessionGuard)

    walk(app.routes)
    return found


def add_user(session: Any, email: str) -> Any:
    """Add a user; the caller returns this (awaitable for the async twin) so nothing flushes yet."""
    session.add(User(email=email))
    return email


def session_state() -> bool:
    state = current_state()
    return state is not None and bool(state.entries)


def test_a_route_without_a_session_is_served_by_fastapi_alone(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    def user() -> str:  # a plain dependency: no session, no yield
        return "someone"

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"state": current_state() is not None}

    @app.get("/me")
    async def me(name: Annotated[str, Depends(user)]) -> dict[str, bool]:
        return {"state": current_state() is not None}

    @app.get("/rows")
    async def rows(session: Annotated[Any, maker.dependency]) -> dict[str, bool]:
        return {"state": session_state()}

    with TestClient(app) as client:
        assert client.get("/ping").json() == {"state": False}
        assert client.get("/me").json() == {"state": False}
        assert client.get("/rows").json() == {"state": True}
        assert client.get("/nowhere").status_code == 404
    assert guarded(app) == {"/ping": False, "/me": False, "/rows": True}


def test_session_routes_are_guarded_wherever_they_are_declared(maker: Maker, sync_engine: sa.Engine) -> None:
    """Parameter, sub-dependency, included router, router-level dependency, mounted app, and a
    get_db() wrapper: each commits before its response (the second write of an e-mail is a 409)."""
    reset_tables(sync_engine)
    Session = Annotated[Any, maker.dependency]
    app = FastAPI()
    maker.init_app(app)

    def repository(session: Session) -> Any:
        return session

    if isinstance(maker, AsyncFastAPISessionMaker):

        async def my_db() -> AsyncIterator[Any]:  # the fastapi-utils wrapper, async
            async for session in maker.get_db():
                yield session

    else:

        def my_db() -> Iterator[Any]:  # type: ignore[misc]  # the fastapi-utils wrapper
            yield from maker.get_db()

    @app.post("/param")
    async def param(email: str, session: Session) -> str:
        return str(add_user(session, email))

    @app.post("/sub")
    async def sub(email: str, repo: Annotated[Any, Depends(repository)]) -> str:
        return str(add_user(repo, email))

    @app.post("/wrapper")
    async def wrapper(email: str, session: Annotated[Any, Depends(my_db)]) -> str:
        return str(add_user(session, email))

    router = APIRouter()

    @router.post("/in-router")
    async def in_router(email: str, session: Session) -> str:
        return str(add_user(session, email))

    bare = APIRouter()

    @bare.post("/by-inclusion")
    async def by_inclusion(email: str) -> str:
        state = current_state()  # the session comes from the inclusion's dependencies
        assert state is not None
        assert state.entries
        return str(add_user(state.entries[0].session, email))

    app.include_router(router, prefix="/r")
    app.include_router(bare, prefix="/x", dependencies=[maker.dependency])
    app.include_router(bare, prefix="/y")  # the same route, without the session: still guarded
    mounted = FastAPI()

    @mounted.post("/in-mount")
    async def in_mount(email: str, session: Session) -> str:
        return str(add_user(session, email))

    app.mount("/m", mounted)
    paths = ["/param", "/sub", "/wrapper", "/r/in-router", "/x/by-inclusion", "/m/in-mount"]
    with TestClient(app) as client:
        for n, path in enumerate(paths):
            email = f"u{n}@x"
            assert client.post(path, params={"email": email}).status_code == 200, path
            again = client.post(path, params={"email": email})
            assert again.status_code == 409, (path, again.text)
            assert again.headers["content-type"] == "application/problem+json"
    assert stored_emails(sync_engine) == sorted(f"u{n}@x" for n in range(len(paths)))
    found = guarded(app)
    for path in ("/param", "/sub", "/wrapper", "/in-router", "/by-inclusion", "/in-mount"):
        assert found[path], (path, found)


def test_a_mounted_app_with_its_own_makers_guards_its_routes_with_them(
    make_maker: MakerFactory,
) -> None:
    outer, inner = make_maker(), make_maker()
    app, mounted = FastAPI(), FastAPI()
    outer.init_app(app, check_on_startup=False)
    inner.init_app(mounted, check_on_startup=False)

    @mounted.get("/which")
    async def which(session: Annotated[Any, inner.dependency]) -> bool:
        state = current_state()
        assert state is not None
        return state.registry is mounted.state.fastapi_sessionmaker

    app.mount("/m", mounted)
    with TestClient(app) as client:
        assert client.get("/m/which").json() is True


def test_a_route_added_after_start_up_fails_before_it_writes(maker: Maker, sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    with TestClient(app) as client:

        @app.post("/late")
        async def late(session: Annotated[Any, maker.dependency]) -> str:
            return str(add_user(session, "late@x"))

        with pytest.raises(NotInstalledError, match="the route /late has no session guard"):
            client.post("/late")
    assert stored_emails(sync_engine) == []


def test_an_override_that_brings_a_session_in_says_so(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    def settings() -> str:
        return "plain"

    @app.get("/settings")
    async def read(value: Annotated[Any, Depends(settings)]) -> str:
        return str(value)

    def with_session(session: Annotated[Any, maker.dependency]) -> str:
        return "from the database"

    app.dependency_overrides[settings] = with_session
    with TestClient(app) as client, pytest.raises(NotInstalledError, match="dependency override"):
        client.get("/settings")


def test_an_app_without_init_app_says_to_call_it(maker: Maker) -> None:
    app = FastAPI()

    @app.get("/rows")
    async def rows(session: Annotated[Any, maker.dependency]) -> str:
        return "unreachable"

    with TestClient(app) as client, pytest.raises(NotInstalledError, match=r"Call maker\.init_app"):
        client.get("/rows")


def test_building_the_middleware_stack_again_guards_a_route_once(maker: Maker) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    @app.get("/rows")
    async def rows(session: Annotated[Any, maker.dependency]) -> bool:
        return session_state()

    app.build_middleware_stack()
    app.build_middleware_stack()
    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/rows")
    handle = route.__dict__["handle"]
    assert isinstance(handle, SessionGuard)
    assert not isinstance(handle.app, SessionGuard)
    with TestClient(app) as client:
        assert client.get("/rows").json() is True


def test_generator_dependencies_of_every_shape_are_recognised() -> None:
    from functools import partial

    from fastapi_sessionmaker._compat import is_generator_dependency

    class Gen:
        def __call__(self) -> Iterator[int]:
            yield 1

    class Inherited(Gen):
        pass

    class Plain:
        def __call__(self) -> int:
            return 1

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> AsyncIterator[int]:
        yield 1

    def plain() -> int:
        return 1

    assert is_generator_dependency(gen)
    assert is_generator_dependency(agen)
    assert is_generator_dependency(partial(gen))
    assert is_generator_dependency(Gen())
    assert is_generator_dependency(Inherited())
    assert not is_generator_dependency(plain)
    assert not is_generator_dependency(Plain())
    assert not is_generator_dependency(Gen)  # a class: FastAPI calls it to make an instance


def test_one_router_in_two_apps_serves_each_app_with_its_own_makers(make_maker: MakerFactory) -> None:
    """The app-factory pattern: a module-level router included in a new app per test, each with
    its own maker. FastAPI 0.165 shares the router's route objects between the apps, so the
    guard on a route takes the makers of the app serving the request, not of the first one."""
    router = APIRouter()
    makers: list[Maker] = []
    twin = make_maker()
    default_session = dependency_of(AsyncDBSession if twin.is_async else DBSession)

    @router.get("/which")
    async def which(session: Annotated[Any, Depends(default_session)]) -> int:
        state = current_state()
        assert state is not None
        return next(n for n, maker in enumerate(makers) if maker is state.entries[0].maker)

    def create_app() -> FastAPI:
        app = FastAPI()  # the route takes the app's default session: DBSession or AsyncDBSession
        maker = make_maker()
        makers.append(maker)
        maker.init_app(app, check_on_startup=False)
        app.include_router(router)
        return app

    first, second = create_app(), create_app()
    with TestClient(first) as one, TestClient(second) as two:
        assert one.get("/which").json() == 0
        assert two.get("/which").json() == 1
        assert one.get("/which").json() == 0
    bare = FastAPI()  # no init_app: the router's guarded route must not borrow another app's makers
    bare.include_router(router)
    with TestClient(bare) as client, pytest.raises(NotInstalledError, match=r"Call maker\.init_app"):
        client.get("/which")


def test_an_error_handler_of_the_app_for_sqlalchemy_errors_is_kept(maker: Maker) -> None:
    """``init_app`` maps SQLAlchemy errors on routes without a session, unless the app has its own
    handler for them: registered before ``init_app``, it is not replaced."""
    from fastapi.responses import PlainTextResponse
    from starlette.requests import Request

    app = FastAPI()

    async def mine(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("handled by the app", status_code=418)

    app.add_exception_handler(sa.exc.SQLAlchemyError, mine)
    maker.init_app(app, check_on_startup=False)

    @app.get("/fails")
    async def fails() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("the database is gone"))

    with TestClient(app) as client:
        response = client.get("/fails")
    assert (response.status_code, response.text) == (418, "handled by the app")


def test_an_error_on_a_route_without_a_session_is_a_problem_response(
    maker: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)

    @app.get("/fails")
    async def fails() -> None:
        raise sa.exc.OperationalError("SELECT secret", {"p": "s3cret"}, Exception("the database is gone"))

    with TestClient(app) as client:
        response = client.get("/fails")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"]
    assert "s3cret" not in response.text
    assert [r.getMessage() for r in caplog.records if r.name == "fastapi_sessionmaker"] == [
        "database error mapped to 503: OperationalError on GET /fails (database '(no request session)')"
    ]


def test_a_shared_route_in_an_app_that_observes_is_served_by_its_one_guard(
    make_maker: MakerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A router's route guarded for one app (its guard on the route) and served by another app
    whose maker observes (``stats=True``: the guard in front of the whole app): that app's guard
    alone serves it, so the request's statistics count the request session's statements."""
    from fastapi import Request

    from fastapi_sessionmaker import request_stats

    router = APIRouter()
    twin = make_maker()
    default_session = dependency_of(AsyncDBSession if twin.is_async else DBSession)

    @router.get("/count")
    async def count(request: Request, session: Annotated[Any, Depends(default_session)]) -> int:
        result = session.execute(sa.text("SELECT 1"))
        if isinstance(twin, AsyncFastAPISessionMaker):
            await result
        return request_stats(request).statements

    plain, observed = FastAPI(), FastAPI()
    make_maker().init_app(plain, check_on_startup=False)
    make_maker(slow_request_ms=0).init_app(observed, check_on_startup=False)  # a line per request
    plain.include_router(router)
    observed.include_router(router)
    with TestClient(plain) as one:
        assert one.get("/ping-free").status_code == 404  # builds the plain app: guards the route
    caplog.set_level(logging.WARNING, logger="fastapi_sessionmaker.slow.request")
    with TestClient(observed) as two:
        assert two.get("/count").json() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "fastapi_sessionmaker.slow.request"]
    assert len(lines) == 1, lines  # one guard, one request: not a second one for the route's guard
    assert "1 statements" in lines[0], lines
