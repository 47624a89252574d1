"""fastapi-sqla as its README shows: env configuration, ``startup()`` lifespan, middleware, ``Session``.

Its tables are reflected at start-up (``fastapi_sqla.Base``); the pool comes from the
``sqlalchemy_*`` environment variables, as its docs say.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from _common import MAX_OVERFLOW, POOL_SIZE, POOL_TIMEOUT, SYNC_URL, ItemIn, ItemOut

# fastapi-sqla reads lower-case ``sqlalchemy_*`` variables (its documented configuration).
os.environ.update(
    {
        "sqlalchemy_url": SYNC_URL,
        "sqlalchemy_pool_size": str(POOL_SIZE),
        "sqlalchemy_max_overflow": str(MAX_OVERFLOW),
        "sqlalchemy_pool_timeout": str(int(POOL_TIMEOUT)),
    }
)

from fastapi import FastAPI, HTTPException
from fastapi_sqla import Base, Session, setup_middlewares, startup


class Item(Base):
    __tablename__ = "items"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await startup()
    yield


app = FastAPI(lifespan=lifespan)
setup_middlewares(app)


@app.get("/items/{item_id}")
def read_item(item_id: int, session: Session) -> ItemOut:
    item = session.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
def create_item(data: ItemIn, session: Session) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    session.add(item)
    session.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
