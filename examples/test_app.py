"""Tests for the demo app with the fastapi-sessionmaker pytest plugin: copy this file and adapt it.

Every test runs inside one transaction that is rolled back afterwards: the app commits as usual
(its commits only release SAVEPOINTs), the test sees what the app stored, and the next test starts
from empty tables. Run it with ``pytest examples/test_app.py`` (SQLite in memory) or pick the
database with ``FSM_TEST_DATABASE_URL=postgresql://user@host/demo``; the plugin creates and drops
``test_demo`` (``test_demo_gw0``... under ``pytest -n``) and never touches ``demo`` itself.

In your project, name the app and the metadata once in ``pyproject.toml`` instead of the two
fixtures below::

    [tool.pytest.ini_options]
    fsm_app = "myapp.main:app"
    fsm_metadata = "myapp.models:Base.metadata"
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from examples.app import app
from examples.models import Base, User


@pytest.fixture(scope="session")
def fsm_app() -> FastAPI:
    """The app under test (or ``fsm_app = "examples.app:app"`` in the ini options)."""
    return app


@pytest.fixture(scope="session")
def fsm_metadata() -> sa.MetaData:
    """The tables to create once per run (or ``fsm_metadata = "examples.models:Base.metadata"``)."""
    return Base.metadata


def test_create_user_is_committed_and_visible(fsm_client: TestClient, fsm_session: Session) -> None:
    response = fsm_client.post("/users", json={"email": "ann@example.com", "name": "Ann"})
    assert response.status_code == 201, response.text
    # The app committed; the test's session sees the row in the same transaction.
    assert fsm_session.scalars(sa.select(User.email)).all() == ["ann@example.com"]


def test_each_test_starts_from_empty_tables(fsm_client: TestClient) -> None:
    assert fsm_client.get("/users").json() == []


def test_duplicate_email_is_409_and_stores_nothing(fsm_client: TestClient, fsm_session: Session) -> None:
    assert fsm_client.post("/users", json={"email": "bob@example.com", "name": "Bob"}).status_code == 201
    duplicate = fsm_client.post("/users", json={"email": "bob@example.com", "name": "Bobby"})
    assert duplicate.status_code == 409
    assert fsm_session.scalars(sa.select(User.name)).all() == ["Bob"]


def test_data_made_by_the_test_is_seen_by_the_app(fsm_client: TestClient, fsm_session: Session) -> None:
    fsm_session.add(User(email="cy@example.com", name="Cy"))
    fsm_session.commit()  # releases a savepoint; rolled back with everything else after the test
    assert [user["name"] for user in fsm_client.get("/users").json()] == ["Cy"]


def test_items_of_an_unknown_user_are_404(fsm_client: TestClient) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    assert fsm_client.post(f"/users/{missing}/items", json={"title": "x"}).status_code == 404
