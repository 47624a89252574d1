"""Count worker-thread hops per request: ``anyio.to_thread.run_sync`` calls, per app and endpoint.

``python benchmarks/count_hops.py self_sync tutorial_sync`` (run from ``benchmarks/apps``)
prints ``{"self_sync": {"get": 3, "post": 3, "ping": 0}, ...}``. Each app is imported in this
process against a temporary SQLite file and called through ``httpx.ASGITransport``; the count
is taken over the requests after a warm-up request (which opens the pool).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import sqlalchemy as sa

CALLS = {"n": 0}
_original = anyio.to_thread.run_sync


async def counting_run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    CALLS["n"] += 1
    return await _original(func, *args, **kwargs)


async def hops(module: str, requests: int = 20) -> dict[str, float]:
    app = importlib.import_module(module).app
    transport = httpx.ASGITransport(app=app)
    out: dict[str, float] = {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        calls: dict[str, Callable[[int], Any]] = {
            "get": lambda i: client.get(f"/items/{1 + i % 10}"),
            "post": lambda i: client.post("/items", json={"name": "hop", "value": i}),
            "ping": lambda i: client.get("/ping"),
        }
        for name, call in calls.items():
            response = await call(0)
            assert response.status_code == 200, (module, name, response.status_code, response.text)
            CALLS["n"] = 0
            for i in range(requests):
                response = await call(i)
                assert response.status_code == 200, (module, name, response.status_code)
            out[name] = CALLS["n"] / requests
    return out


def main(modules: list[str]) -> int:
    tmp = tempfile.mkdtemp(prefix="fsm-hops-")
    path = Path(tmp) / "hops.db"
    os.environ["BENCH_SYNC_URL"] = f"sqlite:///{path}"
    os.environ["BENCH_ASYNC_URL"] = f"sqlite+aiosqlite:///{path}"
    engine = sa.create_engine(os.environ["BENCH_SYNC_URL"])
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL, value INTEGER NOT NULL)"
        )
        connection.execute(
            sa.text("INSERT INTO items (name, value) VALUES (:name, :value)"),
            [{"name": f"item {i}", "value": i} for i in range(10)],
        )
    engine.dispose()
    anyio.to_thread.run_sync = counting_run_sync  # type: ignore[assignment]
    sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
    result = {module: asyncio.run(hops(module)) for module in modules}
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
