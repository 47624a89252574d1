"""The best hand-written pattern, sync: what a careful user writes without a session library.

A ``get_db`` generator dependency (``SessionLocal()`` ... ``yield`` ... ``close()``), an explicit
``commit()`` in the POST with the response built before it (the id comes from ``flush()``), no
``refresh()`` (``expire_on_commit=False``: nothing to reload), and the engine and session options
ours uses (``create_engine(url, **ENGINE_OPTIONS)``, the same pool). The reference of every ratio.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import sqlalchemy as sa
from _common import ENGINE_OPTIONS, SYNC_URL, Item, ItemIn, ItemOut
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.orm import Session, sessionmaker

engine = sa.create_engine(SYNC_URL, **ENGINE_OPTIONS)  # type: ignore[arg-type]
SessionLocal = sessionmaker(bind=engine, expire_on_commit=False)


def get_db() -> Iterator[Session]:
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


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
    response = ItemOut.model_validate(item)
    db.commit()
    return response


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
