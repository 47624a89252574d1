"""A small async HTTP load generator (httpx), used when ``wrk`` is not installed.

``python benchmarks/loadgen.py URL --kind get|post|ping --connections 16 --duration 3``
prints one JSON object with the same fields the ``wrk`` driver reports. Unlike ``wrk`` it
stops issuing requests at the deadline and waits for the ones in flight, so the number of 2xx
answers to POSTs is exactly the number of writes acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx

BODY = {"name": "bench", "value": 1}


async def worker(
    client: httpx.AsyncClient, kind: str, deadline: float, latencies: list[float], counts: dict[str, int]
) -> None:
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            if kind == "post":
                response = await client.post("/items", json=BODY)
            elif kind == "get":
                response = await client.get(f"/items/{random.randint(1, 10_000)}")
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
