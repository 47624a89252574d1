"""The PgBouncer preset (``pgbouncer="transaction"``, ``DATABASE_PGBOUNCER``): its options and
errors, and its proof through the real PgBouncer that ``scripts/pgbouncer start`` runs on
127.0.0.1:6432 in transaction mode: under load no error and no wrong row (and without it, the same
load breaks), requests, the health route and the liveness check, and docs/scaling.md's example."""

import asyncio
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from fastapi_sessionmaker import (
    AsyncDBSession,
    AsyncFastAPISessionMaker,
    ConfigurationError,
    DatabaseSettings,
    DBSession,
    FastAPISessionMaker,
    health_router,
)
from fastapi_sessionmaker._liveness import checks_liveness
from fastapi_sessionmaker._pgbouncer import check_pgbouncer
from tests.conftest import IN_CI, Databases, Maker, run_smoke, wait_until
from tests.pgbouncer_load import Outcome, run_async, run_sync

PORT = 6432
CLIENTS, UNITS = 40, 25
# 40 clients on a client pool of 20 + 20, against PgBouncer's default_pool_size = 20.
LOAD_POOL = {"pool_size": 20, "max_overflow": 20}
PAGE = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"


def maker_class(twin: str) -> type[Maker]:
    return FastAPISessionMaker if twin == "sync" else AsyncFastAPISessionMaker


# -- the preset's options and errors (no server needed) ------------------------------------------
URL = "postgresql://app@db.example:6432/shop"


@pytest.mark.parametrize(
    ("twin", "url", "connect_args"),
    [
        ("sync", URL, {"prepare_threshold": None}),
        ("async", URL, {"statement_cache_size": 0, "prepared_statement_cache_size": 0}),
        ("async", "postgresql+psycopg://app@db.example:6432/shop", {"prepare_threshold": None}),
    ],
)
def test_the_preset_turns_prepared_statements_off_for_each_driver(
    twin: str, url: str, connect_args: dict[str, Any]
) -> None:
    maker = maker_class(twin)(url, pgbouncer="transaction", engine_options={"pool_size": 7})
    kwargs = maker._engine_kwargs()
    assert kwargs == {"pool_size": 7, "connect_args": connect_args}  # the normal pool: no NullPool
    assert maker.pgbouncer == "transaction"
    plain = maker_class(twin)(url)._engine_kwargs()
    assert "connect_args" not in plain  # without the preset nothing changes


def test_the_preset_keeps_the_callers_other_connect_args() -> None:
    maker = AsyncFastAPISessionMaker(
        URL,
        pgbouncer="transaction",
        engine_options={"connect_args": {"timeout": 5, "server_settings": {"application_name": "api"}}},
    )
    assert maker._engine_kwargs()["connect_args"] == {
        "timeout": 5,
        "server_settings": {"application_name": "api"},
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
    }


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        (
            "sqlite:///./app.db",
            {},
            "pgbouncer='transaction' is for PostgreSQL, but database_uri is a sqlite URL: "
            "unset pgbouncer (DATABASE_PGBOUNCER) for this database",
        ),
        (
            "mysql://root@127.0.0.1/test",
            {},
            "pgbouncer='transaction' is for PostgreSQL, but database_uri is a mysql URL",
        ),
        (URL, {"pgbouncer": "session"}, "pgbouncer='session' is not a PgBouncer preset: use 'transaction'"),
        (
            URL,
            {"engine_options": {"connect_args": {"prepare_threshold": 5}}},
            "engine_options connect_args prepare_threshold=5 brings prepared statements back, which "
            "break behind PgBouncer in transaction mode: remove it",
        ),
        (
            URL + "?options=-c%20jit%3Doff",
            {},
            "database_uri sets options, which PgBouncer rejects as a startup parameter "
            "(pgbouncer='transaction'): set it on the server with ALTER ROLE <user> SET <name> = ...",
        ),
    ],
)
def test_what_the_preset_cannot_take_is_a_one_line_error(
    url: str, kwargs: dict[str, Any], message: str
) -> None:
    kwargs.setdefault("pgbouncer", "transaction")
    with pytest.raises(ConfigurationError, match="^" + re.escape(message)):
        FastAPISessionMaker(url, **kwargs)


def test_a_driver_the_preset_does_not_know_is_an_error() -> None:
    message = (
        "pgbouncer='transaction' supports the psycopg and asyncpg drivers, but DATABASE_URI uses "
        "postgresql+pg8000: use postgresql+psycopg or postgresql+asyncpg"
    )
    url = sa.make_url("postgresql+pg8000://app@db.example/shop")
    with pytest.raises(ConfigurationError, match="^" + re.escape(message)):
        check_pgbouncer("transaction", url, variable="DATABASE_URI")


def test_startup_parameters_pgbouncer_rejects_are_an_error_naming_alter_role() -> None:
    options = {"connect_args": {"server_settings": {"jit": "off", "application_name": "api"}}}
    message = (
        "server_settings sets jit, which PgBouncer rejects as a startup parameter "
        "(pgbouncer='transaction'): set it on the server with ALTER ROLE <user> SET jit = ... "
        "(or ALTER DATABASE), or per transaction with set_local()"
    )
    with pytest.raises(ConfigurationError, match="^" + re.escape(message) + "$"):
        AsyncFastAPISessionMaker(URL, pgbouncer="transaction", engine_options=options)
    with pytest.raises(ConfigurationError, match=re.escape("statement_cache_size=100 brings prepared")):
        AsyncFastAPISessionMaker(
            URL, pgbouncer="transaction", engine_options={"connect_args": {"statement_cache_size": 100}}
        )


def test_database_pgbouncer_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URI", URL)
    monkeypatch.setenv("DATABASE_PGBOUNCER", "transaction")
    assert FastAPISessionMaker().pgbouncer == "transaction"
    assert AsyncFastAPISessionMaker()._engine_kwargs()["connect_args"]["statement_cache_size"] == 0
    monkeypatch.setenv("DATABASE_PGBOUNCER", "yes")
    with pytest.raises(
        ConfigurationError, match=re.escape("DATABASE_PGBOUNCER: Input should be 'transaction'")
    ):
        DatabaseSettings()
    monkeypatch.setenv("DATABASE_URI", "sqlite:///./app.db")
    monkeypatch.setenv("DATABASE_PGBOUNCER", "transaction")
    with pytest.raises(ConfigurationError, match=re.escape("but DATABASE_URI is a sqlite URL")):
        FastAPISessionMaker()
    monkeypatch.delenv("DATABASE_PGBOUNCER")
    assert FastAPISessionMaker().pgbouncer is None


# -- through the real PgBouncer -----------------------------------------------------------------
def pgbouncer_answers() -> str | None:
    """``None`` when PgBouncer on 127.0.0.1:6432 runs a query, else why not."""
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres connect_timeout=3"
        ) as c:
            c.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


@pytest.fixture(scope="session")
def bouncer_url(databases: Databases) -> str:
    """The test database through PgBouncer (driverless: each twin picks its driver)."""
    direct = databases.url("postgresql")
    reason = pgbouncer_answers()
    if reason is not None:
        message = f"PgBouncer on 127.0.0.1:{PORT} unreachable ({reason}): run scripts/pgbouncer start"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing server is a failure)")
        pytest.skip(message)
    return direct.replace("127.0.0.1:5432", f"127.0.0.1:{PORT}")


def admin(command: str) -> list[tuple[Any, ...]]:
    """Run ``command`` on PgBouncer's admin console (simple query protocol)."""
    with psycopg.connect(f"host=127.0.0.1 port={PORT} user=postgres dbname=pgbouncer", autocommit=True) as c:
        result = c.pgconn.exec_(command.encode())
        assert result.status in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK), (
            result.error_message
        )
        return [
            tuple(result.get_value(row, col) for col in range(result.nfields))
            for row in range(result.ntuples)
        ]


def load(twin: str, url: str, preset: str | None) -> Outcome:
    if twin == "sync":
        sync = FastAPISessionMaker(url, pgbouncer=preset, engine_options=LOAD_POOL)
        try:
            return run_sync(sync, CLIENTS, UNITS)
        finally:
            sync.dispose()

    async def main() -> Outcome:
        maker = AsyncFastAPISessionMaker(url, pgbouncer=preset, engine_options=LOAD_POOL)
        try:
            return await run_async(maker, CLIENTS, UNITS)
        finally:
            await maker.dispose()

    return asyncio.run(main())


def test_under_load_the_preset_gives_no_error_and_no_wrong_row(twin: str, bouncer_url: str) -> None:
    outcome = load(twin, bouncer_url, "transaction")
    assert (outcome.units, outcome.wrong, outcome.errors) == (CLIENTS * UNITS, 0, []), outcome.summary()


def test_without_the_preset_the_same_load_breaks(twin: str, bouncer_url: str) -> None:
    # The control: the same load, the drivers' defaults. asyncpg fails ("prepared statement
    # __asyncpg_stmt_N__ does not exist"); psycopg runs other clients' statements and returns
    # their rows, with no error for those.
    outcome = load(twin, bouncer_url, None)
    assert outcome.units < CLIENTS * UNITS, outcome.summary()
    assert any("prepared statement" in error for error in outcome.errors), outcome.summary()
    if twin == "sync":
        assert outcome.wrong > 0, outcome.summary()


@pytest.fixture
def orders(bouncer_url: str, databases: Databases) -> Iterator[sa.Table]:
    """A table ``pgb_orders`` on the test database, made and dropped directly (not via PgBouncer)."""
    metadata = sa.MetaData()
    table = sa.Table(
        "pgb_orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client", sa.String(8), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
    )
    engine = FastAPISessionMaker(databases.url("postgresql")).get_new_engine()
    metadata.drop_all(engine)
    metadata.create_all(engine)
    yield table
    metadata.drop_all(engine)
    engine.dispose()


def orders_app(maker: Maker, orders: sa.Table) -> FastAPI:
    """POST /orders stores a row and reads it back with statements that name the client."""
    app = FastAPI()
    maker.init_app(app)
    app.include_router(health_router(timeout=5))

    def statements(client: str, n: int) -> tuple[Any, sa.TextClause]:
        insert = orders.insert().values(client=client, n=n).returning(orders.c.id)
        check = sa.text(f"SELECT '{client}' AS who, n FROM pgb_orders WHERE id = :id")
        return insert, check

    if isinstance(maker, FastAPISessionMaker):

        @app.post("/orders", status_code=201)
        def create_sync(client: str, n: int, session: DBSession) -> dict[str, Any]:
            insert, check = statements(client, n)
            order_id = session.execute(insert).scalar_one()
            return dict(session.execute(check, {"id": order_id}).one()._mapping)

    else:

        @app.post("/orders", status_code=201)
        async def create_async(client: str, n: int, session: AsyncDBSession) -> dict[str, Any]:
            insert, check = statements(client, n)
            order_id = (await session.execute(insert)).scalar_one()
            return dict((await session.execute(check, {"id": order_id})).one()._mapping)

    return app


def test_requests_and_the_health_route_through_pgbouncer(
    twin: str,
    bouncer_url: str,
    orders: sa.Table,
    databases: Databases,
    serve: Callable[..., httpx.Client],
) -> None:
    maker = maker_class(twin)(bouncer_url, pgbouncer="transaction", engine_options={"pool_size": 5})
    client = serve(orders_app(maker, orders))
    base_url = str(client.base_url)

    def one_client(number: int) -> list[str]:
        problems, me = [], f"r{number:02d}"
        with httpx.Client(base_url=base_url, timeout=30) as http:
            for n in range(8):
                response = http.post("/orders", params={"client": me, "n": n})
                if (response.status_code, response.json()) != (201, {"who": me, "n": n}):
                    problems.append(f"{response.status_code} {response.text}")
        return problems

    with ThreadPoolExecutor(16) as pool:
        problems = [problem for found in pool.map(one_client, range(16)) for problem in found]
    assert problems == []
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["databases"]["default"]["status"] == "ok"
    direct = FastAPISessionMaker(databases.url("postgresql")).get_new_engine()
    try:
        with direct.connect() as connection:
            stored = connection.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one()
    finally:
        direct.dispose()
    assert stored == 16 * 8


def pooled_use(maker: Maker, loop: asyncio.AbstractEventLoop) -> None:
    """One unit of work on ``maker``'s pool (an async maker's on ``loop``, its pool's loop)."""
    if isinstance(maker, FastAPISessionMaker):
        with maker.context_session() as session:
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        return

    async def main() -> None:
        async with maker.context_session() as session:
            assert (await session.execute(sa.text("SELECT 1"))).scalar_one() == 1

    loop.run_until_complete(main())


def test_the_liveness_check_replaces_connections_pgbouncer_dropped(twin: str, bouncer_url: str) -> None:
    checked = maker_class(twin)(bouncer_url, pgbouncer="transaction")
    unchecked = maker_class(twin)(
        bouncer_url, pgbouncer="transaction", engine_options={"pool_pre_ping": False}
    )
    engine = checked.cached_engine
    assert checks_liveness(engine if isinstance(engine, sa.Engine) else engine.sync_engine)
    loop = asyncio.new_event_loop()
    try:
        for maker in (checked, unchecked):
            pooled_use(maker, loop)  # one idle connection to PgBouncer in each pool
        database = bouncer_url.rsplit("/", 1)[1]
        admin(f"KILL {database}")  # drops every client (and server) connection of this database
        admin(f"RESUME {database}")
        wait_until(lambda: all(row[3] != database for row in admin("SHOW CLIENTS")), "PgBouncer's KILL")
        pooled_use(checked, loop)  # the dropped connection is replaced on checkout: no error
        # The control: without the check, the first use after the drop fails.
        with pytest.raises(sa.exc.DBAPIError):
            pooled_use(unchecked, loop)
    finally:
        for maker in (checked, unchecked):
            if isinstance(maker, FastAPISessionMaker):
                maker.dispose()
            else:
                loop.run_until_complete(maker.dispose())
        loop.close()


def test_startup_parameters_through_pgbouncer_those_it_takes_and_those_it_rejects(bouncer_url: str) -> None:
    async def show(server_settings: dict[str, str], preset: str | None) -> str:
        options = {"connect_args": {"server_settings": server_settings}}
        maker = AsyncFastAPISessionMaker(bouncer_url, pgbouncer=preset, engine_options=options)
        try:
            async with maker.context_session() as session:
                return str((await session.execute(sa.text("SHOW application_name"))).scalar_one())
        finally:
            await maker.dispose()

    assert asyncio.run(show({"application_name": "fsm-api", "TimeZone": "UTC"}, "transaction")) == "fsm-api"
    # What the preset refuses at start-up, PgBouncer refuses at every connect (SQLAlchemy 2.0 lets
    # asyncpg's connect error through unwrapped, 2.1 wraps it):
    refused = (sa.exc.DBAPIError, asyncpg.PostgresError)
    with pytest.raises(refused, match="unsupported startup parameter: jit"):
        asyncio.run(show({"jit": "off"}, None))


# -- docs/scaling.md, "PgBouncer in transaction mode" ------------------------------------------
def pgbouncer_blocks() -> list[str]:
    text = PAGE.read_text()
    return re.findall(r"<!-- test: tests/test_pgbouncer.py -->\n```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_scaling_page_example_serves_requests_through_pgbouncer(
    bouncer_url: str,
    orders: sa.Table,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., httpx.Client],
) -> None:
    blocks = pgbouncer_blocks()
    assert len(blocks) == 1
    monkeypatch.setenv("DATABASE_URI", bouncer_url)  # what the page sets in the environment
    monkeypatch.setenv("DATABASE_PGBOUNCER", "transaction")
    namespace: dict[str, Any] = {"__name__": "docs_scaling"}
    exec(blocks[0], namespace)
    db = namespace["db"]
    assert db.pgbouncer == "transaction"
    assert db._engine_kwargs()["connect_args"] == {"prepare_threshold": None}
    client = serve(namespace["app"])
    for n in range(3):
        response = client.post("/orders", params={"n": n})
        assert response.status_code == 201, response.text
    assert client.get("/orders/count").json() == {"count": 3}
    assert client.get("/healthz").json()["status"] == "ok"
    assert isinstance(db.cached_engine.pool, sa.QueuePool)  # the normal pool, not NullPool


def test_the_benchmark_smoke_mode_passes_its_correctness_check(bouncer_url: str) -> None:
    output = run_smoke("pgbouncer.py")
    assert "correctness check: PASSED" in output, output
    rows = [line for line in output.splitlines() if line.startswith(("| sync |", "| async |"))]
    assert [row.split("|")[2].strip() for row in rows] == ["psycopg", "asyncpg"], output
    for row in rows:
        assert float(row.split("|")[5]) > 0, row
