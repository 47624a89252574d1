"""CPU cost per request of each approach, without HTTP sockets or a load generator.

Usage::

    .venv/bin/python benchmarks/inprocess.py                     # SQLite + PostgreSQL, ~3 min
    .venv/bin/python benchmarks/inprocess.py --peers             # also the peers, ~10 min
    .venv/bin/python benchmarks/inprocess.py --db postgresql --endpoints get --rounds 9
    .venv/bin/python benchmarks/inprocess.py --smoke             # seconds (CI)
    .venv/bin/python benchmarks/inprocess.py --observability     # what observability costs

``--observability`` measures ours with observability off (``ours-sync``, the default maker: no
listener attached), with statement counts and slow logs on (``ours-sync-observed``) and with
OpenTelemetry on (``ours-sync-traced``), the async twins alike, against the hand-written baseline.

``throughput.py`` measures what users see (throughput under ``wrk``); on a shared two-core machine its
ratios move by several per cent from round to round. This script isolates the session layer:
each approach's app (``benchmarks/apps/``) is imported in a child process and called directly
as an ASGI app on one asyncio loop through uvicorn's own request cycle (httptools), with the real
database behind it: no socket, no HTTP parsing. The child measures its own CPU
time (user + system, all threads) over a fixed number of requests after a warm-up; no other
process shares its counter, so the number moves far less than a throughput does.

Approaches are interleaved and rotated over rounds; the table gives medians and the median
per-round ratio to the best hand-written pattern of the same kind (``bare`` for ``/ping``),
and beside it the ratio to the tutorial pattern (commit + refresh). ``--peers``
adds the peer libraries (``benchmarks/peers/``), each from its own virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl  # the bench extra, as every app is served
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from harness import (
    APPROACHES,
    BY_NAME,
    ENDPOINTS,
    OBSERVABILITY,
    ROOT,
    add_approaches,
    add_python,
    app_path,
    drop_database,
    fmt,
    machine,
    median_ratio,
    prepare_database,
    python_for,
    rotated,
)

# -- child: drive one app ------------------------------------------------------------------------

_LOGGER = logging.getLogger("benchmarks.inprocess")

Message = dict[str, Any]
LAYOUT_VARIABLE = "BENCH_LAYOUT"
NO_GC_VARIABLE = "BENCH_NO_GC"
LAYOUTS = (0, 3, 11, 29, 47, 71, 97, 131)
"""The layouts ``--layouts N`` takes the first N of (classes made before the app is imported)."""


async def call(
    app: Any, method: str, path: str, body: bytes = b"", extra: list[tuple[bytes, bytes]] | None = None
) -> int:
    """One HTTP request through ``app`` as uvicorn would make it (``extra`` headers too); its status."""
    headers = [(b"host", b"127.0.0.1:8000"), *(extra or [])]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    # uvicorn's own request cycle (httptools), writing to a transport that keeps the status line:
    # the app gets the ``receive`` and ``send`` a served request gets, and every approach pays
    # the same response serialization uvicorn does.
    transport = _Transport()
    cycle = RequestResponseCycle(
        scope,  # type: ignore[arg-type]
        transport,
        FlowControl(transport),
        _LOGGER,
        _LOGGER,
        False,  # access_log
        [(b"server", b"uvicorn")],
        asyncio.Event(),
        False,  # expect_100_continue
        True,  # keep_alive
        _response_complete,
    )
    cycle.body = bytearray(body)
    cycle.more_body = False
    cycle.message_event.set()  # the whole body has arrived, as in a small request
    await cycle.run_asgi(app)
    return transport.status


class _Transport(asyncio.Transport):
    """What uvicorn's cycle writes the response to: it keeps the status of the status line."""

    status = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.status:
            self.status = int(bytes(data[9:12]))  # b"HTTP/1.1 200 OK..."

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _response_complete() -> None:
    pass


async def lifespan(app: Any) -> tuple[Callable[[], Awaitable[None]], asyncio.Task[None]]:
    """Run the ASGI lifespan start-up; returns the shutdown step."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    task = asyncio.get_running_loop().create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    answer = await outbox.get()
    if answer["type"] != "lifespan.startup.complete":
        raise SystemExit(f"start-up failed: {answer}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return shutdown, task


def request_for(endpoint: str, n: int) -> tuple[str, str, bytes]:
    if endpoint == "get":
        return "GET", f"/items/{1 + (n * 7919) % 10_000}", b""
    if endpoint == "post":
        return "POST", "/items", json.dumps({"name": f"new {n}", "value": n}).encode()
    return "GET", "/ping", b""


async def drive(
    module: str, endpoints: list[str], warmup: int, requests: int, concurrency: int
) -> dict[str, dict[str, float]]:
    """Serve ``endpoints`` one after the other from one app; per endpoint, CPU and wall µs per request."""
    # --layouts: a few classes more or less before the app (a type version tag each) shift where
    # its types land in CPython's method cache; the parent averages the counts over such layouts.
    for n in range(int(os.environ.get(LAYOUT_VARIABLE, "0"))):
        getattr(type(f"Layout{n}", (), {}), "layout", None)
    app = importlib.import_module(module).app  # found through PYTHONPATH (``harness.app_path``)
    shutdown, _ = await lifespan(app)
    counter = iter(range(10**9))
    results: dict[str, dict[str, float]] = {}
    for endpoint in endpoints:

        async def client(count: int, endpoint: str = endpoint) -> None:
            for _ in range(count):
                status = await call(app, *request_for(endpoint, next(counter)))
                if not 200 <= status < 300:
                    raise SystemExit(f"{module} {endpoint}: status {status}")

        async def batch(total: int) -> None:
            share, extra = divmod(total, concurrency)
            await asyncio.gather(*(client(share + (i < extra)) for i in range(concurrency)))

        await batch(warmup)
        if os.environ.get(NO_GC_VARIABLE):  # --no-gc: no collection falls into the count
            gc.collect()
            gc.disable()
        os.getppid()  # under callgrind (``--instructions``): a dump here ends what came before ...
        cpu, wall = time.process_time(), time.perf_counter()
        await batch(requests)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        os.getpgrp()  # ... and one here is the count: two dumps per endpoint, in order
        results[endpoint] = {"cpu_us": cpu / requests * 1e6, "wall_us": wall / requests * 1e6}
    await shutdown()
    return results


def child_main(args: argparse.Namespace) -> int:
    endpoints = args.endpoint.split(",")
    result = asyncio.run(drive(args.child, endpoints, args.warmup, args.requests, args.concurrency))
    print(json.dumps(result))
    return 0


# -- parent: interleave, repeat, report ----------------------------------------------------------


def run_child(
    python: str, module: str, endpoints: list[str], args: argparse.Namespace, env: dict[str, str]
) -> dict[str, float]:
    """:func:`run_once`, or with ``--instructions --layouts N`` its mean over N layouts."""
    if args.no_gc:
        env = {**env, NO_GC_VARIABLE: "1"}
    if not args.instructions or args.layouts <= 1:
        return run_once(python, module, endpoints, args, env)
    counts = [
        run_once(python, module, endpoints, args, {**env, LAYOUT_VARIABLE: str(layout)})
        for layout in LAYOUTS[: args.layouts]
    ]
    return {endpoint: statistics.fmean(count[endpoint] for count in counts) for endpoint in endpoints}


def run_once(
    python: str, module: str, endpoints: list[str], args: argparse.Namespace, env: dict[str, str]
) -> dict[str, float]:
    """Per endpoint, the CPU µs per request of ``module``, measured by one child process; with
    ``--instructions``, the instructions per request (thousands) counted by callgrind instead."""
    command = [python, str(Path(__file__).resolve()), "--child", module, "--endpoint", ",".join(endpoints)]
    for option in ("warmup", "requests", "concurrency"):
        command += [f"--{option}", str(getattr(args, option))]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "callgrind.out"
        if args.instructions:
            # Counted between the child's os.getppid() and os.getpgrp() (see drive()): start-up,
            # imports and warm-up are left out; every thread counts. Repeatable under any load.
            # A dump, not --zero-before, starts each count: --zero-before zeroes the calling
            # thread's costs only, so what a worker thread did before (the sync app's start-up
            # check, with its imports) fell into the first count: 340 million instructions once,
            # 1.7 million per request over 200. Odd dumps are what came before, even ones the counts.
            command = [
                *("valgrind", "--tool=callgrind", "--dump-before=getppid", "--dump-before=getpgrp"),
                f"--callgrind-out-file={out_file}",
                *command,
            ]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{module}: {(out.stderr or out.stdout).strip()[-1500:]}")
        if args.instructions:
            counts = {}
            for n, endpoint in enumerate(endpoints, 1):
                dump = Path(f"{out_file}.{2 * n}").read_text()
                total = next(
                    int(line.split()[1]) for line in dump.splitlines() if line.startswith("summary:")
                )
                counts[endpoint] = total / args.requests / 1000
            return counts
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {endpoint: float(measured[endpoint]["cpu_us"]) for endpoint in endpoints}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="get", help=argparse.SUPPRESS)
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--approach", action="append", help="approach names as in throughput.py (repeatable)")
    parser.add_argument("--peers", action="store_true", help="also the peer libraries (benchmarks/peers/)")
    parser.add_argument("--endpoints", default="get,post,ping")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--observability", action="store_true", help="ours with observability off and on (apps/_observed.py)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks-cpu.md")
    parser.add_argument("--smoke", action="store_true", help="seconds: SQLite, ours + the baselines (CI)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request with valgrind's callgrind (slow, but the same under any load)",
    )
    parser.add_argument(
        "--layouts",
        type=int,
        default=1,
        help=f"with --instructions: the mean over this many memory layouts (at most {len(LAYOUTS)}): "
        "a change of code moves every count by up to 2 %% through CPython's method cache alone",
    )
    parser.add_argument(
        "--no-gc", action="store_true", help="no garbage collection while counting (its cost in steps)"
    )
    parser.add_argument(
        "--python",
        action="append",
        type=Path,
        default=[],
        help="also run ours and the baselines with this interpreter (rows <approach>@<version>)",
    )
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    skipped: dict[str, str] = {}  # peers whose virtualenv is missing or failed: named on the page
    if args.peers:
        import peers  # opt-in: the same virtualenvs as ``throughput.py --peers``

        skipped, _ = peers.enable(args.approach)
    if args.smoke:
        args.db, args.rounds, args.requests, args.warmup = ["sqlite"], 1, 30, 10
    default = [a.name for a in APPROACHES]
    if args.observability:
        add_approaches(OBSERVABILITY)
        default = ["ours-sync", *(a.name for a in OBSERVABILITY if a.kind == "sync"), "handwritten-sync"]
        default += ["ours-async", *(a.name for a in OBSERVABILITY if a.kind == "async"), "handwritten-async"]
    names = [n for n in args.approach or default if n not in skipped]
    for python in args.python:
        tag = add_python(python)
        names += [n + tag for n in names if not BY_NAME[n].tag and n + tag in BY_NAME]
    if "ping" in args.endpoints.split(","):
        for tag in {BY_NAME[n].tag for n in names}:
            if f"bare{tag}" not in names:
                names.append(f"bare{tag}")  # the /ping baseline
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        parser.error(
            f"unknown approach {', '.join(unknown)}: choose from {', '.join(BY_NAME)} (peers: --peers)"
        )
    endpoints = args.endpoints.split(",")
    unit = "k instructions/req" if args.instructions else "CPU µs/req"
    results: dict[tuple[str, str, str], list[float]] = {}
    rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
    for db_name in args.db or ["sqlite", "postgresql"]:
        db = prepare_database(db_name)
        env = {**os.environ, **db.env(), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            for rep in range(args.rounds):
                this_round: dict[str, dict[str, float]] = {}  # per endpoint: requests per CPU second
                for name in rotated(names, rep):
                    approach = BY_NAME[name]
                    wanted = ["ping"] if approach.kind == "bare" else endpoints
                    wanted = [e for e in wanted if e in endpoints]
                    if not wanted:
                        continue
                    # BENCH_PYTHONPATH: a checkout to measure instead of the installed package
                    extra = os.environ.get("BENCH_PYTHONPATH")
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [app_path(approach), extra]))
                    values = run_child(str(python_for(approach)), approach.module, wanted, args, env)
                    for endpoint, value in values.items():
                        this_round.setdefault(endpoint, {})[name] = 1e6 / value
                        results.setdefault((db_name, endpoint, name), []).append(value)
                        row = f"{db_name:10} {endpoint:4} {name:26} {value:12.1f}"
                        print(f"  r{rep + 1} {row} {unit}", flush=True)
                for endpoint, scores in this_round.items():
                    rounds.setdefault((db_name, endpoint), []).append(scores)
        finally:
            drop_database(db_name)
    rows = []
    for (db_name, endpoint, name), values in results.items():
        approach = BY_NAME[name]
        baseline, second = approach.baseline(endpoint), approach.second_baseline(endpoint)
        per_round = rounds[(db_name, endpoint)]
        rows.append(
            {
                "db": db_name,
                "endpoint": endpoint,
                "approach": name,
                "cpu_us": statistics.median(values),
                "values": values,
                # > 1 means cheaper than the baseline (the same sense as a throughput ratio)
                "ratio": median_ratio(per_round, name, baseline),
                "ratio_tutorial": median_ratio(per_round, name, second) if second else None,
            }
        )
    table = markdown(rows, "k instructions per request" if args.instructions else "CPU µs per request")
    print("\n" + table)
    if args.json:
        payload = {"requests": args.requests, "rounds": args.rounds, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
    if args.docs:
        write_docs(table, args.rounds, args.requests, skipped, peers=args.peers)
    return 0


def markdown(rows: list[dict[str, Any]], unit: str = "CPU µs per request") -> str:
    lines = [
        f"| db | endpoint | approach | kind | {unit} | ratio | vs | ratio to tutorial |",
        "|---|---|---|---|---:|---:|---|---:|",
    ]
    for row in rows:
        approach = BY_NAME[row["approach"]]
        lines.append(
            f"| {row['db']} | {ENDPOINTS[row['endpoint']]} | {row['approach']} | {approach.kind}"
            f" | {row['cpu_us']:,.1f} | {fmt(row['ratio'], '.3f')} | {approach.baseline(row['endpoint'])}"
            f" | {fmt(row['ratio_tutorial'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def write_docs(table: str, rounds: int, requests: int, skipped_peers: dict[str, str], *, peers: bool) -> None:
    meta = machine()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    skipped = "".join(f"- {name}: {note}\n" for name, note in skipped_peers.items())
    flag = " --peers" if peers else ""
    page = (
        "# CPU per request\n\n"
        "What each session layer costs, without HTTP parsing or a load generator: every app of"
        " `benchmarks/apps/` is called in-process as an ASGI app, like uvicorn calls it, against the"
        " real database, and its process CPU time (all threads) is divided by the requests served."
        " The ratio is the baseline's CPU over the approach's, per round, then the median: above 1.00"
        " means cheaper than the best hand-written pattern of the same kind (`get_db` generator,"
        " explicit `commit()`, no `refresh()`; the bare app for `/ping`); the last column is the same"
        " against the FastAPI tutorial pattern (`commit()` then `refresh()`)."
        " Throughput under load is in [benchmarks.md](benchmarks.md).\n\n"
        f"Reproduce: `.venv/bin/python benchmarks/inprocess.py{flag} --docs"
        f" --rounds {rounds} --requests {requests}`"
        " (about 10 minutes with these settings and the peers, whose virtualenvs are the ones"
        " `throughput.py --peers` makes; `--smoke` runs in seconds).\n\n"
        f"Date: {date}. Machine: {meta['cpu']} ({meta['nproc']} CPUs shared, load average"
        f" {meta['loadavg']}), {meta['system']}. {rounds} interleaved rounds of {requests} requests"
        " per cell, one at a time, after 200 of warm-up"
        + ("; every approach on the same Python in its own virtualenv" if peers else "")
        + " (see benchmarks.md for versions).\n\n"
        + table
    )
    if skipped:
        page += "\nNot measured:\n\n" + skipped
    (ROOT / "docs" / "benchmarks-cpu.md").write_text(page)


if __name__ == "__main__":
    sys.exit(main())
