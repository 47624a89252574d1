"""FastSQLA as its docs show: ``new_lifespan(url, **engine options)``, ``fastsqla.Base``, ``Session``."""

from __future__ import annotations

from _common import ASYNC_URL, ENGINE_OPTIONS, ItemIn, ItemOut
from fastapi import FastAPI, HTTPException
from fastsqla import Base, Session, new_lifespan


class Item(Base):
    __tablename__ = "items"


app = FastAPI(lifespan=new_lifespan(ASYNC_URL, **ENGINE_OPTIONS))


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: Session) -> ItemOut:
    item = await session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
async def create_item(data: ItemIn, session: Session) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    session.add(item)
    await session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
