"""The demo app, async: ``uvicorn examples.async_app:app``. Same API and database as ``app.py``."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException

from examples.models import DEFAULT_DATABASE_URI, Base, Item, ItemIn, ItemOut, User, UserIn, UserOut
from fastapi_sessionmaker import AsyncDBSession, AsyncFastAPISessionMaker

db = AsyncFastAPISessionMaker(os.environ.get("DATABASE_URI", DEFAULT_DATABASE_URI))


@contextlib.asynccontextmanager
async def create_tables(app: FastAPI) -> AsyncIterator[None]:
    async with db.cached_engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield


app = FastAPI(title="fastapi-sessionmaker demo (async)", lifespan=create_tables)
db.init_app(app)


@app.post("/users", response_model=UserOut, status_code=201)
async def create_user(data: UserIn, session: AsyncDBSession) -> User:
    user = User(email=data.email, name=data.name)
    session.add(user)
    await session.flush()
    return user


@app.get("/users", response_model=list[UserOut])
async def list_users(session: AsyncDBSession) -> list[User]:
    return list(await session.scalars(sa.select(User).order_by(User.email)))


@app.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: uuid.UUID, session: AsyncDBSession) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    return user


@app.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: uuid.UUID, session: AsyncDBSession) -> None:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    await session.delete(user)


@app.post("/users/{user_id}/items", response_model=ItemOut, status_code=201)
async def create_item(user_id: uuid.UUID, data: ItemIn, session: AsyncDBSession) -> Item:
    if await session.get(User, user_id) is None:
        raise HTTPException(404, "user not found")
    item = Item(owner_id=user_id, title=data.title)
    session.add(item)
    await session.flush()
    return item


@app.get("/users/{user_id}/items", response_model=list[ItemOut])
async def list_items(user_id: uuid.UUID, session: AsyncDBSession) -> list[Item]:
    query = sa.select(Item).where(Item.owner_id == user_id).order_by(Item.title)
    return list(await session.scalars(query))
