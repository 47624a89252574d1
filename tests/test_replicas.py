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
from fastapi import FastAPI, Request
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
from tests.conftest import IN_CI, wait_until

ROOT = Path(__file__).resolve().parent.parent
PRIMARY_PORT, PORTS = 5440, (5441, 5442)
NAME = f"fsm_{os.getpid()}"
LOCK = Path("/tmp/fastapi-sessionmaker-standby.lock")
WHERE = "SELECT inet_server_port(), pg_is_in_recovery()"

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
    return bool(
        scalar(port, "SELECT pg_last_wal_replay_lsn() >= CAST(:p AS pg_lsn)", "postgres", p=primary)
    )


@pytest.fixture(scope="session")
def rig() -> Iterator[None]:
    """The standby rig is up; this run's database exists on the primary and both standbys."""
    try:
        for port in (PRIMARY_PORT, *PORTS):
            scalar(port, "SELECT 1", "postgres")
    except sa.exc.OperationalError as exc:
        message = f"the standby rig is not running ({str(exc).splitlines()[0]}): run scripts/standby start"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing server is a failure)")
        pytest.skip(message)
    engine = admin(PRIMARY_PORT, "postgres")
    with engine.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
        connection.execute(sa.text(f"CREATE DATABASE {NAME}"))
    with admin(PRIMARY_PORT).connect() as connection:
        connection.execute(sa.text("CREATE TABLE items (id serial PRIMARY KEY, key text UNIQUE, n int)"))
    for port in PORTS:
        wait_until(lambda port=port: replayed_everything(port), f"standby {port} to replay the set-up")
    yield
    with engine.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)"))
    engine.dispose()


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
                wait_until(lambda port=port: replayed_everything(port), f"standby {port} to catch up")


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

        return self.run(read())

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
    assert all(a != b for a, b in zip(seen, seen[1:])), seen
    # Every other session (and any session that may write) uses the primary.
    for policy in ("auto", "manual", "commit_unless_raised"):
        assert drive.read(maker, policy=policy) == (PRIMARY_PORT, False)


def test_request_sessions_are_routed_by_their_policy(twin: str, drive: Driver, shared: None, serve: Serve) -> None:
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
            await session.execute(sa.text("INSERT INTO items (key, n) VALUES (:k, 1)"), {"k": uuid.uuid4().hex})
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
    assert report[0]["status"] == "skipped" and report[0]["reason"].startswith("down: ")
    assert report[1]["status"] == "ok"
    assert all("s3cret" not in record.getMessage() for record in caplog.records)

    nothing = drive.maker([url(free_port()), url(free_port())], replica_check_interval=60)
    assert ports(drive, nothing, 3) == [PRIMARY_PORT] * 3
    assert all(entry["status"] == "skipped" for entry in drive.check(nothing))
    assert drive.read(nothing)[1] is False


def test_a_password_in_a_replica_url_is_never_logged(drive: Driver, shared: None, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/{NAME}"
    maker = drive.maker([secret], replica_check_interval=60)
    with caplog.at_level(logging.DEBUG, "fastapi_sessionmaker"):
        assert drive.read(maker)[0] == PRIMARY_PORT
        report = drive.check(maker)
    assert "s3cret" not in repr(report) and "***" in report[0]["url"]
    assert caplog.records and all("s3cret" not in record.getMessage() for record in caplog.records)


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

    if isinstance(maker, FastAPISessionMaker):
        with pytest.raises(ReadOnlySessionError, match="read-only"), maker.task_session(policy="read_only") as s:
            s.add(Item(key="orm", n=1))
            s.flush()
        with pytest.raises(ReadOnlySessionError, match=re.escape("INSERT, UPDATE, DELETE and DDL")):
            with maker.task_session(policy="read_only") as s:
                s.execute(sa.insert(Item).values(key="core", n=1))
        with pytest.raises(sa.exc.DBAPIError) as raised, maker.task_session(policy="read_only") as s:
            s.execute(sa.text("INSERT INTO items (key, n) VALUES ('text', 1)"))
    else:

        async def attempts() -> pytest.ExceptionInfo[sa.exc.DBAPIError]:
            with pytest.raises(ReadOnlySessionError, match="read-only"):
                async with maker.task_session(policy="read_only") as s:
                    s.add(Item(key="orm", n=1))
                    await s.flush()
            with pytest.raises(ReadOnlySessionError, match=re.escape("INSERT, UPDATE, DELETE and DDL")):
                async with maker.task_session(policy="read_only") as s:
                    await s.execute(sa.insert(Item).values(key="core", n=1))
            with pytest.raises(sa.exc.DBAPIError) as raised:
                async with maker.task_session(policy="read_only") as s:
                    await s.execute(sa.text("INSERT INTO items (key, n) VALUES ('text', 1)"))
            return raised

        raised = drive.run(attempts())
    # Only the textual INSERT, which the library cannot see into, reached a replica.
    assert [sql for sql in sent if "items" in sql] == ["INSERT INTO items (key, n) VALUES ('text', 1)"]
    # The server's 25006 (a write on a hot standby) becomes a problem that says what happened.
    problem = default_error_mapper(raised.value)
    assert problem is not None and problem.status == 500
    assert "read-only transaction" in problem.detail


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
        assert report[1]["status"] == "skipped" and "lags" in report[1]["reason"], report
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
    assert maker.replicas is not None and not maker.replicas.replicas[1].healthy
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
    lock = "BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; COMMIT"
    answers: list[tuple[Any, ...]] = []

    def conflicted(first: tuple[Any, ...]) -> None:
        port, pid = first[0], first[2]
        with admin(PRIMARY_PORT).connect() as connection:
            connection.exec_driver_sql(lock)
        wait_until(
            lambda: not scalar(port, "SELECT count(*) FROM pg_stat_activity WHERE pid = :p", "postgres", p=pid),
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
    assert first in PORTS and second in PORTS and first != second, answers
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
            connection.exec_driver_sql("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE; COMMIT")
    finally:
        reader.join(30)
    assert not reader.is_alive()
    assert len(result) == 1 and not isinstance(result[0], Exception), result
    assert result[0][0] in PORTS and result[0][0] != victim, (result, victim)
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
