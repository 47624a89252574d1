"""get_or_404 / one_or_404: the row, or a problem JSON 404 that rolls the request back; both twins,
the three databases, any session (SQLModel's included), with or without ``init_app``."""

import asyncio
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession
from sqlmodel import SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

from examples.heroes_models import Hero
from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    CommitPolicy,
    FastAPISessionMaker,
    NotFoundError,
    get_or_404,
    one_or_404,
)
from tests.conftest import Maker, MakerFactory
from tests.models import User, reset_tables, stored_emails

MISSING = uuid.UUID(int=0)


def sync_app(db: FastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    db.init_app(app)
    SessionDep = Annotated[Session, db.depends(policy=CommitPolicy.COMMIT_UNLESS_RAISED)]

    @app.get("/users/{user_id}")
    def read(user_id: uuid.UUID, session: SessionDep, description: str | None = None) -> str:
        return get_or_404(session, User, user_id, description=description).email

    @app.get("/by-email/{email}")
    def by_email(email: str, session: SessionDep) -> str:
        return str(one_or_404(session, sa.select(User).where(User.email.startswith(email))).email)

    @app.post("/users/{user_id}/copy")
    def copy(user_id: uuid.UUID, session: SessionDep) -> str:
        session.add(User(email="copy@x"))
        session.flush()  # written, then the lookup fails: the raised 404 rolls it back
        return get_or_404(session, User, user_id).email

    return app


def async_app(db: AsyncFastAPISessionMaker) -> FastAPI:
    app = FastAPI()
    db.init_app(app)
    SessionDep = Annotated[AsyncSession, db.depends(policy=CommitPolicy.COMMIT_UNLESS_RAISED)]

    @app.get("/users/{user_id}")
    async def read(user_id: uuid.UUID, session: SessionDep, description: str | None = None) -> str:
        return (await get_or_404(session, User, user_id, description=description)).email

    @app.get("/by-email/{email}")
    async def by_email(email: str, session: SessionDep) -> str:
        user = await one_or_404(session, sa.select(User).where(User.email.startswith(email)))
        return str(user.email)

    @app.post("/users/{user_id}/copy")
    async def copy(user_id: uuid.UUID, session: SessionDep) -> str:
        session.add(User(email="copy@x"))
        await session.flush()
        return (await get_or_404(session, User, user_id)).email

    return app


def app_for(maker: Maker) -> FastAPI:
    return sync_app(maker) if isinstance(maker, FastAPISessionMaker) else async_app(maker)


def problem(detail: str) -> dict[str, Any]:
    return {"type": "about:blank", "title": "Not Found", "status": 404, "detail": detail}


def test_a_row_or_a_problem_404(
    sync_engine: sa.Engine, make_maker: MakerFactory, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(User), [{"email": "ann@x"}, {"email": "anna@x"}, {"email": "bob@x"}])
        ann = connection.scalar(sa.select(User.id).where(User.email == "ann@x"))
    client = serve(app_for(make_maker()))

    assert client.get(f"/users/{ann}").json() == "ann@x"
    missing = client.get(f"/users/{MISSING}")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json() == problem(f"User {MISSING} was not found.")
    custom = client.get(f"/users/{MISSING}", params={"description": "No such user."})
    assert custom.json() == problem("No such user.")

    assert client.get("/by-email/bob").json() == "bob@x"
    assert client.get("/by-email/carl").json() == problem("No User matches the request.")
    assert client.get("/by-email/ann").json() == problem("No User matches the request.")  # two rows

    # Raised, so rolled back even under COMMIT_UNLESS_RAISED (a returned 404 would commit).
    assert client.post(f"/users/{MISSING}/copy").status_code == 404
    assert stored_emails(sync_engine) == ["ann@x", "anna@x", "bob@x"]
    assert client.post(f"/users/{ann}/copy").status_code == 200
    assert stored_emails(sync_engine) == ["ann@x", "anna@x", "bob@x", "copy@x"]


def test_without_init_app_it_is_fastapis_404(tmp_path: Any) -> None:
    db = FastAPISessionMaker(f"sqlite:///{tmp_path}/plain.db")
    reset_tables(db.cached_engine)
    app = FastAPI()  # no init_app: NotFoundError is an HTTPException like any other

    @app.get("/users/{user_id}")
    def read(user_id: uuid.UUID) -> str:
        with db.context_session() as session:
            return get_or_404(session, User, user_id).email

    with TestClient(app) as client:
        response = client.get(f"/users/{MISSING}")
    db.dispose()
    assert response.status_code == 404
    assert response.json() == {"detail": f"User {MISSING} was not found."}


def test_not_found_error_is_an_http_exception_404() -> None:
    error = NotFoundError("Hero 7 was not found.")
    assert (error.status_code, error.detail) == (404, "Hero 7 was not found.")


def test_with_sqlmodels_sessions_no_deprecation_warning(
    twin: str, sync_engine: sa.Engine, make_maker: MakerFactory
) -> None:
    """SQLModel's AsyncSession.execute (and so scalars) warns: the helpers never call it (warnings
    are errors in this suite)."""
    SQLModel.metadata.drop_all(sync_engine, tables=[Hero.__table__])  # type: ignore[attr-defined]
    SQLModel.metadata.create_all(sync_engine, tables=[Hero.__table__])  # type: ignore[attr-defined]
    with sync_engine.begin() as connection:
        connection.execute(sa.insert(Hero), [{"name": "Deadpond", "secret_name": "Dive Wilson"}])
    maker = make_maker(session_class=SQLModelSession if twin == "sync" else SQLModelAsyncSession)
    if isinstance(maker, FastAPISessionMaker):
        with maker.context_session() as session:
            assert one_or_404(session, select(Hero)).name == "Deadpond"
            with pytest.raises(NotFoundError, match=r"^404: No Hero matches the request\.$"):
                one_or_404(session, select(Hero).where(Hero.name == "x"))
        return
    adb = maker

    async def main() -> str:
        async with adb.context_session() as session:
            name = (await one_or_404(session, select(Hero))).name
            with pytest.raises(NotFoundError, match=r"^404: Hero 7 was not found\.$"):
                await get_or_404(session, Hero, 7)
        await adb.dispose()
        return str(name)

    assert asyncio.run(main()) == "Deadpond"
