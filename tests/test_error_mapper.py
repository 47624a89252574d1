"""``init_app(app, error_mapper=...)`` maps database errors the application's way."""

from collections.abc import Callable
from typing import Annotated, Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from fastapi_sessionmaker import Problem, default_error_mapper
from tests.conftest import Maker
from tests.models import User, reset_tables, stored_emails


def unique_app(maker: Maker, mapper: Callable[[BaseException], Problem | None]) -> FastAPI:
    app = FastAPI()
    maker.init_app(app, error_mapper=mapper)
    Db = Annotated[Any, maker.dependency]

    @app.post("/users/{email}")
    async def create(email: str, session: Db) -> dict[str, str]:
        session.add(User(email=email))  # no flush: the duplicate fails at the commit
        return {"email": email}

    return app


def test_a_custom_mapper_decides_the_status_and_body(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)

    def mapper(exc: BaseException) -> Problem | None:
        if isinstance(exc, sa.exc.IntegrityError):
            return Problem(422, "Taken", "That e-mail is already registered.", type="/problems/taken")
        return default_error_mapper(exc)

    client = serve(unique_app(maker, mapper))
    assert client.post("/users/a@x").status_code == 200
    response = client.post("/users/a@x")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "/problems/taken",
        "title": "Taken",
        "status": 422,
        "detail": "That e-mail is already registered.",
    }
    assert stored_emails(sync_engine) == ["a@x"]


def test_a_mapper_that_declines_leaves_a_plain_500(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)
    client = serve(unique_app(maker, lambda exc: None))
    assert client.post("/users/a@x").status_code == 200
    response = client.post("/users/a@x")
    assert response.status_code == 500  # never a 2xx over the lost write
    assert response.headers["content-type"] == "application/problem+json"
    assert stored_emails(sync_engine) == ["a@x"]
