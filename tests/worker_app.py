"""The app ``tests/test_workers.py`` serves from real worker processes (``uvicorn --workers 2``,
``gunicorn --preload`` with uvicorn workers): both twins in one app, ``POST /hits/sync`` and
``POST /hits/async``, configured by environment variables:

- ``FSM_WORKER_URL``: the database (driverless, each twin picks its driver);
- ``FSM_WORKER_TAG``: every connection is named ``<tag><s|a>-<pid of the process that opened
  it>`` (``application_name``), so ``pg_stat_activity`` shows whose connection each backend is.

Both makers' engines are used at import (``create_all``), before gunicorn ``--preload`` forks; the
importing process's pid and backend pids are kept, so the test can check that no worker uses a
connection its parent opened.
"""

import asyncio
import os
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

URL = os.environ["FSM_WORKER_URL"]
TAG = os.environ["FSM_WORKER_TAG"]
OPTIONS = {"pool_size": 2, "max_overflow": 0}

metadata = sa.MetaData()
hits = sa.Table(
    "worker_hits",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("worker", sa.Integer, nullable=False),
)


def namer(twin: str) -> Any:
    """A ``do_connect`` listener: ``application_name`` = tag, twin and the connecting pid."""

    def name_connection(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        name = f"{TAG}{twin[0]}-{os.getpid()}"
        if twin == "async":  # asyncpg: startup parameters go in server_settings
            cparams["server_settings"] = {**cparams.get("server_settings", {}), "application_name": name}
        else:
            cparams["application_name"] = name

    return name_connection


IMPORT_PID = os.getpid()
IMPORT_BACKENDS: dict[str, int] = {}
BACKEND = sa.text("SELECT pg_backend_pid() FROM pg_sleep(0.02)")

db = FastAPISessionMaker(URL, name="sync", engine_options=OPTIONS)
adb = AsyncFastAPISessionMaker(URL, name="async", engine_options=OPTIONS)
sa.event.listen(db.cached_engine, "do_connect", namer("sync"))
sa.event.listen(adb.cached_engine.sync_engine, "do_connect", namer("async"))
app = FastAPI()
db.init_app(app)
adb.init_app(app)

with db.cached_engine.begin() as connection:  # at import: before gunicorn --preload forks
    metadata.create_all(connection)
    IMPORT_BACKENDS["sync"] = int(connection.execute(BACKEND).scalar_one())


async def use_at_import() -> int:
    async with adb.cached_engine.begin() as connection:
        return int((await connection.execute(BACKEND)).scalar_one())


try:
    asyncio.get_running_loop()
except RuntimeError:  # gunicorn --preload imports outside any event loop: use the engine now
    IMPORT_BACKENDS["async"] = asyncio.run(use_at_import())
# (uvicorn imports the app inside its running loop, in each spawned worker: nothing to share)


def answer(twin: str, backend: int) -> dict[str, Any]:
    """Who served a request: the worker's pid, its backend's, and the importing process's."""
    return {
        "pid": os.getpid(),
        "backend": backend,
        "import_pid": IMPORT_PID,
        "import_backend": IMPORT_BACKENDS.get(twin),
    }


@app.post("/hits/sync")
def hit_sync(session: Session = db.dependency) -> dict[str, Any]:
    session.execute(hits.insert().values(worker=os.getpid()))
    return answer("sync", session.execute(BACKEND).scalar_one())


@app.post("/hits/async")
async def hit_async(session: AsyncSession = adb.dependency) -> dict[str, Any]:
    await session.execute(hits.insert().values(worker=os.getpid()))
    return answer("async", (await session.execute(BACKEND)).scalar_one())
