"""An app whose endpoints declare their session with ``@maker.with_session``, in a module with
``from __future__ import annotations``: every annotation is a string that FastAPI resolves in the
endpoint's ``__globals__`` (older FastAPI versions, 0.121 among them, without unwrapping the
decorated function first)."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker
from tests.models import User


class NewUser(BaseModel):
    email: str


class StoredUser(BaseModel):
    email: str
    same_session: bool


def build(maker: FastAPISessionMaker | AsyncFastAPISessionMaker) -> FastAPI:
    """``POST /users`` (a write through ``maker.session``) for either twin."""
    app = FastAPI()
    maker.init_app(app)

    if isinstance(maker, AsyncFastAPISessionMaker):

        @app.post("/users", status_code=201)
        @maker.with_session
        async def create_async(body: NewUser) -> StoredUser:
            session = maker.session
            session.add(User(email=body.email))
            await session.flush()
            return StoredUser(email=body.email, same_session=session is maker.session)

    else:

        @app.post("/users", status_code=201)
        @maker.with_session
        def create_sync(body: NewUser) -> StoredUser:  # run in a worker thread
            session = maker.session
            session.add(User(email=body.email))
            session.flush()
            return StoredUser(email=body.email, same_session=session is maker.session)

    @app.get("/missing")
    @maker.with_session
    async def missing() -> StoredUser:
        raise HTTPException(404)

    return app
