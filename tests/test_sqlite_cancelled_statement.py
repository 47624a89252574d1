"""aiosqlite: a statement interrupted by a cancellation does not keep SQLite's write lock.

The statement runs to its end in aiosqlite's thread anyway; SQLAlchemy invalidates the connection
and aiosqlite closes it. sqlite3's ``close()`` of a connection whose statement is still open only
makes it a zombie that keeps the transaction (and the write lock) until a garbage collection frees
the cursor, so every other writer would get "database is locked" meanwhile. The async maker's
SQLite engines roll back in aiosqlite's thread before the close (``_sqlite.terminate_in_order``).
The garbage collector is off during the test: what it would free by chance cannot hide the lock.
"""

import asyncio
import contextlib
import gc
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fastapi_sessionmaker import AsyncFastAPISessionMaker
from fastapi_sessionmaker._sqlite import terminate_in_order
from tests.conftest import checked_out, pool_of

DEADLINE = 5.0


@pytest.fixture
def no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def write_locked(path: Path) -> bool:
    """Whether another connection is refused SQLite's write lock (within 0.1 s)."""
    other = sqlite3.connect(str(path), timeout=0.1)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        return True
    finally:
        other.close()


@pytest.mark.parametrize(
    ("fixed", "cancels"),
    [
        (True, 1),
        (True, 2),
        # SQLAlchemy's own terminate (cancelled twice, it never ends); sqlite3 before 3.11
        # finalized every statement of a connection it closed, so the lock went with the close.
        pytest.param(
            False,
            1,
            marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 < 3.11 finalizes on close"),
        ),
    ],
    ids=["cancelled", "cancelled-again-during-the-close", "sqlalchemy-terminate"],
)
def test_a_cancelled_statement_gives_the_write_lock_back_once_it_has_ended(
    tmp_path: Path, no_gc: None, fixed: bool, cancels: int
) -> None:
    path = tmp_path / "cancel.db"
    maker = AsyncFastAPISessionMaker(f"sqlite+aiosqlite:///{path}")
    engine = maker.cached_engine
    dialect = engine.sync_engine.dialect
    if not fixed:  # SQLAlchemy's own terminate: the lock stays until a garbage collection
        dialect.do_terminate = type(dialect).do_terminate.__get__(dialect)  # type: ignore[method-assign]
    running = threading.Event()
    release = threading.Event()

    def pause() -> int:  # a statement that is still running when the request is cancelled
        running.set()
        release.wait(DEADLINE)
        return 1

    @sa.event.listens_for(engine.sync_engine, "connect")
    def add_pause(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.run_async(lambda driver: driver.create_function("pause", 0, pause))

    async def scenario() -> bool:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE notes (body TEXT)")

        async def work() -> None:
            async with engine.connect() as connection:
                await connection.exec_driver_sql("INSERT INTO notes VALUES ('lost')")
                await connection.exec_driver_sql("SELECT pause()")

        task = asyncio.create_task(work())
        assert await asyncio.to_thread(running.wait, DEADLINE)
        task.cancel()  # a timeout middleware, asyncio.timeout(), a server cancelling the request
        for _ in range(cancels - 1):  # again, while SQLAlchemy closes the connection (wait_for)
            for _ in range(5):
                await asyncio.sleep(0)
            task.cancel()
        assert write_locked(path)  # the statement is still running in aiosqlite's thread
        threading.Timer(0.05, release.set).start()  # ... until it ends, the cancelled task waiting
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(pool_of(maker)) == 0
        deadline = time.monotonic() + 2.0
        while write_locked(path):
            if time.monotonic() > deadline:
                await maker.dispose()
                return False
            await asyncio.sleep(0.01)
        await maker.dispose()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []  # none stuck
        return True

    unlocked = asyncio.run(scenario())
    assert unlocked is fixed
    gc.collect()  # frees the zombie connection of the unfixed case
    assert not write_locked(path)
    with contextlib.closing(sqlite3.connect(str(path))) as check:  # its own ``with`` does not close
        assert check.execute("SELECT count(*) FROM notes").fetchone() == (0,)  # rolled back


def test_only_aiosqlite_engines_are_changed(tmp_path: Path) -> None:
    sync_sqlite = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    assert terminate_in_order(sync_sqlite) is False
    postgres = sa.create_engine("postgresql+psycopg://u@127.0.0.1/db")
    assert terminate_in_order(postgres) is False
