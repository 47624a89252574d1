"""Observability: exact statement counts per request, slow-query and slow-request lines without
parameters, and nothing attached at all when it is off. Every database, both twins."""

import asyncio
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_sessionmaker import (
    ConfigurationError,
    DatabaseSettings,
    FastAPISessionMaker,
    RequestStats,
    request_stats,
)
from tests.conftest import Databases, Maker, MakerFactory
from tests.models import reset_tables

SECRET = "p4ssw0rd-in-a-parameter"
HIGH = 3_600_000.0  # an hour: no statement or request of this suite takes that long

# Three statements; the first two carry the secret as a bound parameter.
STATEMENTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("SELECT COUNT(*) FROM fsm_users WHERE email = :secret", {"secret": SECRET}),
    ("UPDATE fsm_users SET name = :secret WHERE email = :secret", {"secret": SECRET}),
    ("SELECT 1", {}),
)


class AfterResponse:
    """A pure ASGI middleware outside the guard: reads the request's stats once the app is done."""

    def __init__(self, app: ASGIApp, counting: bool) -> None:
        self.app = app
        self.counting = counting
        self.seen: list[RequestStats] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and self.counting:
            self.seen.append(request_stats(HTTPConnection(scope)))


def counts(request: Request, counting: bool) -> dict[str, int]:
    if not counting:
        return {}
    stats = request_stats(request)
    return {"statements": stats.statements, "checkouts": stats.checkouts}


def make_app(maker: Maker, *, counting: bool = False) -> tuple[FastAPI, list[AfterResponse]]:
    app = FastAPI()
    maker.init_app(app)
    outer: list[AfterResponse] = []

    def outside(inner: ASGIApp) -> AfterResponse:
        outer.append(AfterResponse(inner, counting))
        return outer[-1]

    app.add_middleware(outside)
    Db = Annotated[Any, maker.dependency]

    if maker.is_async:

        @app.post("/work")
        async def work_async(request: Request, session: Db) -> dict[str, Any]:
            for statement, params in STATEMENTS:
                await session.execute(sa.text(statement), params)
            return counts(request, counting)

        @app.get("/nothing")
        async def nothing_async(session: Db) -> int:
            return 0
    else:

        @app.post("/work")
        def work_sync(request: Request, session: Db) -> dict[str, Any]:
            for statement, params in STATEMENTS:
                session.execute(sa.text(statement), params)
            return counts(request, counting)

        @app.get("/nothing")
        def nothing_sync(session: Db) -> int:
            return 0

    return app, outer


@pytest.fixture
def tables(sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)


def slow_records(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == f"fastapi_sessionmaker.slow.{kind}"]


def everything_logged(records: list[logging.LogRecord]) -> str:
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)


@pytest.fixture
def client_for() -> Iterator[Any]:
    clients: list[TestClient] = []

    def start(app: FastAPI) -> TestClient:
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()  # lifespan: the start-up check warms the engine (dialect queries)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


@pytest.mark.usefixtures("tables")
def test_a_request_counts_exactly_its_statements(make_maker: MakerFactory, client_for: Any) -> None:
    maker = make_maker(stats=True)
    app, outer = make_app(maker, counting=True)
    client = client_for(app)
    for _ in range(2):  # the second request on a warm pool counts the same
        response = client.post("/work?token=abc")
        assert response.status_code == 200
        assert response.json() == {"statements": 3, "checkouts": 1}
    first, second = outer[0].seen
    for stats in (first, second):
        assert stats.statements == 3  # the COMMIT is not a statement
        assert stats.checkouts == 1
        assert stats.db_ms > 0
        assert stats.pool_wait_ms >= 0
        assert stats.status == 200
        assert stats.duration_ms is not None
        assert stats.duration_ms >= stats.db_ms
    assert first is not second
    assert client.get("/nothing").status_code == 200
    assert outer[0].seen[-1].statements == 0  # a session that ran nothing took no connection
    assert outer[0].seen[-1].checkouts == 0


@pytest.mark.usefixtures("tables")
def test_slow_queries_over_the_threshold_are_logged_without_parameters(
    make_maker: MakerFactory, client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    every = make_maker(slow_query_ms=0, name="every")
    none = make_maker(slow_query_ms=HIGH, name="none")
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker.slow"):
        assert client_for(make_app(every)[0]).post("/work").status_code == 200
        assert client_for(make_app(none)[0]).post("/work").status_code == 200
    records = [r for r in slow_records(caplog, "query") if r.path == "/work"]  # type: ignore[attr-defined]
    assert len(records) == 3, everything_logged(records)
    texts = [r.statement for r in records]  # type: ignore[attr-defined]
    assert texts[0].startswith("SELECT COUNT(*) FROM fsm_users WHERE email = "), texts
    assert texts[1].startswith("UPDATE fsm_users SET name = "), texts
    assert texts[2] == "SELECT 1", texts
    assert all(r.database == "every" and r.method == "POST" for r in records)  # type: ignore[attr-defined]
    assert all(r.duration_ms >= 0 for r in records)  # type: ignore[attr-defined]
    assert "fsm_users WHERE email =" in records[0].getMessage()
    assert records[2].getMessage().endswith(": SELECT 1")
    assert records[0].getMessage().startswith("slow query: ")
    assert " ms on POST /work (database 'every'): " in records[0].getMessage()
    assert not [r for r in slow_records(caplog, "query") if r.database == "none"]  # type: ignore[attr-defined]
    assert SECRET not in everything_logged(slow_records(caplog, "query"))


def test_a_slow_query_outside_a_request_names_no_path(
    make_maker: MakerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    maker = make_maker(slow_query_ms=0)
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker.slow"):
        if isinstance(maker, FastAPISessionMaker):
            with maker.context_session() as session:
                session.execute(sa.text("SELECT 1 + :n"), {"n": 41})
        else:

            async def run() -> None:
                async with maker.context_session() as session:
                    await session.execute(sa.text("SELECT 1 + :n"), {"n": 41})
                await maker.dispose()  # its connections belong to this loop

            asyncio.run(run())
    (record,) = [r for r in slow_records(caplog, "query") if "SELECT 1 +" in r.getMessage()]
    assert record.path is None  # type: ignore[attr-defined]
    assert " ms outside a request (database 'default'): SELECT 1 + " in record.getMessage()
    assert "41" not in record.getMessage()


@pytest.mark.usefixtures("tables")
def test_slow_requests_over_the_threshold_are_logged_with_their_counts(
    make_maker: MakerFactory, client_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    every = make_maker(slow_request_ms=0, name="every")
    none = make_maker(slow_request_ms=HIGH, name="none")
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker.slow"):
        assert client_for(make_app(every, counting=True)[0]).post(f"/work?token={SECRET}").status_code == 200
        logged = len(slow_records(caplog, "request"))
        assert client_for(make_app(none, counting=True)[0]).post("/work").status_code == 200
    (record,) = slow_records(caplog, "request")
    assert logged == 1
    assert (record.method, record.path, record.status) == ("POST", "/work", 200)  # type: ignore[attr-defined]
    assert record.statements == 3  # type: ignore[attr-defined]
    assert record.checkouts == 1  # type: ignore[attr-defined]
    assert record.db_ms > 0  # type: ignore[attr-defined]
    message = record.getMessage()
    assert message.startswith("slow request: POST /work 200 in ")
    assert " ms: 3 statements, " in message
    assert " ms in the database, " in message
    assert SECRET not in everything_logged([record])  # no parameters, no query string


def test_nothing_is_attached_when_observability_is_off(make_maker: MakerFactory, client_for: Any) -> None:
    maker = make_maker()
    assert maker.observer is None
    engine = maker.cached_engine
    sync_engine = engine if isinstance(engine, sa.Engine) else engine.sync_engine
    assert not sync_engine.dispatch.before_cursor_execute
    assert not sync_engine.dispatch.after_cursor_execute
    assert not sync_engine.dialect.dispatch.handle_error
    assert "raw_connection" not in vars(sync_engine)  # checkouts are not wrapped
    app, _ = make_app(maker, counting=True)
    assert app.state.fastapi_sessionmaker.observer is None  # no stats object per request
    response = client_for(app).post("/work")
    assert response.status_code == 500  # request_stats() raised ConfigurationError


def test_request_stats_says_how_to_turn_counting_on() -> None:
    app = FastAPI()
    FastAPISessionMaker("sqlite://", slow_query_ms=10).init_app(app)  # observes, but counts nothing

    @app.get("/")
    def endpoint(request: Request) -> None:
        request_stats(request)

    with TestClient(app) as client, pytest.raises(ConfigurationError, match=r"maker with stats=True"):
        client.get("/")


def test_thresholds_come_from_the_settings_and_bad_ones_fail_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URI", "sqlite://")
    monkeypatch.setenv("DATABASE_SLOW_QUERY_MS", "250")
    monkeypatch.setenv("DATABASE_SLOW_REQUEST_MS", "1000.5")
    maker = FastAPISessionMaker()
    assert maker.observer is not None
    assert (maker.observer.slow_query_ms, maker.observer.slow_request_ms) == (250.0, 1000.5)
    assert maker.observer.counting  # a slow-request line needs the counts
    assert FastAPISessionMaker(slow_query_ms=5).observer.slow_query_ms == 5.0  # type: ignore[union-attr]
    monkeypatch.setenv("DATABASE_SLOW_QUERY_MS", "-1")
    with pytest.raises(ConfigurationError, match=r"^invalid database settings: DATABASE_SLOW_QUERY_MS: "):
        DatabaseSettings()
    with pytest.raises(ConfigurationError, match=r"^slow_request_ms=-5: give a number of milliseconds"):
        FastAPISessionMaker("sqlite://", slow_request_ms=-5)


def test_every_session_of_the_request_counts(make_maker: MakerFactory, client_for: Any) -> None:
    maker = make_maker(stats=True)
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]

    if isinstance(maker, FastAPISessionMaker):
        sync_maker = maker

        @app.get("/two")
        def two_sync(request: Request, session: Db) -> list[int]:
            session.execute(sa.text("SELECT 1"))
            with sync_maker.context_session() as other:  # its own connection, same request
                other.execute(sa.text("SELECT 2"))
            stats = request_stats(request)
            return [stats.statements, stats.checkouts]
    else:
        async_maker = maker

        @app.get("/two")
        async def two_async(request: Request, session: Db) -> list[int]:
            await session.execute(sa.text("SELECT 1"))
            async with async_maker.context_session() as other:
                await other.execute(sa.text("SELECT 2"))
            stats = request_stats(request)
            return [stats.statements, stats.checkouts]

    assert client_for(app).get("/two").json() == [2, 2]


def test_a_slow_query_line_masks_the_database_password(
    databases: Databases, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL here trusts 127.0.0.1: the password is accepted and never checked.
    url = sa.make_url(databases.url("postgresql")).set(password="s3cret-pw")
    maker = FastAPISessionMaker(url, slow_query_ms=0)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker.slow"),
            maker.context_session() as session,
        ):
            assert session.execute(sa.text("SELECT 's3cret-pw' AS leaked")).scalar_one() == "s3cret-pw"
    finally:
        maker.dispose()
    (record,) = [r for r in slow_records(caplog, "query") if "AS leaked" in r.getMessage()]
    assert record.getMessage().endswith(": SELECT '***' AS leaked")
    assert "s3cret-pw" not in everything_logged(slow_records(caplog, "query"))
