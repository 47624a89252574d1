"""The per-route retry (``db.depends(retries=N)``): the guard re-runs a request whose transaction hit a
serialization failure or deadlock before its status line was sent, with its body replayed.

Real conflicts through a real uvicorn: 8 concurrent clients increment one counter with SERIALIZABLE
read-modify-write transactions (PostgreSQL: 40001; MariaDB: deadlocks), both twins.
"""

import asyncio
import logging
import time
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

from fastapi_sessionmaker import on_commit, on_rollback
from tests import conflicts
from tests.conftest import Maker, MakerFactory, wait_until

CLIENTS = 8
REQUESTS = 6
COUNTER = conflicts.ROWS


class Increment(BaseModel):
    by: int


def counter_app(maker: Maker, retries: int, events: list[str]) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.depends(retries=retries)]
    read = sa.select(COUNTER.c.value).where(COUNTER.c.id == 1)
    options = {"isolation_level": "SERIALIZABLE"}

    def effects(session: Any, tasks: BackgroundTasks) -> None:
        on_commit(session, lambda: events.append("commit"))
        on_rollback(session, lambda: events.append("rollback"))
        tasks.add_task(events.append, "task")

    if maker.is_async:

        @app.post("/increment")
        async def increment_async(body: Increment, session: Db, tasks: BackgroundTasks) -> dict[str, int]:
            await session.connection(execution_options=options)
            value = (await session.execute(read)).scalar_one()
            await session.execute(COUNTER.update().where(COUNTER.c.id == 1).values(value=value + body.by))
            effects(session, tasks)
            return {"seen": value}
    else:

        @app.post("/increment")
        def increment_sync(body: Increment, session: Db, tasks: BackgroundTasks) -> dict[str, int]:
            session.connection(execution_options=options)
            value = session.execute(read).scalar_one()
            session.execute(COUNTER.update().where(COUNTER.c.id == 1).values(value=value + body.by))
            effects(session, tasks)
            return {"seen": value}

    return app


def hammer(base_url: str) -> list[int]:
    async def client(http: httpx.AsyncClient) -> list[int]:
        return [(await http.post("/increment", json={"by": 2})).status_code for _ in range(REQUESTS)]

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            runs = await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(CLIENTS))), 60)
        return [status for run in runs for status in run]

    return asyncio.run(main())


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_without_retries_conflicting_requests_answer_503(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Any
) -> None:
    conflicts.reset_rows(sync_engine)
    maker = make_maker(engine_options={"pool_size": CLIENTS, "max_overflow": 0})
    events: list[str] = []
    statuses = hammer(str(serve(counter_app(maker, 0, events)).base_url))
    assert set(statuses) <= {200, 503}
    assert 503 in statuses, "no conflict happened: the test proves nothing"
    assert conflicts.value_of(sync_engine, 1) == 2 * statuses.count(200)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_with_retries_every_request_succeeds_and_counts_once(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conflicts.reset_rows(sync_engine)
    maker = make_maker(engine_options={"pool_size": CLIENTS, "max_overflow": 0})
    events: list[str] = []
    with caplog.at_level(logging.WARNING, logger="fastapi_sessionmaker"):
        statuses = hammer(str(serve(counter_app(maker, 30, events)).base_url))
    assert statuses == [200] * (CLIENTS * REQUESTS)
    assert conflicts.value_of(sync_engine, 1) == 2 * CLIENTS * REQUESTS  # the body was replayed
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retried, "no request was retried: the test proves nothing"
    # A retried attempt leaves nothing behind: one commit callback and one task per request (both
    # run after their response was sent: wait for the last ones).
    total = CLIENTS * REQUESTS
    wait_until(lambda: events.count("commit") >= total and events.count("task") >= total, "side effects")
    time.sleep(0.05)  # a retried attempt's task or callback would have arrived by now
    assert events.count("commit") == total
    assert events.count("task") == total
    assert "rollback" not in events


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_request_whose_body_is_too_large_to_replay_is_not_retried(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Any
) -> None:
    """An upload is never held in memory for a retry: past 1 MiB the guard stops keeping the body."""
    from fastapi import Request

    from fastapi_sessionmaker._guard import REPLAY_LIMIT

    maker = make_maker()
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.depends(retries=3)]
    attempts: list[int] = []

    if maker.is_async:

        @app.post("/upload")
        async def upload_async(request: Request, session: Db) -> int:
            size = len(await request.body())
            attempts.append(size)
            await session.execute(sa.text("SELECT 1"))
            raise conflicts_serialization_failure()
    else:

        @app.post("/upload")
        async def upload_with_a_sync_session(request: Request, session: Db) -> int:
            size = len(await request.body())
            attempts.append(size)
            raise conflicts_serialization_failure()

    client = serve(app)
    assert client.post("/upload", content=b"x" * 1000).status_code == 503
    assert attempts == [1000] * 4  # replayed: three retries of a small body
    attempts.clear()
    assert client.post("/upload", content=b"x" * (REPLAY_LIMIT + 1)).status_code == 503
    assert attempts == [REPLAY_LIMIT + 1]  # too large to keep: not retried


def conflicts_serialization_failure() -> sa.exc.OperationalError:
    class SerializationFailure(Exception):
        sqlstate = "40001"

    return sa.exc.OperationalError("COMMIT", {}, SerializationFailure("could not serialize access"))
