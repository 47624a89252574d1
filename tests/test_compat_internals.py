"""Each read of another package's internals (``_compat.py``) against the installed versions.

When an upstream release renames or drops what is read, the test of that read fails with a
message naming the package and the attribute, instead of a request path breaking in production.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, SessionTransaction

from fastapi_sessionmaker import FastAPISessionMaker, _compat
from tests.models import User, reset_tables


def test_fastapi_keeps_the_per_endpoint_exit_stack_in_the_scope() -> None:
    app = FastAPI()
    seen: list[Any] = []

    @app.get("/")
    async def endpoint(request: Request) -> None:
        seen.append(_compat.fastapi_function_stack(request.scope))

    with TestClient(app) as client:
        assert client.get("/").status_code == 200
    assert isinstance(seen[0], AsyncExitStack), (
        f"FastAPI no longer puts an AsyncExitStack at scope[{_compat.FUNCTION_STACK_KEY!r}]: "
        "update _compat.fastapi_function_stack (the request dependency relies on it)"
    )


def test_sqlalchemy_session_reports_whether_it_is_clean(sync_engine: sa.Engine) -> None:
    reset_tables(sync_engine)
    with Session(sync_engine) as session:
        assert _compat.session_is_clean(session), "Session._is_clean() changed: update _compat"
        session.add(User(email="clean@x"))
        assert not _compat.session_is_clean(session), "Session._is_clean() changed: update _compat"


def test_sqlalchemy_session_transaction_lists_its_connections(sync_engine: sa.Engine) -> None:
    with Session(sync_engine) as session:
        assert _compat.transaction_connections(session) == []
        session.execute(sa.text("SELECT 1"))
        connections = _compat.transaction_connections(session)
        assert connections == [session.connection()], (
            "SessionTransaction._connections changed: update _compat.transaction_connections"
        )


def test_sqlalchemy_queue_pool_keeps_its_limits() -> None:
    engine = sa.create_engine(
        "sqlite:///:memory:", poolclass=sa.QueuePool, pool_size=3, max_overflow=4, pool_timeout=7.5
    )
    try:
        assert _compat.pool_timeout(engine.pool) == 7.5, "QueuePool._timeout changed: update _compat"
        assert _compat.pool_max_overflow(engine.pool) == 4, "QueuePool._max_overflow changed: update _compat"
        assert _compat.pool_pre_ping(engine.pool) is False, "Pool._pre_ping changed: update _compat"
    finally:
        engine.dispose()
    pinging = sa.create_engine("sqlite:///:memory:", pool_pre_ping=True)
    try:
        assert _compat.pool_pre_ping(pinging.pool) is True, "Pool._pre_ping changed: update _compat"
    finally:
        pinging.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_every_driver_exposes_the_socket_of_an_idle_connection(make_maker: Any, backend: str) -> None:
    """psycopg, PyMySQL (sync) and asyncpg, aiomysql (async): the probe finds a socket for each."""
    maker = make_maker()
    found: list[bool] = []

    def probe(dbapi_connection: Any, record: Any) -> None:
        check = _compat.dead_connection_probe(dbapi_connection)
        found.append(check is not None and check() is False)

    engine = maker.cached_engine
    sync_engine = engine if isinstance(engine, sa.Engine) else engine.sync_engine
    sa.event.listen(sync_engine, "connect", probe)
    if isinstance(maker, FastAPISessionMaker):
        maker.check_connection()
    else:
        import asyncio

        async def check_and_dispose() -> None:
            try:
                await maker.check_connection()
            finally:
                await maker.dispose()  # the pool belongs to this event loop

        asyncio.run(check_and_dispose())
    assert found == [True], (
        f"{sync_engine.dialect.driver}: the driver's connection no longer exposes its socket where "
        "_compat.dead_connection_probe looks: update it"
    )


def test_sqlalchemy_connections_check_out_through_engine_raw_connection() -> None:
    engine = sa.create_engine("sqlite://")
    calls: list[str] = []

    def wrapper(original: Any) -> Any:
        def raw_connection() -> Any:
            calls.append("checkout")
            return original()

        return raw_connection

    _compat.wrap_raw_connection(engine, wrapper)
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    with Session(engine) as session:
        session.execute(sa.text("SELECT 1"))
    engine.dispose()  # a new pool: the wrapper stays on the engine
    with engine.connect():
        pass
    engine.dispose()  # the new pool's connection too (Python 3.13 warns of an unclosed one)
    assert calls == ["checkout"] * 3, (
        "sqlalchemy.Connection no longer checks out through Engine.raw_connection(): update "
        "_compat.wrap_raw_connection (the pool wait of the observability layer relies on it)"
    )


def test_opentelemetry_sqlalchemy_engine_tracer_attaches_to_one_engine() -> None:
    engine = sa.create_engine("sqlite://")
    assert not _compat.otel_traced(engine)
    assert _compat.otel_trace_engine(engine), (
        "opentelemetry-instrumentation-sqlalchemy's EngineTracer(tracer, engine, usage, ...) "
        "changed: update _compat.otel_trace_engine"
    )
    assert _compat.otel_traced(engine)
    assert not _compat.otel_trace_engine(engine)  # never twice
    assert len(engine.dispatch.before_cursor_execute) == 1
    engine.dispose()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_uvicorn_tells_whether_the_client_is_gone(http: str) -> None:
    """The guard asks uvicorn's ``RequestResponseCycle.disconnected`` before a commit (no loop turn)."""
    import socket
    import threading

    import anyio

    from tests.conftest import Server, wait_until

    seen: list[bool | None] = []
    entered, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.get("/flag")
    async def flag(request: Request) -> None:
        seen.append(_compat.server_disconnected(request.receive))
        entered.set()
        assert await anyio.to_thread.run_sync(release.wait, 10.0)
        seen.append(_compat.server_disconnected(request.receive))

    server = Server(app, http=http)
    host, port = server.start().removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10.0) as client:
            client.sendall(b"GET /flag HTTP/1.1\r\nHost: test\r\n\r\n")
            assert entered.wait(10.0)
        wait_until(lambda: not server.server.server_state.connections, "uvicorn to see the disconnect")
        release.set()
        wait_until(lambda: len(seen) == 2, "the endpoint to look again")
    finally:
        server.stop()
    assert seen == [False, True], (
        f"uvicorn's RequestResponseCycle ({http}) no longer answers .disconnected as expected "
        f"({seen}): update _compat.server_disconnected (the guard polls receive() otherwise)"
    )
    assert _compat.server_disconnected(lambda: None) is None  # another server: poll instead


class _OwnCommit(Session):
    commits = 0

    def commit(self) -> None:
        self.commits += 1
        super().commit()


def _emails(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT email FROM fsm_users ORDER BY email")).scalars())


def test_commit_takes_the_short_way_when_that_is_all_a_commit_does(
    sync_engine: sa.Engine, orm_prepares: list[SessionTransaction]
) -> None:
    """``_compat.commit`` skips the ORM's prepare step only where it would do nothing: what a
    commit does for the database, its listeners and the pool happens either way."""
    reset_tables(sync_engine)
    prepared = orm_prepares
    seen: list[str] = []
    sa.event.listen(sync_engine, "commit", lambda connection: seen.append("connection commit"))
    insert = sa.text("INSERT INTO fsm_users (id, email, name) VALUES (:id, :email, '')")

    session = Session(sync_engine, expire_on_commit=False)
    sa.event.listen(session, "after_transaction_end", lambda s, t: seen.append("transaction end"))
    session.execute(insert, {"id": "1" * 32, "email": "raw@x"})  # a raw write: nothing to flush
    _compat.commit(session)
    assert prepared == [], "the short way was not taken: see _compat.commit's conditions"
    assert seen == ["connection commit", "transaction end"]
    assert not session.in_transaction()
    assert sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    session.close()
    assert _emails(sync_engine) == ["raw@x"]

    def ends(session: Session, email: str, *, before: Any = None) -> None:
        """``_compat.commit`` of ``session`` after writing ``email`` (through ``before``): by the
        ORM's own commit, which runs its prepare step."""
        if before is None:
            session.execute(insert, {"id": email[0] * 32, "email": email})
        else:
            before(session, email)
        before_count = len(prepared)
        _compat.commit(session)
        assert len(prepared) > before_count, f"{email}: the ORM's own commit did not run"
        assert not session.in_transaction()
        session.close()

    hooks: list[str] = []
    pending = Session(sync_engine, expire_on_commit=False)
    ends(pending, "b-pending@x", before=lambda s, email: s.add(User(email=email)))
    expiring = Session(sync_engine)  # expire_on_commit=True
    ends(expiring, "c-expiring@x")
    listened = Session(sync_engine, expire_on_commit=False)
    sa.event.listen(listened, "before_commit", lambda s: hooks.append("before"))
    sa.event.listen(listened, "after_commit", lambda s: hooks.append("after"))
    ends(listened, "d-listened@x")
    nested = Session(sync_engine, expire_on_commit=False)

    def in_savepoint(s: Session, email: str) -> None:
        s.begin_nested()
        s.execute(insert, {"id": email[0] * 32, "email": email})

    ends(nested, "e-nested@x", before=in_savepoint)
    own = _OwnCommit(sync_engine, expire_on_commit=False)
    ends(own, "f-own@x")
    assert own.commits == 1
    assert hooks == ["before", "after"]
    assert _emails(sync_engine) == [
        "b-pending@x",
        "c-expiring@x",
        "d-listened@x",
        "e-nested@x",
        "f-own@x",
        "raw@x",
    ]
    assert sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
