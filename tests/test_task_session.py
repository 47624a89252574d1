"""The sync twin's task_session: one session per thread, the same rule as the async twin's."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

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
