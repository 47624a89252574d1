"""Throughput ratios: this library against the best hand-written pattern, the tutorial and a bare app.

Usage::

    .venv/bin/python benchmarks/throughput.py            # full run: SQLite + PostgreSQL
    .venv/bin/python benchmarks/throughput.py --smoke    # a few seconds: SQLite (CI)
    .venv/bin/python benchmarks/throughput.py --peers    # also the peer libraries (benchmarks/peers/)
    # Python 3.11 and 3.12 interleaved in one run (VENV=.venv-3.12 PYTHON=python3.12 scripts/install dev):
    .venv/bin/python benchmarks/throughput.py --python .venv-3.12/bin/python --repeats 3 --docs

Every approach is a tiny app in ``benchmarks/apps/`` served by uvicorn (one worker, 127.0.0.1,
no access log) in a process of its own (``serve.py``: the test suite's ``Server`` helper).
Load comes from another process: ``wrk`` (``scripts/install-wrk``), else ``loadgen.py``.
Approaches are interleaved (A B C A B C ...), each round in a rotated order, and repeated; the
tables give medians, and each ratio is the median over rounds of the approach's throughput
divided by its baseline's *in the same round*: the best hand-written pattern of the same kind
(sync or async: ``apps/handwritten_*.py``) for the database endpoints, the bare FastAPI app for
the endpoint without database. A second column gives the ratio to the FastAPI tutorial pattern
(``apps/tutorial_*.py``, whose POST also reloads the row with ``refresh()``).

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import loadgen
from harness import (
    APPROACHES,
    BY_NAME,
    ENDPOINTS,
    HERE,
    OWN_PYTHON,
    RESULTS,
    ROOT,
    Approach,
    Database,
    add_python,
    app_path,
    count_rows,
    drop_database,
    fmt,
    machine,
    median_ratio,
    prepare_database,
    python_for,
    rotated,
)

DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMOKE_APPROACHES = ["ours-sync", "ours-async", "handwritten-sync", "handwritten-async", "tutorial-sync"]
OVERSUB_APPROACHES = [
    "ours-sync",
    "ours-async",
    "handwritten-sync",
    "handwritten-async",
    "tutorial-sync",
    "tutorial-async",
]


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
    max_overflow: int
    oversub_pool: int
    oversub_connections: int
    loadgen: str
    pin: bool = False
    """``--pin``: the server on the first CPU, the load generator on the others (see ``cpus``)."""


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


# -- servers -----------------------------------------------------------------------------------


class BenchServer:
    """``serve.py <module>`` in a process of its own (the approach's Python), with its CPU and RSS."""

    def __init__(
        self,
        approach: Approach,
        db: Database,
        pool_size: int,
        pool_timeout: float,
        max_overflow: int,
        cpus: set[int] | None = None,
    ) -> None:
        env = {
            **os.environ,
            **db.env(),
            "BENCH_POOL_SIZE": str(pool_size),
            "BENCH_MAX_OVERFLOW": str(max_overflow),
            "BENCH_POOL_TIMEOUT": str(pool_timeout),
            "PYTHONPATH": app_path(approach),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        self.process = subprocess.Popen(
            [str(python_for(approach)), str(HERE / "serve.py"), approach.module],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        if cpus is not None:  # before uvicorn starts: its threads (and the worker threads) inherit it
            os.sched_setaffinity(self.process.pid, cpus)
        assert self.process.stdout is not None
        # serve.py prints the URL once uvicorn has started (or exits: then the line is empty);
        # a peer may log to standard output before it (FastSQLA and fastapi-sqla do, at start-up)
        line = self.process.stdout.readline()
        while line and not line.startswith("LISTENING "):
            line = self.process.stdout.readline()
        if not line.startswith("LISTENING "):
            output = self.output()  # read before stop() closes the log
            self.stop()
            raise RuntimeError(f"server did not start: {line.strip()} {output}")
        self.url = line.split()[1]
        # Whatever the server writes to standard output from now on is read and dropped: a full
        # pipe would stop a server that logs there.
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()

    @staticmethod
    def _drain(stream: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for _ in stream:
                pass

    def output(self) -> str:
        if self.log.closed:
            return ""
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
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()  # serve.py stops uvicorn and exits
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


@contextlib.contextmanager
def serving(server: BenchServer) -> Iterator[BenchServer]:
    """``server``, stopped when the block ends."""
    try:
        yield server
    finally:
        server.stop()


# -- load --------------------------------------------------------------------------------------


def choose_loadgen(wanted: str) -> str:
    if wanted == "httpx":
        return wanted
    if loadgen.wrk_available():
        return "wrk"
    if wanted == "wrk":
        raise SystemExit("wrk is not installed: run scripts/install-wrk (or pass --loadgen httpx)")
    print(loadgen.NO_WRK, flush=True)
    return "httpx"


def cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """With ``--pin``: the CPUs of the server (the first one this process may use) and of the load
    generator (the others); ``(None, None)`` without it, or with a single CPU.

    On a machine of two CPUs, the server, wrk and the database otherwise move between both: the
    same code measured twice in one round differed by up to 0.5x there, pinned by up to 0.16x
    (docs/benchmarks.md, 2026-12-07). The database's processes are left where the system puts them.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2:
        return None, None
    return {allowed[0]}, set(allowed[1:])


def measure(run: Run, server: BenchServer, db: Database, cell: Cell, connections: int) -> None:
    s = run.settings
    before = count_rows(db) if cell.endpoint == "post" else 0
    load_cpus = cpus(s.pin)[1]

    def drive(seconds: float) -> dict[str, float]:
        return loadgen.drive(s.loadgen, server.url, cell.endpoint, connections, seconds, cpus=load_cpus)

    warm = drive(s.warmup) if s.warmup > 0 else None
    cpu0 = server.cpu_seconds()
    load = drive(s.duration)
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
            for name in rotated(s.approaches, rep):
                endpoints = endpoints_for(BY_NAME[name], db_index)
                if endpoints:
                    serve_one(run, name, databases[db_name], endpoints, rep, "main")
        for db_name in s.dbs:
            for name in rotated(s.oversub_approaches, rep):
                serve_one(run, name, databases[db_name], ["get"], rep, "oversub")


def serve_one(run: Run, name: str, db: Database, endpoints: list[str], rep: int, scenario: str) -> None:
    s = run.settings
    main = scenario == "main"
    pool_size = s.pool_size if main else s.oversub_pool
    connections = s.connections if main else s.oversub_connections
    pool_timeout = 30.0 if main else 5.0
    max_overflow = s.max_overflow if main else 0  # oversubscribed: exactly the pool, no overflow
    try:
        server = BenchServer(BY_NAME[name], db, pool_size, pool_timeout, max_overflow, cpus(s.pin)[0])
        with serving(server):
            for endpoint in endpoints:
                cell = Cell(scenario, rep, db.name, endpoint, name)
                measure(run, server, db, cell, connections)
                run.cells.append(cell)
                progress(cell)
            key = f"{name}/{db.name}"
            run.peak_rss_mb[key] = max(run.peak_rss_mb.get(key, 0.0), server.peak_rss_mb())
    except RuntimeError as exc:
        for endpoint in endpoints:
            cell = Cell(scenario, rep, db.name, endpoint, name, ok=False, note=str(exc)[:300])
            run.cells.append(cell)
            progress(cell)


# -- summary -----------------------------------------------------------------------------------


def summarize(run: Run) -> list[dict[str, Any]]:
    """One row per (scenario, db, endpoint, approach): medians and the median per-round ratio."""
    groups: dict[tuple[str, str, str, str], list[Cell]] = {}
    rounds: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
    for cell in run.cells:
        groups.setdefault((cell.scenario, cell.db, cell.endpoint, cell.approach), []).append(cell)
        # /ping is measured once per round, with the first database: its baseline is found there
        db = "-" if cell.endpoint == "ping" else cell.db
        rounds.setdefault((cell.scenario, db, cell.endpoint), {}).setdefault(cell.rep, {})[cell.approach] = (
            cell.rps
        )
    rows = []
    for (scenario, db, endpoint, name), cells in groups.items():
        approach = BY_NAME[name]
        baseline, second = approach.baseline(endpoint), approach.second_baseline(endpoint)
        per_round = list(rounds[(scenario, "-" if endpoint == "ping" else db, endpoint)].values())
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
                "ratio": median_ratio(per_round, name, baseline),
                "ratio_tutorial": median_ratio(per_round, name, second) if second else None,
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
    for ours in [a for a in run.settings.approaches if BY_NAME[a].ours]:
        approach = BY_NAME[ours]
        floor = 1.05 if approach.kind == "sync" else 1.00  # issue 14: sync >= 1.05x, async >= 1.00x
        for db in run.settings.dbs:
            for endpoint in ("get", "post"):
                row = main.get((db, endpoint, ours))
                ratio = row["ratio"] if row else None
                targets.append(
                    (
                        f"{ours} >= {floor:.2f}x {approach.baseline(endpoint)}, {db} {endpoint}",
                        None if ratio is None else ratio >= floor,
                        "not measured" if ratio is None else f"{ratio:.2f}x",
                    )
                )
                peers = [
                    main[(db, endpoint, a.name)]
                    for a in APPROACHES
                    if a.peer
                    and a.kind == approach.kind
                    and (db, endpoint, a.name) in main
                    and not approach.tag
                ]
                peers = [p for p in peers if p["ratio"] is not None]
                if peers and ratio is not None:
                    best = max(peers, key=lambda p: p["ratio"])
                    targets.append(
                        (
                            f"{ours} ahead of {approach.kind} peers, {db} {endpoint}",
                            all(ratio > p["ratio"] for p in peers),
                            f"{ratio:.2f}x vs best peer {best['approach']} {best['ratio']:.2f}x",
                        )
                    )
        row = main.get(("-", "ping", ours)) or main.get((run.settings.dbs[0], "ping", ours))
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


def markdown(run: Run, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = run.settings
    lines = [
        f"Date: {meta['date']}. Machine: {meta['machine']['cpu']} ({meta['machine']['nproc']} CPUs"
        f" shared, load average at start {meta['machine']['loadavg']}), {meta['machine']['system']}.",
        "",
        f"Settings: {s.repeats} interleaved rounds, {s.duration:g} s per cell after {s.warmup:g} s of"
        f" warm-up, {s.connections} connections, pool of {s.pool_size} (max_overflow {s.max_overflow})"
        f" for every approach; load generator `{s.loadgen}`; uvicorn, one worker (uvloop, httptools),"
        " no access log.",
        "Ratio: median over rounds of throughput / the same round's baseline (the best hand-written"
        " pattern of the same kind; bare FastAPI for the endpoint without database); the next"
        " column, the same against the tutorial pattern (commit + refresh).",
        "",
        "| scenario | db | endpoint | approach | kind | req/s | ratio | vs | ratio to tutorial"
        " | p50 ms | p99 ms | CPU µs/req | peak RSS MB | non-2xx + errors | rows stored / acked | correct |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        scenario = (
            "main" if r["scenario"] == "main" else f"pool {s.oversub_pool}, {s.oversub_connections} conns"
        )
        rows_check = "-" if r["stored"] is None else f"{r['stored']} / {r['acknowledged']}"
        lines.append(
            f"| {scenario} | {r['db'] if r['endpoint'] != 'ping' else '-'} | {ENDPOINTS[r['endpoint']]}"
            f" | {r['approach']} | {r['kind']} | {r['rps']:.0f} | {fmt(r['ratio'], '.2f')}"
            f" | {r['baseline']} | {fmt(r['ratio_tutorial'], '.2f')} | {r['p50_ms']:.1f}"
            f" | {r['p99_ms']:.1f} | {r['cpu_us_per_req']:.0f}"
            f" | {fmt(r['peak_rss_mb'], '.0f')} | {r['non2xx'] + r['errors']} | {rows_check}"
            f" | {'yes' if r['ok'] else 'NO: ' + '; '.join(r['notes'])[:120]} |"
        )
    for name, note in sorted(run.skipped.items()):
        lines.append(f"| - | - | - | {name} | - | skipped |{' - |' * 9} {note} |")
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


def own_versions() -> dict[str, str]:
    """The versions the approaches without a virtualenv of their own run on (this interpreter)."""
    names = ["fastapi", "starlette", "sqlalchemy", "pydantic", "uvicorn", "fastapi-sessionmaker"]
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


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
    )
    if out.returncode != 0:
        print(f"hop count failed: {out.stderr[-500:]}", flush=True)
        return {}
    counts: dict[str, Any] = json.loads(out.stdout)
    return {a: counts[BY_NAME[a].module] for a in sync}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Throughput ratios (see the module docstring).")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: SQLite, ours + the baselines")
    parser.add_argument("--peers", action="store_true", help="also the peer libraries (benchmarks/peers/)")
    parser.add_argument("--setup", action="store_true", help="with --peers: (re)install every peer first")
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"], help="databases")
    parser.add_argument("--approach", action="append", help="approach names (repeatable)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--duration", type=float, help="seconds per cell")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--max-overflow", type=int, default=10)
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--no-oversub", action="store_true", help="skip the oversubscription cells")
    parser.add_argument(
        "--pin", action="store_true", help="the server on one CPU, the load generator on the others"
    )
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks.md (full run)")
    parser.add_argument(
        "--python",
        action="append",
        type=Path,
        default=[],
        help="also serve ours and the baselines with this interpreter, interleaved (repeatable;"
        " e.g. .venv-3.12/bin/python): rows <approach>@<version>, each compared with its own Python",
    )
    args = parser.parse_args(argv)

    smoke = args.smoke
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}
    if args.peers:
        import peers  # opt-in: installs each peer into its own virtualenv on first use

        skipped, notes = peers.enable(args.approach, force=args.setup)
    unknown = sorted(set(args.approach or []) - set(BY_NAME) - set(skipped))
    if unknown:
        parser.error(
            f"unknown approach {', '.join(unknown)}: choose from {', '.join(BY_NAME)} (peers: --peers)"
        )
    approaches = args.approach or (SMOKE_APPROACHES if smoke else [a.name for a in APPROACHES])
    approaches = [a for a in approaches if a not in skipped]
    for python in args.python:
        tag = add_python(python)
        approaches += [a + tag for a in approaches if not BY_NAME[a].tag and a + tag in BY_NAME]
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
        max_overflow=args.max_overflow,
        oversub_pool=2,
        oversub_connections=64,
        loadgen=choose_loadgen(args.loadgen),
        pin=args.pin,
    )
    run = Run(settings, skipped=skipped, notes={a: n for a, n in notes.items() if a in approaches})
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
    own = peers.project_versions() if args.peers and OWN_PYTHON[0] != Path(sys.executable) else None
    meta["versions"] = {"ours and the baselines": own or own_versions()}
    if args.peers:
        meta["versions"].update(peers.versions(approaches))
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
        write_docs(table, peers=args.peers)
    ours_ok = all(c.ok for c in run.cells if BY_NAME[c.approach].ours)
    base_ok = all(c.ok for c in run.cells if c.scenario == "main" and not BY_NAME[c.approach].peer)
    print(f"correctness check: {'PASSED' if ours_ok and base_ok else 'FAILED'}")
    print(f"results: {RESULTS / f'bench-{stamp}.json'} ({meta['elapsed_s']} s)")
    return 0 if ours_ok and base_ok else 1


APPS_NOTE = (
    "The apps (`benchmarks/apps/`, one file per approach) serve the same three endpoints with the"
    " same model, the same pydantic response model and the same pool (32 + 10 overflow unless the"
    " settings below say otherwise), served by uvicorn with uvloop and httptools."
    " Each session layer is used as its docs show, defaults included: ours with `init_app` and"
    " `DBSession`/`AsyncDBSession` (the guard commits; the POST calls `flush()` for the id; dead"
    " connections are caught by its socket check on checkout, no round trip), and in the"
    " `-declared` rows `@db.with_session` endpoints reading `db.session` (no dependency);"
    " the reference, the best hand-written pattern (`Depends(get_db)` over a `SessionLocal()` ..."
    " `yield` ... `close()` generator, `expire_on_commit=False`, the engine options ours uses;"
    " the POST flushes for the id, builds the response, then calls `commit()`; no `refresh()`; no"
    " dead-connection handling); the tutorial pattern as in the FastAPI docs (`Depends(get_db)`,"
    " `commit()` then `refresh()` in the POST, one more SELECT per insert; the async one is the same"
    " code on `AsyncSession`; no dead-connection handling). Every approach is served by the same"
    " harness (`benchmarks/serve.py`, the test suite's uvicorn helper), so peak RSS includes the"
    " same test helpers for every approach."
    " The machine is shared: read the ratios, which compare cells measured next to each other,"
    " not the absolute numbers.\n\n"
)
PEERS_NOTE = (
    "With `--peers` (`benchmarks/peers/`), the peers take part with their own commit at the end of"
    " the request (fastapi-utils' `get_db` with the `pool_pre_ping=True` its `get_engine` sets,"
    " fastapi-sqla's middleware, FastSQLA's `Session`, fastapi-async-sqlalchemy with"
    " `commit_on_exit=True`, advanced-alchemy with `commit_mode='autocommit'`), and every approach"
    " runs on the same Python (3.12 when installed, as FastSQLA needs it) in its own virtualenv.\n\n"
)


def write_docs(table: str, *, peers: bool) -> None:
    compared = "a bare FastAPI app, and the peers" if peers else "a bare FastAPI app"
    flag = " --peers" if peers else ""
    DOCS_PAGE.write_text(
        "# Benchmarks\n\n"
        "Throughput of fastapi-sessionmaker against the best hand-written pattern (`SessionLocal` +"
        " `get_db`, explicit `commit()`, no `refresh()`), the FastAPI tutorial pattern (the same with"
        f" `refresh()` after the commit) and {compared}, measured by `benchmarks/throughput.py` in one"
        " run: approaches interleaved, repeated, medians, and ratios to the baseline measured in the"
        " same round. The numbers are this machine's. The project claims a ratio only where the"
        " Targets table at the end of the page says it is met in this run; every other cell is a"
        " measurement, not a claim.\n\n"
        f"Reproduce: `scripts/install-wrk`, then `.venv/bin/python benchmarks/throughput.py{flag} --docs`"
        " (with `--python .venv-3.12/bin/python --repeats 3`, as for the run below, Python 3.12 is"
        " interleaved in the same run; `VENV=.venv-3.12 PYTHON=python3.12 scripts/install dev` first)"
        " (full; with `--peers`, about 25 min, the peers installed into `benchmarks/peers/.venvs/`),"
        " or `.venv/bin/python benchmarks/throughput.py --smoke` (seconds). The CPU each approach"
        " costs per request, measured in-process with no HTTP noise, is in"
        " [benchmarks-cpu.md](benchmarks-cpu.md).\n\n" + APPS_NOTE + (PEERS_NOTE if peers else "") + table
    )


if __name__ == "__main__":
    sys.exit(main())
