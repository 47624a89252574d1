"""Load from another process: ``wrk`` when it is installed, else a small httpx generator.

:func:`drive` is what ``throughput.py`` calls. ``wrk`` comes from ``scripts/install-wrk``;
without it, this file is run as the load process:
``python benchmarks/loadgen.py URL --kind get|post|ping --connections 16 --duration 3``
prints one JSON object with the same fields the ``wrk`` driver reports. Unlike ``wrk`` it
stops issuing requests at the deadline and waits for the ones in flight, so the number of 2xx
answers to POSTs is exactly the number of writes acknowledged. It is slower than ``wrk`` and
shares the two cores with the server: its numbers are for smoke runs and ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

BODY = {"name": "bench", "value": 1}
ROWS = 10_000  # the ids GET asks for: 1..ROWS (``harness.ROWS``)
NO_WRK = (
    "wrk is not installed: the load comes from benchmarks/loadgen.py (httpx), slower than wrk and"
    " sharing the CPUs with the server; run scripts/install-wrk for the numbers the docs quote"
)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


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


def drive(
    loadgen: str, url: str, kind: str, connections: int, duration: float, *, cpus: set[int] | None = None
) -> dict[str, float]:
    """Load ``url`` for ``duration`` seconds with ``wrk`` or ``httpx``, each in its own process
    (on ``cpus`` when given).

    Returns requests, duration_s, non2xx, errors, timeouts, p50_ms, p99_ms and in_flight_at_stop
    (the requests ``wrk`` abandons at its deadline, which the server may still complete).
    """
    pinned = None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)
    if loadgen == "wrk":
        return _drive_wrk(url, kind, connections, duration, pinned)
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
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
        preexec_fn=pinned,
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr[-1000:]}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _drive_wrk(
    url: str, kind: str, connections: int, duration: float, pinned: Callable[[], None] | None
) -> dict[str, float]:
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
            preexec_fn=pinned,
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


async def worker(
    client: httpx.AsyncClient, kind: str, deadline: float, latencies: list[float], counts: dict[str, int]
) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            if kind == "post":
                response = await client.post("/items", json=BODY)
            elif kind == "get":
                response = await client.get(f"/items/{random.randint(1, ROWS)}")
            else:
                response = await client.get("/ping")
        except httpx.TimeoutException:
            counts["timeout"] += 1
            continue
        except httpx.TransportError:
            counts["socket"] += 1
            continue
        latencies.append(time.perf_counter() - started)
        counts["requests"] += 1
        if not 200 <= response.status_code < 300:
            counts["non2xx"] += 1


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(url: str, kind: str, connections: int, duration: float, timeout: float) -> dict[str, float]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    counts = {"requests": 0, "non2xx": 0, "timeout": 0, "socket": 0}
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(worker(client, kind, deadline, latencies, counts) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {
        "requests": counts["requests"],
        "duration_s": elapsed,
        "non2xx": counts["non2xx"],
        "errors": counts["timeout"] + counts["socket"],
        "timeouts": counts["timeout"],
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "in_flight_at_stop": 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--kind", choices=["get", "post", "ping"], required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.kind, args.connections, args.duration, args.timeout))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
