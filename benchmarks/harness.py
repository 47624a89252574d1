"""What the throughput runner and the in-process CPU runner share: approaches, databases, ratios.

``throughput.py`` and ``inprocess.py`` import it (``benchmarks/`` is not a package: they put
this folder on ``sys.path``); the opt-in peer comparison (``peers/``) adds its approaches here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"
RESULTS = HERE / "results"

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_DB = f"fsm_bench_{os.getpid()}"  # one per run: runs side by side (a smoke test) do not collide
ROWS = 10_000
ENDPOINTS = {"get": "GET /items/{id}", "post": "POST /items", "ping": "GET /ping (no database)"}


@dataclass(frozen=True)
class Approach:
    """One app, ``<app_dir>/<module>.py``, served by ``python`` (``None``: :data:`OWN_PYTHON`)."""

    name: str
    module: str
    kind: str  # "sync", "async" or "bare"
    ours: bool = False
    app_dir: Path = APPS
    python: Path | None = None
    peer: str | None = None  # the peer library (``peers/``), for its notes and versions
    tag: str = ""  # "@3.12": a copy run by another interpreter (``--python``), compared with its own

    def baseline(self, endpoint: str) -> str:
        """The reference of this approach's ratios on ``endpoint``: the best hand-written pattern
        of the same kind (on the same Python) for the database endpoints, the bare app for ``/ping``."""
        if endpoint == "ping" or self.kind == "bare":
            return f"bare{self.tag}"
        return f"handwritten-{self.kind}{self.tag}"

    def second_baseline(self, endpoint: str) -> str | None:
        """The tutorial pattern (commit + refresh), shown beside the reference; none for ``/ping``."""
        if endpoint == "ping" or self.kind == "bare":
            return None
        return f"tutorial-{self.kind}{self.tag}"


APPROACHES = [
    Approach("ours-sync", "self_sync", "sync", ours=True),
    Approach("ours-async", "self_async", "async", ours=True),
    Approach("ours-sync-declared", "self_sync_declared", "sync", ours=True),
    Approach("ours-async-declared", "self_async_declared", "async", ours=True),
    Approach("handwritten-sync", "handwritten_sync", "sync"),
    Approach("handwritten-async", "handwritten_async", "async"),
    Approach("tutorial-sync", "tutorial_sync", "sync"),
    Approach("tutorial-async", "tutorial_async", "async"),
    Approach("bare", "bare", "bare"),
]
"""The approaches the README's claims rest on; ``peers.enable()`` appends the peers."""
BY_NAME = {a.name: a for a in APPROACHES}

OBSERVABILITY = [
    Approach("ours-sync-observed", "self_sync_observed", "sync", ours=True),
    Approach("ours-sync-traced", "self_sync_traced", "sync", ours=True),
    Approach("ours-async-observed", "self_async_observed", "async", ours=True),
    Approach("ours-async-traced", "self_async_traced", "async", ours=True),
]
"""Ours with observability on (``apps/_observed.py``), beside ``ours-*`` (off): ``--observability``."""

OWN_PYTHON = [Path(sys.executable)]
"""The interpreter of the approaches without one of their own: this one, or the peers' ``project``."""


def add_approaches(approaches: list[Approach]) -> None:
    APPROACHES.extend(approaches)
    BY_NAME.update((a.name, a) for a in approaches)


def python_version(python: Path | str) -> str:
    """``"3.12"`` for an interpreter."""
    out = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def add_python(python: Path) -> str:
    """Copies of ours and the baselines served by ``python`` (a virtualenv with this project
    installed, e.g. ``.venv-3.12/bin/python``), named ``<approach>@<version>``; the tag."""
    tag = f"@{python_version(python)}"
    own = [a for a in APPROACHES if a.peer is None and a.python is None and not a.tag]
    add_approaches([dataclasses.replace(a, name=a.name + tag, python=python, tag=tag) for a in own])
    return tag


def python_for(approach: Approach) -> Path:
    return approach.python or OWN_PYTHON[0]


def app_path(approach: Approach) -> str:
    """``sys.path`` for a child serving ``approach``: its folder, then ``apps/`` (``_common``)."""
    return os.pathsep.join(dict.fromkeys([str(approach.app_dir), str(APPS)]))


# -- databases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    name: str
    sync_url: str
    async_url: str

    def env(self) -> dict[str, str]:
        """The environment the apps read their URLs from (``apps/_common.py``)."""
        return {"BENCH_SYNC_URL": self.sync_url, "BENCH_ASYNC_URL": self.async_url}


def _sqlite_path() -> Path:
    return RESULTS / f"bench-sqlite-{os.getpid()}.db"


def prepare_database(name: str) -> Database:
    """Recreate the benchmark database with ``items`` holding ``ROWS`` rows."""
    if name == "sqlite":
        RESULTS.mkdir(parents=True, exist_ok=True)
        drop_database(name)
        path = _sqlite_path()
        db = Database(name, f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
    elif name == "postgresql":
        _pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)", f"CREATE DATABASE {PG_DB}")
        db = Database(
            name,
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}",
            f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DB}",
        )
    else:
        raise SystemExit(f"unknown database {name!r}: use sqlite or postgresql")
    engine = sa.create_engine(db.sync_url, poolclass=sa.NullPool)
    with engine.begin() as connection:
        if name == "sqlite":
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        connection.exec_driver_sql(
            "CREATE TABLE items (id INTEGER PRIMARY KEY "
            + ("GENERATED BY DEFAULT AS IDENTITY" if name == "postgresql" else "")
            + ", name VARCHAR(100) NOT NULL, value INTEGER NOT NULL)"
        )
        connection.execute(
            sa.text("INSERT INTO items (id, name, value) VALUES (:id, :name, :value)"),
            [{"id": i, "name": f"item {i}", "value": i} for i in range(1, ROWS + 1)],
        )
    with engine.begin() as connection:
        if name == "postgresql":
            connection.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('items', 'id'), {ROWS})")
            connection.exec_driver_sql("ANALYZE items")
    engine.dispose()
    return db


def drop_database(name: str) -> None:
    if name == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{_sqlite_path()}{suffix}").unlink(missing_ok=True)
    elif name == "postgresql":
        _pg_admin(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")


def _pg_admin(*statements: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))
    finally:
        admin.dispose()


def count_rows(db: Database) -> int:
    engine = sa.create_engine(db.sync_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT count(*) FROM items")).scalar_one())
    finally:
        engine.dispose()


# -- rounds and ratios -------------------------------------------------------------------------


def rotated(names: list[str], rep: int) -> list[str]:
    """``names`` started at a different place each round, so that no approach always goes first."""
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def median_ratio(rounds: list[Mapping[str, float]], name: str, baseline: str) -> float | None:
    """Median over rounds of ``name``'s score / ``baseline``'s score *in the same round*.

    A score is "higher is better" (requests per second, or requests per CPU second); a round in
    which either is missing (or zero) does not count. ``None`` when no round has both.
    """
    ratios = [r[name] / r[baseline] for r in rounds if r.get(name) and r.get(baseline)]
    return statistics.median(ratios) if ratios else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg": load, "system": platform.platform()}
