from collections.abc import Callable

import httpx
import sqlalchemy as sa
from fastapi import FastAPI

from tests.conftest import Maker
from tests.models import User, reset_tables, stored_emails


def test_write_is_committed_before_the_response(
    maker: Maker, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    reset_tables(sync_engine)
    app = FastAPI()
    maker.init_app(app)
    from typing import Annotated, Any

    Dep = Annotated[Any, maker.dependency]

    if maker.is_async:

        @app.post("/users/{email}")
        async def create_async(email: str, session: Dep) -> dict[str, str]:
            session.add(User(email=email))
            return {"email": email}
    else:

        @app.post("/users/{email}")
        def create_sync(email: str, session: Dep) -> dict[str, str]:
            session.add(User(email=email))
            return {"email": email}

    client = serve(app)
    assert client.post("/users/a@x").status_code == 200
    assert stored_emails(sync_engine) == ["a@x"]
    response = client.post("/users/a@x")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert stored_emails(sync_engine) == ["a@x"]
