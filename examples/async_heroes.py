"""FastAPI's SQLModel tutorial app (heroes), async twin: ``uvicorn examples.async_heroes:app``.

The same API and database as ``examples/heroes.py``, with SQLModel's ``AsyncSession`` (the
drivers: aiosqlite, asyncpg, aiomysql, picked from the same ``DATABASE_URI``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Query
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from examples.heroes_models import DEFAULT_DATABASE_URI, Hero, HeroCreate, HeroPublic, HeroUpdate
from fastapi_sessionmaker import AsyncFastAPISessionMaker, get_or_404

db = AsyncFastAPISessionMaker(
    os.environ.get("DATABASE_URI", DEFAULT_DATABASE_URI), session_class=AsyncSession
)
SessionDep = Annotated[AsyncSession, db.dependency]


@contextlib.asynccontextmanager
async def create_db_and_tables(app: FastAPI) -> AsyncIterator[None]:
    async with db.cached_engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all)
    yield


app = FastAPI(title="heroes (SQLModel tutorial, async)", lifespan=create_db_and_tables)
db.init_app(app)


@app.post("/heroes/", response_model=HeroPublic)
async def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    await session.flush()  # assigns the id; the commit happens before the response is sent
    return db_hero


@app.get("/heroes/", response_model=list[HeroPublic])
async def read_heroes(
    session: SessionDep,
    offset: int = 0,
    limit: Annotated[int, Query(le=100)] = 100,
) -> list[Hero]:
    heroes = await session.exec(select(Hero).order_by(col(Hero.id)).offset(offset).limit(limit))
    return list(heroes.all())


@app.get("/heroes/{hero_id}", response_model=HeroPublic)
async def read_hero(hero_id: int, session: SessionDep) -> Hero:
    return await get_or_404(session, Hero, hero_id, description="Hero not found")


@app.patch("/heroes/{hero_id}", response_model=HeroPublic)
async def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    hero_db = await get_or_404(session, Hero, hero_id, description="Hero not found")
    hero_db.sqlmodel_update(hero.model_dump(exclude_unset=True))
    session.add(hero_db)
    return hero_db


@app.delete("/heroes/{hero_id}")
async def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    await session.delete(await get_or_404(session, Hero, hero_id, description="Hero not found"))
    return {"ok": True}
