"""The SQLModel tutorial's tests ("Test Applications with FastAPI and SQLModel") for
``examples/heroes.py``, with the fastapi-sessionmaker pytest plugin instead of
``app.dependency_overrides[get_session]`` and an in-memory engine.

Every test runs inside one transaction that is rolled back afterwards; the app's commits only
release SAVEPOINTs, so the test's session (``fsm_session``) sees what the app stored and the next
test starts from an empty table. Run it with ``pytest examples/test_heroes.py`` (SQLite) or on
another database with ``FSM_TEST_DATABASE_URL=postgresql://user@host/heroes``.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from sqlmodel import SQLModel

from examples.heroes import app
from examples.heroes_models import Hero


@pytest.fixture(scope="session")
def fsm_app() -> FastAPI:
    return app


@pytest.fixture(scope="session")
def fsm_metadata() -> sa.MetaData:
    return SQLModel.metadata


def test_create_hero(fsm_client: TestClient) -> None:
    response = fsm_client.post("/heroes/", json={"name": "Deadpond", "secret_name": "Dive Wilson"})
    data = response.json()

    assert response.status_code == 200
    assert data["name"] == "Deadpond"
    assert data["age"] is None
    assert data["id"] is not None


def test_create_hero_incomplete(fsm_client: TestClient) -> None:
    # No secret_name
    response = fsm_client.post("/heroes/", json={"name": "Deadpond"})
    assert response.status_code == 422


def test_create_hero_invalid(fsm_client: TestClient) -> None:
    # secret_name has an invalid type
    response = fsm_client.post(
        "/heroes/",
        json={"name": "Deadpond", "secret_name": {"message": "Do you wanna know my secret identity?"}},
    )
    assert response.status_code == 422


def test_read_heroes(fsm_session: Session, fsm_client: TestClient) -> None:
    hero_1 = Hero(name="Deadpond", secret_name="Dive Wilson")
    hero_2 = Hero(name="Rusty-Man", secret_name="Tommy Sharp", age=48)
    fsm_session.add_all([hero_1, hero_2])
    fsm_session.commit()

    response = fsm_client.get("/heroes/")
    data = response.json()

    assert response.status_code == 200
    assert [(h["name"], h["age"], h["id"]) for h in data] == [
        ("Deadpond", None, hero_1.id),
        ("Rusty-Man", 48, hero_2.id),
    ]


def test_read_hero(fsm_session: Session, fsm_client: TestClient) -> None:
    hero_1 = Hero(name="Deadpond", secret_name="Dive Wilson")
    fsm_session.add(hero_1)
    fsm_session.commit()

    response = fsm_client.get(f"/heroes/{hero_1.id}")

    assert response.status_code == 200
    assert response.json() == {"name": "Deadpond", "age": None, "id": hero_1.id}


def test_update_hero(fsm_session: Session, fsm_client: TestClient) -> None:
    hero_1 = Hero(name="Deadpond", secret_name="Dive Wilson")
    fsm_session.add(hero_1)
    fsm_session.commit()

    response = fsm_client.patch(f"/heroes/{hero_1.id}", json={"name": "Deadpuddle"})

    assert response.status_code == 200
    assert response.json() == {"name": "Deadpuddle", "age": None, "id": hero_1.id}
    fsm_session.refresh(hero_1)  # the app's change is in the test's transaction
    assert (hero_1.name, hero_1.secret_name) == ("Deadpuddle", "Dive Wilson")


def test_delete_hero(fsm_session: Session, fsm_client: TestClient) -> None:
    hero_1 = Hero(name="Deadpond", secret_name="Dive Wilson")
    fsm_session.add(hero_1)
    fsm_session.commit()

    response = fsm_client.delete(f"/heroes/{hero_1.id}")

    assert response.status_code == 200
    assert fsm_session.get(Hero, hero_1.id, populate_existing=True) is None
    assert fsm_client.get(f"/heroes/{hero_1.id}").status_code == 404


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_starts_from_an_empty_table(fsm_client: TestClient, run: int) -> None:
    # Run twice, each writing after its check: the second fails if the first one's hero was kept.
    assert fsm_client.get("/heroes/").json() == []
    assert fsm_client.post("/heroes/", json={"name": f"run {run}", "secret_name": "x"}).status_code == 200
