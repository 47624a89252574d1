"""Read replicas against a real primary and two streaming hot standbys (``scripts/standby``).

The rig: a primary on 127.0.0.1:5440 and standbys on 5441 and 5442 (``pg_basebackup -R``). Each
run gets its own database on it (``fsm_<pid>``, replicated to both standbys). Tests that pause
replay or stop a standby hold the rig's lock exclusively; the others hold it shared, so they never
see a standby another test disturbs. Which server answered is read from the server itself:
``inet_server_port()`` and ``pg_is_in_recovery()``.
"""

import asyncio
import contextlib
import fcntl
import functools
import itertools
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    ConfigurationError,
    DatabaseSettings,
    FastAPISessionMaker,
    ReadOnlySessionError,
    default_error_mapper,
    health_router,
    pool_stats,
)
from tests.conftest import IN_CI, _pid_alive, run_smoke, wait_until

ROOT = Path(__file__).resolve().parent.parent
PRIMARY_PORT, PORTS = 5440, (5441, 5442)
NAME = f"fsm_{os.getpid()}"
LOCK = Path("/tmp/fastapi-sessionmaker-standby.lock")
WHERE = "SELECT inet_server_port(), pg_is_in_recovery()"
# A lock the standbys must replay; bounded, should a reader on the primary hold the table.
LOCK_ITEMS = "BEGIN; SET LOCAL lock_timeout = '10s'; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; COMMIT"

Maker = FastAPISessionMaker | AsyncFastAPISessionMaker
Serve = Callable[..., httpx.Client]


def url(port: int, database: str = NAME) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


def admin(port: int, database: str = NAME) -> sa.Engine:
    return sa.create_engine(
        url(port, database).replace("postgresql://", "postgresql+psycopg://"),
        isolation_level="AUTOCOMMIT",
        poolclass=sa.NullPool,
        connect_args={"connect_timeout": 5},
    )


def scalar(port: int, sql: str, database: str = NAME, **params: Any) -> Any:
    engine = admin(port, database)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def standby(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "standby"), *args], check=True, timeout=120, capture_output=True)


def replayed_everything(port: int) -> bool:
    """Whether the standby on ``port`` has replayed all the WAL the primary has written."""
    primary = scalar(PRIMARY_PORT, "SELECT CAST(pg_current_wal_lsn() AS text)", "postgres")
    return bool(scalar(port, "SELECT pg_last_wal_replay_lsn() >= CAST(:p AS pg_lsn)", "postgres", p=primary))


@pytest.fixture(scope="session")
def rig() -> Iterator[None]:
    """The standby rig is up; this run's database exists on the primary and both standbys.

    Looked at under the shared lock: another xdist worker's exclusive test may have a standby
    stopped right now, and puts it back before it lets go."""
    with rig_lock(False):
        try:
            for port in (PRIMARY_PORT, *PORTS):
                scalar(port, "SELECT 1", "postgres")
        except sa.exc.OperationalError as exc:
            message = (
                f"the standby rig is not running ({str(exc).splitlines()[0]}): run scripts/standby start"
            )
            if IN_CI:
                pytest.fail(message + " (CI=true: a missing server is a failure)")
            pytest.skip(message)
        set_up_databases()
    yield
    engine = admin(PRIMARY_PORT, "postgres")
    with engine.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
    engine.dispose()


def set_up_databases() -> None:
    """This run's database on the primary (stale ones of dead runs dropped), replayed by both standbys."""
    engine = admin(PRIMARY_PORT, "postgres")
    with engine.connect() as connection:
        stale = "SELECT datname FROM pg_database WHERE datname LIKE 'fsm\\_%'"
        for (name,) in connection.execute(sa.text(stale)).all():  # runs that were killed
            if name.removeprefix("fsm_").isdigit() and not _pid_alive(int(name.removeprefix("fsm_"))):
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
        connection.execute(sa.text(f"CREATE DATABASE {NAME}"))
    with admin(PRIMARY_PORT).connect() as connection:
        connection.execute(sa.text("CREATE TABLE items (id serial PRIMARY KEY, key text UNIQUE, n int)"))
    engine.dispose()
    for port in PORTS:
        wait_until(functools.partial(replayed_everything, port), f"standby {port} to replay the set-up")


@contextlib.contextmanager
def rig_lock(exclusive: bool, timeout: float = 300.0) -> Iterator[None]:
    """Shared: both standbys stay as they are. Exclusive: this test may pause or stop one."""
    with LOCK.open("a") as handle:
        deadline = time.monotonic() + timeout
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(handle, mode)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the standby rig stayed locked by another test"
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture
def shared(rig: None) -> Iterator[None]:
    with rig_lock(False):
        yield


@pytest.fixture
def exclusive(rig: None) -> Iterator[None]:
    with rig_lock(True):
        try:
            yield
        finally:  # leave the rig as the next test expects it: both standbys up and replaying
            for port in PORTS:
                with contextlib.suppress(sa.exc.OperationalError):
                    scalar(port, "SELECT pg_wal_replay_resume()", "postgres")
            standby("start")
            for port in PORTS:
                wait_until(functools.partial(replayed_everything, port), f"standby {port} to catch up")


class Driver:
    """Makers of one twin and their sessions, from a sync test (the async twin on one loop)."""

    def __init__(self, twin: str) -> None:
        self.twin = twin
        self.loop = asyncio.new_event_loop() if twin == "async" else None
        self.makers: list[Maker] = []

    def maker(self, replicas: list[str] | None = None, **kwargs: Any) -> Maker:
        cls = FastAPISessionMaker if self.twin == "sync" else AsyncFastAPISessionMaker
        if replicas is None:
            replicas = [url(port) for port in PORTS]
        made = cls(url(PRIMARY_PORT), replica_uris=replicas, **kwargs)
        self.makers.append(made)
        return made

    def run(self, coroutine: Any) -> Any:
        assert self.loop is not None
        return self.loop.run_until_complete(coroutine)

    def read(self, maker: Maker, sql: str = WHERE, policy: str = "read_only") -> tuple[Any, ...]:
        """One session under ``policy``: the row ``sql`` returned."""
        if isinstance(maker, FastAPISessionMaker):
            with maker.task_session(policy=policy) as session:
                return tuple(session.execute(sa.text(sql)).one())

        async def read() -> tuple[Any, ...]:
            async with maker.task_session(policy=policy) as session:
                return tuple((await session.execute(sa.text(sql))).one())

        return tuple(self.run(read()))

    def check(self, maker: Maker) -> list[dict[str, Any]]:
        assert maker.replicas is not None
        if isinstance(maker, FastAPISessionMaker):
            maker.replicas.check()
        else:
            self.run(maker.replicas.acheck())
        return maker.replicas.report()

    def dispose(self, maker: Maker) -> None:
        if isinstance(maker, FastAPISessionMaker):
            maker.dispose()
        else:
            self.run(maker.dispose())

    def close(self) -> None:
        for made in self.makers:
            self.dispose(made)
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


@pytest.fixture
def drive(twin: str) -> Iterator[Driver]:
    driver = Driver(twin)
    yield driver
    driver.close()


def ports(driver: Driver, maker: Maker, count: int) -> list[int]:
    return [driver.read(maker)[0] for _ in range(count)]


# -- routing --------------------------------------------------------------------------------------
def test_read_only_sessions_read_from_the_replicas_in_turn(drive: Driver, shared: None) -> None:
    maker = drive.maker()
    answers = [drive.read(maker) for _ in range(6)]
    assert all(in_recovery for _, in_recovery in answers), answers
    seen = [port for port, _ in answers]
    assert sorted(seen) == sorted(PORTS * 3), seen  # round robin: each replica served 3 of 6
    assert all(a != b for a, b in itertools.pairwise(seen)), seen
    # Every other session (and any session that may write) uses the primary.
    for policy in ("auto", "manual", "commit_unless_raised"):
        assert drive.read(maker, policy=policy) == (PRIMARY_PORT, False)


def test_request_sessions_are_routed_by_their_policy(
    twin: str, drive: Driver, shared: None, serve: Serve
) -> None:
    maker = drive.maker()
    app = FastAPI()
    maker.init_app(app)
    if isinstance(maker, FastAPISessionMaker):
        Reader = Annotated[Session, maker.depends(policy="read_only")]
        Writer = Annotated[Session, maker.dependency]

        @app.get("/read")
        def read(session: Reader) -> list[Any]:
            return list(session.execute(sa.text(WHERE)).one())

        @app.post("/write")
        def write(session: Writer) -> list[Any]:
            session.execute(sa.text("INSERT INTO items (key, n) VALUES (:k, 1)"), {"k": uuid.uuid4().hex})
            return list(session.execute(sa.text(WHERE)).one())

    else:
        AsyncReader = Annotated[AsyncSession, maker.depends(policy="read_only")]
        AsyncWriter = Annotated[AsyncSession, maker.dependency]

        @app.get("/read")
        async def aread(session: AsyncReader) -> list[Any]:
            return list((await session.execute(sa.text(WHERE))).one())

        @app.post("/write")
        async def awrite(session: AsyncWriter) -> list[Any]:
            await session.execute(
                sa.text("INSERT INTO items (key, n) VALUES (:k, 1)"), {"k": uuid.uuid4().hex}
            )
            return list((await session.execute(sa.text(WHERE))).one())

    client = serve(app)
    reads = [client.get("/read").json() for _ in range(4)]
    assert sorted(port for port, _ in reads) == sorted(PORTS * 2), reads
    assert all(in_recovery for _, in_recovery in reads)
    written = client.post("/write")
    assert written.json() == [PRIMARY_PORT, False]
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", written.headers["x-db-position"])
    assert "x-db-position" not in client.get("/read").headers  # nothing was committed


def test_a_replica_that_is_down_is_skipped_and_with_none_left_reads_go_to_the_primary(
    drive: Driver, shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    dead = url(free_port())
    maker = drive.maker([dead, url(PORTS[0])], replica_check_interval=60)
    with caplog.at_level(logging.WARNING, "fastapi_sessionmaker"):
        seen = ports(drive, maker, 4)  # the first read may try the dead one first: it is re-run
    assert seen == [PORTS[0]] * 4
    report = drive.check(maker)
    assert report[0]["status"] == "skipped"
    assert report[0]["reason"].startswith("down: ")
    assert report[1]["status"] == "ok"
    assert all("s3cret" not in record.getMessage() for record in caplog.records)

    nothing = drive.maker([url(free_port()), url(free_port())], replica_check_interval=60)
    assert ports(drive, nothing, 3) == [PRIMARY_PORT] * 3
    assert all(entry["status"] == "skipped" for entry in drive.check(nothing))
    assert drive.read(nothing)[1] is False


def test_a_replica_whose_url_the_driver_refuses_is_skipped_like_one_that_is_down(
    drive: Driver, shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An option the driver does not take (asyncpg raises ``TypeError`` at connect, psycopg a
    database error): no read fails, the other replica serves them, and the check still judges
    every replica; the report says what to fix, without the password."""
    refused = url(PORTS[0]).replace("postgres@", "postgres:s3cret@") + "?no_such_option=1"
    maker = drive.maker([refused, url(PORTS[1])], replica_check_interval=60)
    with caplog.at_level(logging.DEBUG, "fastapi_sessionmaker"):
        assert ports(drive, maker, 4) == [PORTS[1]] * 4
        report = drive.check(maker)
    assert report[0]["status"] == "skipped"
    assert report[0]["reason"].startswith("down: ")
    assert report[1]["status"] == "ok"
    if drive.twin == "async":
        assert "TypeError" in report[0]["reason"]
        assert "no_such_option" in report[0]["reason"]  # the driver's own words: what to fix
    skipped = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert len(skipped) == 1  # once, when it went down; not again at every read or check
    assert all("s3cret" not in record.getMessage() for record in caplog.records)
    assert "s3cret" not in repr(report)


@pytest.mark.parametrize(
    "shape",
    [
        "postgresql://postgres:s3cret@127.0.0.1:{port}/{name}",  # the password
        "postgresql://postgres@127.0.0.1:{port}/{name}?password=s3cret",  # a query value
    ],
    ids=["password", "query"],
)
def test_a_secret_in_a_replica_url_is_never_logged(
    drive: Driver, shared: None, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    secret = shape.format(port=free_port(), name=NAME)
    maker = drive.maker([secret], replica_check_interval=60)
    with caplog.at_level(logging.DEBUG, "fastapi_sessionmaker"):
        assert drive.read(maker)[0] == PRIMARY_PORT
        report = drive.check(maker)
    assert "s3cret" not in repr(report)
    assert "***" in report[0]["url"]
    assert caplog.records
    assert all("s3cret" not in record.getMessage() for record in caplog.records)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- writes in a replica session -----------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str]
    n: Mapped[int]


def test_writes_in_a_replica_session_fail_before_any_sql_is_sent(drive: Driver, shared: None) -> None:
    maker = drive.maker()
    assert maker.replicas is not None
    sent: list[str] = []
    for replica in maker.replicas.replicas:
        engine = maker.replicas.bind_of(replica)
        sa.event.listen(engine, "before_cursor_execute", lambda *args: sent.append(args[2]))

    def attempt(write: Callable[[Any], Any]) -> None:
        """``write(session)`` in a read-only session of ``maker`` (awaited for the async twin)."""
        if isinstance(maker, FastAPISessionMaker):
            with maker.task_session(policy="read_only") as session:
                write(session)
            return

        async def run() -> None:
            async with maker.task_session(policy="read_only") as session:
                result = write(session)
                if asyncio.iscoroutine(result):
                    await result

        drive.run(run())

    def orm(session: Any) -> Any:
        session.add(Item(key="orm", n=1))
        return session.flush()

    with pytest.raises(ReadOnlySessionError, match="read-only"):
        attempt(orm)
    with pytest.raises(ReadOnlySessionError, match=re.escape("INSERT, UPDATE, DELETE and DDL")):
        attempt(lambda session: session.execute(sa.insert(Item).values(key="core", n=1)))
    with pytest.raises(sa.exc.DBAPIError) as raised:
        attempt(lambda session: session.execute(sa.text("INSERT INTO items (key, n) VALUES ('text', 1)")))
    # Only the textual INSERT, which the library cannot see into, reached a replica.
    assert [sql for sql in sent if "items" in sql] == ["INSERT INTO items (key, n) VALUES ('text', 1)"]
    # The server's 25006 (a write on a hot standby) becomes a problem that says what happened.
    problem = default_error_mapper(raised.value)
    assert problem is not None
    assert problem.status == 500
    assert "read-only transaction" in problem.detail


def test_a_check_that_looked_before_a_read_found_the_replica_down_does_not_revive_it(
    drive: Driver, shared: None
) -> None:
    """The race behind a stopped standby: a background check reads the replica's status while it is
    up, a read then finds it down, and the check's healthy verdict arrives last. The read wins."""
    maker = drive.maker(replica_check_interval=60)
    assert maker.replicas is not None
    replica = maker.replicas.replicas[1]
    looked_at = time.monotonic()  # the check's status row was read here, while the replica was up
    maker.replicas.failed(replica, ConnectionRefusedError("the standby stopped"))
    assert not replica.healthy
    maker.replicas._judge(replica, (True, "0/0"), 0, looked_at)
    assert not replica.healthy, "a check that started before the failed read marked the replica healthy"
    maker.replicas._judge(replica, (True, "0/0"), 0, time.monotonic())  # a later check may
    assert replica.healthy


# -- the lag bound --------------------------------------------------------------------------------
def test_a_lagging_replica_is_skipped_until_it_catches_up(drive: Driver, exclusive: None) -> None:
    maker = drive.maker(replica_max_lag=64 * 1024, replica_check_interval=0.1)
    lagging, current = PORTS[1], PORTS[0]
    assert sorted(set(ports(drive, maker, 4))) == sorted(PORTS)
    try:
        scalar(lagging, "SELECT pg_wal_replay_pause()", "postgres")
        wait_until(
            lambda: scalar(lagging, "SELECT pg_get_wal_replay_pause_state()", "postgres") == "paused",
            "replay to pause",
        )
        # 256 KiB of WAL that the paused standby cannot replay (a non-transactional message).
        scalar(PRIMARY_PORT, "SELECT pg_logical_emit_message(false, 'fsm', repeat('x', 262144))", "postgres")
        wait_until(lambda: replayed_everything(current), "the other standby to replay it")
        # The background checks (every 0.1 s, started by reads) see the lag: reads leave it.
        wait_until(lambda: set(ports(drive, maker, 2)) == {current}, "reads to leave the lagging replica")
        report = maker.replicas.report() if maker.replicas else []
        assert report[1]["status"] == "skipped", report
        assert "lags" in report[1]["reason"], report
        assert report[1]["lag_bytes"] > 64 * 1024
        assert ports(drive, maker, 4) == [current] * 4
    finally:
        scalar(lagging, "SELECT pg_wal_replay_resume()", "postgres")
    wait_until(lambda: lagging in ports(drive, maker, 2), "the replica to serve reads again once caught up")


# -- a standby stopped and started for real ---------------------------------------------------
def test_a_stopped_standby_is_skipped_and_serves_again_after_its_restart(
    drive: Driver, exclusive: None, caplog: pytest.LogCaptureFixture
) -> None:
    maker = drive.maker(replica_check_interval=0.1)
    assert sorted(set(ports(drive, maker, 4))) == sorted(PORTS)
    standby("stop", "replica2")
    with caplog.at_level(logging.WARNING, "fastapi_sessionmaker"):
        assert ports(drive, maker, 6) == [PORTS[0]] * 6  # no read fails: re-run on the other one
    assert maker.replicas is not None
    assert not maker.replicas.replicas[1].healthy
    assert any("running it again" in r.getMessage() or "skipped" in r.getMessage() for r in caplog.records)
    standby("start")
    wait_until(lambda: PORTS[1] in ports(drive, maker, 2), "the restarted standby to serve reads", 30)


# -- recovery conflicts ----------------------------------------------------------------------
def test_a_read_terminated_by_a_recovery_conflict_runs_again_on_the_other_replica(
    drive: Driver, shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle-in-transaction reader holds a lock the primary's ``LOCK TABLE`` needs replayed: the
    standby terminates it (40001 "terminating connection due to conflict with recovery")."""
    maker = drive.maker(replica_check_interval=60)
    answers: list[tuple[Any, ...]] = []

    def conflicted(first: tuple[Any, ...]) -> None:
        port, pid = first[0], first[2]
        with admin(PRIMARY_PORT).connect() as connection:
            connection.exec_driver_sql(LOCK_ITEMS)
        wait_until(
            lambda: (
                not scalar(port, "SELECT count(*) FROM pg_stat_activity WHERE pid = :p", "postgres", p=pid)
            ),
            "the standby to terminate the reader",
        )

    sql = "SELECT inet_server_port(), count(*), pg_backend_pid() FROM items"
    with caplog.at_level(logging.WARNING, "fastapi_sessionmaker"):
        if isinstance(maker, FastAPISessionMaker):
            with maker.task_session(policy="read_only") as session:
                answers.append(tuple(session.execute(sa.text(sql)).one()))
                conflicted(answers[0])
                answers.append(tuple(session.execute(sa.text(sql)).one()))
        else:

            async def reads() -> None:
                async with maker.task_session(policy="read_only") as session:
                    answers.append(tuple((await session.execute(sa.text(sql))).one()))
                    await asyncio.to_thread(conflicted, answers[0])
                    answers.append(tuple((await session.execute(sa.text(sql))).one()))

            drive.run(reads())
    first, second = answers[0][0], answers[1][0]
    assert {first, second} == set(PORTS), answers
    # psycopg reads the server's 40001 FATAL; asyncpg finds the connection closed: both run again.
    assert any("running it again" in record.getMessage() for record in caplog.records)


def test_a_query_cancelled_by_a_recovery_conflict_runs_again_on_the_other_replica(
    drive: Driver, shared: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A running query on the standby blocks the replay of a lock: the standby cancels it after
    ``max_standby_streaming_delay`` (40001 "canceling statement due to conflict with recovery")."""
    sql = "SELECT inet_server_port(), count(*) FROM items, pg_sleep(1.5)"
    result: list[Any] = []

    def read() -> None:
        try:
            if drive.twin == "sync":
                result.append(drive.read(drive.maker(replica_check_interval=60), sql))
            else:  # its own event loop in this thread: a maker of its own
                result.append(asyncio.run(_aread(sql)))
        except Exception as exc:  # reported below, not lost in the thread
            result.append(exc)

    def running_on() -> int | None:
        for port in PORTS:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1.5)%' "
                "AND pid <> pg_backend_pid()"
            )
            if scalar(port, query, "postgres"):
                return port
        return None

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: running_on() is not None, "the read to run on a standby")
        victim = running_on()
        with admin(PRIMARY_PORT).connect() as connection:
            connection.exec_driver_sql(LOCK_ITEMS)
    finally:
        reader.join(30)
    assert not reader.is_alive()
    assert len(result) == 1, result
    assert not isinstance(result[0], Exception), result
    assert {result[0][0], victim} == set(PORTS), (result, victim)
    assert any("code 40001" in record.getMessage() for record in caplog.records)


async def _aread(sql: str) -> tuple[Any, ...]:
    maker = AsyncFastAPISessionMaker(
        url(PRIMARY_PORT), replica_uris=[url(port) for port in PORTS], replica_check_interval=60
    )
    try:
        async with maker.task_session(policy="read_only") as session:
            return tuple((await session.execute(sa.text(sql))).one())
    finally:
        await maker.dispose()


# -- read-your-writes across requests ----------------------------------------------------------
def items_app(maker: Maker) -> FastAPI:
    """POST /items/{key} writes on the primary; GET /items/{key} reads in a read-only session."""
    app = FastAPI()
    maker.init_app(app)
    find = "SELECT inet_server_port(), count(*) FROM items WHERE key = :k"
    if isinstance(maker, FastAPISessionMaker):
        Reader = Annotated[Session, maker.depends(policy="read_only")]
        Writer = Annotated[Session, maker.dependency]

        @app.post("/items/{key}", status_code=201)
        def add(key: str, session: Writer) -> dict[str, str]:
            session.execute(sa.text("INSERT INTO items (key, n) VALUES (:k, 1)"), {"k": key})
            return {"key": key}

        @app.get("/items/{key}")
        def get(key: str, session: Reader) -> dict[str, int]:
            port, count = session.execute(sa.text(find), {"k": key}).one()
            return {"port": port, "count": count}

    else:
        AsyncReader = Annotated[AsyncSession, maker.depends(policy="read_only")]
        AsyncWriter = Annotated[AsyncSession, maker.dependency]

        @app.post("/items/{key}", status_code=201)
        async def aadd(key: str, session: AsyncWriter) -> dict[str, str]:
            await session.execute(sa.text("INSERT INTO items (key, n) VALUES (:k, 1)"), {"k": key})
            return {"key": key}

        @app.get("/items/{key}")
        async def aget(key: str, session: AsyncReader) -> dict[str, int]:
            port, count = (await session.execute(sa.text(find), {"k": key})).one()
            return {"port": port, "count": count}

    app.include_router(health_router(timeout=5.0))
    return app


def replica_idle(maker: Maker, index: int) -> bool:
    return pool_stats(maker, replica=index)["checked_out"] == 0


def test_read_your_writes_under_50_concurrent_clients(drive: Driver, shared: None, serve: Serve) -> None:
    maker = drive.maker()
    client = serve(items_app(maker))
    results: list[tuple[int, int] | BaseException] = []

    def write_then_read(n: int) -> None:
        try:
            key = f"ryw-{uuid.uuid4().hex}"
            written = client.post(f"/items/{key}")
            assert written.status_code == 201, written.text
            token = written.headers["x-db-position"]
            read = client.get(f"/items/{key}", headers={"X-DB-Position": token})
            assert read.status_code == 200, read.text
            results.append((read.json()["port"], read.json()["count"]))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=write_then_read, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    answers = [r for r in results if not isinstance(r, BaseException)]
    assert len(answers) == 50
    stale = [a for a in answers if a[1] != 1]
    assert stale == [], f"{len(stale)} of 50 reads with the token missed their own write"
    # The token does not simply send everything to the primary: replicas that have replayed the
    # commit serve such reads (the standbys replay within a few milliseconds).
    assert any(port in PORTS for port, _ in answers), answers
    assert maker.replicas is not None
    for index in range(len(PORTS)):
        wait_until(
            functools.partial(replica_idle, maker, index), "the replica pools to have every connection back"
        )


def test_read_your_writes_while_a_standby_lags(drive: Driver, exclusive: None, serve: Serve) -> None:
    """Replay paused on one standby (within the lag bound, so it still serves reads): without the
    position, the reads it serves miss the write just made; with it, none does."""
    maker = drive.maker(replica_check_interval=60)
    client = serve(items_app(maker))
    paused = PORTS[1]
    outcomes: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    try:
        scalar(paused, "SELECT pg_wal_replay_pause()", "postgres")
        wait_until(
            lambda: scalar(paused, "SELECT pg_get_wal_replay_pause_state()", "postgres") == "paused",
            "replay to pause",
        )
        for n in range(20):
            with_position = n % 2 == 0
            key = f"lag-{uuid.uuid4().hex}"
            written = client.post(f"/items/{key}")
            assert written.status_code == 201, written.text
            headers = {"X-DB-Position": written.headers["x-db-position"]} if with_position else {}
            read = client.get(f"/items/{key}", headers=headers).json()
            outcomes[with_position].append((read["port"], read["count"]))
    finally:
        scalar(paused, "SELECT pg_wal_replay_resume()", "postgres")
    assert all(count == 1 for _, count in outcomes[True]), outcomes[True]
    assert all(port != paused for port, _ in outcomes[True]), outcomes[True]
    # Round robin sends about half the reads without a position to the paused standby: stale.
    stale = [port for port, count in outcomes[False] if count == 0]
    assert stale, outcomes[False]
    assert set(stale) == {paused}, outcomes[False]


def test_a_position_no_replica_has_replayed_is_read_on_the_primary(
    drive: Driver, shared: None, serve: Serve
) -> None:
    maker = drive.maker()
    client = serve(items_app(maker))
    future = client.get("/items/none", headers={"X-DB-Position": "FFFFFFFF/0"})
    assert future.status_code == 200
    assert future.json()["port"] == PRIMARY_PORT
    assert client.get("/items/none").json()["port"] in PORTS  # without a position: a replica


def test_an_invalid_position_is_a_400_problem(drive: Driver, shared: None, serve: Serve) -> None:
    maker = drive.maker()
    client = serve(items_app(maker))
    answer = client.get("/items/x", headers={"X-DB-Position": "yesterday"})
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert "X-DB-Position" in answer.json()["detail"]
    assert "0/16B3748" in answer.json()["detail"]


def test_the_health_route_reports_each_replica(drive: Driver, shared: None, serve: Serve) -> None:
    maker = drive.maker([url(free_port()), url(PORTS[0])], replica_check_interval=60)
    client = serve(items_app(maker))
    health = client.get("/healthz")
    assert health.status_code == 200, health.text  # a skipped replica: reads go elsewhere
    replicas = health.json()["databases"]["default"]["replicas"]
    assert [r["status"] for r in replicas] == ["skipped", "ok"]
    assert replicas[0]["reason"].startswith("down: ")
    assert replicas[1]["lag_bytes"] >= 0
    assert replicas[1]["pool"]["checked_out"] == 0
    assert replicas[1]["url"].endswith(f":{PORTS[0]}/{NAME}")


def test_dispose_disposes_the_replica_engines(drive: Driver, shared: None) -> None:
    maker = drive.maker()
    ports(drive, maker, 2)
    assert maker.replicas is not None
    engines = [replica.engine for replica in maker.replicas.replicas]
    pools: list[Any] = [e.pool if isinstance(e, sa.Engine) else e.sync_engine.pool for e in engines]
    assert all(pool.checkedin() >= 1 for pool in pools)
    drive.dispose(maker)
    assert all(replica.engine is None for replica in maker.replicas.replicas)
    assert all(pool.checkedin() == 0 for pool in pools)
    assert sorted(ports(drive, maker, 2)) == sorted(PORTS)  # used again: new engines


# -- configuration (no server needed) -----------------------------------------------------------
def test_replica_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, twin: str) -> None:
    monkeypatch.setenv("DATABASE_URI", "postgresql://app:pw@primary:5432/shop")
    monkeypatch.setenv(
        "DATABASE_REPLICA_URIS", " postgresql://app:s3cret@r1/shop, postgresql://r2:5433/shop ,"
    )
    monkeypatch.setenv("DATABASE_REPLICA_MAX_LAG", "1000")
    monkeypatch.setenv("DATABASE_REPLICA_CHECK_INTERVAL", "0.5")
    cls = FastAPISessionMaker if twin == "sync" else AsyncFastAPISessionMaker
    maker = cls()
    assert maker.replicas is not None
    assert [r.url.host for r in maker.replicas.replicas] == ["r1", "r2"]
    assert maker.replicas.max_lag == 1000
    assert maker.replicas.check_interval == 0.5
    driver = "asyncpg" if twin == "async" else "psycopg"
    assert maker.replicas.report()[0]["url"] == f"postgresql+{driver}://app:***@r1/shop"
    assert "s3cret" not in repr(DatabaseSettings())


def test_bad_replica_settings_fail_with_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URI", "postgresql://primary/shop")
    monkeypatch.setenv("DATABASE_REPLICA_URIS", "postgresql://app:s3cret@r1/shop,not a url")
    with pytest.raises(
        ConfigurationError, match=r"^DATABASE_REPLICA_URIS is not a valid database URL"
    ) as bad:
        FastAPISessionMaker()
    assert "s3cret" not in str(bad.value)
    assert "\n" not in str(bad.value)
    monkeypatch.setenv("DATABASE_REPLICA_URIS", "mysql://r1/shop")
    with pytest.raises(ConfigurationError, match="DATABASE_REPLICA_URIS: read replicas need PostgreSQL"):
        FastAPISessionMaker()
    with pytest.raises(ConfigurationError, match="replica_uris: read replicas need PostgreSQL"):
        FastAPISessionMaker("sqlite://", replica_uris=["postgresql://r1/db"])
    with pytest.raises(ConfigurationError, match=re.escape("replica_uris: give a list of URLs")):
        FastAPISessionMaker("postgresql://p/db", replica_uris="postgresql://r1/db")
    with pytest.raises(ConfigurationError, match="replica_max_lag=-1"):
        FastAPISessionMaker("postgresql://p/db", replica_uris=["postgresql://r1/db"], replica_max_lag=-1)
    monkeypatch.setenv("DATABASE_REPLICA_URIS", "")
    assert FastAPISessionMaker().replicas is None  # empty: no replicas


def test_a_maker_without_replicas_composes_no_routing() -> None:
    maker = FastAPISessionMaker("sqlite://")
    assert maker.replicas is None
    session = maker.lifecycle.open(maker.policy.READ_ONLY)
    assert not any(c.__name__ == "ReplicaMixin" for c in type(session).__mro__)
    session.close()
    maker.dispose()


# -- docs/scaling.md, "Read replicas" -------------------------------------------------------------
def replica_blocks() -> list[str]:
    """The page's python blocks that this file runs (marked ``<!-- test: tests/test_replicas.py -->``)."""
    page = (ROOT / "docs" / "scaling.md").read_text()
    marker = r"<!-- test: tests/test_replicas\.py -->\n```python\n(.*?)```"
    return re.findall(marker, page, flags=re.DOTALL)


def test_the_docs_read_replica_examples_do_what_the_page_says(shared: None, serve: Serve) -> None:
    blocks = replica_blocks()
    assert len(blocks) == 2
    # The page's URLs name the rig's `test` database: this run uses its own.
    assert blocks[0].count('/test"') == 3
    namespace: dict[str, Any] = {"__name__": "docs_scaling"}
    exec(blocks[0].replace('/test"', f'/{NAME}"'), namespace)
    db = namespace["db"]
    try:
        assert db.replicas is not None
        assert [r.url.port for r in db.replicas.replicas] == list(PORTS)
        assert (db.replicas.max_lag, db.replicas.check_interval) == (16 * 1024 * 1024, 1.0)
        with admin(PRIMARY_PORT).connect() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS notes")
            connection.exec_driver_sql("CREATE TABLE notes (id serial PRIMARY KEY, text text)")
        for port in PORTS:
            wait_until(functools.partial(replayed_everything, port), f"standby {port} to replay the table")
        client = serve(namespace["app"])
        exec(blocks[1], namespace)
        first = namespace["add_then_count"](client, "hello")
        assert first["count"] == 1  # "the first add_then_count(client, "hello") counts 1 note"
        assert first["served_by"] in (PRIMARY_PORT, *PORTS)
        assert namespace["add_then_count"](client, "again")["count"] == 2
        served = {client.get("/notes/count").json()["served_by"] for _ in range(4)}
        assert served == set(PORTS)  # read-only requests without a position: the replicas in turn
    finally:
        db.dispose()


def test_the_replica_benchmark_smoke_mode_measures_every_cell(shared: None) -> None:
    output = run_smoke("replica_read.py")
    rows = [
        line.split("|")
        for line in output.splitlines()
        if line.startswith("| sync") or line.startswith("| async")
    ]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [
        (twin, setup)
        for twin in ("sync", "async")
        for setup in ("primary", "standby, no routing", "replica", "replica + position")
    ], output
    assert all(float(row[4]) > 0 for row in rows)
    assert [row[4].strip() for row in rows if row[2].strip() == "primary"] == ["1.00", "1.00"]
