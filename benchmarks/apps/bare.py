"""A bare FastAPI app: the no-database endpoint's baseline (no middleware, no session layer)."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
