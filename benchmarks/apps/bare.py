"""A bare FastAPI app: the no-database endpoint's baseline (no middleware, no session layer).

It has the same three routes as every other app, in the same order, so that routing costs the
same; only ``/ping`` is measured here, and the other two never touch a database.
"""

from __future__ import annotations

from _common import ItemIn, ItemOut
from fastapi import FastAPI

app = FastAPI()


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> ItemOut:
    return ItemOut(id=item_id, name="bare", value=0)


@app.post("/items")
async def create_item(data: ItemIn) -> ItemOut:
    return ItemOut(id=0, name=data.name, value=data.value)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
