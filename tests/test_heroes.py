"""FastAPI's SQLModel tutorial app (examples/heroes.py, examples/async_heroes.py) behaves as the
tutorial's, sync and async, on SQLite, PostgreSQL and MariaDB."""

import importlib
import sys
from collections.abc import Callable
from types import ModuleType

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from examples.heroes_models import Hero


def load_heroes(twin: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("DATABASE_URI", database_url)
    name = "examples.heroes" if twin == "sync" else "examples.async_heroes"
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)
    return module


def stored(engine: sa.Engine) -> list[tuple[int, str, str, int | None]]:
    table = Hero.__table__  # type: ignore[attr-defined]
    with engine.connect() as connection:
        query = sa.select(table.c.id, table.c.name, table.c.secret_name, table.c.age).order_by(table.c.id)
        return [(row[0], row[1], row[2], row[3]) for row in connection.execute(query)]


def test_heroes_crud(
    twin: str,
    database_url: str,
    sync_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., httpx.Client],
) -> None:
    SQLModel.metadata.drop_all(sync_engine, tables=[Hero.__table__])  # type: ignore[attr-defined]
    heroes = load_heroes(twin, database_url, monkeypatch)
    client = serve(heroes.app)

    created = [
        client.post("/heroes/", json={"name": name, "secret_name": secret, "age": age})
        for name, secret, age in [
            ("Deadpond", "Dive Wilson", None),
            ("Spider-Boy", "Pedro Parqueador", None),
            ("Rusty-Man", "Tommy Sharp", 48),
        ]
    ]
    assert [r.status_code for r in created] == [200, 200, 200], [r.text for r in created]
    ids = [r.json()["id"] for r in created]
    assert created[2].json() == {"name": "Rusty-Man", "age": 48, "id": ids[2]}  # no secret_name
    # Committed before the response: the rows are there as soon as the client has the answer.
    assert [row[1] for row in stored(sync_engine)] == ["Deadpond", "Spider-Boy", "Rusty-Man"]

    assert [h["name"] for h in client.get("/heroes/").json()] == ["Deadpond", "Spider-Boy", "Rusty-Man"]
    page = client.get("/heroes/", params={"offset": 1, "limit": 1}).json()
    assert [h["name"] for h in page] == ["Spider-Boy"]
    assert client.get("/heroes/", params={"limit": 101}).status_code == 422  # Query(le=100)

    assert client.get(f"/heroes/{ids[0]}").json() == {"name": "Deadpond", "age": None, "id": ids[0]}
    missing = client.get("/heroes/9999")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "Hero not found",
    }

    patched = client.patch(f"/heroes/{ids[0]}", json={"age": 30})
    assert patched.status_code == 200, patched.text
    assert patched.json() == {"name": "Deadpond", "age": 30, "id": ids[0]}
    # Only the fields sent change; the update is stored before the response.
    assert stored(sync_engine)[0] == (ids[0], "Deadpond", "Dive Wilson", 30)
    assert client.patch("/heroes/9999", json={"age": 1}).status_code == 404

    assert client.delete(f"/heroes/{ids[1]}").json() == {"ok": True}
    assert client.get(f"/heroes/{ids[1]}").status_code == 404
    assert client.delete(f"/heroes/{ids[1]}").status_code == 404
    assert [row[1] for row in stored(sync_engine)] == ["Deadpond", "Rusty-Man"]
