"""docs/observability.md: its examples run and do what the page says.

The OpenTelemetry example sets the process's global tracer provider, which can be set only once:
it runs in a fresh interpreter of its own.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
MARK = "<!-- test: tests/test_docs_observability.py -->\n```python\n"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)


def test_every_example_is_marked_for_this_file() -> None:
    assert len(python_blocks()) == 2
    assert PAGE.count(MARK) == 2


def test_counting_statements_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_observability"}
    exec(python_blocks()[0], namespace)
    try:
        with TestClient(namespace["app"]) as client:
            response = client.get("/report")
        assert response.status_code == 200
        assert response.json() == {"statements": 3, "connections": 1}  # as the page says
        assert '`GET /report` answers `{"statements": 3, "connections": 1}`' in PAGE
        assert re.fullmatch(r"db;dur=\d+\.\d", response.headers["server-timing"])
    finally:
        namespace["db"].dispose()


def test_the_opentelemetry_example(tmp_path: Path) -> None:
    script = python_blocks()[1] + (
        "\nimport json\n"
        "parents = {name: next((p.name for p in spans.values()"
        " if s.parent and p.context.span_id == s.parent.span_id), None) for name, s in spans.items()}\n"
        "print(json.dumps({'ours': ours, 'parents': parents}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    promised = re.search(r"`ours` is then `(\[.*?\])`", PAGE)
    assert promised is not None
    assert seen["ours"] == ast.literal_eval(promised.group(1))
    parents = seen["parents"]
    assert "SELECT ./traced.db" in parents  # the instrumentation's statement span, as the page says
    assert parents["fastapi_sessionmaker.commit"] == "POST /orders"  # FastAPI's request span
    assert parents["fastapi_sessionmaker.callback"] == "POST /orders"
    assert parents["POST /orders"] is None
