"""Ratio benchmarks: this library against the FastAPI tutorial pattern, a bare app and the peers.

Usage::

    .venv/bin/python benchmarks/run.py            # full run (~25 min): SQLite + PostgreSQL, peers
    .venv/bin/python benchmarks/run.py --smoke    # a few seconds: SQLite, ours + tutorial (CI)

Every approach is a tiny app in ``benchmarks/apps/`` served by uvicorn (one worker, 127.0.0.1,
no access log) from its own virtualenv (peers: ``benchmarks/setup_peers.py``, run automatically
when one is missing). Load comes from another process: ``wrk`` when installed (installed with
apt-get when missing and running as root, full runs only), else ``benchmarks/loadgen.py``.
Approaches are interleaved (A B C A B C ...), each round in a rotated order, and repeated; the
tables give medians, and each ratio is the median over rounds of the approach's throughput
divided by its baseline's *in the same round*: the tutorial pattern of the same kind (sync or
async) for the database endpoints, the bare FastAPI app for the endpoint without database.

Every cell also checks correctness: every response 2xx, and rows stored = writes acknowledged
(rows counted before and after the POST cell against the 2xx answers; ``wrk`` abandons the
requests in flight when it stops, which the server may still complete, so with ``wrk`` the
check is ``acknowledged <= stored <= acknowledged + connections``; with the httpx generator it
is exact). Server CPU per request comes from ``/proc/<pid>/stat`` over the measured window,
peak RSS from ``VmHWM``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"
RESULTS = HERE / "results"
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(HERE))

import setup_peers  # noqa: E402  (benchmarks/ is not a package)

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_DB = f"fsm_bench_{os.getpid()}"  # one per run: runs side by side (a smoke test) do not collide
ROWS = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Approach:
    """One app: ``apps/<module>.py`` run by ``peer``'s virtualenv (``None``: the project's)."""

    name: str
    module: str
    kind: str  # "sync", "async" or "bare"
    peer: str | None = None
    ours: bool = False

    @property
    def baseline(self) -> str:
        return {"sync": "tutorial-sync", "async": "tutorial-async"}.get(self.kind, "bare")


APPROACHES = [
    Approach("ours-sync", "self_sync", "sync", ours=True),
    Approach("ours-async", "self_async", "async", ours=True),
    Approach("tutorial-sync", "tutorial_sync", "sync"),
    Approach("tutorial-async", "tutorial_async", "async"),
    Approach("bare", "bare", "bare"),
    Approach("fastapi-utils", "peer_fastapi_utils", "sync", peer="fastapi-utils"),
    Approach("fastapi-sqla", "peer_fastapi_sqla", "sync", peer="fastapi-sqla"),
    Approach("fastsqla", "peer_fastsqla", "async", peer="fastsqla"),
    Approach(
        "fastapi-async-sqlalchemy",
        "peer_fastapi_async_sqlalchemy",
        "async",
        peer="fastapi-async-sqlalchemy",
    ),
    Approach("advanced-alchemy", "peer_advanced_alchemy", "async", peer="advanced-alchemy"),
]
BY_NAME = {a.name: a for a in APPROACHES}
SMOKE_APPROACHES = ["ours-sync", "ours-async", "tutorial-sync"]
OVERSUB_APPROACHES = ["ours-sync", "ours-async", "tutorial-sync", "tutorial-async"]
ENDPOINTS = {"get": "GET /items/{id}", "post": "POST /items", "ping": "GET /ping (no database)"}


@dataclass(frozen=True)
class Database:
    name: str
    sync_url: str
    async_url: str


@dataclass(frozen=True)
class Settings:
    dbs: list[str]
    approaches: list[str]
    oversub_approaches: list[str]
    repeats: int
    duration: float
    warmup: float
    connections: int
    pool_size: int
    oversub_pool: int
    oversub_connections: int
    loadgen: str


@dataclass
class Cell:
    """One measurement: an approach, a database, an endpoint, one round."""

    scenario: str
    rep: int
    db: str
    endpoint: str
    approach: str
    rps: float = 0.0
    requests: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_req: float = 0.0
    non2xx: int = 0
    errors: int = 0
    acknowledged: int | None = None
    stored: int | None = None
    ok: bool = True
    note: str = ""


@dataclass
class Run:
    settings: Settings
    cells: list[Cell] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    hops: dict[str, Any] = field(default_factory=dict)


# -- databases ---------------------------------------------------------------------------------


def prepare_database(name: str) -> Database:
    """Recreate the benchmark database with ``items`` holding ``ROWS`` rows."""
    if name == "sqlite":
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"bench-sqlite-{os.getpid()}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = Database(name, f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
    elif name == "postgresql":
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
            connection.execute(sa.text(f"CREATE DATABASE {PG_DB}"))
        admin.dispose()
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
            Path(f"{RESULTS / f'bench-sqlite-{os.getpid()}.db'}{suffix}").unlink(missing_ok=True)
    elif name == "postgresql":
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
        admin.dispose()


def count_rows(db: Database) -> int:
    engine = sa.create_engine(db.sync_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SELECT count(*) FROM items")).scalar_one())
    finally:
        engine.dispose()


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OWN_PYTHON = [Path(sys.executable)]
"""The interpreter of ours, the tutorial and bare: this one (smoke), or the ``project`` venv."""


def python_for(approach: Approach) -> Path:
    if approach.peer is None:
        return OWN_PYTHON[0]
    return setup_peers.venv_python(approach.peer)


def use_project_venv() -> None:
    """Run ours, the tutorial and bare from ``benchmarks/.venvs/project`` (the peers' Python)."""
    if not setup_peers.venv_python("project").exists():
        setup_peers.main(["project"])
    if setup_peers.peer_status("project").get("ok"):
        OWN_PYTHON[0] = setup_peers.venv_python("project")
    else:
        print("project venv not available: ours, tutorial and bare run on this interpreter", flush=True)


class Server:
    """``uvicorn apps/<module>:app`` in a subprocess, with its CPU time and peak RSS."""

    def __init__(self, approach: Approach, db: Database, pool_size: int, pool_timeout: float) -> None:
        self.approach = approach
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            BENCH_SYNC_URL=db.sync_url,
            BENCH_ASYNC_URL=db.async_url,
            BENCH_POOL_SIZE=str(pool_size),
            BENCH_POOL_TIMEOUT=str(pool_timeout),
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.pop("PYTHONPATH", None)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        self.process = subprocess.Popen(
            [
                str(python_for(approach)),
                "-m",
                "uvicorn",
                f"{approach.module}:app",
                "--app-dir",
                str(APPS),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=str(APPS),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@contextlib.contextmanager
def serving(approach: Approach, db: Database, pool_size: int, pool_timeout: float) -> Iterator[Server]:
    server = Server(approach, db, pool_size, pool_timeout)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -- load --------------------------------------------------------------------------------------

_WRK_SCRIPT = """
math.randomseed(os.time())
local kind = "%s"
if kind == "post" then
  wrk.method = "POST"
  wrk.body = '{"name":"bench","value":1}'
  wrk.headers["Content-Type"] = "application/json"
end
request = function()
  if kind == "get" then
    return wrk.format("GET", "/items/" .. math.random(1, %d))
  elseif kind == "post" then
    return wrk.format(nil, "/items")
  end
  return wrk.format("GET", "/ping")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"errors":%%d,"timeouts":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def ensure_wrk(allow_install: bool) -> bool:
    if shutil.which("wrk"):
        return True
    if allow_install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, timeout=600)
    return shutil.which("wrk") is not None


def drive(loadgen: str, url: str, kind: str, connections: int, duration: float) -> dict[str, float]:
    """Load ``url`` for ``duration`` seconds; requests, non-2xx, errors, p50/p99 (ms)."""
    if loadgen == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(_WRK_SCRIPT % (kind, ROWS))
        try:
            out = subprocess.run(
                [
                    "wrk",
                    "-t1",
                    f"-c{connections}",
                    f"-d{max(1, round(duration))}s",
                    "--timeout",
                    "10s",
                    "-s",
                    script.name,
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=duration + 60,
                check=False,
            )
        finally:
            os.unlink(script.name)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        raw = json.loads(line.removeprefix("BENCHJSON "))
        return {
            "requests": raw["requests"],
            "duration_s": raw["duration_us"] / 1e6,
            "non2xx": raw["non2xx"],
            "errors": raw["errors"],
            "timeouts": raw["timeouts"],
            "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "in_flight_at_stop": connections,
        }
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            url,
            "--kind",
            kind,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1000:]}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def measure(
    run: Run,
    server: Server,
    db: Database,
    cell: Cell,
    connections: int,
) -> None:
    s = run.settings
    before = count_rows(db) if cell.endpoint == "post" else 0
    warm = drive(s.loadgen, server.url, cell.endpoint, connections, s.warmup) if s.warmup > 0 else None
    cpu0 = server.cpu_seconds()
    load = drive(s.loadgen, server.url, cell.endpoint, connections, s.duration)
    cpu1 = server.cpu_seconds()
    cell.requests = int(load["requests"])
    cell.rps = load["requests"] / load["duration_s"] if load["duration_s"] else 0.0
    cell.p50_ms = load["p50_ms"]
    cell.p99_ms = load["p99_ms"]
    cell.cpu_us_per_req = (cpu1 - cpu0) * 1e6 / cell.requests if cell.requests else 0.0
    cell.non2xx = int(load["non2xx"]) + int(warm["non2xx"] if warm else 0)
    cell.errors = int(load["errors"]) + int(warm["errors"] if warm else 0)
    problems = []
    if cell.non2xx or cell.errors:
        problems.append(f"{cell.non2xx} non-2xx, {cell.errors} socket errors/timeouts")
    if cell.requests == 0:
        problems.append("no response")
    if cell.endpoint == "post":
        time.sleep(0.2)  # let requests abandoned by wrk at its deadline finish
        acked = sum(int(x["requests"] - x["non2xx"]) for x in (warm, load) if x is not None)
        slack = sum(int(x["in_flight_at_stop"]) for x in (warm, load) if x is not None)
        cell.acknowledged = acked
        cell.stored = count_rows(db) - before
        if not acked <= cell.stored <= acked + slack:
            problems.append(f"rows stored {cell.stored} != writes acknowledged {acked} (+{slack} in flight)")
    cell.ok = not problems
    cell.note = "; ".join(problems)


# -- the run -----------------------------------------------------------------------------------


def available(run: Run, approach: Approach) -> bool:
    if approach.name in run.skipped:
        return False
    if approach.peer is None:
        return True
    status = setup_peers.peer_status(approach.peer)
    if not status.get("ok"):
        run.skipped[approach.name] = str(status.get("note", "not available"))
        return False
    if status.get("note"):
        run.notes[approach.name] = str(status["note"])
    return True


def rotated(names: list[str], rep: int) -> list[str]:
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def endpoints_for(approach: Approach, db_index: int) -> list[str]:
    # The endpoint without database is measured once per round (with the first database).
    if approach.kind == "bare":
        return ["ping"] if db_index == 0 else []
    return ["get", "post", "ping"] if db_index == 0 else ["get", "post"]


def progress(cell: Cell) -> None:
    flag = "ok" if cell.ok else f"FAIL ({cell.note})"
    print(
        f"  [{cell.scenario} r{cell.rep + 1}] {cell.db:10} {cell.endpoint:4} {cell.approach:26}"
        f" {cell.rps:8.0f} req/s  p99 {cell.p99_ms:7.1f} ms  {cell.cpu_us_per_req:6.0f} us/req  {flag}",
        flush=True,
    )


def run_all(run: Run, databases: dict[str, Database]) -> None:
    s = run.settings
    for rep in range(s.repeats):
        for db_index, db_name in enumerate(s.dbs):
            db = databases[db_name]
            for name in rotated(s.approaches, rep):
                approach = BY_NAME[name]
                endpoints = endpoints_for(approach, db_index)
                if not endpoints or not available(run, approach):
                    continue
                serve_one(run, approach, db, endpoints, rep, "main", s.pool_size, s.connections, 30.0)
        for db_name in s.dbs:
            db = databases[db_name]
            for name in rotated(s.oversub_approaches, rep):
                approach = BY_NAME[name]
                if available(run, approach):
                    serve_one(
                        run, approach, db, ["get"], rep, "oversub", s.oversub_pool, s.oversub_connections, 5.0
                    )


def serve_one(
    run: Run,
    approach: Approach,
    db: Database,
    endpoints: list[str],
    rep: int,
    scenario: str,
    pool_size: int,
    connections: int,
    pool_timeout: float,
) -> None:
    try:
        with serving(approach, db, pool_size, pool_timeout) as server:
            for endpoint in endpoints:
                cell = Cell(scenario, rep, db.name, endpoint, approach.name)
                measure(run, server, db, cell, connections)
                run.cells.append(cell)
                progress(cell)
            key = f"{approach.name}/{db.name}"
            run.peak_rss_mb[key] = max(run.peak_rss_mb.get(key, 0.0), server.peak_rss_mb())
    except RuntimeError as exc:
        for endpoint in endpoints:
            cell = Cell(scenario, rep, db.name, endpoint, approach.name, ok=False, note=str(exc)[:300])
            run.cells.append(cell)
            progress(cell)


# -- summary -----------------------------------------------------------------------------------


def summarize(run: Run) -> list[dict[str, Any]]:
    """One row per (scenario, db, endpoint, approach): medians and the median per-round ratio."""
    groups: dict[tuple[str, str, str, str], list[Cell]] = {}
    for cell in run.cells:
        groups.setdefault((cell.scenario, cell.db, cell.endpoint, cell.approach), []).append(cell)
    rows = []
    for (scenario, db, endpoint, name), cells in groups.items():
        approach = BY_NAME[name]
        baseline = "bare" if endpoint == "ping" else approach.baseline
        ratios = []
        for cell in cells:
            base = next(
                (
                    c
                    for c in run.cells
                    if (c.scenario, c.db, c.endpoint, c.approach, c.rep)
                    == (scenario, db if endpoint != "ping" else c.db, endpoint, baseline, cell.rep)
                ),
                None,
            )
            if base is not None and base.rps > 0:
                ratios.append(cell.rps / base.rps)
        rss_db = db if endpoint != "ping" else run.settings.dbs[0]
        rows.append(
            {
                "scenario": scenario,
                "db": db,
                "endpoint": endpoint,
                "approach": name,
                "kind": approach.kind,
                "baseline": baseline,
                "rounds": len(cells),
                "rps": statistics.median(c.rps for c in cells),
                "ratio": statistics.median(ratios) if ratios else None,
                "p50_ms": statistics.median(c.p50_ms for c in cells),
                "p99_ms": statistics.median(c.p99_ms for c in cells),
                "cpu_us_per_req": statistics.median(c.cpu_us_per_req for c in cells),
                "peak_rss_mb": run.peak_rss_mb.get(f"{name}/{rss_db}"),
                "non2xx": sum(c.non2xx for c in cells),
                "errors": sum(c.errors for c in cells),
                "acknowledged": sum(c.acknowledged or 0 for c in cells) if endpoint == "post" else None,
                "stored": sum(c.stored or 0 for c in cells) if endpoint == "post" else None,
                "ok": all(c.ok for c in cells),
                "notes": sorted({c.note for c in cells if c.note}),
            }
        )
    order = {a.name: i for i, a in enumerate(APPROACHES)}
    eps = list(ENDPOINTS)
    rows.sort(
        key=lambda r: (r["scenario"] != "main", eps.index(r["endpoint"]), r["db"], order[r["approach"]])
    )
    return rows


def check_targets(run: Run, rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """DESIGN §6 targets: (what, met (None: not measured), detail)."""
    main = {(r["db"], r["endpoint"], r["approach"]): r for r in rows if r["scenario"] == "main"}
    targets: list[tuple[str, bool | None, str]] = []
    for ours in ("ours-sync", "ours-async"):
        kind = BY_NAME[ours].kind
        for db in run.settings.dbs:
            for endpoint in ("get", "post"):
                row = main.get((db, endpoint, ours))
                ratio = row["ratio"] if row else None
                targets.append(
                    (
                        f"{ours} >= 1.00x tutorial-{kind}, {db} {endpoint}",
                        None if ratio is None else ratio >= 1.0,
                        "not measured" if ratio is None else f"{ratio:.2f}x",
                    )
                )
                peers = [
                    main[(db, endpoint, a.name)]
                    for a in APPROACHES
                    if a.peer and a.kind == kind and (db, endpoint, a.name) in main
                ]
                peers = [p for p in peers if p["ratio"] is not None]
                if peers and ratio is not None:
                    best = max(peers, key=lambda p: p["ratio"])
                    targets.append(
                        (
                            f"{ours} ahead of {kind} peers, {db} {endpoint}",
                            all(ratio > p["ratio"] for p in peers),
                            f"{ratio:.2f}x vs best peer {best['approach']} {best['ratio']:.2f}x",
                        )
                    )
        row = main.get((run.settings.dbs[0], "ping", ours))
        ratio = row["ratio"] if row else None
        targets.append(
            (
                f"{ours} no-database endpoint >= 0.98x bare FastAPI",
                None if ratio is None else ratio >= 0.98,
                "not measured" if ratio is None else f"{ratio:.2f}x",
            )
        )
    for row in rows:
        if row["scenario"] == "oversub" and BY_NAME[row["approach"]].ours:
            errors = row["non2xx"] + row["errors"]
            targets.append(
                (
                    f"{row['approach']} oversubscribed ({run.settings.oversub_pool} connections in the pool, "
                    f"{run.settings.oversub_connections} clients), {row['db']}: zero errors",
                    errors == 0 and row["ok"],
                    f"{errors} errors, p99 {row['p99_ms']:.1f} ms",
                )
            )
    return targets


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(run: Run, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = run.settings
    lines = [
        f"Date: {meta['date']}. Machine: {meta['machine']['cpu']} ({meta['machine']['nproc']} CPUs"
        f" shared, load average at start {meta['machine']['loadavg']}), {meta['machine']['system']}.",
        "",
        f"Settings: {s.repeats} interleaved rounds, {s.duration:g} s per cell after {s.warmup:g} s of"
        f" warm-up, {s.connections} connections, pool of {s.pool_size} (max_overflow 0) for every"
        f" approach; load generator `{s.loadgen}`; uvicorn, one worker, no access log.",
        "Ratio: median over rounds of throughput / the same round's baseline (tutorial pattern of"
        " the same kind; bare FastAPI for the endpoint without database).",
        "",
        "| scenario | db | endpoint | approach | kind | req/s | ratio | vs | p50 ms | p99 ms"
        " | CPU µs/req | peak RSS MB | non-2xx + errors | rows stored / acked | correct |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        scenario = (
            "main" if r["scenario"] == "main" else f"pool {s.oversub_pool}, {s.oversub_connections} conns"
        )
        rows_check = "-" if r["stored"] is None else f"{r['stored']} / {r['acknowledged']}"
        lines.append(
            f"| {scenario} | {r['db'] if r['endpoint'] != 'ping' else '-'} | {ENDPOINTS[r['endpoint']]}"
            f" | {r['approach']} | {r['kind']} | {r['rps']:.0f} | {fmt(r['ratio'], '.2f')}"
            f" | {r['baseline']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_us_per_req']:.0f}"
            f" | {fmt(r['peak_rss_mb'], '.0f')} | {r['non2xx'] + r['errors']} | {rows_check}"
            f" | {'yes' if r['ok'] else 'NO: ' + '; '.join(r['notes'])[:120]} |"
        )
    for name, note in sorted(run.skipped.items()):
        lines.append(f"| - | - | - | {name} | - | skipped | - | - | - | - | - | - | - | - | {note} |")
    if run.notes:
        lines += ["", "Notes:"] + [f"- {name}: {note}" for name, note in sorted(run.notes.items())]
    if run.hops:
        lines += [
            "",
            "Worker-thread hops per request (`anyio.to_thread.run_sync` calls, sync approaches):",
            "",
            "| approach | GET /items/{id} | POST /items | GET /ping |",
            "|---|---:|---:|---:|",
        ]
        for name, counts in run.hops.items():
            cells = " | ".join(str(counts.get(k, "-")) for k in ("get", "post", "ping"))
            lines.append(f"| {name} | {cells} |")
    targets = check_targets(run, rows)
    if targets:
        lines += ["", "Targets (DESIGN §6):", "", "| target | met | measured |", "|---|---|---|"]
        for what, met, detail in targets:
            mark = "n/a" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {what} | {mark} | {detail} |")
    lines += ["", "Versions:", ""]
    for name, versions in meta["versions"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines) + "\n"


def versions(run: Run) -> dict[str, dict[str, str]]:
    names = ["fastapi", "starlette", "sqlalchemy", "pydantic", "uvicorn"]
    own = {"python": platform.python_version()}
    own.update({n: metadata.version(n) for n in names})
    own["fastapi-sessionmaker"] = metadata.version("fastapi-sessionmaker")
    if OWN_PYTHON[0] != Path(sys.executable):
        own = dict(setup_peers.peer_status("project").get("versions", own))  # type: ignore[call-overload]
    out = {"ours, tutorial, bare": own}
    for approach in APPROACHES:
        if approach.peer and any(c.approach == approach.name for c in run.cells):
            status = setup_peers.peer_status(approach.peer)
            if status.get("versions"):
                out[approach.name] = dict(status["versions"])  # type: ignore[call-overload]
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg": load, "system": platform.platform()}


def count_hops(approaches: list[str]) -> dict[str, Any]:
    """Run ``count_hops.py`` (in-process ASGI calls with ``anyio.to_thread.run_sync`` counted)."""
    sync = [a for a in approaches if BY_NAME[a].kind == "sync" and BY_NAME[a].peer is None]
    if not sync:
        return {}
    out = subprocess.run(
        [sys.executable, str(HERE / "count_hops.py"), *[BY_NAME[a].module for a in sync]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(APPS),
    )
    if out.returncode != 0:
        print(f"hop count failed: {out.stderr[-500:]}", flush=True)
        return {}
    counts: dict[str, Any] = json.loads(out.stdout)
    return {a: counts[BY_NAME[a].module] for a in sync}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ratio benchmarks (see the module docstring).")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: SQLite, ours + tutorial")
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"], help="databases")
    parser.add_argument("--approach", action="append", choices=list(BY_NAME), help="approaches")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--duration", type=float, help="seconds per cell")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--no-oversub", action="store_true", help="skip the oversubscription cells")
    parser.add_argument("--setup", action="store_true", help="(re)install every peer first")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md (full run)")
    args = parser.parse_args(argv)

    smoke = args.smoke
    approaches = args.approach or (SMOKE_APPROACHES if smoke else [a.name for a in APPROACHES])
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if ensure_wrk(allow_install=not smoke) else "httpx"
    elif loadgen == "wrk" and not ensure_wrk(allow_install=True):
        raise SystemExit("wrk is not installed")
    settings = Settings(
        dbs=args.db or (["sqlite"] if smoke else ["sqlite", "postgresql"]),
        approaches=approaches,
        oversub_approaches=[]
        if args.no_oversub
        else [a for a in (["ours-sync"] if smoke else OVERSUB_APPROACHES) if a in approaches],
        repeats=args.repeats or (1 if smoke else 5),
        duration=args.duration or (1.0 if smoke else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.0 if smoke else 1.0),
        connections=args.connections,
        pool_size=args.pool_size,
        oversub_pool=2,
        oversub_connections=64,
        loadgen=loadgen,
    )
    peers = sorted({BY_NAME[a].peer for a in approaches if BY_NAME[a].peer})
    if not smoke:
        peers.append("project")
    missing = [p for p in peers if args.setup or not setup_peers.venv_python(p).exists()]
    if missing:
        print(f"setting up peers: {', '.join(missing)}", flush=True)
        setup_peers.main([*missing, *(["--force"] if args.setup else [])])

    if not smoke:
        use_project_venv()
    run = Run(settings)
    started = time.monotonic()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}
    print(f"benchmark: {asdict(settings)}", flush=True)
    run.hops = count_hops(approaches)
    databases = {name: prepare_database(name) for name in settings.dbs}
    try:
        run_all(run, databases)
    finally:
        for name in settings.dbs:
            with contextlib.suppress(Exception):
                drop_database(name)
    meta["versions"] = versions(run)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    rows = summarize(run)
    table = markdown(run, rows, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if smoke else "")
    payload = {
        "meta": meta,
        "settings": asdict(settings),
        "summary": rows,
        "cells": [asdict(c) for c in run.cells],
        "skipped": run.skipped,
        "notes": run.notes,
        "hops": run.hops,
        "targets": [{"target": t, "met": m, "measured": d} for t, m, d in check_targets(run, rows)],
    }
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"bench-{stamp}.md").write_text(table)
    print()
    print(table)
    if args.docs:
        write_docs(table, meta)
    ours_ok = all(c.ok for c in run.cells if BY_NAME[c.approach].ours)
    base_ok = all(c.ok for c in run.cells if c.scenario == "main" and not BY_NAME[c.approach].peer)
    print(f"correctness check: {'PASSED' if ours_ok and base_ok else 'FAILED'}")
    print(f"results: {RESULTS / f'bench-{stamp}.json'} ({meta['elapsed_s']} s)")
    return 0 if ours_ok and base_ok else 1


APPS_NOTE = (
    "The apps (`benchmarks/apps/`, one file per approach) serve the same three endpoints with the"
    " same model, the same pydantic response model and the same pool (size 10, no overflow)."
    " Each session layer is used as its docs show, defaults included: ours with `init_app` and"
    " `DBSession`/`AsyncDBSession` (the guard commits; the POST calls `flush()` for the id; dead"
    " connections are caught by its socket check on checkout, no round trip);"
    " the tutorial pattern as in the FastAPI docs (`Depends(get_db)`, `commit()` then"
    " `refresh()` in the POST; the async one is the same code on `AsyncSession`; no dead-connection"
    " handling); the peers with their own commit at the end of the request (fastapi-utils' `get_db`"
    " with the `pool_pre_ping=True` its `get_engine` sets, fastapi-sqla's middleware, FastSQLA's"
    " `Session`, fastapi-async-sqlalchemy with `commit_on_exit=True`, advanced-alchemy with"
    " `commit_mode='autocommit'`). Every approach runs on the same Python (3.12 when installed, as"
    " FastSQLA needs it) in its own virtualenv. The machine is shared: read the ratios, which"
    " compare cells measured next to each other, not the absolute numbers.\n\n"
)


def write_docs(table: str, meta: dict[str, Any]) -> None:
    DOCS_PAGE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PAGE.write_text(
        "# Benchmarks\n\n"
        "Throughput of fastapi-sessionmaker against the FastAPI tutorial pattern (`SessionLocal` +"
        " `get_db`, explicit `commit()`), a bare FastAPI app and the peers, measured by"
        " `benchmarks/run.py` in one run: approaches interleaved, repeated, medians, and ratios to"
        " the baseline measured in the same round. The numbers are this machine's; the ratios are"
        " what the project claims.\n\n"
        "Reproduce: `.venv/bin/python benchmarks/run.py --docs` (full, ~25 min; installs the peers"
        " into `benchmarks/.venvs/`) or `.venv/bin/python benchmarks/run.py --smoke` (seconds)."
        " The CPU each approach costs per request, measured in-process with no HTTP noise, is in"
        " [benchmarks-cpu.md](benchmarks-cpu.md).\n\n" + APPS_NOTE + table
    )


if __name__ == "__main__":
    sys.exit(main())
