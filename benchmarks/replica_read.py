"""What a read from a replica costs against the same read from the primary, per request.

Usage: ``.venv/bin/python benchmarks/replica_read.py [rounds] [requests]`` (about half a minute;
``--smoke``: one round of 10 requests). Needs the standby rig: ``scripts/standby start`` (a primary on
127.0.0.1:5440, hot standbys on 5441 and 5442).

The same ``GET /items/{id}`` (a primary-key read in a ``READ_ONLY`` request session), called
in-process as uvicorn calls it, sequentially, for both twins and three set-ups interleaved over
rounds: ``primary`` (a maker without replicas), ``standby, no routing`` (a maker whose database
is the first standby: the server's own cost), ``replica`` (a maker with the two standbys: round
robin), ``replica + position`` (the same, with an ``X-DB-Position`` the standbys have replayed: one
more round trip to check it on the replica). The table gives the median wall time per request and
its ratio to the ``primary`` cell of the same twin and round (median over rounds).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess import call

PRIMARY = "postgresql://postgres@127.0.0.1:5440/test"
REPLICAS = ["postgresql://postgres@127.0.0.1:5441/test", "postgresql://postgres@127.0.0.1:5442/test"]
ROWS = 1000
SETUPS = ("primary", "standby, no routing", "replica", "replica + position")


def prepare() -> str:
    """The table, filled on the primary and replayed by both standbys; a position they have replayed."""
    engine = sa.create_engine(PRIMARY.replace("://", "+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS bench_replica_items (id int PRIMARY KEY, name text NOT NULL)"
        )
        connection.exec_driver_sql(
            f"INSERT INTO bench_replica_items SELECT g, 'item ' || g FROM generate_series(1, {ROWS}) g "
            "ON CONFLICT DO NOTHING"
        )
        position = str(connection.exec_driver_sql("SELECT CAST(pg_current_wal_lsn() AS text)").scalar())
    engine.dispose()
    for replica in REPLICAS:
        standby = sa.create_engine(replica.replace("://", "+psycopg://", 1), isolation_level="AUTOCOMMIT")
        with standby.connect() as connection:
            deadline = time.monotonic() + 10
            check = "SELECT pg_last_wal_replay_lsn() >= CAST(%(p)s AS pg_lsn)"
            while not connection.exec_driver_sql(check, {"p": position}).scalar():
                assert time.monotonic() < deadline, f"{replica} did not replay the table in 10 s"
                time.sleep(0.01)
        standby.dispose()
    return position


def app_for(maker: Any) -> FastAPI:
    app = FastAPI()
    maker.init_app(app)
    sql = sa.text("SELECT name FROM bench_replica_items WHERE id = :id")
    if isinstance(maker, FastAPISessionMaker):
        Reader = Annotated[Session, maker.depends(policy="read_only")]

        @app.get("/items/{item_id}")
        def read(item_id: int, session: Reader) -> str:
            return str(session.execute(sql, {"id": item_id}).scalar_one())

    else:
        AsyncReader = Annotated[AsyncSession, maker.depends(policy="read_only")]

        @app.get("/items/{item_id}")
        async def aread(item_id: int, session: AsyncReader) -> str:
            return str((await session.execute(sql, {"id": item_id})).scalar_one())

    return app


async def cell(app: Any, requests: int, headers: list[tuple[bytes, bytes]]) -> float:
    """Median wall µs per request over ``requests`` sequential requests."""
    times = []
    for n in range(requests):
        started = time.perf_counter()
        status = await call(app, "GET", f"/items/{n % ROWS + 1}", extra=headers)
        times.append(time.perf_counter() - started)
        assert status == 200, status
    return statistics.median(times) * 1e6


async def measure(rounds: int, requests: int) -> list[dict[str, Any]]:
    position = prepare()
    makers: dict[tuple[str, str], Any] = {}
    for twin, cls in (("sync", FastAPISessionMaker), ("async", AsyncFastAPISessionMaker)):
        makers[(twin, "primary")] = cls(PRIMARY)
        makers[(twin, "standby, no routing")] = cls(REPLICAS[0])
        makers[(twin, "replica")] = cls(PRIMARY, replica_uris=REPLICAS)
    apps = {key: app_for(maker) for key, maker in makers.items()}
    token = [(b"x-db-position", position.encode())]
    samples: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    try:
        for key, app in apps.items():  # warm-up: pools filled, replicas checked
            await cell(app, 20, token if key[1] == "replica" else [])
        for _ in range(rounds):
            for twin in ("sync", "async"):
                this_round = {}
                for setup in SETUPS:
                    app = apps[(twin, "replica" if setup == "replica + position" else setup)]
                    headers = token if setup == "replica + position" else []
                    this_round[setup] = await cell(app, requests, headers)
                    samples.setdefault((twin, setup), []).append(this_round[setup])
                for setup in SETUPS:
                    ratios.setdefault((twin, setup), []).append(this_round[setup] / this_round["primary"])
    finally:
        for maker in makers.values():
            if isinstance(maker, FastAPISessionMaker):
                maker.dispose()
            else:
                await maker.dispose()
    return [
        {
            "twin": twin,
            "setup": setup,
            "us": statistics.median(samples[(twin, setup)]),
            "ratio": statistics.median(ratios[(twin, setup)]),
        }
        for twin in ("sync", "async")
        for setup in SETUPS
    ]


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    numbers = [int(a) for a in argv if a.isdigit()]
    default = (1, 10) if smoke else (7, 300)
    rounds, requests = (*numbers, *default[len(numbers) :])[:2]
    rows = asyncio.run(measure(rounds, requests))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{now}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load}")
    print(f"{rounds} interleaved rounds x {requests} sequential requests per cell, in-process ASGI")
    print()
    print("| twin | set-up | median µs / request | ratio to primary |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['twin']} | {row['setup']} | {row['us']:,.0f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
