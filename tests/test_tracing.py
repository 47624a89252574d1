"""OpenTelemetry with ``tracing=True``: statement spans from opentelemetry-instrumentation-sqlalchemy,
and ours for the pool wait, the commit, the rollback and the after-commit callbacks, all inside the
request's span, with the database's attributes. Every database, both twins; the SDK's in-memory
exporter."""

import asyncio
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_sessionmaker import FastAPISessionMaker, on_commit, on_rollback
from fastapi_sessionmaker._compat import otel_traced
from fastapi_sessionmaker._tracing import TracedSessionMixin
from tests.conftest import Maker, MakerFactory
from tests.models import reset_tables

SECRET = "p4ssw0rd-in-a-parameter"
REQUEST_SPAN = "test request"


EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
"""The tests' own tracer provider, given to the makers (``tracing=PROVIDER``): the process's global
one stays unset, so the other tests' apps (FastAPI traces requests natively) make no spans."""
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


class RequestSpan:
    """A pure ASGI middleware outside the guard that runs each request in a span, as an ASGI or
    FastAPI instrumentation does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with PROVIDER.get_tracer("tests").start_as_current_span(REQUEST_SPAN):
            await self.app(scope, receive, send)


def make_app(maker: Maker, done: list[str]) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)
    app.add_middleware(RequestSpan)
    Db = Annotated[Any, maker.dependency]
    statement = sa.text("UPDATE fsm_users SET name = :secret WHERE email = :secret")

    async def notify() -> None:
        done.append("committed")

    def undo() -> None:
        done.append("rolled back")

    if maker.is_async:

        @app.post("/write")
        async def write_async(session: Db) -> str:
            await session.execute(statement, {"secret": SECRET})
            on_commit(session, notify)
            return "ok"

        @app.post("/fail")
        async def fail_async(session: Db) -> str:
            await session.execute(statement, {"secret": SECRET})
            on_rollback(session, undo)
            raise HTTPException(422)
    else:

        @app.post("/write")
        def write_sync(session: Db) -> str:
            session.execute(statement, {"secret": SECRET})
            on_commit(session, notify)
            return "ok"

        @app.post("/fail")
        def fail_sync(session: Db) -> str:
            session.execute(statement, {"secret": SECRET})
            on_rollback(session, undo)
            raise HTTPException(422)

    return app


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def inside(span: ReadableSpan, outer: ReadableSpan, finished: tuple[ReadableSpan, ...]) -> bool:
    """Whether ``outer`` is ``span``'s parent, grandparent, ..."""
    ids = {s.context.span_id: s for s in finished if s.context is not None}
    parent = span.parent
    while parent is not None:
        if parent.span_id == outer.context.span_id:
            return True
        above = ids.get(parent.span_id)
        parent = above.parent if above is not None else None
    return False


DB_SYSTEM = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}


@pytest.fixture
def tables(sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)


@pytest.mark.usefixtures("tables")
def test_commit_pool_wait_statements_and_callbacks_are_spans_of_the_request(
    make_maker: MakerFactory, backend: str, spans: InMemorySpanExporter
) -> None:
    maker = make_maker(tracing=PROVIDER, name="orders")
    done: list[str] = []
    with TestClient(make_app(maker, done)) as client:
        spans.clear()  # the start-up check's spans
        assert client.post("/write").status_code == 200
    assert done == ["committed"]
    finished = spans.get_finished_spans()
    (request,) = by_name(finished, REQUEST_SPAN)
    (wait,) = by_name(finished, "fastapi_sessionmaker.pool_wait")
    (commit,) = by_name(finished, "fastapi_sessionmaker.commit")
    (callback,) = by_name(finished, "fastapi_sessionmaker.callback")
    assert not by_name(finished, "fastapi_sessionmaker.rollback")
    (update,) = [s for s in finished if "UPDATE fsm_users" in str((s.attributes or {}).get("db.statement"))]
    for span in (wait, commit, callback, update):
        assert inside(span, request, finished), span.name
        assert span.context.trace_id == request.context.trace_id
    for span in (wait, commit):
        assert span.attributes is not None
        assert span.attributes["db.system"] == DB_SYSTEM[backend]
        assert span.attributes["fastapi_sessionmaker.database"] == "orders"
    assert commit.kind is trace.SpanKind.CLIENT
    assert update.attributes is not None
    assert update.attributes["db.system"] == DB_SYSTEM[backend]
    assert wait.end_time is not None
    assert update.start_time is not None
    assert wait.end_time <= update.start_time  # the connection first, then the statement
    assert commit.start_time is not None
    assert update.end_time is not None
    assert update.end_time <= commit.start_time
    assert callback.start_time is not None
    assert commit.end_time is not None
    assert commit.end_time <= callback.start_time  # after the commit, never before
    assert callback.attributes is not None
    assert str(callback.attributes["fastapi_sessionmaker.callback"]).endswith("notify")
    assert callback.attributes["fastapi_sessionmaker.where"] == "POST /write"
    assert all(SECRET not in str(s.attributes) for s in finished)  # the statement, never its values


@pytest.mark.usefixtures("tables")
def test_a_failed_request_has_a_rollback_span(
    make_maker: MakerFactory, backend: str, spans: InMemorySpanExporter
) -> None:
    maker = make_maker(tracing=PROVIDER)
    done: list[str] = []
    with TestClient(make_app(maker, done), raise_server_exceptions=False) as client:
        spans.clear()
        assert client.post("/fail").status_code == 422
    assert done == ["rolled back"]
    finished = spans.get_finished_spans()
    (request,) = by_name(finished, REQUEST_SPAN)
    (rollback,) = by_name(finished, "fastapi_sessionmaker.rollback")
    (callback,) = by_name(finished, "fastapi_sessionmaker.callback")
    assert not by_name(finished, "fastapi_sessionmaker.commit")
    assert inside(rollback, request, finished)
    assert inside(callback, request, finished)
    assert rollback.attributes is not None
    assert rollback.attributes["db.system"] == DB_SYSTEM[backend]


def test_a_commit_outside_a_request_is_a_span_of_the_current_one(
    twin: str, make_maker: MakerFactory, spans: InMemorySpanExporter
) -> None:
    maker = make_maker(tracing=PROVIDER)
    with PROVIDER.get_tracer("tests").start_as_current_span("job") as job:
        if isinstance(maker, FastAPISessionMaker):
            with maker.context_session() as session:
                session.execute(sa.text("SELECT 1"))
        else:

            async def run() -> None:
                async with maker.context_session() as session:
                    await session.execute(sa.text("SELECT 1"))
                await maker.dispose()

            asyncio.run(run())
    finished = spans.get_finished_spans()
    (commit,) = by_name(finished, "fastapi_sessionmaker.commit")
    assert commit.parent is not None
    assert commit.parent.span_id == job.get_span_context().span_id


def test_every_engine_is_traced_once_and_untraced_makers_add_nothing(make_maker: MakerFactory) -> None:
    traced = make_maker(tracing=PROVIDER)
    plain = make_maker()

    def sync_engine_of(maker: Maker) -> sa.Engine:
        engine = maker.cached_engine
        return engine if isinstance(engine, sa.Engine) else engine.sync_engine

    engine = sync_engine_of(traced)
    assert otel_traced(engine)
    (tracer,) = engine.dispatch.before_cursor_execute  # tracing alone times nothing itself
    traced.observer.instrument(engine)  # type: ignore[union-attr]  # a second time: no second tracer
    assert list(engine.dispatch.before_cursor_execute) == [tracer]
    assert not otel_traced(sync_engine_of(plain))
    key = "sync_session_class" if traced.is_async else "class_"
    assert issubclass(traced.session_options[key], TracedSessionMixin)
    assert not issubclass(plain.session_options.get(key, Session), TracedSessionMixin)
