"""Tests for the async demo app with the fastapi-sessionmaker pytest plugin: copy and adapt.

``async def`` tests that use the plugin's async fixtures run on anyio's pytest plugin (installed
with FastAPI), no marker needed. ``fsm_async_client`` calls the app in-process with httpx;
``fsm_async_session`` shares the test's transaction, which is rolled back afterwards.
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from examples.async_app import app
from examples.models import Base, User


@pytest.fixture(scope="session")
def fsm_app() -> FastAPI:
    """The app under test (or ``fsm_app = "examples.async_app:app"`` in the ini options)."""
    return app


@pytest.fixture(scope="session")
def fsm_metadata() -> sa.MetaData:
    """The tables to create once per run."""
    return Base.metadata


async def test_create_user_is_committed_and_visible(
    fsm_async_client: httpx.AsyncClient, fsm_async_session: AsyncSession
) -> None:
    response = await fsm_async_client.post("/users", json={"email": "ann@example.com", "name": "Ann"})
    assert response.status_code == 201, response.text
    assert (await fsm_async_session.scalars(sa.select(User.email))).all() == ["ann@example.com"]


async def test_each_test_starts_from_empty_tables(fsm_async_client: httpx.AsyncClient) -> None:
    assert (await fsm_async_client.get("/users")).json() == []


async def test_duplicate_email_is_409_and_stores_nothing(
    fsm_async_client: httpx.AsyncClient, fsm_async_session: AsyncSession
) -> None:
    first = await fsm_async_client.post("/users", json={"email": "bob@example.com", "name": "Bob"})
    assert first.status_code == 201
    duplicate = await fsm_async_client.post("/users", json={"email": "bob@example.com", "name": "Bobby"})
    assert duplicate.status_code == 409
    assert (await fsm_async_session.scalars(sa.select(User.name))).all() == ["Bob"]
