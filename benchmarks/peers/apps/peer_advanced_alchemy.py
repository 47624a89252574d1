"""advanced-alchemy's FastAPI extension as its docs show: ``AdvancedAlchemy(config, app)``,
``Depends(alchemy.provide_session())``, ``commit_mode="autocommit"``.
"""

from __future__ import annotations

from typing import Annotated

from _common import ASYNC_URL, MAX_OVERFLOW, POOL_SIZE, POOL_TIMEOUT, Item, ItemIn, ItemOut
from advanced_alchemy.extensions.fastapi import (
    AdvancedAlchemy,
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
)
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession

config = SQLAlchemyAsyncConfig(
    connection_string=ASYNC_URL,
    commit_mode="autocommit",
    engine_config=EngineConfig(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=POOL_TIMEOUT),
    session_config=AsyncSessionConfig(expire_on_commit=False),
)
app = FastAPI()
alchemy = AdvancedAlchemy(config=config, app=app)
DatabaseSession = Annotated[AsyncSession, Depends(alchemy.provide_session())]


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: DatabaseSession) -> ItemOut:
    item = await session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
async def create_item(data: ItemIn, session: DatabaseSession) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    session.add(item)
    await session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
