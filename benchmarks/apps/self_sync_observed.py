"""This library, sync, with observability on (``_observed.OBSERVED``): the ``ours-sync-observed`` row."""

from __future__ import annotations

from _common import ENGINE_OPTIONS, SYNC_URL, Item, ItemIn, ItemOut
from _observed import OBSERVED
from fastapi import FastAPI, HTTPException

from fastapi_sessionmaker import DBSession, FastAPISessionMaker

db = FastAPISessionMaker(SYNC_URL, engine_options=ENGINE_OPTIONS, **OBSERVED)
app = FastAPI()
db.init_app(app)


@app.get("/items/{item_id}")
def read_item(item_id: int, session: DBSession) -> ItemOut:
    item = session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
def create_item(data: ItemIn, session: DBSession) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    session.add(item)
    session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
