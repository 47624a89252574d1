"""This library, async: ``AsyncFastAPISessionMaker`` + ``init_app`` + ``AsyncDBSession``."""

from __future__ import annotations

from typing import Any

from _common import ASYNC_URL, ENGINE_OPTIONS, Item, ItemIn, ItemOut
from fastapi import FastAPI, HTTPException

from fastapi_sessionmaker import AsyncDBSession, AsyncFastAPISessionMaker


def build(**options: Any) -> tuple[AsyncFastAPISessionMaker, FastAPI]:
    """The maker and the app; ``options`` are extra maker options (the observability rows)."""
    db = AsyncFastAPISessionMaker(ASYNC_URL, engine_options=ENGINE_OPTIONS, **options)
    app = FastAPI()
    db.init_app(app)

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, session: AsyncDBSession) -> ItemOut:
        item = await session.get(Item, item_id)
        if item is None:
            raise HTTPException(404)
        return ItemOut.model_validate(item)

    @app.post("/items")
    async def create_item(data: ItemIn, session: AsyncDBSession) -> ItemOut:
        item = Item(name=data.name, value=data.value)
        session.add(item)
        await session.flush()
        return ItemOut.model_validate(item)

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return db, app


db, app = build()
