"""The FastAPI tutorial pattern, sync: ``SessionLocal`` + a ``get_db`` generator, explicit commit.

As in the FastAPI docs: ``sessionmaker(autocommit=False, autoflush=False)``, ``Depends(get_db)``
with the default scope (closes after the response), ``commit()`` then ``refresh()`` in the POST.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import sqlalchemy as sa
from _common import ENGINE_OPTIONS, SYNC_URL, Item, ItemIn, ItemOut
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.orm import Session, sessionmaker

connect_args = {"check_same_thread": False} if SYNC_URL.startswith("sqlite") else {}
engine = sa.create_engine(SYNC_URL, connect_args=connect_args, **ENGINE_OPTIONS)  # type: ignore[arg-type]
SessionLocal = sessionmaker(autocommit=False, autoflush=False, bind=engine)


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
    db.commit()
    db.refresh(item)
    return ItemOut.model_validate(item)


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
