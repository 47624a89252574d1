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

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "testing.md").read_text()
pytest_plugins = ["pytester"]


def override_block() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)
    blocks = [block for block in blocks if "dependency_of" in block]
    assert len(blocks) == 1
    return blocks[0]


def fixture_blocks() -> list[str]:
    """The page's fixture and test examples, in order (the override example aside)."""
    blocks: list[str] = re.findall(r"\n```python\n(.*?)```", PAGE, flags=re.DOTALL)  # not the indented one
    return [block for block in blocks if "dependency_of" not in block]


def test_the_fixture_examples_pass_against_the_demo_apps(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set-up, sync and async examples, as written, in a project of the demo apps (sync and async)."""
    first, factory, duplicate, async_test = fixture_blocks()
    assert "def fsm_app" in factory
    assert "async def" in async_test
    header = "import sqlalchemy as sa\nfrom examples.models import User\n\n"
    for twin, module in (("sync", "examples.app"), ("async", "examples.async_app")):
        folder = pytester.mkpydir(f"docs_{twin}")
        (folder / "conftest.py").write_text(
            f"import pytest\nfrom {module} import app\n\n"
            "def create_app(settings):\n    return app\n\ntest_settings = None\n\n" + factory
        )
    (pytester.path / "docs_sync" / "test_sync_examples.py").write_text(header + first + "\n\n" + duplicate)
    (pytester.path / "docs_async" / "test_async_examples.py").write_text(header + async_test)
    pytester.makeini("[pytest]\nfsm_metadata = examples.models:Base.metadata\nfilterwarnings = error\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", timeout=120)
    result.assert_outcomes(passed=3)
    assert not list(pytester.path.glob("*.db")), "the demo's own database was used"


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
