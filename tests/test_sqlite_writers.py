"""SQLite writers take turns per database file (``_sqlite.py``): fast under contention, never a
turn left held, reads never wait, and only file engines are touched (pysqlite here; aiosqlite's in
``test_sqlite_async_writers.py``).

Every test runs on its own SQLite file in ``tmp_path``; threads are joined with a timeout and every
wait is bounded, so a turn left held fails a test instead of hanging it.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydantic
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fastapi_sessionmaker import AsyncFastAPISessionMaker, DBSession, FastAPISessionMaker
from fastapi_sessionmaker._sqlite import (
    WriterQueue,
    database_file,
    install_writer_queue,
    statement_kind,
    writer_queue_of,
)
from fastapi_sessionmaker.testing._database import sqlite_savepoints
from tests.conftest import checked_out, wait_until
from tests.test_edges import Timeout

INSERT = "INSERT INTO notes (body) VALUES ('x')"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.String(50))


class NoteOut(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(from_attributes=True)
    id: int
    body: str


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/writers.db"


@pytest.fixture
def makers() -> Iterator[Callable[..., FastAPISessionMaker]]:
    """``make(url, timeout=..., **options)``: a sync maker whose busy timeout is ``timeout`` s."""
    made: list[FastAPISessionMaker] = []

    def make(url: str, *, timeout: float = 5.0, **engine_options: Any) -> FastAPISessionMaker:
        options = {"connect_args": {"timeout": timeout}, **engine_options}
        maker = FastAPISessionMaker(url, engine_options=options)
        made.append(maker)
        return maker

    yield make
    for maker in made:
        maker.dispose()


@pytest.fixture
def maker(url: str, makers: Callable[..., FastAPISessionMaker]) -> FastAPISessionMaker:
    made = makers(url)
    Base.metadata.create_all(made.cached_engine)
    return made


def queue_of(maker: FastAPISessionMaker) -> WriterQueue:
    queue = writer_queue_of(maker.cached_engine)
    assert queue is not None
    return queue


def count(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM notes")).scalar_one())


def assert_free(maker: FastAPISessionMaker, makers: Callable[..., FastAPISessionMaker], url: str) -> None:
    """Nobody holds the turn, and another engine (busy timeout 0.5 s) writes at once."""
    assert queue_of(maker).owner is None
    other = makers(url, timeout=0.5)
    started = time.monotonic()
    with other.cached_engine.begin() as connection:
        connection.execute(sa.text(INSERT))
    assert time.monotonic() - started < 0.5
    assert queue_of(other).owner is None


def run_in_thread(target: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``target`` in another thread (joined with a timeout); return its result or raise its error."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the thread did not finish in time"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def run_together(target: Callable[[], Any], count: int, timeout: float) -> None:
    """Run ``target`` in ``count`` threads at once; each must finish within ``timeout`` seconds."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout} s"


def timed_inserts(dialect: type[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], Any]:
    """The seconds each INSERT spent in ``dialect``'s driver execute, and the timing function.

    Patched on the dialect class before the engine exists, so the queue's own wrapper (installed
    with the engine) wraps it: the time after any wait for the turn.
    """
    inserts: list[float] = []
    original: Any = dialect.do_execute

    def timed(self: Any, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        begun = time.monotonic()
        try:
            original(self, cursor, statement, parameters, context)
        finally:
            if statement.startswith("INSERT"):
                inserts.append(time.monotonic() - begun)

    monkeypatch.setattr(dialect, "do_execute", timed)
    return inserts, timed


def post_together(
    base_url: str, path: str, writers: int, each: int, timeout: float
) -> tuple[list[int], list[float]]:
    """``writers`` clients that start together and each ``POST`` ``each`` times: the statuses, and
    each request's seconds."""
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def writer() -> None:
        with httpx.Client(base_url=base_url, timeout=30.0) as own:
            start.wait(timeout=10)
            for _ in range(each):
                began = time.monotonic()
                status = own.post(path).status_code
                with lock:
                    statuses.append(status)
                    latencies.append(time.monotonic() - began)

    run_together(writer, writers, timeout=timeout)
    return statuses, latencies


# -- under contention ----------------------------------------------------------------------------
def test_32_concurrent_request_writers_are_all_stored_without_a_freeze(
    url: str,
    makers: Callable[..., FastAPISessionMaker],
    serve: Callable[..., httpx.Client],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The measured collapse: 32 writers that flush, validate a response model and commit in
    another hop, 20 requests each. Without the queue the writers wait inside SQLite (its busy
    handler sleeps up to 100 ms a time): an INSERT took 1-3 s there, a request's p99 1.4 s. With
    it, an INSERT starts once its connection has the turn, and runs at once."""
    inserts, timed = timed_inserts(SQLiteDialect_pysqlite, monkeypatch)
    db = makers(url, timeout=30.0, pool_size=32, max_overflow=8)  # a freeze would show as > 30 s
    engine = db.cached_engine
    Base.metadata.create_all(engine)
    queue = writer_queue_of(engine)
    assert queue is not None
    assert engine.dialect.do_execute.__wrapped__.__func__ is timed  # type: ignore[attr-defined]  # the installed wrapper

    app = FastAPI()
    db.init_app(app)

    @app.post("/notes", status_code=201)
    def create(session: DBSession) -> NoteOut:
        note = Note(body="x")
        session.add(note)
        session.flush()
        return NoteOut.model_validate(note)

    writers, each = 32, 20
    began = time.monotonic()
    statuses, latencies = post_together(str(serve(app).base_url), "/notes", writers, each, timeout=60)
    wall = time.monotonic() - began

    assert statuses == [201] * (writers * each)
    assert count(engine) == writers * each  # every acknowledged write is stored
    # A freeze, not a speed (a benchmark's claim): about 7 s alone, 12 s under the full suite on
    # two cores; what the queue changes is asserted per request and per INSERT below.
    assert wall < 30.0, f"{writers * each} writes took {wall:.1f} s"
    assert max(latencies) < 3.0, f"the slowest request took {max(latencies):.2f} s"
    assert max(inserts) < 0.5, f"an INSERT waited {max(inserts):.2f} s inside SQLite"
    assert queue_of(db).owner is None


def test_concurrent_context_sessions_hand_the_turn_over_in_order(
    maker: FastAPISessionMaker, makers: Callable[..., FastAPISessionMaker], url: str
) -> None:
    """16 threads that each write 10 times through ``context_session()``: every row stored, and no
    thread ever waits anywhere near the busy timeout."""
    errors: list[BaseException] = []
    waits: list[float] = []
    lock = threading.Lock()

    def writer() -> None:
        try:
            for _ in range(10):
                began = time.monotonic()
                with maker.context_session() as session:
                    session.add(Note(body="x"))
                    session.flush()
                with lock:
                    waits.append(time.monotonic() - began)
        except BaseException as exc:
            errors.append(exc)

    run_together(writer, 16, timeout=30)
    assert not errors, errors
    assert count(maker.cached_engine) == 160
    assert max(waits) < 2.5
    assert_free(maker, makers, url)


def test_the_turn_goes_to_the_longest_waiter_first() -> None:
    queue = WriterQueue("fifo")
    holder, order = object(), list[int]()
    assert queue.acquire(holder, timeout=1)
    threads = []

    def take_turn(n: int) -> None:
        assert queue.acquire(n, timeout=10)
        order.append(n)
        queue.release(n)

    for n in range(4):
        thread = threading.Thread(target=take_turn, args=(n,), daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(lambda: len(queue._waiters) == len(threads), f"waiter {n} queued")
    queue.release(holder)
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 2, 3]
    assert queue.owner is None


def test_a_wait_that_times_out_leaves_the_queue_in_order() -> None:
    queue = WriterQueue("timeout")
    assert queue.acquire("a", timeout=1)
    began = time.monotonic()
    assert queue.acquire("b", timeout=0.05) is False
    assert time.monotonic() - began >= 0.05
    assert not queue._waiters
    queue.release("b")  # not the owner: nothing happens
    assert queue.owner == "a"
    queue.release("a")
    assert queue.acquire("b", timeout=0)


def test_writers_cancelled_by_a_timeout_middleware_give_the_turn_back(
    url: str, makers: Callable[..., FastAPISessionMaker], serve: Callable[..., httpx.Client]
) -> None:
    """Four concurrent writers whose sync endpoint flushes, then sleeps past a 0.15 s timeout
    middleware (504): the cancelled requests' threads still hold or wait for the turn; once they
    are done every turn is back, nothing of a 504 is stored, and another writer writes at once."""
    db = makers(url, timeout=10.0)
    engine = db.cached_engine
    Base.metadata.create_all(engine)
    app = FastAPI()
    db.init_app(app)
    app.add_middleware(Timeout, seconds=0.15)  # outside the guard

    @app.post("/notes", status_code=201)
    def create(session: DBSession) -> NoteOut:
        note = Note(body="x")
        session.add(note)
        session.flush()  # takes the turn
        time.sleep(0.3)  # the timeout fires meanwhile
        return NoteOut.model_validate(note)

    client = serve(app)
    statuses: list[int] = []
    lock = threading.Lock()

    def writer() -> None:
        status = client.post("/notes").status_code
        with lock:
            statuses.append(status)

    run_together(writer, 4, timeout=30)
    assert sorted(set(statuses)) in ([504], [201, 504], [201]), statuses
    queue = queue_of(db)
    wait_until(lambda: queue.owner is None and checked_out(engine.pool) == 0, "the turn given back", 20)
    assert count(engine) == statuses.count(201)  # a 504 stored nothing
    assert_free(db, makers, url)


# -- every way a transaction ends gives the turn back ------------------------------------------
def flushed(maker: FastAPISessionMaker) -> Session:
    session = maker.get_new_sessionmaker(None)()
    session.add(Note(body="x"))
    session.flush()
    assert queue_of(maker).owner is session.connection().connection.dbapi_connection
    return session


def test_commit_gives_the_turn_back(maker: FastAPISessionMaker, makers: Any, url: str) -> None:
    with flushed(maker) as session:
        session.commit()
        assert_free(maker, makers, url)


def test_rollback_gives_the_turn_back(maker: FastAPISessionMaker, makers: Any, url: str) -> None:
    with flushed(maker) as session:
        session.rollback()
        assert_free(maker, makers, url)


def test_closing_a_session_without_commit_gives_the_turn_back(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    session = flushed(maker)
    session.close()  # the pool's reset on return rolls back
    assert_free(maker, makers, url)
    assert count(maker.cached_engine) == 1  # assert_free's row only


def test_a_failed_commit_gives_the_turn_back(maker: FastAPISessionMaker, makers: Any, url: str) -> None:
    with maker.cached_engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
        connection.exec_driver_sql(
            "CREATE TABLE children (id INTEGER PRIMARY KEY, parent_id INTEGER "
            "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
        )
    session = maker.get_new_sessionmaker(None)()
    session.execute(sa.text("INSERT INTO children (parent_id) VALUES (42)"))  # checked at COMMIT
    assert queue_of(maker).owner is not None
    with pytest.raises(sa.exc.IntegrityError):
        session.commit()
    assert queue_of(maker).owner is None  # the failed COMMIT gave it back at once
    session.close()
    assert_free(maker, makers, url)


def test_autocommit_statements_give_the_turn_back_each(url: str, makers: Any) -> None:
    maker = makers(url, isolation_level="AUTOCOMMIT")
    Base.metadata.create_all(maker.cached_engine)
    with maker.cached_engine.connect() as connection:
        connection.execute(sa.text(INSERT))
        assert queue_of(maker).owner is None  # the statement committed itself
        connection.execute(sa.text("INSERT INTO notes (id, body) VALUES (100, 'y')"))
        with pytest.raises(sa.exc.IntegrityError):  # a failing statement gives it back too
            connection.execute(sa.text("INSERT INTO notes (id, body) VALUES (100, 'y')"))
        assert queue_of(maker).owner is None
        assert_free(maker, makers, url)


def test_a_connection_invalidated_mid_transaction_gives_the_turn_back(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    with flushed(maker) as session:
        session.connection().invalidate()
        assert_free(maker, makers, url)


def test_detaching_a_connection_gives_the_turn_back(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    connection = maker.cached_engine.connect()
    connection.execute(sa.text(INSERT))
    assert queue_of(maker).owner is not None
    connection.connection.detach()
    assert queue_of(maker).owner is None
    connection.rollback()
    connection.close()
    assert_free(maker, makers, url)


def test_the_pools_return_close_and_checkout_give_the_turn_back(url: str, makers: Any) -> None:
    """The safety nets of the pool, for a turn that no statement or transaction end gave back."""
    maker = makers(url, pool_size=1, max_overflow=0)
    engine = maker.cached_engine
    queue = queue_of(maker)
    raw = engine.raw_connection()
    assert queue.acquire(raw.dbapi_connection, timeout=0)
    raw.close()  # the pool's rollback on return
    assert queue.owner is None
    raw = engine.raw_connection()
    assert queue.acquire(raw.dbapi_connection, timeout=0)
    raw.invalidate()  # closed
    assert queue.owner is None
    raw.close()

    lazy = makers(url, pool_size=1, max_overflow=0, pool_reset_on_return=None)
    raw = lazy.cached_engine.raw_connection()
    dbapi_connection = raw.dbapi_connection
    assert queue.acquire(dbapi_connection, timeout=0)
    raw.close()  # no rollback on return: the turn stays until the next checkout
    raw = lazy.cached_engine.raw_connection()
    assert raw.dbapi_connection is dbapi_connection
    assert queue.owner is None  # it was not in a transaction: released at checkout
    raw.close()


def test_savepoints_and_user_begin_immediate_hold_the_turn_until_the_commit(url: str, makers: Any) -> None:
    maker = makers(url)
    engine = maker.cached_engine
    Base.metadata.create_all(engine)

    @sa.event.listens_for(engine, "connect")
    def driver_autocommit(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def begin_immediate(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # new connections get the listener
    queue = queue_of(maker)
    with engine.connect() as connection:
        with connection.begin():
            assert queue.owner is connection.connection.dbapi_connection  # taken by BEGIN IMMEDIATE
            with connection.begin_nested():
                connection.execute(sa.text(INSERT))
            with connection.begin_nested() as nested:
                connection.execute(sa.text(INSERT))
                nested.rollback()
            assert queue.owner is connection.connection.dbapi_connection
        assert queue.owner is None
    assert count(engine) == 1
    assert_free(maker, makers, url)


def test_a_deferred_begin_waits_for_the_turn_but_a_transaction_that_read_only_tries(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    """SQLAlchemy's savepoint recipe (the driver's autocommit, ``BEGIN`` from a listener): right
    after ``BEGIN`` a connection holds no lock and waits its turn; after a read it holds SQLite's
    SHARED lock, so waiting could stall the owner's COMMIT: it goes ahead, and SQLite decides."""
    other = makers(url, timeout=0.3)
    engine = other.cached_engine

    sqlite_savepoints(engine)  # the testing plugin's recipe: the driver's autocommit, BEGIN from a listener

    queue = queue_of(maker)
    holder = flushed(maker)

    def read_then_write() -> float:
        with engine.begin() as connection:
            connection.execute(sa.text("SELECT count(*) FROM notes"))
            began = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="locked"):  # the driver's own error
                connection.execute(sa.text(INSERT))
            return time.monotonic() - began

    assert run_in_thread(read_then_write) < 0.3 + 0.2  # SQLite's busy timeout, no queue wait first

    def begin_then_write() -> None:
        with engine.begin() as connection:
            connection.execute(sa.text(INSERT))  # waits in the queue, not in SQLite

    thread = threading.Thread(target=begin_then_write, daemon=True)
    thread.start()
    wait_until(lambda: len(queue._waiters) == 1, "the deferred BEGIN's writer queued")
    holder.commit()
    holder.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert count(maker.cached_engine) == 2
    assert queue.owner is None


def test_a_wait_past_the_busy_timeout_proceeds_and_the_driver_error_surfaces(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    other = makers(url, timeout=0.2)
    holder = flushed(maker)

    def write() -> float:
        began = time.monotonic()
        with (
            pytest.raises(sa.exc.OperationalError, match="database is locked"),
            other.cached_engine.begin() as connection,
        ):
            connection.execute(sa.text(INSERT))
        return time.monotonic() - began

    elapsed = run_in_thread(write)
    assert 0.2 <= elapsed < 2.0
    assert queue_of(maker).owner is holder.connection().connection.dbapi_connection  # untouched
    holder.rollback()
    holder.close()
    assert_free(maker, makers, url)


def test_executemany_and_a_commit_in_another_thread(
    maker: FastAPISessionMaker, makers: Any, url: str
) -> None:
    """Request sessions write in one worker thread and commit in another: the turn is the
    connection's, not the thread's."""
    session = maker.get_new_sessionmaker(None)()
    session.execute(sa.insert(Note), [{"body": "a"}, {"body": "b"}, {"body": "c"}])
    queue = queue_of(maker)
    assert queue.owner is not None
    run_in_thread(session.commit)
    assert queue.owner is None
    session.close()
    assert count(maker.cached_engine) == 3
    assert_free(maker, makers, url)


# -- reads, sharing, scope ---------------------------------------------------------------------
def test_a_read_never_waits_for_the_turn(maker: FastAPISessionMaker, makers: Any, url: str) -> None:
    other = makers(url, timeout=5.0)
    holder = flushed(maker)

    def read() -> float:
        began = time.monotonic()
        with other.cached_engine.connect() as connection:
            connection.execute(sa.select(Note)).all()
            connection.execute(sa.text("WITH n AS (SELECT 1) SELECT * FROM n")).all()
        return time.monotonic() - began

    assert run_in_thread(read) < 0.5
    holder.rollback()
    holder.close()


def test_engines_on_one_file_share_one_queue_and_other_files_do_not(
    tmp_path: Path, makers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = makers(f"sqlite:///{tmp_path}/one.db").cached_engine
    relative = makers("sqlite:///./one.db").cached_engine
    (tmp_path / "link.db").symlink_to(tmp_path / "one.db")
    linked = makers("sqlite:///link.db").cached_engine
    two = makers(f"sqlite:///{tmp_path}/two.db").cached_engine
    queue = writer_queue_of(first)
    assert queue is not None
    assert writer_queue_of(relative) is queue
    assert writer_queue_of(linked) is queue
    assert writer_queue_of(two) not in (None, queue)
    assert queue.path == os.path.realpath(tmp_path / "one.db")
    assert install_writer_queue(first) is queue  # installing twice is a no-op


def test_only_file_engines_get_a_queue(url: str) -> None:
    """pysqlite and aiosqlite engines on a file (the async twin's: tests/test_sqlite_async_writers.py)."""

    async def async_engine_has_one() -> None:
        maker = AsyncFastAPISessionMaker(url)
        engine = maker.cached_engine
        queue = writer_queue_of(engine.sync_engine)
        assert queue is not None
        async with maker.context_session() as session:
            await session.execute(sa.text("CREATE TABLE t (n INTEGER)"))
            await session.execute(sa.text("INSERT INTO t VALUES (1)"))
        assert queue.owner is None
        await maker.dispose()
        memory = AsyncFastAPISessionMaker("sqlite+aiosqlite://")
        assert writer_queue_of(memory.cached_engine.sync_engine) is None
        await memory.dispose()

    anyio.run(async_engine_has_one)
    memory = FastAPISessionMaker("sqlite://")
    assert writer_queue_of(memory.cached_engine) is None
    memory.dispose()
    for plain in ("sqlite://", "sqlite:///file:shared?mode=memory&uri=true"):
        engine = sa.create_engine(plain, poolclass=sa.pool.QueuePool)
        assert install_writer_queue(engine) is None
        engine.dispose()


@pytest.mark.parametrize(
    ("statement", "kind"),
    [
        ("SELECT 1", 0),
        ("  select * from t", 0),
        ("PRAGMA foreign_keys", 0),
        ("INSERT INTO t VALUES (1)", 1),
        ("insert or replace into t values (1)", 1),
        ("REPLACE INTO t VALUES (1)", 1),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = 2", 1),
        ("\n  -- a comment\n/* another */ UPDATE t SET n = 1", 1),
        ("DELETE FROM t", 1),
        ("CREATE TABLE t (n INTEGER)", 1),
        ("DROP TABLE t", 1),
        ("ALTER TABLE t ADD COLUMN m INTEGER", 1),
        ("BEGIN IMMEDIATE", 1),
        ("begin exclusive transaction", 1),
        ("BEGIN", 2),
        ("BEGIN DEFERRED", 2),
        ("SAVEPOINT sa_savepoint_1", 2),
        ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", 1),
        ("WITH x AS (SELECT 1) SELECT * FROM x", 0),
        ("/* unterminated", 0),
        ("", 0),
    ],
)
def test_statement_kinds(statement: str, kind: int) -> None:
    assert statement_kind(statement) == kind


def test_database_file_resolves_paths_and_knows_memory(tmp_path: Path) -> None:
    assert database_file(sa.make_url(f"sqlite:///{tmp_path}/a.db")) == os.path.realpath(tmp_path / "a.db")
    uri = sa.make_url(f"sqlite:///file:{tmp_path}/a.db?mode=ro&uri=true")
    assert database_file(uri) == os.path.realpath(tmp_path / "a.db")
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared&uri=true"):
        assert database_file(sa.make_url(memory)) is None


def test_the_busy_timeout_comes_from_connect_args_then_the_url(tmp_path: Path) -> None:
    from fastapi_sessionmaker._sqlite import _busy_timeout

    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db?timeout=7")
    assert _busy_timeout(engine, {}) == 7.0
    assert _busy_timeout(engine, {"timeout": 2}) == 2.0
    engine.dispose()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db")
    assert _busy_timeout(engine, {}) == 5.0
    engine.dispose()


def test_a_turn_held_at_fork_is_free_in_the_child(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        import sqlalchemy as sa
        from fastapi_sessionmaker import FastAPISessionMaker
        from fastapi_sessionmaker._sqlite import writer_queue_of

        db = FastAPISessionMaker("sqlite:///{tmp_path}/fork.db")
        engine = db.cached_engine
        connection = engine.connect()
        connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        queue = writer_queue_of(engine)
        assert queue.owner is not None
        child = os.fork()
        if child == 0:
            code = 0 if queue.owner is None and queue.acquire(object(), timeout=0) else 1
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child saw the parent's turn"
        assert queue.owner is not None  # the parent's is untouched
        connection.commit()
        assert queue.owner is None
        connection.close()
        db.dispose()
        print("fork check: PASSED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert "fork check: PASSED" in result.stdout, result.stderr
