"""The demo app works the same, sync and async, on SQLite, PostgreSQL and MariaDB."""

import importlib
import sys
from collections.abc import Callable
from types import ModuleType

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import checked_out, pool_of


def load_demo(twin: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("DATABASE_URI", database_url)
    name = "examples.app" if twin == "sync" else "examples.async_app"
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)
    return module


def test_demo_crud(
    twin: str,
    database_url: str,
    sync_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., httpx.Client],
) -> None:
    from examples.models import Base, Item

    Base.metadata.drop_all(sync_engine)
    demo = load_demo(twin, database_url, monkeypatch)
    client = serve(demo.app)

    created = client.post("/users", json={"email": "ann@example.com", "name": "Ann"})
    assert created.status_code == 201, created.text
    user = created.json()

    duplicate = client.post("/users", json={"email": "ann@example.com", "name": "Other"})
    assert duplicate.status_code == 409
    assert duplicate.headers["content-type"] == "application/problem+json"
    assert [u["name"] for u in client.get("/users").json()] == ["Ann"]

    assert client.get(f"/users/{user['id']}").json() == user
    assert client.get("/users/00000000-0000-0000-0000-000000000000").status_code == 404

    item = client.post(f"/users/{user['id']}/items", json={"title": "book"})
    assert item.status_code == 201
    assert item.json()["owner_id"] == user["id"]
    assert [i["title"] for i in client.get(f"/users/{user['id']}/items").json()] == ["book"]
    missing_owner = client.post("/users/00000000-0000-0000-0000-000000000000/items", json={"title": "x"})
    assert missing_owner.status_code == 404

    assert client.delete(f"/users/{user['id']}").status_code == 204
    assert client.get(f"/users/{user['id']}").status_code == 404
    # ON DELETE CASCADE: the user's items went with it (on SQLite too: foreign keys are enforced).
    assert client.get(f"/users/{user['id']}/items").json() == []
    with sync_engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Item)) == 0
    assert checked_out(pool_of(demo.db)) == 0
