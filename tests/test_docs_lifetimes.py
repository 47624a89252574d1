"""docs/lifetimes.md: its examples run and do what the page says."""

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fastapi_sessionmaker import FastAPISessionMaker

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "lifetimes.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The page's python blocks, run in order in one namespace, in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_lifetimes"}
    for block in python_blocks():
        exec(block, namespace)
    yield namespace
    namespace["db"].dispose()


def test_the_page_has_its_examples() -> None:
    assert len(python_blocks()) == 7


def test_streaming_background_tasks_and_health(page: dict[str, Any]) -> None:
    with TestClient(page["app"], raise_server_exceptions=False) as client:
        assert client.post("/notes", params={"text": "hello"}).status_code == 201
        assert client.get("/notes.txt").text == "hello\naudit: hello\n"
        assert client.get("/notes/events").text == "data: hello\n\ndata: audit: hello\n\n"
        assert client.get("/notes/count-events").text == "data: 2\n\n" * 3
        with client.websocket_connect("/notes/ws") as socket:
            socket.send_text("over a socket")
            assert socket.receive_text() == "stored over a socket"
        assert page["pool_stats"](page["db"])["checked_out"] == 0
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["databases"]["default"]["pool"]["checked_out"] == 0
    assert page["pool_stats"](page["db"])["checked_out"] == 0


def test_scripts_and_workers(page: dict[str, Any]) -> None:
    page["main"]()
    assert asyncio.run(page["count_notes"]()) == 1


def test_fault_settings_example() -> None:
    namespace: dict[str, Any] = {"FastAPISessionMaker": FastAPISessionMaker}
    exec(python_blocks()[5], namespace)
    maker = namespace["slow_network_db"]
    assert maker.engine_options["connect_args"] == {"connect_timeout": 3}
    assert maker.engine_options["pool_timeout"] == 5
