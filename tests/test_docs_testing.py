"""docs/testing.md: the dependency override example runs as written, and dependency_of finds each key.

No ``from __future__ import annotations``: FastAPI resolves the endpoints' annotations, which name
locals of the tests.
"""

import re
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from fastapi_sessionmaker import AsyncDBSession, DBSession, FastAPISessionMaker, dependency_of
from fastapi_sessionmaker._request import default_async_session, default_sync_session

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()


def override_block() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)
    blocks = [block for block in blocks if "dependency_of" in block]
    assert len(blocks) == 1
    return blocks[0]


def test_the_override_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_testing_override"}
    exec(override_block(), namespace)
    namespace["test_answer_from_a_session_of_my_own"]()
    assert namespace["app"].dependency_overrides == {}
    # Without the override the app's own database answers, and it has no such table.
    with TestClient(namespace["app"], raise_server_exceptions=False) as client:
        assert client.get("/answer").status_code == 500
    namespace["db"].dispose()


def test_dependency_of_gives_the_key_fastapi_looks_up() -> None:
    db = FastAPISessionMaker("sqlite://")
    assert dependency_of(DBSession) is default_sync_session
    assert dependency_of(AsyncDBSession) is default_async_session
    assert dependency_of(db.dependency) is db.dependency.dependency
    mine = Annotated[Session, db.depends(policy="read_only")]
    assert dependency_of(mine) is db.depends(policy="read_only").dependency
    with pytest.raises(TypeError, match=r"expected Depends\(\.\.\.\)"):
        dependency_of(Session)


def test_an_override_of_a_per_maker_dependency(tmp_path: Path) -> None:
    db = FastAPISessionMaker(f"sqlite:///{tmp_path}/never.db")
    app = FastAPI()
    db.init_app(app)

    @app.get("/who")
    def who(session: Annotated[Session, db.dependency]) -> str:
        return str(session)

    app.dependency_overrides[dependency_of(db.dependency)] = lambda: "fake"
    with TestClient(app) as client:
        assert client.get("/who").json() == "fake"
    db.dispose()
