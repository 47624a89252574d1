"""The best hand-written pattern, async: ``handwritten_sync.py`` on ``AsyncSession``.

A ``get_db`` async generator dependency (``SessionLocal()`` ... ``yield`` ... ``await close()``),
an explicit ``commit()`` in the POST with the response built before it, no ``refresh()``
(``expire_on_commit=False``), and the engine and session options ours uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from _common import ASYNC_URL, ENGINE_OPTIONS, Item, ItemIn, ItemOut
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, **ENGINE_OPTIONS)  # type: ignore[arg-type]
SessionLocal = async_sessionmaker(bind=engine, expire_on_commit=False)


async def get_db() -> AsyncIterator[AsyncSession]:
    db = SessionLocal()
    try:
        yield db
    finally:
        await db.close()


SessionDep = Annotated[AsyncSession, Depends(get_db)]
app = FastAPI()


@app.get("/items/{item_id}")
async def read_item(item_id: int, db: SessionDep) -> ItemOut:
    item = await db.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
async def create_item(data: ItemIn, db: SessionDep) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    db.add(item)
    await db.flush()
    response = ItemOut.model_validate(item)
    await db.commit()
    return response


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
