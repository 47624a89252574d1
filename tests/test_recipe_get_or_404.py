"""docs/recipes.md, "A row or a 404": the example runs as written and answers what the page shows."""

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
SECTION = PAGE.split("## A row or a 404", 1)[1].split("\n## ", 1)[0]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SECTION, flags=re.DOTALL)


def test_the_section_has_its_examples() -> None:
    assert len(python_blocks()) == 3


def test_the_recipe_runs_and_answers_problem_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_recipes_get_or_404"}
    try:
        for block in python_blocks():  # the last block asserts what the page says
            exec(block, namespace)
    finally:
        namespace["db"].dispose()
        asyncio.run(namespace["async_db"].dispose())
    assert (tmp_path / "books.db").is_file()
