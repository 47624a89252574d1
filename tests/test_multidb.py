"""Several databases in one app: settings per name, one alias per database, the commit order, a
commit that stops half-way, and two-phase commit on real servers (PostgreSQL prepared
transactions, MariaDB XA), both twins. The second database of a pair is ``fsm_<pid>_reports``
beside the per-process one (a second file for SQLite)."""

import asyncio
import gc
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    ConfigurationError,
    DatabaseSettings,
    FastAPISessionMaker,
    health_router,
)
from tests.conftest import SERVERS, Databases, Maker, checked_out, drop_database, pool_of, wait_until

SECRET = "s3cr3t-multi-pw"
REPORTS = f"fsm_{os.getpid()}_reports"


class SecondDatabases:
    """The second database of each backend, created on first use and dropped at the end."""

    def __init__(self, tmp_dir: str) -> None:
        self.tmp_dir = tmp_dir
        self.urls: dict[str, str] = {}

    def url(self, backend: str, databases: Databases) -> str:
        if backend not in self.urls:
            first = sa.make_url(databases.url(backend))  # skips (or fails in CI) when unreachable
            if backend == "sqlite":
                self.urls[backend] = f"sqlite:///{self.tmp_dir}/{REPORTS}.db"
            else:
                admin = sa.create_engine(
                    SERVERS[backend], isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
                )
                with admin.connect() as connection:
                    connection.execute(sa.text(f"DROP DATABASE IF EXISTS {REPORTS}"))
                    connection.execute(sa.text(f"CREATE DATABASE {REPORTS}"))
                admin.dispose()
                self.urls[backend] = first.set(database=REPORTS).render_as_string(hide_password=False)
        return self.urls[backend]

    def drop_all(self) -> None:
        for backend in self.urls:
            if backend != "sqlite":
                drop_database(backend, REPORTS)


@pytest.fixture(scope="session")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondDatabases]:
    made = SecondDatabases(str(tmp_path_factory.mktemp("reports")))
    yield made
    made.drop_all()


def plain_engine(maker: Maker, **kwargs: Any) -> sa.Engine:
    """A sync engine with the sync twin's driver on ``maker``'s database, pooling nothing."""
    return sa.create_engine(sync_url(maker), poolclass=sa.NullPool, **kwargs)


def sync_url(maker: Maker) -> sa.URL:
    """``maker``'s URL with the sync twin's driver."""
    return FastAPISessionMaker(maker.url.set(drivername=maker.url.get_backend_name())).url


def maker_class(twin: str) -> type[Maker]:
    return FastAPISessionMaker if twin == "sync" else AsyncFastAPISessionMaker


def sync_engine_of(maker: Maker) -> sa.Engine:
    engine = maker.cached_engine
    return engine if isinstance(engine, sa.Engine) else engine.sync_engine


def dispose(maker: Maker) -> None:
    if isinstance(maker, FastAPISessionMaker):
        maker.dispose()
    else:
        asyncio.run(maker.dispose())


@pytest.fixture
def pair(
    request: pytest.FixtureRequest, twin: str, databases: Databases, reports: SecondDatabases
) -> Iterator[Callable[..., tuple[Maker, Maker]]]:
    """``pair(**options)``: makers ``main`` (on the first backend) and ``reports`` (the second)."""
    first, second = request.param
    made: list[Maker] = []

    def make(**options: Any) -> tuple[Maker, Maker]:
        cls = maker_class(twin)
        main = cls(databases.url(first), name="main", **options.get("main", {}))
        other = cls(reports.url(second, databases), name="reports", **options.get("reports", {}))
        made.extend((main, other))
        for maker in (main, other):
            engine = plain_engine(maker)
            with engine.begin() as c:
                c.execute(sa.text("DROP TABLE IF EXISTS fsm_md_serial"))
                c.execute(sa.text("DROP TABLE IF EXISTS fsm_md_child"))
                c.execute(sa.text("DROP TABLE IF EXISTS fsm_md_item"))
                c.execute(sa.text("CREATE TABLE fsm_md_item (id INTEGER PRIMARY KEY, note VARCHAR(40))"))
                if maker.url.get_backend_name() == "postgresql":
                    # Checked at COMMIT (and at PREPARE TRANSACTION), not at the INSERT.
                    c.execute(
                        sa.text(
                            "CREATE TABLE fsm_md_child (id INTEGER PRIMARY KEY, item INTEGER "
                            "REFERENCES fsm_md_item (id) DEFERRABLE INITIALLY DEFERRED)"
                        )
                    )
                    # A serialization failure (40001, retryable) raised at COMMIT.
                    c.execute(sa.text("CREATE TABLE fsm_md_serial (id INTEGER)"))
                    c.execute(
                        sa.text(
                            "CREATE OR REPLACE FUNCTION fsm_md_conflict() RETURNS trigger AS $$ BEGIN "
                            "RAISE EXCEPTION 'conflict at commit' USING ERRCODE = '40001'; END $$ "
                            "LANGUAGE plpgsql"
                        )
                    )
                    c.execute(
                        sa.text(
                            "CREATE CONSTRAINT TRIGGER fsm_md_conflict AFTER INSERT ON fsm_md_serial "
                            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fsm_md_conflict()"
                        )
                    )
            engine.dispose()
        return main, other

    yield make
    leaks = []
    for maker in made:
        if maker._engine is not None and checked_out(pool_of(maker)):
            leaks.append(f"{maker!r} left connections checked out")
        dispose(maker)
    assert not leaks, leaks


def ids(maker: Maker) -> list[int]:
    """The ids stored in ``maker``'s database, read with a plain sync engine."""
    engine = plain_engine(maker)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text("SELECT id FROM fsm_md_item ORDER BY id")).scalars())
    finally:
        engine.dispose()


def prepared_on(maker: Maker) -> list[str]:
    """Every prepared transaction on ``maker``'s server (``pg_prepared_xacts`` / ``XA RECOVER``)."""
    engine = plain_engine(maker)
    try:
        with engine.connect() as connection:
            if maker.url.get_backend_name() == "postgresql":
                return list(connection.execute(sa.text("SELECT gid FROM pg_prepared_xacts")).scalars())
            rows = connection.execute(sa.text("XA RECOVER"))
            return [row.data.decode() if isinstance(row.data, bytes) else str(row.data) for row in rows]
    finally:
        engine.dispose()


def write_app(main: Maker, other: Maker, twin: str, *, child: bool = False) -> FastAPI:
    """An app writing item 1 to ``main`` and item 2 to ``reports`` (with ``child``: also a row
    violating ``reports``' deferred foreign key, which fails at its commit or prepare)."""
    app = FastAPI()
    main.init_app(app)
    other.init_app(app)
    insert = sa.text("INSERT INTO fsm_md_item (id, note) VALUES (:id, 'x')")
    orphan = sa.text("INSERT INTO fsm_md_child (id, item) VALUES (1, -1)")

    if twin == "sync":
        Main = Annotated[Session, main.dependency]  # the aliases users write, one per database
        Reports = Annotated[Session, other.dependency]

        @app.post("/write")
        def write_sync(rep: Reports, db: Main) -> dict[str, bool]:  # reports named first
            db.execute(insert, {"id": 1})
            rep.execute(insert, {"id": 2})
            if child:
                rep.execute(orphan)
            return {"distinct": db is not rep}

    else:
        AsyncMain = Annotated[AsyncSession, main.dependency]
        AsyncReports = Annotated[AsyncSession, other.dependency]

        @app.post("/write")
        async def write_async(rep: AsyncReports, db: AsyncMain) -> dict[str, bool]:
            await db.execute(insert, {"id": 1})
            await rep.execute(insert, {"id": 2})
            if child:
                await rep.execute(orphan)
            return {"distinct": db is not rep}

    return app


ALL_PAIRS = [
    pytest.param(("postgresql", "postgresql"), id="pg+pg"),
    pytest.param(("postgresql", "mariadb"), id="pg+mariadb"),
    pytest.param(("mariadb", "postgresql"), id="mariadb+pg"),
    pytest.param(("sqlite", "postgresql"), id="sqlite+pg"),
    pytest.param(("sqlite", "sqlite"), id="sqlite+sqlite"),
]
SECOND_PG = [p for p in ALL_PAIRS if p.values[0][1] == "postgresql"]  # type: ignore[index]
TWO_PHASE = [p for p in ALL_PAIRS if "sqlite" not in p.values[0]]  # type: ignore[operator]


# -- settings per name ----------------------------------------------------------------------------
@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in list(os.environ):
        if variable.startswith("DATABASE_"):
            monkeypatch.delenv(variable)
    return monkeypatch


def test_each_name_reads_its_own_variables(env: pytest.MonkeyPatch, twin: str, tmp_path: Path) -> None:
    env.setenv("DATABASE_URI", f"sqlite:///{tmp_path}/main.db")
    env.setenv("DATABASE_REPORTS_SCHEME", "postgresql")
    env.setenv("DATABASE_REPORTS_USER", "app")
    env.setenv("DATABASE_REPORTS_PASSWORD", SECRET)
    env.setenv("DATABASE_REPORTS_HOST", "reports.example")
    env.setenv("DATABASE_REPORTS_PORT", "6432")
    env.setenv("DATABASE_REPORTS_NAME", "reports")
    env.setenv("DATABASE_REPORTS_POOL_SIZE", "3")
    env.setenv("DATABASE_REPORTS_MAX_OVERFLOW", "1")
    env.setenv("DATABASE_AUDIT_LOG_URI", f"sqlite:///{tmp_path}/audit.db")
    cls = maker_class(twin)
    main, other, audit = cls(), cls(name="reports"), cls(name="audit-log")
    assert main.url.database == f"{tmp_path}/main.db"
    assert other.url.render_as_string(hide_password=True).split("://")[1] == (
        "app:***@reports.example:6432/reports"
    )
    assert other.url.password == SECRET
    assert other.engine_options == {"pool_size": 3, "max_overflow": 1}
    assert main.engine_options == {}  # DATABASE_REPORTS_* is not DATABASE_*
    assert audit.url.database == f"{tmp_path}/audit.db"
    assert SECRET not in repr(other)
    assert SECRET not in repr(DatabaseSettings.named("reports"))
    dispose(main)
    dispose(audit)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        pytest.param({}, "DATABASE_REPORTS_URI is not set: set DATABASE_REPORTS_URI (e.g.", id="missing"),
        pytest.param(
            {"SCHEME": "postgresql", "PORT": "not-a-port"},
            "invalid database settings: DATABASE_REPORTS_PORT: ",
            id="port",
        ),
        pytest.param(
            {"URI": "sqlite://", "POOL_SIZE": "many"},
            "invalid database settings: DATABASE_REPORTS_POOL_SIZE: ",
            id="pool-size",
        ),
        pytest.param({"URI": "nonsense"}, "DATABASE_REPORTS_URI is not a valid database URL", id="uri"),
        pytest.param({"SCHEME": "oracle"}, "DATABASE_REPORTS_SCHEME names an unknown database", id="dialect"),
        pytest.param(
            {"URI": f"postgresql+nodriver://u:{SECRET}@h/d"},
            "DATABASE_REPORTS_URI names a driver SQLAlchemy does not know",
            id="driver",
        ),
    ],
)
def test_errors_name_the_variable_of_the_database(
    env: pytest.MonkeyPatch, twin: str, variables: dict[str, str], message: str
) -> None:
    env.setenv("DATABASE_URI", "sqlite://")  # the default database is fine: not the one named
    env.setenv("DATABASE_REPORTS_PASSWORD", SECRET)
    for key, value in variables.items():
        env.setenv(f"DATABASE_REPORTS_{key}", value)
    with pytest.raises(ConfigurationError, match=re.escape(message)) as caught:
        maker_class(twin)(name="reports")
    text = str(caught.value)
    assert "\n" not in text
    assert SECRET not in text
    assert "DATABASE_URI" not in text.replace("DATABASE_REPORTS_URI", "")


def test_a_name_that_cannot_be_a_variable_is_refused(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("database name '--' cannot name environment")):
        FastAPISessionMaker(name="--")


def test_two_phase_on_sqlite_is_a_configuration_error(env: pytest.MonkeyPatch, twin: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("SQLite has no two-phase commit")):
        maker_class(twin)("sqlite://", two_phase=True)
    env.setenv("DATABASE_AUDIT_URI", "sqlite://")
    env.setenv("DATABASE_AUDIT_TWO_PHASE", "true")
    with pytest.raises(ConfigurationError, match=re.escape("two_phase=True for database 'audit'")):
        maker_class(twin)(name="audit")


# -- one alias per database, commit order -----------------------------------------------------------
@pytest.mark.parametrize("pair", ALL_PAIRS, indirect=True)
def test_each_alias_gets_its_own_session_and_both_commit_in_install_order(
    pair: Callable[..., tuple[Maker, Maker]], twin: str
) -> None:
    main, other = pair()
    order: list[str] = []
    for maker in (main, other):
        sa.event.listen(sync_engine_of(maker), "commit", lambda c, name=maker.name: order.append(name))
    with TestClient(write_app(main, other, twin)) as client:
        response = client.post("/write")
    assert response.status_code == 200, response.text
    assert response.json() == {"distinct": True}
    assert ids(main) == [1]
    assert ids(other) == [2]
    assert order == ["main", "reports"]  # installed first, committed first (the endpoint named reports first)


@pytest.mark.parametrize("pair", [ALL_PAIRS[0], ALL_PAIRS[2]], indirect=True)
def test_settings_per_name_serve_an_app_of_two_databases(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, env: pytest.MonkeyPatch
) -> None:
    """The makers users write: ``cls()`` and ``cls(name="reports")`` from the environment."""
    main, other = pair()  # tables ready; their URLs go into the environment
    env.setenv("DATABASE_URI", main.url.set(drivername=main.url.get_backend_name()).render_as_string(False))
    env.setenv(
        "DATABASE_REPORTS_URI", other.url.set(drivername=other.url.get_backend_name()).render_as_string(False)
    )
    env.setenv("DATABASE_REPORTS_POOL_SIZE", "2")
    cls = maker_class(twin)
    main_env, reports_env = cls(), cls(name="reports")
    assert reports_env.engine_options["pool_size"] == 2
    try:
        with TestClient(write_app(main_env, reports_env, twin)) as client:
            assert client.post("/write").status_code == 200
        assert ids(main) == [1]
        assert ids(other) == [2]
    finally:
        dispose(main_env)
        dispose(reports_env)


def test_health_covers_every_database_installed_one_down(
    env: pytest.MonkeyPatch, twin: str, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    env.setenv("DATABASE_URI", f"sqlite:///{tmp_path}/up.db")
    env.setenv("DATABASE_REPORTS_URI", f"postgresql://postgres:{SECRET}@127.0.0.1:{dead}/down")
    cls = maker_class(twin)
    up, down = cls(), cls(name="reports")
    app = FastAPI()
    up.init_app(app)
    down.init_app(app, check_on_startup=False)
    app.include_router(health_router(timeout=2))
    try:
        with TestClient(app) as client:
            response = client.get("/healthz")
        assert response.status_code == 503
        body = response.json()
        assert list(body["databases"]) == ["default", "reports"]
        assert body["databases"]["default"]["status"] == "ok"
        assert body["databases"]["reports"]["status"] == "unavailable"
        assert SECRET not in response.text
    finally:
        dispose(up)
        dispose(down)


# -- the second commit fails after the first -------------------------------------------------------
@pytest.mark.parametrize("pair", SECOND_PG, indirect=True)
def test_a_failed_second_commit_is_a_500_and_one_line_naming_what_was_stored(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, caplog: pytest.LogCaptureFixture
) -> None:
    main, other = pair()
    app = write_app(main, other, twin, child=True)
    caplog.set_level(logging.INFO, logger="fastapi_sessionmaker")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/write")
    assert response.status_code == 500  # not the 409 of one database: a retry would store main twice
    assert response.headers["content-type"] == "application/problem+json"
    assert "not in all" in response.json()["detail"]
    assert ids(main) == [1]  # committed first
    assert ids(other) == []  # its commit failed (deferred foreign key)
    lines = [r for r in caplog.records if r.name == "fastapi_sessionmaker" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    text = lines[0].getMessage()
    assert text.startswith("partial commit of POST /write: IntegrityError on database 'reports'")
    assert text.endswith("committed: 'main'; not committed: 'reports'")
    assert lines[0].__dict__["committed"] == ["main"]
    assert lines[0].__dict__["not_committed"] == ["reports"]
    assert "postgres" not in text
    assert "127.0.0.1" not in text


@pytest.mark.parametrize("pair", [SECOND_PG[0]], indirect=True)
def test_a_partial_commit_is_never_retried(pair: Callable[..., tuple[Maker, Maker]], twin: str) -> None:
    """A serialization failure at the second commit is retryable, but the first database has
    committed: re-running the request would store its write twice."""
    main, other = pair()
    app = FastAPI()
    main.init_app(app)
    other.init_app(app)
    calls: list[int] = []
    insert = sa.text("INSERT INTO fsm_md_item (id, note) VALUES (:id, 'x')")
    conflict = sa.text("INSERT INTO fsm_md_serial (id) VALUES (1)")  # 40001 at COMMIT

    if twin == "sync":
        Main = Annotated[Session, main.depends(retries=3)]
        Reports = Annotated[Session, other.depends(retries=3)]

        @app.post("/serial")
        def serial_sync(db: Main, rep: Reports) -> None:
            calls.append(1)
            db.execute(insert, {"id": len(calls)})
            rep.execute(conflict)

    else:
        AsyncMain = Annotated[AsyncSession, main.depends(retries=3)]
        AsyncReports = Annotated[AsyncSession, other.depends(retries=3)]

        @app.post("/serial")
        async def serial_async(db: AsyncMain, rep: AsyncReports) -> None:
            calls.append(1)
            await db.execute(insert, {"id": len(calls)})
            await rep.execute(conflict)

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/serial").status_code == 500
    assert calls == [1]
    assert ids(main) == [1]


# -- two-phase commit ------------------------------------------------------------------------------
def kill_before(maker: Maker, event: str, xids: list[str]) -> None:
    """Terminate ``maker``'s connection right before its ``event`` (prepare or commit of the
    two-phase transaction), and wait until the server has really ended it."""
    engine = sync_engine_of(maker)
    pg = maker.url.get_backend_name() == "postgresql"

    def kill(connection: sa.Connection, xid: Any, *args: Any) -> None:
        xids.append(xid.decode() if isinstance(xid, bytes) else str(xid))
        query = "SELECT pg_backend_pid()" if pg else "SELECT CONNECTION_ID()"
        own = int(connection.exec_driver_sql(query).scalar_one())
        admin = plain_engine(maker, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f"SELECT pg_terminate_backend({own})" if pg else f"KILL {own}"))

            def gone() -> bool:
                query = (
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = :p"
                    if pg
                    else "SELECT count(*) FROM information_schema.processlist WHERE id = :p"
                )
                return c.execute(sa.text(query), {"p": own}).scalar() == 0

            wait_until(gone, "the killed connection to end")
        admin.dispose()

    sa.event.listen(engine, event, kill, once=True)


def record(maker: Maker, event: str, xids: list[str]) -> None:
    def seen(connection: sa.Connection, xid: Any, *args: Any) -> None:
        xids.append(xid.decode() if isinstance(xid, bytes) else str(xid))

    sa.event.listen(sync_engine_of(maker), event, seen)


@pytest.mark.parametrize("two_phase", [True, False], ids=["two-phase", "one-phase"])
@pytest.mark.parametrize("pair", [p for p in SECOND_PG if p in TWO_PHASE], indirect=True)
def test_a_failed_prepare_stores_nothing(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, two_phase: bool
) -> None:
    """The second database's deferred foreign key fails its PREPARE TRANSACTION: the first's
    prepared transaction is rolled back; without two-phase commit the first keeps its write."""
    main, other = pair(main={"two_phase": two_phase}, reports={"two_phase": two_phase})
    prepared: list[str] = []
    record(main, "prepare_twophase", prepared)
    with TestClient(write_app(main, other, twin, child=True), raise_server_exceptions=False) as client:
        response = client.post("/write")
    if two_phase:
        assert response.status_code == 409  # the error of the one database that failed: nothing stored
        assert len(prepared) == 1  # main was really prepared, then rolled back
        assert ids(main) == []
    else:
        assert response.status_code == 500
        assert ids(main) == [1]
    assert ids(other) == []
    assert not set(prepared) & set(prepared_on(main) + prepared_on(other))


def refuse_prepare(maker: Maker, refused: list[str]) -> None:
    """Make the server refuse ``maker``'s next PREPARE TRANSACTION: right before it, the transaction
    touches a temporary table, which PostgreSQL cannot prepare (0A000). Any error the server
    raises at PREPARE goes this way: after psycopg has marked the transaction prepared."""

    def touch(connection: sa.Connection, xid: Any, *args: Any) -> None:
        refused.append(xid.decode() if isinstance(xid, bytes) else str(xid))
        connection.exec_driver_sql("CREATE TEMPORARY TABLE fsm_md_unpreparable (x int) ON COMMIT DROP")

    sa.event.listen(sync_engine_of(maker), "prepare_twophase", touch, once=True)


@pytest.mark.parametrize("pair", [p for p in SECOND_PG if p in TWO_PHASE], indirect=True)
def test_a_prepare_the_server_refuses_stores_nothing_and_discards_its_connection(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, caplog: pytest.LogCaptureFixture
) -> None:
    main, other = pair(main={"two_phase": True}, reports={"two_phase": True})
    prepared: list[str] = []
    refused: list[str] = []
    record(main, "prepare_twophase", prepared)
    refuse_prepare(other, refused)
    caplog.set_level(logging.INFO)
    with TestClient(write_app(main, other, twin), raise_server_exceptions=False) as client:
        response = client.post("/write")
        assert response.status_code == 500, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert len(prepared) == 1  # main was prepared, then rolled back
        assert len(refused) == 1
        assert ids(main) == []
        assert ids(other) == []
        assert not set(prepared + refused) & set(prepared_on(main) + prepared_on(other))
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors  # the mapped error, and no failed rollback or pool reset
        # the server's refusal (NotSupportedError; asyncpg's comes as DBAPIError), not a failed rollback
        assert errors[0].split(":")[1].strip().split()[0] in {"NotSupportedError", "DBAPIError"}, errors
        # The pool recovers: the next request stores both.
        assert client.post("/write").status_code == 200
    assert ids(main) == [1]
    assert ids(other) == [2]


@pytest.mark.parametrize("pair", TWO_PHASE, indirect=True)
@pytest.mark.usefixtures("killed_connections_collected")
def test_a_connection_lost_before_prepare_stores_nothing(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, caplog: pytest.LogCaptureFixture
) -> None:
    main, other = pair(main={"two_phase": True}, reports={"two_phase": True})
    prepared: list[str] = []
    killed: list[str] = []
    record(main, "prepare_twophase", prepared)
    kill_before(other, "prepare_twophase", killed)
    with TestClient(write_app(main, other, twin), raise_server_exceptions=False) as client:
        response = client.post("/write")
    assert response.status_code == 503, response.text  # connection lost: nothing stored, retry later
    assert len(prepared) == 1
    assert len(killed) == 1
    assert ids(main) == []
    assert ids(other) == []
    assert not set(prepared + killed) & set(prepared_on(main) + prepared_on(other))
    assert not [r for r in caplog.records if "partial commit" in r.getMessage()]
    # The pool recovers: the next request stores both.
    with TestClient(write_app(main, other, twin), raise_server_exceptions=False) as client:
        assert client.post("/write").status_code == 200
    assert ids(main) == [1]
    assert ids(other) == [2]


@pytest.fixture
def killed_connections_collected() -> Iterator[None]:
    """After the test, collect the connection the server killed under it. When the kill lands
    during COMMIT PREPARED, SQLAlchemy's pool fails to close the asyncpg connection and logs
    "Exception closing connection" with its traceback, which leaves the transport to the garbage
    collector; pytest keeps that record (and through its traceback the connection) until after the
    test, so the next test would meet the ResourceWarning. Here the pool's record keeps its text
    and loses its arguments and traceback, and the connection is collected at the end of this test."""

    def no_traceback(record: logging.LogRecord) -> bool:
        record.msg, record.args, record.exc_info = record.getMessage(), (), None  # the text only
        return True

    pool_log = logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool")
    pool_log.addFilter(no_traceback)
    try:
        yield
    finally:
        pool_log.removeFilter(no_traceback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.parametrize("pair", [ALL_PAIRS[0], ALL_PAIRS[2]], indirect=True)
@pytest.mark.usefixtures("killed_connections_collected")
def test_a_commit_lost_after_every_prepare_is_in_doubt_and_resolvable(
    pair: Callable[..., tuple[Maker, Maker]], twin: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything prepared, then the second's COMMIT PREPARED loses its connection: its
    transaction stays prepared on PostgreSQL; the log line names its xid; resolving it stores it."""
    main, other = pair(main={"two_phase": True}, reports={"two_phase": True})
    xids: list[str] = []
    kill_before(other, "commit_twophase", xids)
    caplog.set_level(logging.INFO, logger="fastapi_sessionmaker")
    with TestClient(write_app(main, other, twin), raise_server_exceptions=False) as client:
        response = client.post("/write")
    assert response.status_code == 500
    assert ids(main) == [1]
    assert ids(other) == []
    (xid,) = xids
    lines = [r for r in caplog.records if r.name == "fastapi_sessionmaker" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    text = lines[0].getMessage()
    assert text.startswith("two-phase commit of POST /write left transactions in doubt")
    assert f"committed: 'main'; in doubt (prepared, not committed): 'reports' (xid '{xid}')" in text
    assert text.endswith("maker.resolve_in_doubt(xid, commit=True)")

    async def resolve() -> list[str]:
        assert isinstance(other, AsyncFastAPISessionMaker)
        waiting = await other.in_doubt()
        await other.resolve_in_doubt(xid)
        return waiting

    if isinstance(other, FastAPISessionMaker):
        waiting = other.in_doubt()
        other.resolve_in_doubt(xid)
    else:
        waiting = asyncio.run(resolve())
    assert xid in waiting
    assert ids(other) == [2]
    assert xid not in prepared_on(other)


@pytest.mark.parametrize("pair", [ALL_PAIRS[1]], indirect=True)
def test_a_one_phase_database_beside_two_phase_ones_commits_before_them(
    pair: Callable[..., tuple[Maker, Maker]], twin: str
) -> None:
    """A mix: the prepared transaction commits last, so the one-phase commit can still undo it."""
    main, other = pair(main={"two_phase": True})
    order: list[str] = []
    sa.event.listen(sync_engine_of(main), "prepare_twophase", lambda c, x: order.append("main prepared"))
    sa.event.listen(sync_engine_of(main), "commit_twophase", lambda c, x, p: order.append("main committed"))
    sa.event.listen(sync_engine_of(other), "commit", lambda c: order.append("reports committed"))
    with TestClient(write_app(main, other, twin)) as client:
        assert client.post("/write").status_code == 200
    assert order == ["main prepared", "reports committed", "main committed"]
    assert ids(main) == [1]
    assert ids(other) == [2]


# -- docs/scaling.md -------------------------------------------------------------------------------
PAGE = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()


def docs_block() -> str:
    """The page's two-phase example: the python block after ``<!-- test: tests/test_multidb.py -->``."""
    (block,) = re.findall(r"<!-- test: tests/test_multidb.py -->\n```python\n(.*?)```", PAGE, flags=re.DOTALL)
    return str(block)


@pytest.mark.parametrize("stock_backend", ["mariadb", "postgresql"])
def test_the_two_phase_example_of_the_docs(
    env: pytest.MonkeyPatch, databases: Databases, reports: SecondDatabases, stock_backend: str
) -> None:
    """Run as the page says: makers from DATABASE_ORDERS_URI / DATABASE_STOCK_URI; a purchase is
    stored in both databases, and one whose second prepare loses its connection in neither."""
    orders_url = databases.url("postgresql")
    stock_url = reports.url(stock_backend, databases)
    env.setenv("DATABASE_ORDERS_URI", orders_url)
    env.setenv("DATABASE_STOCK_URI", stock_url)
    for url, ddl in (
        (orders_url, ["DROP TABLE IF EXISTS purchases", "CREATE TABLE purchases (item INTEGER)"]),
        (stock_url, ["DROP TABLE IF EXISTS stock", "CREATE TABLE stock (item INTEGER, count INTEGER)"]),
    ):
        engine = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
        with engine.begin() as connection:
            for statement in [*ddl, *(["INSERT INTO stock VALUES (7, 10)"] if "stock (" in ddl[1] else [])]:
                connection.execute(sa.text(statement))
        engine.dispose()
    namespace: dict[str, Any] = {"__name__": "docs_scaling"}
    exec(docs_block(), namespace)
    orders, stock = namespace["orders"], namespace["stock"]

    def stored() -> tuple[int, int]:
        with orders.context_session() as a, stock.context_session() as b:
            bought = a.execute(sa.text("SELECT count(*) FROM purchases")).scalar_one()
            left = b.execute(sa.text("SELECT count FROM stock WHERE item = 7")).scalar_one()
            return int(bought), int(left)

    try:
        assert orders.two_phase
        assert stock.two_phase
        with TestClient(namespace["app"], raise_server_exceptions=False) as client:
            assert client.post("/buy/7").status_code == 200
            assert stored() == (1, 9)
            killed: list[str] = []
            kill_before(stock, "prepare_twophase", killed)
            assert client.post("/buy/7").status_code == 503
            assert killed
            assert stored() == (1, 9)  # neither database kept the second purchase
        assert not set(killed) & set(stock.in_doubt() + orders.in_doubt())
    finally:
        orders.dispose()
        stock.dispose()
