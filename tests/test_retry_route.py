"""The per-route retry (``db.depends(retries=N)``): the guard re-runs a request whose transaction hit a
serialization failure or deadlock before its status line was sent, with its body replayed.

Real conflicts through a real uvicorn: 8 concurrent clients increment one counter with SERIALIZABLE
read-modify-write transactions (PostgreSQL: 40001; MariaDB: deadlocks), both twins.
"""

import asyncio
import logging
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

from fastapi_sessionmaker import on_commit, on_rollback
from tests import conflicts
from tests.conftest import Maker, MakerFactory

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
    # A retried attempt leaves nothing behind: one commit callback and one task per request.
    assert events.count("commit") == CLIENTS * REQUESTS
    assert events.count("task") == CLIENTS * REQUESTS
    assert "rollback" not in events
