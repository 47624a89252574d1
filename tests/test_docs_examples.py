"""Every ```python block in ``docs/**/*.md`` runs, and every page is on the site.

The convention (docs/recipes.md says it to authors):

- By default a page's python blocks run **in order, in one namespace**, in a temporary working
  directory, with no ``DATABASE_*`` variable set (a maker without a URL gets the embedded SQLite
  default); the makers left in the namespace are disposed afterwards. A page shows what its
  example does with a following block that asserts it ("what you get"), e.g. through a
  ``TestClient``: every page run this way must assert something.
- A block preceded by the line ``<!-- test: tests/test_something.py -->`` is run by that test file
  instead (it needs a real PostgreSQL, a pytest plugin, a server...): the runner skips it and checks
  that the file exists and reads this page.
- A block preceded by ``<!-- fragment -->`` is only compiled: an excerpt that cannot run alone (part
  of Alembic's ``env.py``), whose code is tested elsewhere. At most ``MAX_FRAGMENTS`` per page.

Python blocks are fenced as ```python (```py, ```python3 would escape the runner: refused).
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
MAX_FRAGMENTS = 2

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
TEST_MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<path>\S+)\s*-->\s*$")
FRAGMENT_MARKER = re.compile(r"^\s*<!--\s*fragment\s*-->\s*$")
PYTHON_ALIASES = {"py", "py3", "python3", "pycon", "ipython"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it starts, its language, its code, how it is run."""

    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    mode: str  # "run", "test" or "fragment"
    test_file: str | None = None

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks_of(page: str, docs: Path = DOCS) -> list[Block]:
    """The fenced blocks of a page, with the marker on the last non-blank line before each."""
    lines = (docs / page).read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        end = index + 1
        while end < len(lines) and not re.match(
            rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            end += 1
        assert end < len(lines), f"docs/{page}:{index + 1}: this block is never closed"
        code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        before = next((line for line in reversed(lines[:index]) if line.strip()), "")
        test = TEST_MARKER.match(before)
        mode = "test" if test else "fragment" if FRAGMENT_MARKER.match(before) else "run"
        blocks.append(
            Block(page, index + 1, opening.group("info").lower(), code, mode, test and test.group("path"))
        )
        index = end + 1
    return blocks


def python_blocks(page: str) -> list[Block]:
    return [block for block in blocks_of(page) if block.language == "python"]


def nav_pages() -> list[str]:
    """The pages named in mkdocs.yml's nav, in order (nested sections flattened)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(entry: Any) -> list[str]:
        if isinstance(entry, str):
            return [] if "://" in entry else [entry]
        if isinstance(entry, list):
            return [page for item in entry for page in walk(item)]
        assert isinstance(entry, dict), entry
        return [page for value in entry.values() for page in walk(value)]

    return walk(config["nav"])


RUN_PAGES = [page for page in PAGES if any(block.mode == "run" for block in python_blocks(page))]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = nav_pages()
    missing = [page for page in nav if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    assert len(nav) == len(set(nav)), f"a page is twice in mkdocs.yml's nav: {nav}"
    absent = sorted(set(PAGES) - set(nav))
    assert not absent, f"add these pages to mkdocs.yml's nav (one line each): {absent}"


def test_the_site_has_the_pages_of_the_brief_in_order() -> None:
    order = ["index.md", "quickstart.md", "policy.md", "migrating.md", "lifetimes.md", "async.md"]
    order += ["testing.md", "side-effects.md", "recipes.md", "benchmarks.md", "architecture.md"]
    nav = nav_pages()
    assert [page for page in nav if page in order] == order
    assert nav[-1] == "reference.md"


def test_python_blocks_are_fenced_as_python() -> None:
    aliased = [block.where for page in PAGES for block in blocks_of(page) if block.language in PYTHON_ALIASES]
    assert not aliased, f"fence python code as ```python so that it is run: {aliased}"


def test_markers_stand_before_python_blocks_only() -> None:
    blocks = [block for page in PAGES for block in blocks_of(page)]
    misplaced = [block.where for block in blocks if block.mode != "run" and block.language != "python"]
    assert not misplaced, f"<!-- test: --> and <!-- fragment --> mark ```python blocks only: {misplaced}"


@pytest.mark.parametrize("page", PAGES)
def test_marked_blocks_are_run_by_a_test_that_reads_the_page(page: str) -> None:
    for block in python_blocks(page):
        if block.mode != "test":
            continue
        assert block.test_file is not None
        test_file = ROOT / block.test_file
        assert re.fullmatch(r"tests/(.+/)?test_\w+\.py", block.test_file), (
            f"{block.where}: the marker names {block.test_file!r}, not a test module tests/test_*.py"
        )
        assert test_file.is_file(), f"{block.where}: {block.test_file} does not exist"
        source = test_file.read_text()
        assert Path(page).name in source, f"{block.where}: {block.test_file} never reads docs/{page}"


@pytest.mark.parametrize("page", PAGES)
def test_fragments_compile_and_stay_rare(page: str) -> None:
    fragments = [block for block in python_blocks(page) if block.mode == "fragment"]
    assert len(fragments) <= MAX_FRAGMENTS, (
        f"docs/{page} has {len(fragments)} fragments (at most {MAX_FRAGMENTS}): make the examples run, "
        "or run them from a test of their own with <!-- test: tests/test_x.py -->"
    )
    for block in fragments:
        compile(block.code, block.where, "exec", dont_inherit=True)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_pages_show_what_their_examples_do(page: str) -> None:
    """A page run by this file asserts what it promises, not only that its code raises nothing."""
    blocks = [block for block in python_blocks(page) if block.mode == "run"]
    asserts = [
        node for block in blocks for node in ast.walk(ast.parse(block.code)) if isinstance(node, ast.Assert)
    ]
    assert asserts, f"docs/{page}: add a block that asserts what the example does (a 'what you get' block)"


def dispose_makers(namespace: dict[str, Any]) -> None:
    for value in list(namespace.values()):
        if isinstance(value, FastAPISessionMaker):
            value.dispose()
        elif isinstance(value, AsyncFastAPISessionMaker):
            asyncio.run(value.dispose())


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in [name for name in os.environ if name.startswith("DATABASE_")]:
        monkeypatch.delenv(variable)
    namespace: dict[str, Any] = {"__name__": "docs_" + re.sub(r"\W", "_", page.removesuffix(".md"))}
    try:
        for block in python_blocks(page):
            if block.mode == "run":
                exec(compile(block.code, block.where, "exec", dont_inherit=True), namespace)
    finally:
        dispose_makers(namespace)


def test_the_runner_reads_markers_and_indented_blocks(tmp_path: Path) -> None:
    """The parser itself, on a page made for it: each mode, an indented block, other languages."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nx = 1\n```\n\n<!-- test: tests/test_docs_examples.py -->\n\n"
        "```python\nneeds_a_server()\n```\n\n<!-- fragment -->\n```python\nreturn_outside()\n```\n\n"
        "- a list item:\n\n  ```python\n  assert x == 1\n  ```\n\n```bash\necho hi\n```\n"
    )
    blocks = blocks_of("page.md", docs=tmp_path)
    assert [(block.language, block.mode, block.line) for block in blocks] == [
        ("python", "run", 3),
        ("python", "test", 9),
        ("python", "fragment", 14),
        ("python", "run", 20),
        ("bash", "run", 24),
    ]
    assert blocks[1].test_file == "tests/test_docs_examples.py"
    assert blocks[3].code == "assert x == 1\n"
    assert blocks[2].code == "return_outside()\n"


def test_the_reference_names_every_public_name() -> None:
    """One ``::: name`` per root export; the exceptions, the testing toolkit and Alembic as modules."""
    import fastapi_sessionmaker
    from fastapi_sessionmaker import exceptions

    directives = re.findall(r"^::: (\S+)$", (DOCS / "reference.md").read_text(), flags=re.MULTILINE)
    assert len(directives) == len(set(directives)), "a name is documented twice"
    expected = {f"fastapi_sessionmaker.{name}" for name in fastapi_sessionmaker.__all__}
    expected -= {f"fastapi_sessionmaker.{name}" for name in exceptions.__all__}
    expected |= {
        "fastapi_sessionmaker.exceptions",
        "fastapi_sessionmaker.testing",
        "fastapi_sessionmaker.alembic",
    }
    assert set(directives) == expected


def test_the_site_builds_strictly_with_every_public_name(tmp_path: Path) -> None:
    """mkdocs build --strict (broken links, anchors, nav, references fail) renders each public name."""
    import fastapi_sessionmaker
    from fastapi_sessionmaker import exceptions, testing

    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    built = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    reference = (tmp_path / "reference" / "index.html").read_text()
    anchors = set(re.findall(r'id="(fastapi_sessionmaker\.[\w.]+)"', reference))
    names = {
        f"fastapi_sessionmaker.{name}"
        for name in fastapi_sessionmaker.__all__
        if name not in exceptions.__all__
    }
    names |= {f"fastapi_sessionmaker.exceptions.{name}" for name in exceptions.__all__}
    names |= {f"fastapi_sessionmaker.testing.{name}" for name in testing.__all__}
    assert names <= anchors, f"not rendered in the API reference: {sorted(names - anchors)}"
    assert (tmp_path / "index.html").is_file()
    assert not list(tmp_path.rglob("_ext")), "the griffe extension was published with the site"
