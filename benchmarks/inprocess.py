"""CPU cost per request of each approach, without HTTP sockets or a load generator.

Usage::

    .venv/bin/python benchmarks/inprocess.py                     # SQLite + PostgreSQL, ~3 min
    .venv/bin/python benchmarks/inprocess.py --db postgresql --endpoints get --rounds 9
    .venv/bin/python benchmarks/inprocess.py --smoke             # seconds (CI)

``run.py`` measures what users see (throughput under ``wrk``); on a shared two-core machine its
ratios move by several per cent from round to round. This script isolates the session layer:
each approach's app (``benchmarks/apps/``) is imported in a child process and called directly
as an ASGI app on one asyncio loop, like uvicorn calls it (``receive`` waits on an event until
the response is complete), with the real database behind it. The child measures its own CPU
time (user + system, all threads) over a fixed number of requests after a warm-up; no other
process shares its counter, so the number moves far less than a throughput does.

Approaches are interleaved and rotated over rounds; the table gives medians and the median
per-round ratio to the tutorial pattern of the same kind (``bare`` for ``/ping``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"

# -- child: drive one app ------------------------------------------------------------------------

Message = dict[str, Any]


async def call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    """One HTTP request through ``app`` as uvicorn would make it; the response status."""
    headers = [(b"host", b"127.0.0.1:8000")]
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
    complete = asyncio.Event()
    delivered = False
    status = 0

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()

    await app(scope, receive, send)
    return status


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


async def drive(module: str, endpoint: str, warmup: int, requests: int, concurrency: int) -> dict[str, float]:
    sys.path.insert(0, str(APPS))
    app = importlib.import_module(module).app
    shutdown, _ = await lifespan(app)
    counter = iter(range(10**9))

    async def client(count: int) -> None:
        for _ in range(count):
            status = await call(app, *request_for(endpoint, next(counter)))
            if not 200 <= status < 300:
                raise SystemExit(f"{module} {endpoint}: status {status}")

    async def batch(total: int) -> None:
        share, extra = divmod(total, concurrency)
        await asyncio.gather(*(client(share + (i < extra)) for i in range(concurrency)))

    await batch(warmup)
    cpu, wall = time.process_time(), time.perf_counter()
    await batch(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await shutdown()
    return {"cpu_us": cpu / requests * 1e6, "wall_us": wall / requests * 1e6}


def child_main(args: argparse.Namespace) -> int:
    result = asyncio.run(drive(args.child, args.endpoint, args.warmup, args.requests, args.concurrency))
    print(json.dumps(result))
    return 0


# -- parent: interleave, repeat, report ----------------------------------------------------------

sys.path.insert(0, str(HERE))


def child_command(
    python: str, module: str, endpoint: str, warmup: int, requests: int, conc: int
) -> list[str]:
    return [
        python,
        str(Path(__file__).resolve()),
        "--child",
        module,
        "--endpoint",
        endpoint,
        "--warmup",
        str(warmup),
        "--requests",
        str(requests),
        "--concurrency",
        str(conc),
    ]


def run_child(command: list[str], env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        command, env=env, cwd=APPS, capture_output=True, text=True, timeout=1800, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])}: {(out.stderr or out.stdout).strip()[-1500:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="get", help=argparse.SUPPRESS)
    parser.add_argument("--db", action="append", choices=["sqlite", "postgresql"])
    parser.add_argument("--approach", action="append", help="approach names as in run.py (repeatable)")
    parser.add_argument("--endpoints", default="get,post,ping")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks-cpu.md")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: SQLite, ours + tutorial, this interpreter (CI)"
    )
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)

    import run as bench  # the same databases, approaches and virtualenvs as the throughput run

    if args.smoke:
        args.db, args.rounds, args.requests, args.warmup = ["sqlite"], 1, 30, 10
        args.approach = args.approach or ["ours-sync", "tutorial-sync", "ours-async", "tutorial-async"]
        args.approach.append("bare")
    else:
        bench.use_project_venv()

    rounds, requests = args.rounds, args.requests
    wanted = args.approach or [a.name for a in bench.APPROACHES]
    skipped: dict[str, str] = {}  # peers whose virtualenv is missing or failed: named on the page
    for name in wanted:
        peer = bench.BY_NAME[name].peer
        status = bench.setup_peers.peer_status(peer) if peer else {"ok": True}
        if not status.get("ok"):
            skipped[name] = str(status.get("note", "not available"))
    names = [n for n in wanted if n not in skipped]
    endpoints = args.endpoints.split(",")
    results: dict[tuple[str, str, str], list[float]] = {}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    unit = "CPU µs"
    for db_name in args.db or ["sqlite", "postgresql"]:
        db = bench.prepare_database(db_name)
        env = {**os.environ, "BENCH_SYNC_URL": db.sync_url, "BENCH_ASYNC_URL": db.async_url}
        env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        try:
            for endpoint in endpoints:
                for rep in range(rounds):
                    this_round: dict[str, float] = {}
                    for name in bench.rotated(names, rep):
                        approach = bench.BY_NAME[name]
                        if endpoint != "ping" and approach.kind == "bare":
                            continue
                        python = str(bench.python_for(approach))
                        command = child_command(
                            python, approach.module, endpoint, args.warmup, requests, args.concurrency
                        )
                        value = run_child(command, env)["cpu_us"]
                        this_round[name] = value
                        results.setdefault((db_name, endpoint, name), []).append(value)
                        print(
                            f"  r{rep + 1} {db_name:10} {endpoint:4} {name:26} {value:12.1f} {unit}/req",
                            flush=True,
                        )
                    for name, value in this_round.items():
                        base = "bare" if endpoint == "ping" else bench.BY_NAME[name].baseline
                        if base in this_round:
                            # > 1 means cheaper than the baseline (the same sense as a throughput ratio)
                            ratios.setdefault((db_name, endpoint, name), []).append(this_round[base] / value)
        finally:
            bench.drop_database(db_name)
    rows = []
    for (db_name, endpoint, name), values in results.items():
        rows.append(
            {
                "db": db_name,
                "endpoint": endpoint,
                "approach": name,
                "cpu_us": statistics.median(values),
                "values": values,
                "ratio": statistics.median(ratios.get((db_name, endpoint, name), [float("nan")])),
            }
        )
    table = markdown(rows, bench)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"requests": requests, "rounds": rounds, "rows": rows}, indent=2))
    if args.docs:
        write_docs(table, rounds, requests, skipped, bench)
    return 0


def markdown(rows: list[dict[str, Any]], bench: Any) -> str:
    lines = [
        "| db | endpoint | approach | kind | CPU µs per request | ratio | vs |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        approach = bench.BY_NAME[row["approach"]]
        base = "bare" if row["endpoint"] == "ping" else approach.baseline
        lines.append(
            f"| {row['db']} | {bench.ENDPOINTS[row['endpoint']]} | {row['approach']} | {approach.kind}"
            f" | {row['cpu_us']:,.1f} | {row['ratio']:.3f} | {base} |"
        )
    return "\n".join(lines) + "\n"


def write_docs(table: str, rounds: int, requests: int, skipped_peers: dict[str, str], bench: Any) -> None:
    meta = bench.machine()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    skipped = "".join(f"- {name}: {note}\n" for name, note in skipped_peers.items())
    page = (
        "# CPU per request\n\n"
        "What each session layer costs, without HTTP parsing or a load generator: every app of"
        " `benchmarks/apps/` is called in-process as an ASGI app, like uvicorn calls it, against the"
        " real database, and its process CPU time (all threads) is divided by the requests served."
        " The ratio is the baseline's CPU over the approach's, per round, then the median: above 1.00"
        " means cheaper than the tutorial pattern of the same kind (the bare app for `/ping`)."
        " Throughput under load is in [benchmarks.md](benchmarks.md).\n\n"
        "Reproduce: `.venv/bin/python benchmarks/inprocess.py --docs"
        f" --rounds {rounds} --requests {requests}`"
        " (about 10 minutes with these settings; the peers' virtualenvs are the ones `run.py` makes).\n\n"
        f"Date: {date}. Machine: {meta['cpu']} ({meta['nproc']} CPUs shared, load average"
        f" {meta['loadavg']}), {meta['system']}. {rounds} interleaved rounds of {requests} requests"
        " per cell, one at a time, after 200 of warm-up; every approach on the same Python in its"
        " own virtualenv (see benchmarks.md for versions).\n\n" + table
    )
    if skipped:
        page += "\nNot measured:\n\n" + skipped
    (HERE.parent / "docs" / "benchmarks-cpu.md").write_text(page)


if __name__ == "__main__":
    sys.exit(main())
