"""The public surface: exactly the intended names, each documented, and docstring examples that run."""

from __future__ import annotations

import ast
import asyncio
import doctest
import gc
import importlib
import inspect
import itertools
import pkgutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

import fastapi_sessionmaker
from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

EXPECTED_ROOT = {
    # the makers and the request session aliases
    "FastAPISessionMaker",
    "AsyncFastAPISessionMaker",
    "DBSession",
    "AsyncDBSession",
    "ReadOnlySession",
    "dependency_of",
    # the commit rule and the HTTP edge
    "CommitPolicy",
    "Problem",
    "default_error_mapper",
    "is_retryable",
    # a row or a problem JSON 404
    "get_or_404",
    "one_or_404",
    "NotFoundError",
    # settings
    "DatabaseSettings",
    # health and pool stats
    "health_router",
    "pool_stats",
    # per-transaction settings
    "set_local",
    "use_schemas",
    # exceptions
    "FastAPISessionMakerError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "MigrationError",
    "NotInstalledError",
    "ReadOnlySessionError",
    "ResponseStartedError",
    "SessionClosedError",
    # side effects after the commit
    "on_commit",
    "on_rollback",
    # observability: statement counts per request
    "RequestStats",
    "request_stats",
    "TransactionSettingsError",
    # fastapi-utils names
    "get_engine",
    "get_sessionmaker_for_engine",
    "context_session",
    "GUID",
    "GUID_DEFAULT_SQLITE",
    "GUID_SERVER_DEFAULT_POSTGRESQL",
    "setup_guids_postgresql",
    "async_setup_guids_postgresql",
}

# fastapi-utils' module names: ``fastapi_utils.session`` and ``fastapi_utils.guid_type``.
COMPAT = {
    "fastapi_sessionmaker.session": {
        "FastAPISessionMaker",
        "get_engine",
        "get_sessionmaker_for_engine",
        "context_session",
    },
    "fastapi_sessionmaker.guid_type": {
        "GUID",
        "GUID_DEFAULT_SQLITE",
        "GUID_SERVER_DEFAULT_POSTGRESQL",
        "setup_guids_postgresql",
    },
}

PACKAGE_DIR = Path(fastapi_sessionmaker.__file__).parent


def _package_modules() -> list[str]:
    names = [fastapi_sessionmaker.__name__]
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="fastapi_sessionmaker."):
        names.append(info.name)
    return sorted(names)


MODULES = _package_modules()


def _attribute_docstrings() -> dict[str, str]:
    """Module-level ``NAME = value`` followed by a string literal, in every module of the package."""
    docs: dict[str, str] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for statement, following in itertools.pairwise(body):
            targets: list[ast.expr] = []
            if isinstance(statement, ast.Assign):
                targets = list(statement.targets)
            elif isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                for target in targets:
                    if isinstance(target, ast.Name):
                        docs[target.id] = following.value.value
    return docs


def test_root_exports_exactly_the_intended_names() -> None:
    exported = fastapi_sessionmaker.__all__
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    assert set(exported) == EXPECTED_ROOT


def test_root_has_no_other_public_names() -> None:
    public = {
        name
        for name, value in vars(fastapi_sessionmaker).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    # ``Annotated``, ``Depends``, ``Session`` ... are imported to build the aliases; they must not leak
    # into ``from fastapi_sessionmaker import *``.
    star: dict[str, object] = {}
    exec("from fastapi_sessionmaker import *", star)
    assert set(star) - {"__builtins__"} == EXPECTED_ROOT
    assert public == EXPECTED_ROOT, sorted(public ^ EXPECTED_ROOT)


@pytest.mark.parametrize("name", sorted(EXPECTED_ROOT))
def test_every_export_exists_and_is_documented(name: str) -> None:
    value = getattr(fastapi_sessionmaker, name)
    defined_here = getattr(value, "__module__", "").startswith("fastapi_sessionmaker")
    if defined_here and (inspect.isclass(value) or inspect.isfunction(value)):
        own = value.__doc__
        assert own, f"{name} has no docstring"
        assert own.strip(), f"{name} has an empty docstring"
        is_exception = inspect.isclass(value) and issubclass(value, BaseException)
        if not is_exception:  # exceptions are shown by the examples that raise them
            doc = inspect.getdoc(value) or ""
            assert "Example" in doc, f"{name}'s docstring has no Example section"
            assert ">>>" in doc, f"{name}'s docstring example has no code"
    else:
        # Constants, ``Annotated`` aliases and borrowed objects (``uuid.uuid4``) carry an
        # attribute docstring in the module that defines them.
        doc = _attribute_docstrings().get(name, "")
        assert doc.strip(), f"{name} has no attribute docstring"


@pytest.mark.parametrize("module_name", sorted(COMPAT))
def test_fastapi_utils_module_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in COMPAT[module_name]:
        assert hasattr(module, name), f"{module_name}.{name} is missing"
        assert name in module.__all__
        # The same objects as the root package's, so isinstance checks and caches agree.
        assert getattr(module, name) is getattr(fastapi_sessionmaker, name)


def test_fastapi_utils_signatures() -> None:
    from fastapi_sessionmaker import guid_type, session

    assert list(inspect.signature(session.get_engine).parameters) == ["uri"]
    assert list(inspect.signature(session.get_sessionmaker_for_engine).parameters) == ["engine"]
    assert list(inspect.signature(session.context_session).parameters) == ["engine"]
    assert list(inspect.signature(guid_type.setup_guids_postgresql).parameters) == ["engine"]
    parameters = inspect.signature(session.FastAPISessionMaker).parameters
    assert next(iter(parameters)) == "database_uri"
    for attribute in (
        "cached_engine",
        "cached_sessionmaker",
        "get_new_engine",
        "get_new_sessionmaker",
        "get_db",
        "context_session",
        "reset_cache",
    ):
        assert hasattr(session.FastAPISessionMaker, attribute), attribute


def test_doctests_are_collected() -> None:
    """Guards the doctest runner below: it must find the examples, not silently run nothing."""
    finder = doctest.DocTestFinder()
    found = sum(len(test.examples) for name in MODULES for test in finder.find(importlib.import_module(name)))
    assert found >= 20


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every docstring example in the package runs (in a temporary directory: some create files)."""
    monkeypatch.chdir(tmp_path)
    for variable in ("DATABASE_URI", "DATABASE_SCHEME"):
        monkeypatch.delenv(variable, raising=False)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, globs=dict(vars(module)))
    leaks = []
    for test in tests:
        before = set(test.globs)
        runner.run(test, clear_globs=False)
        # What an example leaves open is this example's leak, reported here: not a ResourceWarning
        # ("unclosed database", Python 3.13) that fails whichever test runs when it is collected.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            _release({name: value for name, value in test.globs.items() if name not in before})
            test.globs.clear()
            gc.collect()
        leaks += [f"{test.name}: {w.message}" for w in caught if issubclass(w.category, ResourceWarning)]
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name}"
    assert not leaks, f"docstring examples left connections open: {leaks}"


def _release(names: dict[str, Any]) -> None:
    """Dispose the engines an example kept in its names, as the end of a reader's script would."""
    for value in names.values():
        if isinstance(value, Session):
            value.close()
            value = value.bind
        elif isinstance(value, sessionmaker):
            value = value.kw.get("bind")
        if isinstance(value, sa.Engine | FastAPISessionMaker):
            value.dispose()
        elif isinstance(value, AsyncEngine | AsyncFastAPISessionMaker):
            asyncio.run(value.dispose())
