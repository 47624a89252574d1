"""fastapi-async-sqlalchemy as its docs show: ``SQLAlchemyMiddleware`` + the global ``db.session``.

``commit_on_exit=True`` makes it commit at the end of the request like the other session layers.
"""

from __future__ import annotations

from _common import ASYNC_URL, ENGINE_OPTIONS, Item, ItemIn, ItemOut
from fastapi import FastAPI, HTTPException
from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

app = FastAPI()
app.add_middleware(
    SQLAlchemyMiddleware,
    db_url=ASYNC_URL,
    engine_args=dict(ENGINE_OPTIONS),
    session_args={"expire_on_commit": False},
    commit_on_exit=True,
)


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> ItemOut:
    item = await db.session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
async def create_item(data: ItemIn) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    db.session.add(item)
    await db.session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
