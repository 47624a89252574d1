"""This library, sync: ``FastAPISessionMaker`` + ``init_app`` + ``DBSession`` in ``def`` endpoints."""

from __future__ import annotations

from typing import Any

from _common import ENGINE_OPTIONS, SYNC_URL, Item, ItemIn, ItemOut
from fastapi import FastAPI, HTTPException

from fastapi_sessionmaker import DBSession, FastAPISessionMaker


def build(**options: Any) -> tuple[FastAPISessionMaker, FastAPI]:
    """The maker and the app; ``options`` are extra maker options (the observability rows)."""
    db = FastAPISessionMaker(SYNC_URL, engine_options=ENGINE_OPTIONS, **options)
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

    return db, app


db, app = build()
