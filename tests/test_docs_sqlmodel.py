"""docs/sqlmodel.md: its examples run, in order, and do what the page says (its blocks assert it).

They run in a fresh interpreter: the page defines the tutorial's ``Hero`` table, which SQLModel's
one global metadata already holds in this process when ``examples.heroes_models`` was imported.
Warnings are errors there too, as in this suite (SQLModel's deprecated ``execute`` would fail).
"""

import re
import subprocess
import sys
from pathlib import Path

PAGE_PATH = Path(__file__).resolve().parent.parent / "docs" / "sqlmodel.md"
PAGE = PAGE_PATH.read_text()

RUNNER = """
import asyncio, pathlib, re, sys
page = pathlib.Path(sys.argv[1]).read_text()
namespace = sys.modules["__main__"].__dict__
for block in re.findall(r"```python\\n(.*?)```", page, flags=re.DOTALL):
    exec(compile(block, sys.argv[1], "exec"), namespace)
namespace["db"].dispose()
asyncio.run(namespace["async_db"].dispose())
print("ran", len(re.findall(r"```python\\n", page)), "blocks")
"""


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE, flags=re.DOTALL)


def test_the_page_has_its_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) == 6
    assert 'FastAPISessionMaker("sqlite:///./heroes.db", session_class=Session)' in blocks[2]
    assert 'AsyncFastAPISessionMaker("sqlite:///./heroes.db", session_class=AsyncSession)' in blocks[4]
    assert "def get_session():" in blocks[1]  # the "before"
    assert "get_session" not in blocks[2]  # the "after"
    assert ".commit()" not in blocks[2]


def test_the_page_runs_and_does_what_it_says(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER, str(PAGE_PATH)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran 6 blocks"
    assert (tmp_path / "heroes.db").is_file()
