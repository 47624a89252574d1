"""The pytest plugin, run on small user projects with ``pytester``: nothing a test commits survives.

Each user project has a sync and an async app whose own URL points at a file that must never be
created, tests that commit through the app and check the row inside the test's transaction, and a
session fixture that counts the rows on a fresh connection at the end of the run (per xdist worker).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastapi_sessionmaker.testing import TestDatabase
from fastapi_sessionmaker.testing.plugin import load_object
from tests.conftest import Databases

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "plugin_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(50), unique=True)
"""

SYNC_APP = """
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi_sessionmaker import DBSession, FastAPISessionMaker
from user_models import Note

db = FastAPISessionMaker("sqlite:///./app_never_created.db")
app = FastAPI()
db.init_app(app)


@app.post("/notes", status_code=201)
def add(text: str, session: DBSession) -> int:
    session.add(Note(text=text))
    session.flush()
    if text == "fail":
        raise HTTPException(400, "rolled back")
    return session.scalar(sa.select(sa.func.count(Note.id))) or 0


@app.get("/notes")
def count(session: DBSession) -> int:
    return session.scalar(sa.select(sa.func.count(Note.id))) or 0
"""

ASYNC_APP = """
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi_sessionmaker import AsyncDBSession, AsyncFastAPISessionMaker
from user_models import Note

db = AsyncFastAPISessionMaker("sqlite:///./async_app_never_created.db")
app = FastAPI()
db.init_app(app)


@app.post("/notes", status_code=201)
async def add(text: str, session: AsyncDBSession) -> int:
    session.add(Note(text=text))
    await session.flush()
    if text == "fail":
        raise HTTPException(400, "rolled back")
    return await session.scalar(sa.select(sa.func.count(Note.id))) or 0


@app.get("/notes")
async def count(session: AsyncDBSession) -> int:
    return await session.scalar(sa.select(sa.func.count(Note.id))) or 0
"""

CONFTEST = """
import pytest
import sqlalchemy as sa
from user_models import Note


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_the_end(fsm_engine):
    yield
    with fsm_engine.connect() as connection:
        left = connection.scalar(sa.select(sa.func.count(Note.id)))
    assert left == 0, f"{left} rows survived the run"
"""

SYNC_TESTS = """
import pytest
import sqlalchemy as sa
from user_models import Note


@pytest.mark.parametrize("n", range(4))
def test_commit_through_the_app(fsm_client, fsm_session, n):
    assert fsm_session.scalar(sa.select(sa.func.count(Note.id))) == 0
    assert fsm_client.post("/notes", params={"text": "a"}).status_code == 201
    assert fsm_client.post("/notes", params={"text": "fail"}).status_code == 400
    assert fsm_client.get("/notes").json() == 1
    assert fsm_session.scalars(sa.select(Note.text)).all() == ["a"]


def test_a_test_client_of_your_own_is_joined_too(fsm_session):
    from fastapi.testclient import TestClient
    import user_sync_app

    with TestClient(user_sync_app.app) as client:
        assert client.post("/notes", params={"text": "own"}).status_code == 201
    assert fsm_session.scalars(sa.select(Note.text)).all() == ["own"]


def test_the_test_session_commits_too(fsm_client, fsm_session):
    fsm_session.add(Note(text="from the test"))
    fsm_session.commit()
    assert fsm_client.get("/notes").json() == 1
"""

ASYNC_TESTS = """
import pytest
import sqlalchemy as sa
from user_models import Note
import user_async_app


@pytest.fixture(scope="session")
def fsm_app():
    return user_async_app.app


@pytest.mark.parametrize("n", range(4))
async def test_async_commit_through_the_app(fsm_async_client, fsm_async_session, n):
    assert await fsm_async_session.scalar(sa.select(sa.func.count(Note.id))) == 0
    assert (await fsm_async_client.post("/notes", params={"text": "a"})).status_code == 201
    assert (await fsm_async_client.post("/notes", params={"text": "fail"})).status_code == 400
    assert (await fsm_async_client.get("/notes")).json() == 1
    assert (await fsm_async_session.scalars(sa.select(Note.text))).all() == ["a"]


@pytest.mark.parametrize("n", range(2))
def test_async_app_under_the_test_client(fsm_client, n):
    assert fsm_client.get("/notes").json() == 0
    assert fsm_client.post("/notes", params={"text": "b"}).status_code == 201
    assert fsm_client.get("/notes").json() == 1
"""


def user_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        user_models=MODELS,
        user_sync_app=SYNC_APP,
        user_async_app=ASYNC_APP,
        conftest=CONFTEST,
        test_sync=SYNC_TESTS,
        test_async=ASYNC_TESTS,
    )
    pytester.makeini(
        """
        [pytest]
        fsm_app = user_sync_app:app
        fsm_metadata = user_models:Base.metadata
        filterwarnings = error
        """
    )


@pytest.fixture(params=["sqlite", "sqlite-memory", "postgresql", "mariadb"])
def user_database_url(request: pytest.FixtureRequest, databases: Databases) -> str:
    """The URL a user would configure (the plugin derives ``test_<name>`` from it)."""
    if request.param == "sqlite-memory":
        return "sqlite://"
    return databases.url(str(request.param))


@pytest.mark.parametrize("workers", [0, 2])
def test_commits_through_the_app_leave_nothing_behind(
    pytester: pytest.Pytester, user_database_url: str, workers: int
) -> None:
    if workers and user_database_url == "sqlite://":
        pytest.skip("in-memory SQLite is covered serially; each xdist worker has its own anyway")
    user_project(pytester)
    # -W error: also what the run leaves to the garbage collector at its end (unclosed sqlite3
    # connections are a ResourceWarning on Python 3.13).
    args = ["-p", "no:cacheprovider", "-W", "error", f"--fsm-database-url={user_database_url}"]
    if workers:
        args += ["-n", str(workers)]
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=12)
    assert result.ret == 0, result.stderr.str()
    assert not list(pytester.path.glob("*never_created*")), "the app's own database was used"


def test_test_database_is_dropped_after_the_run(pytester: pytest.Pytester, databases: Databases) -> None:
    import sqlalchemy as sa

    url = databases.url("postgresql")
    user_project(pytester)
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", f"--fsm-database-url={url}", "test_sync.py"
    )
    result.assert_outcomes(passed=6)
    name = TestDatabase(url).url.database
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            found = connection.scalar(
                sa.text("SELECT count(*) FROM pg_database WHERE datname = :name"), {"name": name}
            )
    finally:
        engine.dispose()
    assert found == 0


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_existing_database_used_as_is_keeps_no_rows(
    pytester: pytest.Pytester, databases: Databases, backend: str
) -> None:
    import sqlalchemy as sa

    from fastapi_sessionmaker import FastAPISessionMaker

    url = databases.url(backend)  # this process's database: the plugin must not drop it
    user_project(pytester)
    pytester.makeini(
        """
        [pytest]
        fsm_app = user_sync_app:app
        fsm_metadata = user_models:Base.metadata
        fsm_create_database = false
        filterwarnings = error
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--fsm-database-url={url}", timeout=120)
    result.assert_outcomes(passed=12)
    engine = FastAPISessionMaker(url).get_new_engine()
    try:
        with engine.connect() as connection:
            left = connection.scalar(sa.text("SELECT count(*) FROM plugin_notes"))
    finally:
        engine.dispose()
    assert left == 0


def test_inert_when_not_configured(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        def test_plain(request):
            assert request.getfixturevalue("fsm_app") is None
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "fastapi-sessionmaker:" not in result.stdout.str()
    assert not list(pytester.path.glob("*.db"))


def test_configured_run_names_the_app_in_the_header(pytester: pytest.Pytester) -> None:
    user_project(pytester)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_sync.py")
    result.assert_outcomes(passed=6)  # in-memory SQLite by default
    result.stdout.fnmatch_lines(["fastapi-sessionmaker: app user_sync_app:app, each test rolled back"])


def test_bad_app_spec_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfsm_app = no_such_module:app\n")
    pytester.makepyfile(test_x="def test_x(fsm_client):\n    assert fsm_client\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    assert "fsm_app = 'no_such_module:app': ModuleNotFoundError" in result.stdout.str() + result.stderr.str()


def test_load_object_calls_factories() -> None:
    assert load_object("os.path:join", "x") is os.path.join
    assert load_object("os:getcwd()", "x") == os.getcwd()
    with pytest.raises(pytest.UsageError, match=r"expected 'package\.module:attribute'"):
        load_object("os.path.join", "fsm_app")


def test_xdist_workers_get_their_own_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert TestDatabase("postgresql://u:secret@127.0.0.1/app").url.database == "test_app_gw1"
    assert TestDatabase("sqlite:///./data/app.db").url.database == "data/test_app_gw1.db"
    memory = TestDatabase("sqlite://").url
    assert memory.database is not None
    assert memory.database.endswith("_gw1")
    assert "secret" not in TestDatabase("postgresql://u:secret@127.0.0.1/app").safe_url()


def test_example_test_files_pass_as_is(databases: Databases) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["FSM_TEST_DATABASE_URL"] = databases.url("postgresql")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "examples/test_app.py",
            "examples/test_async_app.py",
            "examples/test_heroes.py",  # SQLModel's sessions join the test's transaction too
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_benchmark_quick_mode_runs() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_testing_plugin.py", "--quick", "--tests", "3", "--tables", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| SQLite (file) | rollback (plugin) |" in result.stdout
    assert "| SQLite (file) | recreate tables |" in result.stdout


# -- an app whose maker reads DATABASE_URI (the README's `FastAPISessionMaker()`) ----------------

ENV_MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class EnvNote(Base):
    __tablename__ = "plugin_env_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(50), unique=True)
"""

ENV_APP = """
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi_sessionmaker import DBSession, FastAPISessionMaker
from user_env_models import Base, EnvNote

db = FastAPISessionMaker()  # DATABASE_URI from the environment
app = FastAPI()
db.init_app(app)
Base.metadata.create_all(db.cached_engine)  # the README's pattern: at import


@app.post("/notes", status_code=201)
def add(text: str, session: DBSession) -> int:
    session.add(EnvNote(text=text))
    session.flush()
    return session.scalar(sa.select(sa.func.count(EnvNote.id))) or 0
"""

ENV_TESTS = """
import pytest
import sqlalchemy as sa
from user_env_models import EnvNote


@pytest.mark.parametrize("n", range(2))
def test_the_app_works_in_the_test_database(fsm_client, fsm_session, fsm_database, n):
    import user_env_app  # imported by the fsm_app fixture

    assert user_env_app.db.url.database == fsm_database.url.database
    assert fsm_client.post("/notes", params={"text": "env"}).status_code == 201
    assert fsm_session.scalars(sa.select(EnvNote.text)).all() == ["env"]
"""


def env_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(user_env_models=ENV_MODELS, user_env_app=ENV_APP, test_env=ENV_TESTS)
    pytester.makeini(
        """
        [pytest]
        fsm_app = user_env_app:app
        fsm_metadata = user_env_models:Base.metadata
        filterwarnings = error
        """
    )


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in ("DATABASE_URI", "DATABASE_SCHEME", "FSM_TEST_DATABASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("where", "workers"),
    [("default", 0), ("sqlite", 0), ("postgresql", 0), ("postgresql", 2), ("mariadb", 0)],
)
def test_a_maker_from_the_environment_gets_the_test_database(
    pytester: pytest.Pytester,
    databases: Databases,
    clean_environment: pytest.MonkeyPatch,
    where: str,
    workers: int,
) -> None:
    """``FastAPISessionMaker()`` with no DATABASE_URI set: the plugin provides the test database."""
    env_project(pytester)
    args = ["-p", "no:cacheprovider"]
    if where == "postgresql":
        args.append(f"--fsm-database-url={databases.url(where)}")
    elif where != "default":
        clean_environment.setenv("FSM_TEST_DATABASE_URL", databases.url(where))
    if workers:
        args += ["-n", str(workers)]
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=2)
    assert "DATABASE_URI is not set" not in result.stdout.str() + result.stderr.str()


def _has_table(url: str, table: str) -> bool:
    import sqlalchemy as sa

    from fastapi_sessionmaker import FastAPISessionMaker

    engine = FastAPISessionMaker(url).get_new_engine()
    try:
        return sa.inspect(engine).has_table(table)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_a_maker_from_the_environment_never_writes_into_the_configured_database(
    pytester: pytest.Pytester, databases: Databases, clean_environment: pytest.MonkeyPatch, backend: str
) -> None:
    """DATABASE_URI names a real database: the app, built from it at import, works in test_<name>."""
    if backend == "sqlite":
        real = f"sqlite:///{pytester.path}/real.db"
    else:
        real = databases.url(backend)
        assert not _has_table(real, "plugin_env_notes")
    clean_environment.setenv("DATABASE_URI", real)
    env_project(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)
    if backend == "sqlite":
        assert not (pytester.path / "real.db").exists(), "the configured SQLite database was written to"
    else:
        assert not _has_table(real, "plugin_env_notes"), "the app created its tables in the real database"


def test_database_uri_is_set_before_the_conftest_is_imported(
    pytester: pytest.Pytester, clean_environment: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(
        """
        from fastapi_sessionmaker import FastAPISessionMaker

        db = FastAPISessionMaker()  # a root conftest.py that imports the app
        """
    )
    pytester.makepyfile(
        test_early="""
        import os
        import conftest


        def test_the_conftest_maker_has_the_test_database(fsm_database):
            assert conftest.db.url.database == fsm_database.url.database
            assert os.environ["FSM_TEST_DATABASE_URL"] == "sqlite://"
        """
    )
    pytester.makeini("[pytest]\nfsm_database_url = sqlite://\nfilterwarnings = error\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "DATABASE_URI" not in os.environ, "the plugin did not restore the environment"
    assert "FSM_TEST_DATABASE_URL" not in os.environ


# -- the sync fixtures with an async-only app: a clear error, never a hang -----------------------

SYNC_FIXTURES_ON_ASYNC_APP = """
import sqlalchemy as sa
from user_models import Note


def test_sync_session_beside_the_async_app(fsm_client, fsm_session):
    fsm_session.add(Note(text="taken"))
    fsm_session.commit()
    assert fsm_client.post("/notes", params={"text": "taken"}).status_code == 409


async def test_sync_session_beside_the_async_client(fsm_async_client, fsm_session):
    fsm_session.add(Note(text="taken"))
    fsm_session.commit()
    assert (await fsm_async_client.post("/notes", params={"text": "taken"})).status_code == 409


def test_the_client_alone_still_works(fsm_client):
    assert fsm_client.post("/notes", params={"text": "alone"}).status_code == 201
    assert fsm_client.get("/notes").json() == 1
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_sync_fixtures_with_an_async_only_app_fail_at_once(
    pytester: pytest.Pytester, databases: Databases, backend: str
) -> None:
    """fsm_session is another connection than the async app's: refused before the test runs.

    Before, the app waited for the test's row lock on PostgreSQL (forever) and MariaDB (50 s), and
    saw nothing of the test's rows on SQLite.
    """
    pytester.makepyfile(user_models=MODELS, user_async_app=ASYNC_APP, test_mixed=SYNC_FIXTURES_ON_ASYNC_APP)
    pytester.makeini(
        """
        [pytest]
        fsm_app = user_async_app:app
        fsm_metadata = user_models:Base.metadata
        filterwarnings = error
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--fsm-database-url={databases.url(backend)}", timeout=30
    )
    result.assert_outcomes(passed=1, errors=2)
    output = result.stdout.str()
    for fixture in ("fsm_client", "fsm_async_client"):
        assert f"fsm_session cannot be used with {fixture}: the app's makers are all async" in output
    assert "fsm_async_client + fsm_async_session" in output
