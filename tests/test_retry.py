"""Retries of a whole unit of work (``_retry``, the makers' ``run_in_transaction``), both twins.

Real conflicts: SERIALIZABLE read-modify-write of one counter by 8 concurrent workers (PostgreSQL:
serialization failures; MariaDB: deadlocks), and deadlocks of two workers locking two rows in
opposite order on both. Bounded in time: PostgreSQL looks for deadlocks after 50 ms here
(``SET LOCAL deadlock_timeout``, superuser only), MariaDB at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker, is_retryable
from fastapi_sessionmaker._errors import error_code
from fastapi_sessionmaker._retry import BASE_DELAY, MAX_DELAY, backoff
from tests import conflicts
from tests.conftest import Maker, MakerFactory

WORKERS = 8
INCREMENTS = 25
COUNTER = conflicts.ROWS


def run(maker: Maker, fn: Callable[[Any], Any], **options: Any) -> Any:
    """``maker.run_in_transaction(fn, ...)`` for either twin (``fn`` is a coroutine function for
    the async one); the async twin's engine is disposed on the loop that used it."""
    if isinstance(maker, FastAPISessionMaker):
        return maker.run_in_transaction(fn, **options)

    async def main() -> Any:
        try:
            return await maker.run_in_transaction(fn, **options)
        finally:
            await maker.dispose()

    return asyncio.run(main())


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fastapi_sessionmaker" and "retrying" in r.getMessage()]


# -- the backoff -------------------------------------------------------------------------------


def test_the_backoff_is_jittered_exponential_and_capped() -> None:
    for attempt in range(1, 12):
        ceiling = min(MAX_DELAY, BASE_DELAY * 2 ** (attempt - 1))
        waits = [backoff(attempt) for _ in range(200)]
        assert all(0.0 <= wait <= ceiling for wait in waits), attempt
        assert len(set(waits)) > 100  # jittered: workers that failed together spread out
        assert max(waits) > ceiling / 2
    assert max(backoff(1) for _ in range(200)) <= BASE_DELAY == 0.01
    assert MAX_DELAY == 0.5


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("attempts", [0, -1, True, 1.5])
def test_attempts_must_be_a_whole_number_of_at_least_one(maker: Maker, attempts: Any) -> None:
    calls: list[object] = []

    async def noop(session: AsyncSession) -> None:
        calls.append(session)

    with pytest.raises(ValueError, match="attempts must be an int >= 1"):
        run(maker, noop if maker.is_async else calls.append, attempts=attempts)
    assert calls == []


# -- the loop, with errors made on purpose ----------------------------------------------------


def serialization_failure() -> sa.exc.OperationalError:
    """What psycopg's 40001 becomes, with SQL and parameters that must never be logged."""
    return sa.exc.OperationalError(
        "UPDATE secret_table SET x = %(x)s", {"x": "hunter2"}, psycopg.errors.SerializationFailure("boom")
    )


@pytest.mark.parametrize("backend", ["sqlite"])
def test_each_attempt_is_a_fresh_transaction_and_the_value_of_the_last_is_returned(
    make_maker: MakerFactory, sync_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    conflicts.reset_rows(sync_engine)
    maker = make_maker(name="orders")
    sessions: list[object] = []
    bump = COUNTER.update().where(COUNTER.c.id == 1).values(value=COUNTER.c.value + 1)

    def attempt_sync(session: Session) -> str:
        sessions.append(session)
        session.execute(bump)  # rolled back with the attempts that fail
        if len(sessions) < 3:
            raise serialization_failure()
        return f"done after {len(sessions)}"

    async def attempt_async(session: AsyncSession) -> str:
        sessions.append(session)
        await session.execute(bump)
        if len(sessions) < 3:
            raise serialization_failure()
        return f"done after {len(sessions)}"

    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        result = run(maker, attempt_async if maker.is_async else attempt_sync, attempts=3)

    assert result == "done after 3"
    assert len({id(s) for s in sessions}) == 3  # a new session each attempt
    assert conflicts.value_of(sync_engine, 1) == 1  # only the attempt that committed counts
    records = retry_records(caplog)
    assert [(r.levelno, getattr(r, "attempt", None)) for r in records] == [
        (logging.WARNING, 1),
        (logging.WARNING, 2),
    ]
    for record in records:
        text = record.getMessage()
        assert "'orders'" in text
        assert "OperationalError (40001)" in text
        assert "of 3" in text
        assert "secret_table" not in text
        assert "hunter2" not in text
        assert getattr(record, "database", None) == "orders"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_last_error_is_reraised_unchanged_when_attempts_run_out(
    maker: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    raised: list[BaseException] = []

    def fail_sync(session: Session) -> None:
        raised.append(serialization_failure())
        raise raised[-1]

    async def fail_async(session: AsyncSession) -> None:
        fail_sync(session.sync_session)

    with (
        caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"),
        pytest.raises(sa.exc.OperationalError) as info,
    ):
        run(maker, fail_async if maker.is_async else fail_sync, attempts=4)

    assert len(raised) == 4
    assert info.value is raised[-1]
    assert [getattr(r, "attempt", None) for r in retry_records(caplog)] == [1, 2, 3]


def test_non_retryable_errors_are_not_retried(
    make_maker: MakerFactory, sync_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A real IntegrityError (a duplicate key) on every database, and an error of the caller's."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker()
    calls: list[str] = []
    duplicate = COUNTER.insert().values(id=1, value=7)

    def insert_sync(session: Session) -> None:
        calls.append("insert")
        session.execute(duplicate)

    async def insert_async(session: AsyncSession) -> None:
        calls.append("insert")
        await session.execute(duplicate)

    def mine_sync(session: Session) -> None:
        calls.append("mine")
        raise LookupError("the caller's own error")

    async def mine_async(session: AsyncSession) -> None:
        mine_sync(session.sync_session)

    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        with pytest.raises(sa.exc.IntegrityError) as info:
            run(maker, insert_async if maker.is_async else insert_sync, attempts=5)
        assert not is_retryable(info.value)
        with pytest.raises(LookupError):
            run(maker, mine_async if maker.is_async else mine_sync, attempts=5)

    assert calls == ["insert", "mine"]
    assert retry_records(caplog) == []
    assert conflicts.value_of(sync_engine, 1) == 0


ISOLATION_QUERY = {
    "postgresql": "SELECT current_setting('transaction_isolation')",
    "mariadb": "SELECT @@tx_isolation",
}


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_isolation_level_is_this_transactions_only(make_maker: MakerFactory, backend: str) -> None:
    maker = make_maker(engine_options={"pool_size": 1, "max_overflow": 0})  # the same connection after
    query = sa.text(ISOLATION_QUERY[backend])

    def level_sync(session: Session) -> str:
        return str(session.execute(query).scalar_one()).lower().replace("-", " ")

    async def level_async(session: AsyncSession) -> str:
        return str((await session.execute(query)).scalar_one()).lower().replace("-", " ")

    if isinstance(maker, FastAPISessionMaker):
        inside = maker.run_in_transaction(level_sync, isolation_level="SERIALIZABLE")
        with maker.context_session() as session:
            after = level_sync(session)
    else:

        async def main() -> tuple[str, str]:
            assert isinstance(maker, AsyncFastAPISessionMaker)
            try:
                inside = await maker.run_in_transaction(level_async, isolation_level="SERIALIZABLE")
                async with maker.context_session() as session:
                    return inside, await level_async(session)
            finally:
                await maker.dispose()

        inside, after = asyncio.run(main())

    assert inside == "serializable"
    assert after == ("read committed" if backend == "postgresql" else "repeatable read")


@pytest.mark.parametrize("backend", ["postgresql"])
def test_joined_to_a_test_transaction_the_isolation_level_is_left_alone(
    make_maker: MakerFactory, sync_engine: sa.Engine
) -> None:
    """Under the testing plugin the work joins the test's transaction, whose level cannot change."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker()
    bump = COUNTER.update().where(COUNTER.c.id == 1).values(value=COUNTER.c.value + 1)
    if isinstance(maker, FastAPISessionMaker):
        with maker.cached_engine.connect() as connection:
            transaction = connection.begin()
            maker.join(connection)
            try:
                maker.run_in_transaction(
                    lambda session: session.execute(bump), isolation_level="SERIALIZABLE"
                )
                assert connection.execute(sa.select(COUNTER.c.value).where(COUNTER.c.id == 1)).scalar() == 1
            finally:
                maker.leave()
                transaction.rollback()
    else:

        async def bump_async(session: AsyncSession) -> None:
            await session.execute(bump)

        async def main() -> None:
            assert isinstance(maker, AsyncFastAPISessionMaker)
            connection: AsyncConnection = await maker.cached_engine.connect()
            try:
                await connection.begin()
                maker.join(connection)
                await maker.run_in_transaction(bump_async, isolation_level="SERIALIZABLE")
                stored = await connection.execute(sa.select(COUNTER.c.value).where(COUNTER.c.id == 1))
                assert stored.scalar() == 1
            finally:
                maker.leave()
                await connection.rollback()
                await connection.close()
                await maker.dispose()

        asyncio.run(main())
    assert conflicts.value_of(sync_engine, 1) == 0  # rolled back with the test's transaction


# -- real conflicts ------------------------------------------------------------------------------


def counter_race(maker: Maker, *, attempts: int) -> list[BaseException]:
    """8 workers (threads, or tasks for the async twin) x 25 SERIALIZABLE read-modify-write
    increments of one counter; the errors of the increments that failed for good."""
    read = sa.select(COUNTER.c.value).where(COUNTER.c.id == 1)
    errors: list[BaseException] = []

    def increment_sync(session: Session) -> None:
        value = session.execute(read).scalar_one()
        session.execute(COUNTER.update().where(COUNTER.c.id == 1).values(value=value + 1))

    async def increment_async(session: AsyncSession) -> None:
        value = (await session.execute(read)).scalar_one()
        await session.execute(COUNTER.update().where(COUNTER.c.id == 1).values(value=value + 1))

    if isinstance(maker, FastAPISessionMaker):
        start = threading.Barrier(WORKERS, timeout=conflicts.TIMEOUT)

        def worker() -> None:
            start.wait()
            for _ in range(INCREMENTS):
                try:
                    maker.run_in_transaction(
                        increment_sync, attempts=attempts, isolation_level="SERIALIZABLE"
                    )
                except sa.exc.DBAPIError as exc:
                    errors.append(exc)

        with ThreadPoolExecutor(WORKERS) as pool:
            for future in [pool.submit(worker) for _ in range(WORKERS)]:
                future.result(timeout=60)
    else:

        async def task() -> None:
            for _ in range(INCREMENTS):
                try:
                    await maker.run_in_transaction(
                        increment_async, attempts=attempts, isolation_level="SERIALIZABLE"
                    )
                except sa.exc.DBAPIError as exc:
                    errors.append(exc)

        async def main() -> None:
            try:
                await asyncio.wait_for(asyncio.gather(*(task() for _ in range(WORKERS))), 60)
            finally:
                await maker.dispose()

        asyncio.run(main())
    return errors


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_serializable_increments_without_retry_fail(
    make_maker: MakerFactory, sync_engine: sa.Engine, backend: str
) -> None:
    """PostgreSQL: serialization failures (40001). MariaDB's SERIALIZABLE reads take shared locks,
    so two increments that read the counter together deadlock when both update it (1213)."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker(engine_options={"pool_size": WORKERS, "max_overflow": 0})

    errors = counter_race(maker, attempts=1)

    assert errors, "no serialization failure: the workers did not overlap"
    assert {error_code(e) for e in errors} == {"40001" if backend == "postgresql" else "1213"}
    assert all(is_retryable(e) for e in errors)
    assert conflicts.value_of(sync_engine, 1) == WORKERS * INCREMENTS - len(errors) < 200


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_serializable_increments_with_retries_all_count(
    make_maker: MakerFactory, sync_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    conflicts.reset_rows(sync_engine)
    maker = make_maker(engine_options={"pool_size": WORKERS, "max_overflow": 0})

    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        errors = counter_race(maker, attempts=30)

    assert errors == []
    assert conflicts.value_of(sync_engine, 1) == WORKERS * INCREMENTS == 200
    assert retry_records(caplog), "no retry: the workers did not overlap"


class Gate:
    """Two tasks wait here until both arrived (``asyncio.Barrier`` needs Python 3.11)."""

    def __init__(self) -> None:
        self.arrived = 0
        self.open = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived == 2:
            self.open.set()
        await asyncio.wait_for(self.open.wait(), conflicts.TIMEOUT)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_real_deadlock_is_retried_and_both_transactions_commit(
    make_maker: MakerFactory, sync_engine: sa.Engine, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers lock rows 1 and 2 in opposite order; on their first attempt both hold their
    first row before asking for the second. The database aborts one: it is retried, once."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker()
    fast = conflicts.deadlock_timeout_sql(backend, 50)
    attempts = {1: 0, 2: 0}
    bump = COUNTER.update().where(COUNTER.c.id.in_([1, 2])).values(value=COUNTER.c.value + 1)

    def worker_sync(first: int, second: int, gate: threading.Barrier) -> Callable[[Session], None]:
        def work(session: Session) -> None:
            attempts[first] += 1
            if fast is not None:
                session.execute(fast)
            session.execute(conflicts.lock_sql(first))
            if attempts[first] == 1:
                gate.wait()
            session.execute(conflicts.lock_sql(second))
            session.execute(bump)

        return work

    def worker_async(first: int, second: int, gate: Gate) -> Callable[[AsyncSession], Awaitable[None]]:
        async def work(session: AsyncSession) -> None:
            attempts[first] += 1
            if fast is not None:
                await session.execute(fast)
            await session.execute(conflicts.lock_sql(first))
            if attempts[first] == 1:
                await gate.wait()
            await session.execute(conflicts.lock_sql(second))
            await session.execute(bump)

        return work

    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        if isinstance(maker, FastAPISessionMaker):
            barrier = threading.Barrier(2, timeout=conflicts.TIMEOUT)
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(maker.run_in_transaction, worker_sync(a, b, barrier), attempts=3)
                    for a, b in ((1, 2), (2, 1))
                ]
                for future in futures:
                    future.result(timeout=30)
        else:

            async def main() -> None:
                assert isinstance(maker, AsyncFastAPISessionMaker)
                gate = Gate()
                try:
                    await asyncio.wait_for(
                        asyncio.gather(
                            *(
                                maker.run_in_transaction(worker_async(a, b, gate), attempts=3)
                                for a, b in ((1, 2), (2, 1))
                            )
                        ),
                        30,
                    )
                finally:
                    await maker.dispose()

            asyncio.run(main())

    assert sorted(attempts.values()) == [1, 2]  # one victim, retried once
    assert conflicts.value_of(sync_engine, 1) == conflicts.value_of(sync_engine, 2) == 2
    (record,) = retry_records(caplog)
    assert getattr(record, "attempt", None) == 1
    assert getattr(record, "error_code", None) == ("40P01" if backend == "postgresql" else "1213")
    assert "FOR UPDATE" not in record.getMessage()
