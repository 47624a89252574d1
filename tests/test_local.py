"""Per-transaction settings: ``set_local`` under a real row-level-security policy, ``use_schemas``.

PostgreSQL tests run through a real uvicorn with both twins, as a role that is not a superuser
(superusers bypass row-level security). The pooled connections are few on purpose: a setting that
outlived its transaction would show up in the next request on the same connection.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import concurrent.futures
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    CommitPolicy,
    FastAPISessionMaker,
    TransactionSettingsError,
    set_local,
    use_schemas,
)
from tests.conftest import Maker, MakerFactory, checked_out, pool_of
from tests.models import User, reset_tables

ROLE = f"fsm_app_{os.getpid()}"
SEEN = sa.text(
    "SELECT current_setting('app.tenant_id', true) AS tenant, pg_backend_pid() AS pid, "
    "(SELECT coalesce(array_agg(text ORDER BY text), '{}') FROM fsm_notes) AS texts"
)
ROWS = {1: ["a1", "a2"], 2: ["b1"]}
Serve = Callable[..., httpx.Client]


def seen(row: Any) -> dict[str, Any]:
    return {"tenant": row.tenant, "pid": row.pid, "texts": list(row.texts)}


@pytest.fixture
def rls_url(sync_engine: sa.Engine) -> Iterator[str]:
    """The test database with ``fsm_notes`` under a tenant policy; the URL of a non-superuser."""
    with sync_engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS fsm_notes"))
        exists = connection.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE})
        if exists.first() is None:
            connection.execute(sa.text(f"CREATE ROLE {ROLE} LOGIN"))
        connection.execute(
            sa.text(
                "CREATE TABLE fsm_notes (id serial PRIMARY KEY, tenant_id int NOT NULL, "
                "text varchar(50) NOT NULL)"
            )
        )
        connection.execute(sa.text("ALTER TABLE fsm_notes ENABLE ROW LEVEL SECURITY"))
        connection.execute(sa.text("ALTER TABLE fsm_notes FORCE ROW LEVEL SECURITY"))
        tenant = "nullif(current_setting('app.tenant_id', true), '')::int"
        connection.execute(
            sa.text(
                f"CREATE POLICY tenant ON fsm_notes USING (tenant_id = {tenant}) "
                f"WITH CHECK (tenant_id = {tenant})"
            )
        )
        connection.execute(sa.text(f"GRANT SELECT, INSERT ON fsm_notes TO {ROLE}"))
        connection.execute(sa.text(f"GRANT USAGE ON SEQUENCE fsm_notes_id_seq TO {ROLE}"))
        for tenant_id, texts in ROWS.items():
            for text in texts:
                connection.execute(
                    sa.text("INSERT INTO fsm_notes (tenant_id, text) VALUES (:t, :x)"),
                    {"t": tenant_id, "x": text},
                )
    yield sa.make_url(str(sync_engine.url)).set(username=ROLE).render_as_string(hide_password=False)
    with sync_engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS fsm_notes"))
        connection.execute(sa.text(f"DROP OWNED BY {ROLE}"))
        connection.execute(sa.text(f"DROP ROLE {ROLE}"))


def stored(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as connection:  # a superuser: every row
        return [
            tuple(r) for r in connection.execute(sa.text("SELECT tenant_id, text FROM fsm_notes ORDER BY id"))
        ]


def sync_rls_app(maker: FastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)

    def tenant_of(dependency: Any) -> Any:
        def tenant(session: Annotated[Session, dependency], x_tenant: Annotated[int, Header()]) -> Session:
            set_local(session, "app.tenant_id", x_tenant)
            return session

        return Depends(tenant)

    Tenant = Annotated[Session, tenant_of(maker.dependency)]
    ManualTenant = Annotated[Session, tenant_of(maker.depends(policy=CommitPolicy.MANUAL))]
    Plain = Annotated[Session, maker.dependency]

    @app.get("/notes")
    def notes(session: Tenant) -> dict[str, Any]:
        return seen(session.execute(SEEN).one())

    @app.get("/plain")
    def plain(session: Plain) -> dict[str, Any]:
        return seen(session.execute(SEEN).one())

    @app.post("/manual")
    def manual(session: ManualTenant, x_tenant: Annotated[int, Header()]) -> dict[str, Any]:
        insert = sa.text("INSERT INTO fsm_notes (tenant_id, text) VALUES (:t, :x)")
        session.execute(insert, {"t": x_tenant, "x": "first"})
        session.commit()
        # A second transaction of the same session: the policy's WITH CHECK needs the setting.
        session.execute(insert, {"t": x_tenant, "x": "second"})
        row = seen(session.execute(SEEN).one())
        session.commit()
        return row

    @app.get("/stream")
    def stream(session: Tenant) -> StreamingResponse:
        def body() -> Iterator[str]:
            for _ in range(2):  # after the response started: each read in a transaction of its own
                yield json.dumps(seen(session.execute(SEEN).one())) + "\n"

        return StreamingResponse(body(), media_type="application/jsonl")

    @app.get("/immediate")
    def immediate(session: Plain, x_tenant: Annotated[int, Header()]) -> dict[str, Any]:
        before = seen(session.execute(SEEN).one())
        set_local(session, "app.tenant_id", x_tenant)  # the transaction is open: applied at once
        return {"before": before, "after": seen(session.execute(SEEN).one())}

    return app


def async_rls_app(maker: AsyncFastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)

    def tenant_of(dependency: Any) -> Any:
        async def tenant(
            session: Annotated[AsyncSession, dependency], x_tenant: Annotated[int, Header()]
        ) -> AsyncSession:
            set_local(session, "app.tenant_id", x_tenant)
            return session

        return Depends(tenant)

    Tenant = Annotated[AsyncSession, tenant_of(maker.dependency)]
    ManualTenant = Annotated[AsyncSession, tenant_of(maker.depends(policy=CommitPolicy.MANUAL))]
    Plain = Annotated[AsyncSession, maker.dependency]

    @app.get("/notes")
    async def notes(session: Tenant) -> dict[str, Any]:
        return seen((await session.execute(SEEN)).one())

    @app.get("/plain")
    async def plain(session: Plain) -> dict[str, Any]:
        return seen((await session.execute(SEEN)).one())

    @app.post("/manual")
    async def manual(session: ManualTenant, x_tenant: Annotated[int, Header()]) -> dict[str, Any]:
        insert = sa.text("INSERT INTO fsm_notes (tenant_id, text) VALUES (:t, :x)")
        await session.execute(insert, {"t": x_tenant, "x": "first"})
        await session.commit()
        await session.execute(insert, {"t": x_tenant, "x": "second"})
        row = seen((await session.execute(SEEN)).one())
        await session.commit()
        return row

    @app.get("/stream")
    async def stream(session: Tenant) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            for _ in range(2):
                yield json.dumps(seen((await session.execute(SEEN)).one())) + "\n"

        return StreamingResponse(body(), media_type="application/jsonl")

    @app.get("/immediate")
    async def immediate(session: Plain, x_tenant: Annotated[int, Header()]) -> dict[str, Any]:
        before = seen((await session.execute(SEEN)).one())
        with pytest.raises(TransactionSettingsError, match="run_sync"):
            set_local(session, "app.tenant_id", x_tenant)
        await session.run_sync(set_local, "app.tenant_id", x_tenant)
        return {"before": before, "after": seen((await session.execute(SEEN)).one())}

    return app


def rls_app(maker: Maker) -> FastAPI:
    if isinstance(maker, FastAPISessionMaker):
        return sync_rls_app(maker)
    return async_rls_app(maker)


def get(client: httpx.Client, path: str, tenant: int | None = None) -> Any:
    headers = {} if tenant is None else {"x-tenant": str(tenant)}
    response = client.request("POST" if path == "/manual" else "GET", path, headers=headers)
    assert response.status_code == 200, response.text
    if path == "/stream":
        return [json.loads(line) for line in response.text.splitlines()]
    return response.json()


NOTHING = {"tenant": "", "texts": []}


@pytest.mark.parametrize("backend", ["postgresql"])
def test_concurrent_tenants_see_only_their_rows(rls_url: str, make_maker: MakerFactory, serve: Serve) -> None:
    """50 requests of two tenants at once on a pool of 2; then requests without a tenant see nothing."""
    maker = make_maker(rls_url, engine_options={"pool_size": 2, "max_overflow": 0})
    client = serve(rls_app(maker))
    with concurrent.futures.ThreadPoolExecutor(50) as executor:
        results = list(executor.map(lambda i: (i % 2 + 1, get(client, "/notes", i % 2 + 1)), range(50)))
    pids = set()
    for tenant, row in results:
        assert row["tenant"] == str(tenant)
        assert row["texts"] == ROWS[tenant]
        pids.add(row["pid"])
    assert len(pids) <= 2
    for _ in range(6):
        row = get(client, "/plain")
        assert {k: row[k] for k in NOTHING} == NOTHING
        assert row["pid"] in pids  # the same pooled connections the tenants used
    assert checked_out(pool_of(maker)) == 0


@pytest.mark.parametrize("backend", ["postgresql"])
def test_settings_never_outlive_the_transaction_on_one_connection(
    rls_url: str, make_maker: MakerFactory, serve: Serve, sync_engine: sa.Engine
) -> None:
    """One pooled connection: after each kind of tenant request, a request without one sees nothing."""
    maker = make_maker(rls_url, engine_options={"pool_size": 1, "max_overflow": 0})
    client = serve(rls_app(maker))
    pids = set()

    def nothing_after() -> None:
        row = get(client, "/plain")
        assert {k: row[k] for k in NOTHING} == NOTHING
        pids.add(row["pid"])

    row = get(client, "/notes", 1)
    assert row["texts"] == ROWS[1]
    pids.add(row["pid"])
    nothing_after()

    # MANUAL: the setting is applied again to the second transaction (WITH CHECK would refuse it).
    row = get(client, "/manual", 2)
    assert row["tenant"] == "2"
    assert row["texts"] == ["b1", "first", "second"]
    pids.add(row["pid"])
    assert stored(sync_engine)[-2:] == [(2, "first"), (2, "second")]
    nothing_after()

    # A streaming body reads after the response started, in short transactions of its own.
    for row in get(client, "/stream", 1):
        assert row["tenant"] == "1"
        assert row["texts"] == ROWS[1]
        pids.add(row["pid"])
    nothing_after()

    # Called while the transaction is open: applied at once (async: through run_sync).
    row = get(client, "/immediate", 1)
    assert {k: row["before"][k] for k in NOTHING} == NOTHING
    assert row["after"]["tenant"] == "1"
    assert row["after"]["texts"] == ROWS[1]
    nothing_after()
    assert len(pids) == 1, pids


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_refused_where_no_transaction_scoped_setting_exists(make_maker: MakerFactory) -> None:
    maker = make_maker()
    session = maker.lifecycle.open(CommitPolicy.AUTO)
    try:
        with pytest.raises(TransactionSettingsError, match="needs PostgreSQL") as caught:
            set_local(session, "app.tenant_id", 1)
        if maker.url.get_backend_name() == "mysql":
            assert "no transaction-scoped variables" in str(caught.value)
        assert "fastapi_sessionmaker.local" not in getattr(session, "sync_session", session).info
    finally:
        if isinstance(session, AsyncSession):
            asyncio.run(session.close())
        else:
            session.close()


def test_refused_when_a_connection_of_another_database_is_taken(tmp_path: Any) -> None:
    """A session without a default bind is checked when each connection is taken."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/binds.db")
    session = Session(binds={User: engine})
    try:
        set_local(session, "app.tenant_id", 1)  # nothing to check yet
        with pytest.raises(TransactionSettingsError, match="needs PostgreSQL"):
            session.execute(sa.select(User))
    finally:
        session.close()
        engine.dispose()


@pytest.mark.parametrize(
    "name",
    ["", "app.", ".app", "app..tenant", "app.tenant id", "app.tenant;DROP TABLE x", "app.'x'", "1app.x"],
)
def test_setting_names_are_dotted_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="is not a setting name"):
        set_local(Session(), name, 1)


def test_values_are_not_none_and_sessions_are_sessions() -> None:
    with pytest.raises(TypeError, match="None"):
        set_local(Session(), "app.tenant_id", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Session or an AsyncSession"):
        set_local(object(), "app.tenant_id", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str or None"):
        use_schemas(Session(), {None: 1})  # type: ignore[dict-item]


def test_the_setting_is_sent_as_bound_parameters() -> None:
    """Never formatted into the SQL: the statement holds placeholders only."""
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/x")  # never connects
    session = Session(bind=engine)
    statements: list[tuple[str, Any]] = []
    try:
        set_local(session, "app.tenant_id", "1'); DROP TABLE fsm_notes; --")
        local = session.info["fastapi_sessionmaker.local"]
        compiled = local.statement.compile(dialect=engine.dialect)
        statements.append((str(compiled), compiled.params))
    finally:
        session.close()
        engine.dispose()
    sql, params = statements[0]
    assert "DROP" not in sql
    assert sql.startswith("SELECT set_config(%(fsm_name_0)s")
    assert "%(fsm_value_0)s" in sql
    assert params == {"fsm_name_0": "app.tenant_id", "fsm_value_0": "1'); DROP TABLE fsm_notes; --"}


# -- use_schemas ---------------------------------------------------------------------------------
SCHEMAS = {"a": "fsm_tenant_a", "b": "fsm_tenant_b"}


@pytest.fixture
def tenant_schemas(sync_engine: sa.Engine) -> Iterator[None]:
    """``fsm_users`` in the default schema and in one schema per tenant."""
    reset_tables(sync_engine)
    for schema in SCHEMAS.values():
        with sync_engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
            User.metadata.create_all(connection.execution_options(schema_translate_map={None: schema}))
    yield
    with sync_engine.begin() as connection:
        for schema in SCHEMAS.values():
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


def schema_app(maker: Maker) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)
    if isinstance(maker, FastAPISessionMaker):

        def tenant(
            session: Annotated[Session, maker.dependency], x_tenant: Annotated[str, Header()]
        ) -> Session:
            use_schemas(session, {None: SCHEMAS[x_tenant]})
            return session

        @app.post("/users")
        def add(session: Annotated[Session, Depends(tenant)], email: str) -> list[str]:
            session.add(User(email=email))  # an ORM flush, in the tenant's schema
            session.flush()
            return list(session.scalars(sa.select(User.email).order_by(User.email)))

        @app.get("/users")
        def users(session: Annotated[Session, maker.dependency]) -> list[str]:
            return list(session.scalars(sa.select(User.email).order_by(User.email)))

    else:

        async def atenant(
            session: Annotated[AsyncSession, maker.dependency], x_tenant: Annotated[str, Header()]
        ) -> AsyncSession:
            use_schemas(session, {None: SCHEMAS[x_tenant]})
            return session

        @app.post("/users")
        async def aadd(session: Annotated[AsyncSession, Depends(atenant)], email: str) -> list[str]:
            session.add(User(email=email))
            await session.flush()
            return list(await session.scalars(sa.select(User.email).order_by(User.email)))

        @app.get("/users")
        async def ausers(session: Annotated[AsyncSession, maker.dependency]) -> list[str]:
            return list(await session.scalars(sa.select(User.email).order_by(User.email)))

    return app


def emails(engine: sa.Engine, schema: str | None) -> list[str]:
    with engine.connect() as connection:
        connection = connection.execution_options(schema_translate_map={None: schema})
        return sorted(connection.scalars(sa.select(User.email)))


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_schema_per_tenant(
    tenant_schemas: None, make_maker: MakerFactory, serve: Serve, sync_engine: sa.Engine
) -> None:
    maker = make_maker(engine_options={"pool_size": 2, "max_overflow": 0})
    client = serve(schema_app(maker))

    def add(i: int) -> tuple[str, list[str]]:
        tenant = "ab"[i % 2]
        response = client.post("/users", params={"email": f"{tenant}{i:02}@x"}, headers={"x-tenant": tenant})
        assert response.status_code == 200, response.text
        return tenant, response.json()

    with concurrent.futures.ThreadPoolExecutor(20) as executor:
        for tenant, listed in executor.map(add, range(20)):
            assert listed
            assert all(email.startswith(tenant) for email in listed)
    assert emails(sync_engine, SCHEMAS["a"]) == [f"a{i:02}@x" for i in range(0, 20, 2)]
    assert emails(sync_engine, SCHEMAS["b"]) == [f"b{i:02}@x" for i in range(1, 20, 2)]
    assert emails(sync_engine, None) == []
    for _ in range(4):  # the pooled connections the tenants used translate nothing any more
        response = client.get("/users")
        assert response.status_code == 200
        assert response.json() == []


def test_a_joined_connection_gets_its_own_schema_map_back(tmp_path: Any) -> None:
    """A session on a connection it was given (a test's) restores the connection's map at the end."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/joined.db")
    try:
        with engine.connect() as connection:
            session = Session(bind=connection, join_transaction_mode="create_savepoint")
            use_schemas(session, {None: "main"})
            session.execute(sa.text("SELECT 1"))
            assert connection.get_execution_options()["schema_translate_map"][None] == "main"
            session.commit()
            assert connection.get_execution_options().get("schema_translate_map") is None
            session.close()
    finally:
        engine.dispose()


def test_an_after_begin_listener_keeps_the_commit_without_a_thread_hop(tmp_path: Any) -> None:
    """The sync maker ends a SQLite read on the event loop when no listener would run at the end:
    ``use_schemas``' ``after_begin`` listener runs when a transaction begins, never when it ends."""
    from fastapi_sessionmaker._unit import _ends_without_io, end_sync

    maker = FastAPISessionMaker(f"sqlite:///{tmp_path}/hop.db")
    session = maker.lifecycle.open(CommitPolicy.AUTO)
    begins: list[object] = []
    try:
        use_schemas(session, {})
        sa.event.listen(session, "after_begin", lambda *args: begins.append(args[1]))
        session.execute(sa.text("SELECT 1"))
        assert len(begins) == 1
        assert _ends_without_io(session)
        end_sync(session, True)
        assert not session.in_transaction()
        assert len(begins) == 1  # the commit began nothing
    finally:
        session.close()
        maker.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_docs_example(rls_url: str, sync_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/side-effects.md's policy and app, as written, as a role that is not a superuser."""
    from fastapi.testclient import TestClient

    page = (Path(__file__).resolve().parent.parent / "docs" / "side-effects.md").read_text()
    section = page.split("## Per-transaction settings", 1)[1].split("\n## ", 1)[0]
    sql = re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)[0].replace(" TO app;", f" TO {ROLE};")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    with sync_engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS notes")
        connection.exec_driver_sql(sql)
        connection.execute(
            sa.text("INSERT INTO notes (tenant_id, text) VALUES (1, 'one'), (2, 'two'), (1, 'uno')")
        )
    monkeypatch.setenv("DATABASE_URI", rls_url)
    namespace: dict[str, Any] = {"__name__": "docs_tenants"}
    try:
        exec(code, namespace)
        with TestClient(namespace["app"]) as client:
            assert client.get("/notes", headers={"x-tenant": "1"}).json() == ["one", "uno"]
            assert client.get("/notes", headers={"x-tenant": "2"}).json() == ["two"]
            assert client.get("/notes", headers={"x-tenant": "3"}).json() == []
            assert client.get("/notes").status_code == 422  # no tenant, no query
    finally:
        namespace.get("db", FastAPISessionMaker("sqlite://")).dispose()
        with sync_engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS notes")
