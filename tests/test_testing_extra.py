"""The ``testing`` extra is all a newcomer installs: with it, ``fsm_client`` tests pass under ``-W error``.

A virtual environment with nothing but ``pip install -e '.[testing]'`` is built once per Python and
per set of requirements, under ``.venv-testing/`` (git-ignored; about 20 s), and reused afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
VENVS = ROOT / ".venv-testing"


def requirement_names(extra: str) -> set[str]:
    """The distribution names an extra of ``pyproject.toml`` requires (normalized)."""
    found = re.search(rf'^{extra} = \[((?:\s*"[^"]*",?)*)\s*\]', PYPROJECT, flags=re.MULTILINE)
    assert found is not None, f"no {extra!r} extra in pyproject.toml"
    requirements = re.findall(r'"([^"]+)"', found.group(1))
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_the_extra_names_what_the_test_client_and_the_plugin_import() -> None:
    import starlette.testclient

    # Starlette's TestClient imports httpx2 and only falls back to httpx with a deprecation
    # warning (an error under filterwarnings = error); fsm_async_client uses httpx.
    client_source = Path(starlette.testclient.__file__).read_text()
    assert "import httpx2 as httpx" in client_source
    plugin_source = (ROOT / "src" / "fastapi_sessionmaker" / "testing" / "plugin.py").read_text()
    assert "import httpx\n" in plugin_source
    assert {"pytest", "httpx", "httpx2"} <= requirement_names("testing")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run (or Python) may be building one too
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_testing_venv() -> Path:
    """The interpreter of a venv holding only this project with its ``testing`` extra."""
    dependencies = re.search(r"^dependencies = \[.*?\]$", PYPROJECT, flags=re.MULTILINE | re.DOTALL)
    assert dependencies is not None
    key = hashlib.sha256((dependencies.group(0) + str(sorted(requirement_names("testing")))).encode())
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    venv = VENVS / f"{version}-{key.hexdigest()[:12]}"
    python = venv / "bin" / "python"
    with _locked(VENVS / f".{version}.lock"):
        if not (venv / ".complete").exists():
            for stale in VENVS.glob(f"{version}-*"):
                shutil.rmtree(stale)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[testing]"],
                check=True,
                timeout=300,
                capture_output=True,
            )
            (venv / ".complete").touch()
    return python


NEWCOMER_APP = """
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi_sessionmaker import DBSession, FastAPISessionMaker

db = FastAPISessionMaker()  # DATABASE_URI from the environment: the plugin provides the test one
app = FastAPI()
db.init_app(app)


@app.get("/answer")
def answer(session: DBSession) -> int:
    return session.execute(sa.text("SELECT 42")).scalar_one()
"""

NEWCOMER_TESTS = """
def test_answer(fsm_client, fsm_session):
    assert fsm_client.get("/answer").json() == 42
"""


def test_a_venv_with_only_the_testing_extra_runs_fsm_client_under_w_error(tmp_path: Path) -> None:
    python = build_testing_venv()
    (tmp_path / "newcomer_app.py").write_text(NEWCOMER_APP)
    (tmp_path / "test_newcomer.py").write_text(NEWCOMER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nfsm_app = newcomer_app:app\n")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTEST_", "DATABASE_", "FSM_", "VIRTUAL_ENV", "PYTHON"))
    }
    result = subprocess.run(
        [str(python), "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.mark.parametrize("extra", ["testing", "dev"])
def test_the_extras_parse(extra: str) -> None:
    assert "pytest" in requirement_names(extra)
