"""docs/recipes.md, "Pagination with fastapi-pagination": the recipe runs as written (SQLite), and the
same code pages the same way on PostgreSQL and MariaDB, both twins."""

import asyncio
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
SECTION = PAGE.split("## Pagination with fastapi-pagination", 1)[1].split("\n## ", 1)[0]
URL = '"sqlite:///./notes.db"'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SECTION, flags=re.DOTALL)


def run_section(database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The section's blocks in order, in one namespace; on ``database_url`` instead of SQLite.

    The namespace is a module's, in ``sys.modules`` while it runs: pydantic looks the module of
    ``Page[NoteOut]`` up there."""
    setup, what_you_get = python_blocks()
    assert setup.count(URL) == 2  # both makers: the test can move them to another database
    module = types.ModuleType("docs_recipes_pagination")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    if database_url is not None:
        setup = setup.replace(URL, repr(database_url))
    try:
        exec(setup, namespace)
        namespace["Base"].metadata.drop_all(namespace["db"].cached_engine)
        exec(what_you_get, namespace)  # asserts the page shown for both apps
    finally:
        namespace["db"].dispose()
        asyncio.run(namespace["async_db"].dispose())


def test_the_section_has_its_examples() -> None:
    assert len(python_blocks()) == 2
    assert "paginate(session, sa.select(Note)" in SECTION
    assert "await apaginate(session, sa.select(Note)" in SECTION


def test_the_recipe_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_section(None, monkeypatch)
    assert (tmp_path / "notes.db").is_file()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_the_recipe_on_servers(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run_section(database_url, monkeypatch)
