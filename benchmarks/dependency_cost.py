"""What a FastAPI dependency costs per request, by its shape (the reason ours is a plain coroutine).

Usage: ``.venv/bin/python benchmarks/dependency_cost.py [rounds] [requests]`` (about a minute, no
database; ``--smoke`` for a one-second run).

Four apps serve the same ``/ping``, called in-process as uvicorn calls them and interleaved over
rounds: no dependency; a plain ``async def`` dependency; the same with a ``Request`` parameter and
an exit-stack callback (what ``fastapi_sessionmaker``'s dependency does besides opening the
session); an async generator dependency (what the tutorial's ``get_db`` is, and what ours was).
The table gives the median CPU µs per request and the extra cost over no dependency.
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inprocess import call  # benchmarks/ is not a package: found through sys.path


async def plain() -> int:
    return 1


def _exit(exc_type: Any, exc: Any, tb: Any) -> bool:
    return False


async def with_exit_callback(request: Request) -> int:
    request.scope["fastapi_function_astack"].push(_exit)
    return 1


async def generator() -> AsyncIterator[int]:
    try:
        yield 1
    except BaseException:
        raise


def app_with(dependency: Any) -> FastAPI:
    app = FastAPI()
    if dependency is None:

        @app.get("/ping")
        async def ping() -> dict[str, bool]:
            return {"ok": True}

    else:

        @app.get("/ping")
        async def ping_with(value: Annotated[int, Depends(dependency)]) -> dict[str, bool]:
            return {"ok": True}

    return app


async def main(rounds: int = 11, requests: int = 3000) -> None:
    apps = {
        "no dependency": app_with(None),
        "plain coroutine": app_with(plain),
        "coroutine + exit callback (ours)": app_with(with_exit_callback),
        "async generator (tutorial)": app_with(generator),
    }
    results: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            for _ in range(100):
                await call(app, "GET", "/ping")
            start = time.process_time()
            for _ in range(requests):
                assert await call(app, "GET", "/ping") == 200
            results[name].append((time.process_time() - start) / requests * 1e6)
    base = statistics.median(results["no dependency"])
    print("| dependency | CPU µs per request | extra |\n|---|---:|---:|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median - base:+.1f} |")


if __name__ == "__main__":
    if "--smoke" in sys.argv:  # a second, for the test suite: the script keeps working
        asyncio.run(main(1, 50))
    else:
        asyncio.run(main(*(int(a) for a in sys.argv[1:3])))
