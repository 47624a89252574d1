"""The tutorial pattern, async: ``async_sessionmaker`` + an async ``get_db`` generator, commit.

The sync tutorial translated to ``AsyncSession`` (the SQLAlchemy asyncio docs' settings:
``expire_on_commit=False``), with the same explicit ``commit()`` and ``refresh()`` in the POST.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from _common import ASYNC_URL, ENGINE_OPTIONS, Item, ItemIn, ItemOut
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, **ENGINE_OPTIONS)  # type: ignore[arg-type]
SessionLocal = async_sessionmaker(engine, autoflush=False, expire_on_commit=False)


async def get_db() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as db:
        yield db


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
    await db.commit()
    await db.refresh(item)
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
