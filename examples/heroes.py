"""FastAPI's SQLModel tutorial app (heroes), sync, on fastapi-sessionmaker:
``uvicorn examples.heroes:app``. ``DATABASE_URI`` picks the database (SQLite ``./heroes.db`` by
default; ``postgresql://...`` or ``mysql://...`` work unchanged).

What changed from the tutorial: no ``engine`` and no ``get_session`` generator (the maker makes
both, and ``SessionDep`` is its dependency); no ``session.commit()`` / ``session.refresh()`` (the
request's session commits before the response is sent, a failed commit is an error response,
any error rolls back); ``get_or_404`` instead of ``get`` + ``if not hero: raise HTTPException``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import FastAPI, Query
from sqlmodel import Session, SQLModel, col, select

from examples.heroes_models import DEFAULT_DATABASE_URI, Hero, HeroCreate, HeroPublic, HeroUpdate
from fastapi_sessionmaker import FastAPISessionMaker, get_or_404

db = FastAPISessionMaker(os.environ.get("DATABASE_URI", DEFAULT_DATABASE_URI), session_class=Session)
SessionDep = Annotated[Session, db.dependency]


@contextlib.asynccontextmanager
async def create_db_and_tables(app: FastAPI) -> AsyncIterator[None]:
    await anyio.to_thread.run_sync(SQLModel.metadata.create_all, db.cached_engine)
    yield


app = FastAPI(title="heroes (SQLModel tutorial, sync)", lifespan=create_db_and_tables)
db.init_app(app)


@app.post("/heroes/", response_model=HeroPublic)
def create_hero(hero: HeroCreate, session: SessionDep) -> Hero:
    db_hero = Hero.model_validate(hero)
    session.add(db_hero)
    session.flush()  # assigns the id; the commit happens before the response is sent
    return db_hero


@app.get("/heroes/", response_model=list[HeroPublic])
def read_heroes(
    session: SessionDep,
    offset: int = 0,
    limit: Annotated[int, Query(le=100)] = 100,
) -> list[Hero]:
    return list(session.exec(select(Hero).order_by(col(Hero.id)).offset(offset).limit(limit)).all())


@app.get("/heroes/{hero_id}", response_model=HeroPublic)
def read_hero(hero_id: int, session: SessionDep) -> Hero:
    return get_or_404(session, Hero, hero_id, description="Hero not found")


@app.patch("/heroes/{hero_id}", response_model=HeroPublic)
def update_hero(hero_id: int, hero: HeroUpdate, session: SessionDep) -> Hero:
    hero_db = get_or_404(session, Hero, hero_id, description="Hero not found")
    hero_db.sqlmodel_update(hero.model_dump(exclude_unset=True))
    session.add(hero_db)
    return hero_db


@app.delete("/heroes/{hero_id}")
def delete_hero(hero_id: int, session: SessionDep) -> dict[str, bool]:
    session.delete(get_or_404(session, Hero, hero_id, description="Hero not found"))
    return {"ok": True}
