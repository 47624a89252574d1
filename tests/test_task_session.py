"""The sync twin's task_session: one session per thread, the same rule as the async twin's."""

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from fastapi_sessionmaker import FastAPISessionMaker, ReadOnlySessionError
from tests.models import User, reset_tables, stored_emails


@pytest.fixture
def db(database_url: str, sync_engine: sa.Engine) -> Iterator[FastAPISessionMaker]:
    reset_tables(sync_engine)
    maker = FastAPISessionMaker(database_url)
    yield maker
    maker.dispose()


def test_each_thread_commits_its_own_work(db: FastAPISessionMaker, sync_engine: sa.Engine) -> None:
    def write(n: int) -> int:
        with db.task_session() as session:
            session.add(User(email=f"u{n}@x"))
            session.flush()
            return n

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(write, range(8))) == list(range(8))
    assert stored_emails(sync_engine) == sorted(f"u{n}@x" for n in range(8))
    assert db.cached_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


class CountingMaker(FastAPISessionMaker):
    """A maker that keeps every engine it creates."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.engines: list[sa.Engine] = []

    def get_new_engine(self) -> sa.Engine:
        engine = super().get_new_engine()
        self.engines.append(engine)
        return engine


def test_threads_that_use_a_new_maker_at_once_share_one_engine(tmp_path: Path) -> None:
    """The first use creates the engine once: an engine lost in the race would keep the connection
    its thread used open in a pool that nothing disposes (psycopg's ResourceWarning at some later
    garbage collection, in whichever test runs then)."""
    threads = 8
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows at once
    try:
        for _ in range(10):
            maker = CountingMaker(f"sqlite:///{tmp_path}/race.db")
            start = threading.Barrier(threads)

            def use(_: int, maker: CountingMaker = maker, start: threading.Barrier = start) -> object:
                start.wait(10)
                with maker.task_session() as session:
                    session.execute(sa.text("SELECT 1"))
                    return session.get_bind()

            try:
                with ThreadPoolExecutor(threads) as pool:
                    binds = set(pool.map(use, range(threads)))
                assert len(maker.engines) == 1, f"{len(maker.engines)} engines for one maker"
                assert binds == {maker.cached_engine}
            finally:
                maker.dispose()
                for engine in maker.engines:
                    engine.dispose()
    finally:
        sys.setswitchinterval(switch)


def test_an_error_rolls_back_only_that_task(db: FastAPISessionMaker, sync_engine: sa.Engine) -> None:
    with db.task_session() as session:
        session.add(User(email="kept@x"))

    def fail() -> None:
        with db.task_session() as session:
            session.add(User(email="lost@x"))
            session.flush()
            raise RuntimeError("task failed")

    with pytest.raises(RuntimeError, match="task failed"):
        fail()
    assert stored_emails(sync_engine) == ["kept@x"]


def test_policy_read_only_and_manual(db: FastAPISessionMaker, sync_engine: sa.Engine) -> None:
    def write_read_only() -> None:
        with db.task_session(policy="read_only") as session:
            session.add(User(email="ro@x"))
            session.flush()

    with pytest.raises(ReadOnlySessionError):
        write_read_only()
    with db.task_session(policy="manual") as session:
        session.add(User(email="manual@x"))  # never committed under MANUAL
    assert stored_emails(sync_engine) == []


def test_the_task_session_is_closed_after_the_block(db: FastAPISessionMaker) -> None:
    with db.task_session() as session:
        session.execute(sa.text("SELECT 1"))
    with pytest.raises(sa.exc.InvalidRequestError):
        session.execute(sa.text("SELECT 1"))
