"""SQLModel's sessions as request sessions (``session_class=``): ``exec()`` under every commit policy,
in both twins, composed with the read-only, after-the-response-started and serial rules."""

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from sqlmodel import Session, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from examples.heroes_models import Hero
from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    CommitPolicy,
    ConcurrentSessionUseError,
    ConfigurationError,
    FastAPISessionMaker,
    ReadOnlySessionError,
    ResponseStartedError,
)
from tests.conftest import Maker, MakerFactory

HERO = Hero.__table__  # type: ignore[attr-defined]
POLICIES = [policy.value for policy in CommitPolicy]


@pytest.fixture
def heroes(sync_engine: sa.Engine) -> sa.Engine:
    """An empty ``hero`` table on this test's database."""
    SQLModel.metadata.drop_all(sync_engine, tables=[HERO])
    SQLModel.metadata.create_all(sync_engine, tables=[HERO])
    return sync_engine


def names(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(sa.select(HERO.c.name).order_by(HERO.c.id)))


def session_class(twin: str) -> type[Any]:
    return Session if twin == "sync" else AsyncSession


def sync_app(db: FastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    db.init_app(app)
    for policy in POLICIES:
        add_routes_sync(app, policy, Annotated[Session, db.depends(policy=policy)])

    @app.get("/stream")
    def stream(session: Annotated[Session, db.dependency]) -> StreamingResponse:
        def body() -> Iterator[str]:
            # The response has started: each exec() is a read of its own, its rows fetched in full.
            heroes = session.exec(select(Hero).order_by(col(Hero.id))).all()
            rows = session.exec(select(Hero.id, Hero.name).order_by(col(Hero.id))).all()
            held = session.in_transaction()
            try:
                session.exec(sa.update(HERO).values(age=1))
                refused = False
            except ResponseStartedError:
                refused = True
            yield json.dumps([[h.name for h in heroes], [r[1] for r in rows], held, refused])

        return StreamingResponse(body())

    return app


def add_routes_sync(app: FastAPI, policy: str, SessionDep: Any) -> None:
    @app.post(f"/{policy}/heroes")
    def create(name: str, session: SessionDep, fail: bool = False, commit: bool = False) -> Any:
        session.add(Hero(name=name, secret_name="secret"))
        try:
            session.flush()
        except ReadOnlySessionError:
            return JSONResponse("read-only", status_code=403)
        if commit:
            session.commit()
        stored = session.exec(select(Hero.name).order_by(col(Hero.id))).all()
        return JSONResponse(stored, status_code=400 if fail else 200)

    @app.get(f"/{policy}/heroes")
    def read(session: SessionDep) -> list[str]:
        return [hero.name for hero in session.exec(select(Hero).order_by(col(Hero.id))).all()]


def async_app(db: AsyncFastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    db.init_app(app)
    for policy in POLICIES:
        add_routes_async(app, policy, Annotated[AsyncSession, db.depends(policy=policy)])

    @app.get("/stream")
    async def stream(session: Annotated[AsyncSession, db.dependency]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            heroes = (await session.exec(select(Hero).order_by(col(Hero.id)))).all()
            rows = (await session.exec(select(Hero.id, Hero.name).order_by(col(Hero.id)))).all()
            held = session.in_transaction()
            try:
                await session.exec(sa.update(HERO).values(age=1))
                refused = False
            except ResponseStartedError:
                refused = True
            yield json.dumps([[h.name for h in heroes], [r[1] for r in rows], held, refused])

        return StreamingResponse(body())

    return app


def add_routes_async(app: FastAPI, policy: str, SessionDep: Any) -> None:
    @app.post(f"/{policy}/heroes")
    async def create(name: str, session: SessionDep, fail: bool = False, commit: bool = False) -> Any:
        session.add(Hero(name=name, secret_name="secret"))
        try:
            await session.flush()
        except ReadOnlySessionError:
            return JSONResponse("read-only", status_code=403)
        if commit:
            await session.commit()
        stored = (await session.exec(select(Hero.name).order_by(col(Hero.id)))).all()
        return JSONResponse(list(stored), status_code=400 if fail else 200)

    @app.get(f"/{policy}/heroes")
    async def read(session: SessionDep) -> list[str]:
        heroes = await session.exec(select(Hero).order_by(col(Hero.id)))
        return [hero.name for hero in heroes.all()]


def app_for(maker: Maker) -> FastAPI:
    if isinstance(maker, FastAPISessionMaker):
        return sync_app(maker)
    return async_app(maker)


def test_exec_under_every_commit_policy(
    twin: str, heroes: sa.Engine, make_maker: MakerFactory, serve: Callable[..., httpx.Client]
) -> None:
    client = serve(app_for(make_maker(session_class=session_class(twin))))

    # AUTO: committed before the response; a returned error response rolls back.
    assert client.post("/auto/heroes", params={"name": "a"}).json() == ["a"]
    assert client.post("/auto/heroes", params={"name": "b", "fail": True}).status_code == 400
    assert names(heroes) == ["a"]
    # COMMIT_UNLESS_RAISED: the returned error response commits too.
    response = client.post("/commit_unless_raised/heroes", params={"name": "c", "fail": True})
    assert response.status_code == 400
    assert response.json() == ["a", "c"]
    assert names(heroes) == ["a", "c"]
    # MANUAL: only what the endpoint commits is stored.
    assert client.post("/manual/heroes", params={"name": "d"}).json() == ["a", "c", "d"]
    assert names(heroes) == ["a", "c"]
    assert client.post("/manual/heroes", params={"name": "e", "commit": True}).json() == ["a", "c", "e"]
    assert names(heroes) == ["a", "c", "e"]
    # READ_ONLY: exec() reads; the flush of a new hero is refused and nothing is stored.
    assert client.get("/read_only/heroes").json() == ["a", "c", "e"]
    assert client.post("/read_only/heroes", params={"name": "f"}).status_code == 403
    assert names(heroes) == ["a", "c", "e"]
    for policy in POLICIES:
        assert client.get(f"/{policy}/heroes").json() == ["a", "c", "e"]


def test_exec_after_the_response_started_is_a_read_of_its_own(
    twin: str, heroes: sa.Engine, make_maker: MakerFactory, serve: Callable[..., httpx.Client]
) -> None:
    client = serve(app_for(make_maker(session_class=session_class(twin))))
    assert client.post("/auto/heroes", params={"name": "a"}).status_code == 200
    # Both selects read every row, no transaction (so no connection) is held between statements,
    # and a write through exec() is refused instead of being lost.
    assert client.get("/stream").json() == [["a"], ["a"], False, True]
    with heroes.connect() as connection:
        assert connection.scalar(sa.select(HERO.c.age)) is None


@pytest.mark.parametrize("policy", list(CommitPolicy))
def test_the_request_session_is_sqlmodels_composed_with_the_rules(
    twin: str, heroes: sa.Engine, make_maker: MakerFactory, policy: CommitPolicy
) -> None:
    maker = make_maker(session_class=session_class(twin))
    if isinstance(maker, FastAPISessionMaker):
        session = maker.lifecycle.open(policy)
        try:
            assert isinstance(session, Session)
            assert session.exec(select(Hero)).all() == []
            session.add(Hero(name="x", secret_name="y"))
            if policy is CommitPolicy.READ_ONLY:
                with pytest.raises(ReadOnlySessionError):
                    session.flush()
            else:
                session.flush()
                assert [h.name for h in session.exec(select(Hero)).all()] == ["x"]
        finally:
            session.close()
        return

    async def main() -> None:
        session: Any = maker.lifecycle.open(policy)
        try:
            assert isinstance(session, AsyncSession)
            assert isinstance(session.sync_session, Session)
            assert (await session.exec(select(Hero))).all() == []
            # One operation at a time: a second task's exec() is refused, whichever runs first.
            results = await asyncio.gather(
                session.exec(select(Hero)), session.exec(select(Hero)), return_exceptions=True
            )
            assert [type(r) for r in results].count(ConcurrentSessionUseError) == 1, results
        finally:
            await session.close()
            await maker.dispose()

    asyncio.run(main())


def test_sessions_outside_requests_are_sqlmodels(
    twin: str, heroes: sa.Engine, make_maker: MakerFactory
) -> None:
    """context_session(), task_session() and run_in_transaction() hand out SQLModel's class."""
    maker = make_maker(session_class=session_class(twin))
    if isinstance(maker, FastAPISessionMaker):
        with maker.context_session() as session:
            session.add(Hero(name="ctx", secret_name="s"))
        with maker.task_session() as session:
            session.add(Hero(name="task", secret_name="s"))

        def read_sync(session: Any) -> list[str]:
            return [h.name for h in session.exec(select(Hero).order_by(col(Hero.id)))]

        assert maker.run_in_transaction(read_sync) == ["ctx", "task"]
        return

    async def main() -> list[str]:
        async with maker.context_session() as session:
            session.add(Hero(name="ctx", secret_name="s"))
        async with maker.task_session() as session:
            session.add(Hero(name="task", secret_name="s"))

        async def read(session: Any) -> list[str]:
            return [h.name for h in await session.exec(select(Hero).order_by(col(Hero.id)))]

        heroes = await maker.run_in_transaction(read)
        await maker.dispose()  # on this event loop, which the connections belong to
        return heroes

    assert asyncio.run(main()) == ["ctx", "task"]


@pytest.mark.parametrize(
    ("maker_class", "given", "message"),
    [
        (
            FastAPISessionMaker,
            AsyncSession,
            "FastAPISessionMaker(session_class=AsyncSession) is the other twin's class: give a Session "
            "class (SQLModel's: sqlmodel.Session), or use AsyncFastAPISessionMaker for an AsyncSession class",
        ),
        (
            AsyncFastAPISessionMaker,
            Session,
            "AsyncFastAPISessionMaker(session_class=Session) is the other twin's class: give an "
            "AsyncSession class (SQLModel's: sqlmodel.ext.asyncio.session.AsyncSession), or use "
            "FastAPISessionMaker for a Session class",
        ),
        (
            FastAPISessionMaker,
            dict,
            "FastAPISessionMaker(session_class=<class 'dict'>): give a subclass of "
            "sqlalchemy.orm.session.Session",
        ),
    ],
)
def test_a_wrong_session_class_is_a_clear_error(maker_class: Any, given: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        maker_class("sqlite://", session_class=given)
    assert str(raised.value) == message


def test_the_session_class_is_given_once() -> None:
    with pytest.raises(ConfigurationError, match=r"give the session class once"):
        FastAPISessionMaker("sqlite://", session_class=Session, session_options={"class_": Session})


def test_an_app_without_sqlmodel_never_imports_it() -> None:
    code = (
        "import sys\n"
        "from fastapi_sessionmaker import CommitPolicy, FastAPISessionMaker\n"
        "db = FastAPISessionMaker('sqlite://')\n"
        "with db.context_session() as session:\n"
        "    session.close()\n"
        "db.lifecycle.open(CommitPolicy.READ_ONLY).close()\n"
        "print('sqlmodel' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
