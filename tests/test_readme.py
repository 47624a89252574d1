"""The README keeps its promises: two set-up commands, CI runs the second, its examples run."""

import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_first_block_holds_the_two_setup_commands() -> None:
    first = re.search(r"```[a-z]*\n(.*?)```", README, flags=re.DOTALL)
    assert first is not None
    lines = first.group(1).strip().splitlines()
    assert lines == ["./scripts/demo", "./scripts/test"]
    for line in lines:
        script = ROOT / line.removeprefix("./")
        assert script.is_file(), script
        assert os.access(script, os.X_OK), script


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci.splitlines()[-1]


def test_ci_runs_the_suite_on_the_oldest_and_newest_pythons() -> None:
    """requires-python's lower bound and the newest release, each in a venv of its own, lint once."""
    ci = (ROOT / ".ci" / "run").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    oldest = re.search(r'^requires-python = ">=(3\.\d+)"$', pyproject, flags=re.MULTILINE)
    assert oldest is not None
    versions = re.search(r"CI_PYTHONS:-([0-9. ]+)\}", ci)
    assert versions is not None
    assert versions.group(1).split() == [oldest.group(1), "3.13"]
    lines = ci.splitlines()
    assert lines[-2] == "scripts/test"  # the default Python
    assert 'VENV=".venv-${run%%=*}" PYTHON="${run#*=}" scripts/test' in lines[-1]
    assert sum(line.startswith(".venv/bin/mypy") for line in lines) == 1
    assert 'if [ "$CI" = "true" ]' in ci  # a missing Python fails CI
    for script in ("install", "test"):
        assert 'venv="${VENV:-.venv}"' in (ROOT / "scripts" / script).read_text()
    assert ".venv-*/" in (ROOT / ".gitignore").read_text().splitlines()


def test_demo_serves_on_localhost_8000_with_sqlite_default() -> None:
    demo = (ROOT / "scripts" / "demo").read_text()
    assert "--host 127.0.0.1 --port 8000" in demo
    from examples.models import DEFAULT_DATABASE_URI

    assert DEFAULT_DATABASE_URI.startswith("sqlite:///")


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_quick_start_commits_before_the_response(in_tmp_dir: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme_quick_start"}
    exec(python_blocks()[0], namespace)
    app = namespace["app"]
    with TestClient(app, raise_server_exceptions=False) as client:  # type: ignore[arg-type]
        assert client.post("/notes", params={"text": "hello"}).status_code == 201
        duplicate = client.post("/notes", params={"text": "hello"})
        assert duplicate.status_code == 409
        assert duplicate.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("index", [1, 2])
def test_other_examples_run(index: int, in_tmp_dir: Path) -> None:
    exec(python_blocks()[index], {"__name__": f"readme_block_{index}"})


@pytest.mark.parametrize("module_name", ["examples.app", "examples.async_app"])
def test_readme_lists_every_demo_endpoint(module_name: str) -> None:
    import importlib

    from fastapi.routing import APIRoute

    listed = set(re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/\S*)` \|", README, flags=re.MULTILINE))
    app = importlib.import_module(module_name).app
    served = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    assert listed == served


def test_the_two_context_sessions_differ_as_the_readme_says(in_tmp_dir: Path) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm.exc import DetachedInstanceError

    from fastapi_sessionmaker import FastAPISessionMaker, context_session
    from tests.models import User, reset_tables

    assert "`db.context_session()` (a method of the maker) is the one to use" in README
    db = FastAPISessionMaker("sqlite:///./both.db")
    read_only = FastAPISessionMaker("sqlite:///./both.db", policy="read_only")
    try:
        reset_tables(db.cached_engine)
        with db.context_session() as session:
            ann = User(email="ann@example.com", name="Ann")
            session.add(ann)
        assert ann.name == "Ann"  # expire_on_commit=False: readable after the block
        with context_session(db.cached_engine) as session:
            bob = User(email="bob@example.com", name="Bob")
            session.add(bob)
        with pytest.raises(DetachedInstanceError):
            _ = bob.name  # fastapi-utils' expire_on_commit=True
        with read_only.context_session() as session:
            session.execute(sa.delete(User))  # the policy rolls it back
        with db.context_session() as session:
            assert sorted(session.scalars(sa.select(User.email))) == ["ann@example.com", "bob@example.com"]
    finally:
        db.dispose()
        read_only.dispose()
