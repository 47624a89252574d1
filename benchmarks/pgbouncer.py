"""What the PgBouncer preset costs: units of work through PgBouncer (transaction mode, the preset on)
against the same units straight to PostgreSQL, sync (psycopg) and async (asyncpg).

Usage: ``.venv/bin/python benchmarks/pgbouncer.py [rounds] [units]`` (about a minute; needs
PostgreSQL on 127.0.0.1:5432 and ``scripts/pgbouncer start``); ``--smoke`` for a run of seconds.

Each unit is one transaction of three parametrised statements that check their own rows
(``tests/pgbouncer_load.py``), run by 20 concurrent clients on a pool of 10 + 10. The two paths
are interleaved over rounds; the table gives the median units per second and the median of each
round's ratio (through PgBouncer / direct). Every unit must succeed with the right rows, on both
paths, or the script fails (the correctness check).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker  # noqa: E402
from tests.pgbouncer_load import Outcome, run_async, run_sync  # noqa: E402 - after the path

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CLIENTS = 20
POOL = {"pool_size": 10, "max_overflow": 10}


def measure(twin: str, url: str, preset: str | None, clients: int, units: int) -> tuple[float, Outcome]:
    """Units per second of one cell, and what it did."""
    if twin == "sync":
        maker = FastAPISessionMaker(url, pgbouncer=preset, engine_options=POOL)
        run_sync(maker, clients, 1)  # warm the pool
        started = time.perf_counter()
        outcome = run_sync(maker, clients, units)
        elapsed = time.perf_counter() - started
        maker.dispose()
        return outcome.units / elapsed, outcome

    async def main() -> tuple[float, Outcome]:
        maker = AsyncFastAPISessionMaker(url, pgbouncer=preset, engine_options=POOL)
        await run_async(maker, clients, 1)
        started = time.perf_counter()
        outcome = await run_async(maker, clients, units)
        elapsed = time.perf_counter() - started
        await maker.dispose()
        return outcome.units / elapsed, outcome

    return asyncio.run(main())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.machine()


def with_database(run: Callable[[str], int]) -> int:
    name = f"fsm_bench_{os.getpid()}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        return run(name)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


def main() -> int:
    smoke = "--smoke" in sys.argv
    numbers = [int(arg) for arg in sys.argv[1:] if arg.isdigit()]
    rounds, units = numbers + [1, 3][len(numbers) :] if smoke else numbers + [5, 50][len(numbers) :]
    clients = 4 if smoke else CLIENTS

    def run(database: str) -> int:
        paths = {
            "direct": (f"postgresql://postgres@127.0.0.1:5432/{database}", None),
            "pgbouncer": (f"postgresql://postgres@127.0.0.1:6432/{database}", "transaction"),
        }
        rates: dict[tuple[str, str], list[float]] = {}
        failures: list[str] = []
        for _ in range(rounds):
            for twin in ("sync", "async"):
                for path, (url, preset) in paths.items():
                    rate, outcome = measure(twin, url, preset, clients, units)
                    rates.setdefault((twin, path), []).append(rate)
                    if outcome.units != clients * units or outcome.wrong or outcome.errors:
                        failures.append(f"{twin} {path}: {outcome.summary()}")
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        print(
            f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {cpu_model()}"
            f" ({os.cpu_count()} CPUs, shared), load average at the end {load}, Python "
            f"{platform.python_version()}, {platform.platform()}."
        )
        print(
            f"Settings: {rounds} interleaved rounds, {clients} clients x {units} units of 3 statements, "
            f"pool {POOL['pool_size']} + {POOL['max_overflow']}; PgBouncer default_pool_size 20."
        )
        print()
        print("| twin | driver | direct units/s | PgBouncer (preset) units/s | ratio |")
        print("|---|---|---:|---:|---:|")
        for twin, driver in (("sync", "psycopg"), ("async", "asyncpg")):
            direct, bouncer = rates[(twin, "direct")], rates[(twin, "pgbouncer")]
            ratio = statistics.median(b / d for b, d in zip(bouncer, direct, strict=True))
            print(
                f"| {twin} | {driver} | {statistics.median(direct):,.0f} | "
                f"{statistics.median(bouncer):,.0f} | {ratio:.2f} |"
            )
        print()
        if failures:
            print("correctness check: FAILED")
            for failure in failures:
                print(f"  {failure}")
            return 1
        print("correctness check: PASSED (every unit committed, every row its own)")
        return 0

    return with_database(run)


if __name__ == "__main__":
    sys.exit(main())
