"""fastapi-utils' ``FastAPISessionMaker`` as its docs show: ``Depends(get_db)`` over ``get_db()``.

Its engine takes no pool options, so ``get_new_engine`` is overridden (the documented way to
customise it) to give it the same pool as every other approach.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

import sqlalchemy as sa
from _common import ENGINE_OPTIONS, SYNC_URL, Item, ItemIn, ItemOut
from fastapi import Depends, FastAPI, HTTPException
from fastapi_utils.session import FastAPISessionMaker
from sqlalchemy.orm import Session


class PooledSessionMaker(FastAPISessionMaker):
    def get_new_engine(self) -> sa.engine.Engine:
        # fastapi-utils' own ``get_engine`` sets ``pool_pre_ping=True``: kept, with the shared pool.
        options: dict[str, object] = {"pool_pre_ping": True, **ENGINE_OPTIONS}
        return sa.create_engine(self.database_uri, **options)  # type: ignore[arg-type]


@lru_cache
def get_fastapi_sessionmaker() -> FastAPISessionMaker:
    return PooledSessionMaker(SYNC_URL)


def get_db() -> Iterator[Session]:
    yield from get_fastapi_sessionmaker().get_db()


SessionDep = Annotated[Session, Depends(get_db)]
app = FastAPI()


@app.get("/items/{item_id}")
def read_item(item_id: int, db: SessionDep) -> ItemOut:
    item = db.get(Item, item_id)
    if item is None:
        raise HTTPException(404)
    return ItemOut.model_validate(item)


@app.post("/items")
def create_item(data: ItemIn, db: SessionDep) -> ItemOut:
    item = Item(name=data.name, value=data.value)
    db.add(item)
    db.flush()
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
