"""This library, async, without a dependency: ``@db.with_session`` endpoints reading ``db.session``
(the style of fastapi-async-sqlalchemy's global ``db.session``)."""

from __future__ import annotations

from _common import ASYNC_URL, ENGINE_OPTIONS, Item, ItemIn, ItemOut
from fastapi import FastAPI, HTTPException

from fastapi_sessionmaker import AsyncFastAPISessionMaker

db = AsyncFastAPISessionMaker(ASYNC_URL, engine_options=ENGINE_OPTIONS)
app = FastAPI()
db.init_app(app)


@app.get("/items/{item_id}")
@db.with_session
async def read_item(item_id: int) -> ItemOut:
    item = await db.session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
@db.with_session
async def create_item(data: ItemIn) -> ItemOut:
    session = db.session
    item = Item(name=data.name, value=data.value)
    session.add(item)
    await session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
