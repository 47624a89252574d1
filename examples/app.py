"""The demo app, sync: ``uvicorn examples.app:app``. ``DATABASE_URI`` picks the database.

With no configuration it serves a SQLite file (``./demo.db``); point ``DATABASE_URI`` at
PostgreSQL (``postgresql://user@host/db``) or MariaDB (``mysql://user@host/db``) and nothing else
changes. Writes are committed before the response is sent: a duplicate e-mail is a 409 and
stores nothing; an unknown id is a 404.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import anyio
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException

from examples.models import DEFAULT_DATABASE_URI, Base, Item, ItemIn, ItemOut, User, UserIn, UserOut
from fastapi_sessionmaker import DBSession, FastAPISessionMaker

db = FastAPISessionMaker(os.environ.get("DATABASE_URI", DEFAULT_DATABASE_URI))


@contextlib.asynccontextmanager
async def create_tables(app: FastAPI) -> AsyncIterator[None]:
    await anyio.to_thread.run_sync(Base.metadata.create_all, db.cached_engine)
    yield


app = FastAPI(title="fastapi-sessionmaker demo (sync)", lifespan=create_tables)
db.init_app(app)


@app.post("/users", response_model=UserOut, status_code=201)
def create_user(data: UserIn, session: DBSession) -> User:
    user = User(email=data.email, name=data.name)
    session.add(user)
    session.flush()  # assigns the id; the commit happens before the response is sent
    return user


@app.get("/users", response_model=list[UserOut])
def list_users(session: DBSession) -> list[User]:
    return list(session.scalars(sa.select(User).order_by(User.email)))


@app.get("/users/{user_id}", response_model=UserOut)
def get_user(user_id: uuid.UUID, session: DBSession) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    return user


@app.delete("/users/{user_id}", status_code=204)
def delete_user(user_id: uuid.UUID, session: DBSession) -> None:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    session.delete(user)


@app.post("/users/{user_id}/items", response_model=ItemOut, status_code=201)
def create_item(user_id: uuid.UUID, data: ItemIn, session: DBSession) -> Item:
    if session.get(User, user_id) is None:
        raise HTTPException(404, "user not found")
    item = Item(owner_id=user_id, title=data.title)
    session.add(item)
    session.flush()
    return item


@app.get("/users/{user_id}/items", response_model=list[ItemOut])
def list_items(user_id: uuid.UUID, session: DBSession) -> list[Item]:
    return list(session.scalars(sa.select(Item).where(Item.owner_id == user_id).order_by(Item.title)))
