"""The async twin's SQLite writers take turns too (``_sqlite.WriterQueue``, aiosqlite): the wait is
awaited on the event loop, the turn always comes back (commit, rollback, failed commit, a statement
cut by a cancellation, a waiter cancelled in line), and sync and async engines on one file share
one line.

Every test runs on its own SQLite file; every wait is bounded.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker
from fastapi_sessionmaker._sqlite import WriterQueue, _wake, writer_queue_of
from tests.conftest import checked_out
from tests.test_sqlite_writers import INSERT, Base, Note, count, post_together, timed_inserts

DEADLINE = 10.0


def bounded(scenario: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return await asyncio.wait_for(scenario(), DEADLINE)

    return asyncio.run(run())


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition()`` holds (bounded by the scenario's deadline)."""
    while not condition():  # noqa: ASYNC110 - the queue's state, which no event announces
        await asyncio.sleep(0.001)


def async_maker(url: str, *, timeout: float = 5.0, **engine_options: Any) -> AsyncFastAPISessionMaker:
    options = {"connect_args": {"timeout": timeout}, **engine_options}
    return AsyncFastAPISessionMaker(url, engine_options=options)


def queue_of(maker: AsyncFastAPISessionMaker) -> WriterQueue:
    queue = writer_queue_of(maker.cached_engine.sync_engine)
    assert queue is not None
    return queue


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/async-writers.db"
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


def test_64_concurrent_async_request_writers_are_all_stored_and_none_waits_inside_sqlite(
    url: str, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., httpx.Client]
) -> None:
    """Measured without the line: 12 of 640 requests got 503 ("database is locked" after the 5 s
    busy timeout), p99 5.6 s. With it an INSERT starts once its connection has the turn."""
    inserts, _ = timed_inserts(SQLiteDialect_aiosqlite, monkeypatch)
    db = async_maker(url, pool_size=64, max_overflow=8)
    app = FastAPI()
    db.init_app(app)

    @app.post("/notes", status_code=201)
    async def create(session: Annotated[AsyncSession, db.dependency]) -> dict[str, int]:
        note = Note(body="x")
        session.add(note)
        await session.flush()
        return {"id": note.id}

    writers, each = 64, 10
    statuses, _ = post_together(str(serve(app).base_url), "/notes", writers, each, timeout=90)
    engine = sa.create_engine(url)
    try:
        assert statuses == [201] * (writers * each)
        assert count(engine) == writers * each  # every acknowledged write is stored
    finally:
        engine.dispose()
    # The driver's execute includes aiosqlite's thread round trip, which 64 threads on two busy
    # cores can stretch; without the line, INSERTs waited in SQLite's busy handler up to its 5 s.
    assert max(inserts) < 2.0, f"an INSERT took {max(inserts):.2f} s in the driver"
    assert queue_of(db).owner is None


@pytest.mark.parametrize("end", ["commit", "rollback", "failed commit", "close"])
def test_every_end_of_a_transaction_gives_the_turn_back(url: str, end: str) -> None:
    db = async_maker(url)

    async def scenario() -> None:
        engine = db.cached_engine
        if end == "failed commit":
            async with engine.begin() as connection:
                await connection.exec_driver_sql(
                    "CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER "
                    "REFERENCES notes (id) DEFERRABLE INITIALLY DEFERRED)"
                )
        connection = await engine.connect()
        await connection.exec_driver_sql("PRAGMA foreign_keys = ON")
        await connection.commit()
        if end == "failed commit":
            await connection.exec_driver_sql("INSERT INTO child (parent) VALUES (999)")
        else:
            await connection.exec_driver_sql(INSERT)
        assert queue_of(db).owner is not None
        if end == "commit":
            await connection.commit()
        elif end == "rollback":
            await connection.rollback()
        elif end == "failed commit":
            with pytest.raises(sa.exc.IntegrityError):
                await connection.commit()
        await connection.close()
        assert queue_of(db).owner is None
        other = async_maker(url, timeout=0.2)  # a writer that would fail at once on a held lock
        async with other.cached_engine.begin() as writer:
            await writer.exec_driver_sql(INSERT)
        await other.dispose()
        await db.dispose()

    bounded(scenario)


def test_writers_wait_in_line_on_the_loop_first_come_first_served(url: str) -> None:
    db = async_maker(url)
    order: list[int] = []

    async def scenario() -> None:
        engine = db.cached_engine
        first = await engine.connect()
        await first.exec_driver_sql(INSERT)  # holds the turn

        async def write(number: int) -> None:
            async with engine.begin() as connection:
                await connection.exec_driver_sql(INSERT)
                order.append(number)

        waiting = []
        for number in range(3):
            waiting.append(asyncio.create_task(write(number)))
            waiters = number + 1
            await until(lambda: len(queue_of(db)._waiters) == waiters)  # in line, in this order  # noqa: B023
        ticks = 0
        while ticks < 20:  # the loop keeps running meanwhile: nobody blocked it
            await asyncio.sleep(0)
            ticks += 1
        assert order == []
        await first.commit()
        await asyncio.gather(*waiting)
        await first.close()
        assert order == [0, 1, 2]
        assert queue_of(db).owner is None
        await db.dispose()

    bounded(scenario)


def test_a_waiter_cancelled_in_line_leaves_it_and_the_turn_goes_on(url: str) -> None:
    db = async_maker(url)

    async def scenario() -> None:
        engine = db.cached_engine
        holder = await engine.connect()
        await holder.exec_driver_sql(INSERT)

        async def write() -> None:
            async with engine.begin() as connection:
                await connection.exec_driver_sql(INSERT)

        cancelled = asyncio.create_task(write())
        await until(lambda: bool(queue_of(db)._waiters))
        after = asyncio.create_task(write())
        await until(lambda: len(queue_of(db)._waiters) == 2)
        cancelled.cancel()  # a timeout middleware, while it waits for the turn
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert len(queue_of(db)._waiters) == 1
        await holder.commit()
        await holder.close()
        await after  # handed the turn, not lost with the cancelled waiter
        assert queue_of(db).owner is None
        assert checked_out(db.cached_engine.sync_engine.pool) == 0
        await db.dispose()

    bounded(scenario)
    engine = sa.create_engine(url)
    assert count(engine) == 2
    engine.dispose()


def test_a_turn_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    async def scenario() -> None:
        queue = WriterQueue("/unit")
        holder, cancelled_one, next_one = object(), object(), object()
        assert await queue.acquire_async(holder, 1.0)
        cancelled = asyncio.create_task(queue.acquire_async(cancelled_one, 5.0))
        following = asyncio.create_task(queue.acquire_async(next_one, 5.0))
        await asyncio.sleep(0)
        queue.release(holder)  # handed to the first waiter ...
        cancelled.cancel()  # ... which is cancelled before it ran
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await following
        assert queue.owner is next_one
        queue.release(next_one)
        assert queue.owner is None

    bounded(scenario)


def test_a_wait_past_the_busy_timeout_proceeds_without_the_turn() -> None:
    async def scenario() -> None:
        queue = WriterQueue("/unit")
        holder, waiter = object(), object()
        assert await queue.acquire_async(holder, 1.0)
        started = time.monotonic()
        assert await queue.acquire_async(waiter, 0.05) is False
        assert time.monotonic() - started < 1.0
        assert not queue._waiters
        queue.release(holder)
        assert queue.owner is None

    bounded(scenario)


def test_a_waiter_whose_loop_is_closed_is_skipped() -> None:
    """The turn never goes to a waiter that cannot be woken any more (its loop was closed)."""
    queue = WriterQueue("/unit")
    holder, gone, thread_waiter = object(), object(), object()
    assert queue.acquire(holder, 0.0)
    loop = asyncio.new_event_loop()
    turn = loop.create_future()
    loop.close()
    queue._waiters.append((functools.partial(_wake, loop, turn), gone))  # in line, then its loop closed
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(queue.acquire(thread_waiter, 5.0)))
    thread.start()
    while len(queue._waiters) < 2:
        time.sleep(0.001)
    queue.release(holder)
    thread.join(5)
    assert result == [True]
    assert queue.owner is thread_waiter
    queue.release(thread_waiter)
    assert queue.owner is None


def test_sync_and_async_engines_on_one_file_share_one_line(url: str) -> None:
    sync = FastAPISessionMaker(url, engine_options={"connect_args": {"timeout": 5.0}})
    db = async_maker(url)
    assert writer_queue_of(sync.cached_engine) is queue_of(db)
    stored: list[str] = []

    async def scenario() -> None:
        holder = await db.cached_engine.connect()
        await holder.exec_driver_sql(INSERT)  # the async connection holds the turn

        def sync_write() -> None:
            with sync.cached_engine.begin() as connection:
                connection.execute(sa.text(INSERT))
            stored.append("sync")

        thread = threading.Thread(target=sync_write)
        thread.start()
        await until(lambda: bool(queue_of(db)._waiters))  # the thread waits in line, the loop does not
        await holder.commit()
        await holder.close()
        await asyncio.to_thread(thread.join, 5)
        assert stored == ["sync"]
        assert queue_of(db).owner is None
        await db.dispose()

    try:
        bounded(scenario)
    finally:
        sync.dispose()
    engine = sa.create_engine(url)
    assert count(engine) == 2
    engine.dispose()
