"""fastapi_sessionmaker.alembic with a real Alembic project (docs/alembic.md) on the three databases.

The project is ``tests/alembic_project/``; its ``env.py`` and ``myapp/main.py`` are the page's code
blocks, written out here, so the page shows what is run. The CLI runs in subprocesses with only
``DATABASE_URI`` set; three processes run the start-up step at the same moment.
"""

import asyncio
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from fastapi import FastAPI

from fastapi_sessionmaker import (
    AsyncFastAPISessionMaker,
    ConfigurationError,
    FastAPISessionMaker,
    MigrationError,
    health_router,
)
from fastapi_sessionmaker._locks import database_lock
from fastapi_sessionmaker.alembic import Migrations, lock_name
from tests.conftest import Databases, wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "alembic.md").read_text()
PROJECT = Path(__file__).resolve().parent / "alembic_project"
MARKER = "<!-- test: tests/test_alembic.py -->"
TABLES = ("alembic_demo_log", "alembic_demo_notes", "alembic_version")
SECRET = "s3cret-pw"
SECONDS = 120  # any one subprocess; each normally takes one or two


def page_blocks() -> list[str]:
    return re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", PAGE, flags=re.DOTALL)


ENV_PY, MAIN_PY, CHECK_PY = page_blocks()


ASYNC_DRIVERS = {"postgresql": "asyncpg", "mysql": "aiomysql", "sqlite": "aiosqlite"}


def driver_url(url: str, twin: str) -> str:
    """The driverless test URL with the twin's driver named (async: asyncpg, aiomysql, aiosqlite)."""
    if twin == "sync":
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}+{ASYNC_DRIVERS[scheme]}://{rest}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project with the page's env.py and main.py."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "migrations" / "env.py").write_text(ENV_PY)
    (root / "myapp" / "main.py").write_text(MAIN_PY)
    return root


def _drop(url: str) -> None:
    engine = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    try:
        with engine.begin() as connection:
            for table in TABLES:
                connection.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        engine.dispose()


@pytest.fixture
def url(backend: str, databases: Databases, tmp_path: Path) -> Iterator[str]:
    """A driverless URL of an empty database: the project's tables dropped before and after."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/app.db"
        return
    found = databases.url(backend)
    _drop(found)
    yield found
    _drop(found)


def alembic(project: Path, database_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The Alembic CLI in a subprocess whose environment has only ``DATABASE_URI`` (and ``PATH``)."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), *args],
        cwd=project,
        env={"PATH": os.environ.get("PATH", ""), "DATABASE_URI": database_uri},
        capture_output=True,
        text=True,
        timeout=SECONDS,
        check=False,
    )


def stored(url: str) -> dict[str, Any]:
    """What the migrations left: the version, the log of runs, the notes' columns."""
    engine = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            if not inspector.has_table("alembic_version"):
                return {"version": [], "log": [], "columns": []}
            return {
                "version": connection.execute(sa.text("SELECT version_num FROM alembic_version"))
                .scalars()
                .all(),
                "log": connection.execute(sa.text("SELECT revision FROM alembic_demo_log ORDER BY id"))
                .scalars()
                .all(),
                "columns": sorted(c["name"] for c in inspector.get_columns("alembic_demo_notes")),
            }
    finally:
        engine.dispose()


AT_HEAD = {"version": ["r0002"], "log": ["r0001", "r0002"], "columns": ["author", "id", "text"]}


def in_process(project: Path, url: str, revision: str, *, down: bool = False) -> None:
    """Upgrade or downgrade through Alembic's API on a connection we give env.py."""
    config = Config(str(project / "alembic.ini"))
    engine = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
            connection.commit()
    finally:
        engine.dispose()


def test_the_page_has_its_examples() -> None:
    assert PAGE.count(MARKER) == 3
    assert "run_migrations(Base.metadata" in ENV_PY
    assert "migrations=Migrations(" in MAIN_PY
    assert 'mode="check"' in CHECK_PY


# -- env.py: the CLI with only DATABASE_URI ------------------------------------------------------
def test_cli_upgrades_with_only_database_uri(project: Path, url: str, backend: str, twin: str) -> None:
    database_uri = driver_url(url, twin)
    if backend == "postgresql":  # trust authentication: a password in the URL is accepted, unused
        database_uri = database_uri.replace("postgres@", f"postgres:{SECRET}@")
    done = alembic(project, database_uri, "upgrade", "head")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Running upgrade  -> r0001" in done.stderr
    assert "Running upgrade r0001 -> r0002" in done.stderr
    assert SECRET not in output
    assert stored(url) == AT_HEAD


@pytest.mark.parametrize("scheme", ["postgresql", "mysql", "sqlite"])
def test_offline_sql_has_literal_values_and_no_password(project: Path, scheme: str) -> None:
    database_uri = {
        "postgresql": f"postgresql://app:{SECRET}@db.invalid:5432/shop",
        "mysql": f"mysql://app:{SECRET}@db.invalid:3306/shop",
        "sqlite": f"sqlite:///{project}/never-created.db",
    }[scheme]
    done = alembic(project, database_uri, "upgrade", "head", "--sql")
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE alembic_demo_notes" in done.stdout
    assert "INSERT INTO alembic_demo_log (revision) VALUES ('r0001')" in done.stdout
    assert "INSERT INTO alembic_demo_log (revision) VALUES ('r0002')" in done.stdout
    assert "UPDATE alembic_version SET version_num='r0002'" in done.stdout
    assert SECRET not in done.stdout + done.stderr
    assert not (project / "never-created.db").exists()  # offline: nothing connected


def test_cli_names_the_variable_when_no_database_is_set(project: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), "upgrade", "head"],
        cwd=project,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=SECONDS,
        check=False,
    )
    assert done.returncode != 0
    assert "ConfigurationError: DATABASE_URI is not set" in done.stderr


# -- the start-up step ----------------------------------------------------------------------------
CHILD = """
import asyncio, sys
from myapp.main import app
print("ready", flush=True)
sys.stdin.readline()  # all three start the step at the same moment

async def main():
    async with app.router.lifespan_context(app):
        print("started", flush=True)

asyncio.run(main())
"""


def test_three_processes_starting_at_once_migrate_exactly_once(project: Path, url: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URI": url}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=project,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + SECONDS
        for process in processes:  # each has imported the app: a line, or EOF if it died
            assert process.stdout is not None
            readable, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, "a process did not import the app in time"
            assert process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=SECONDS) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:  # pragma: no cover - only when a test failed
                process.kill()
                process.wait(SECONDS)
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert out == "started\n", err
    assert stored(url) == AT_HEAD  # each revision ran once: one row per revision in the log


def make(twin: str, url: str) -> FastAPISessionMaker | AsyncFastAPISessionMaker:
    return FastAPISessionMaker(url) if twin == "sync" else AsyncFastAPISessionMaker(url)


def test_readiness_is_not_ready_while_the_schema_is_behind_head(
    project: Path, url: str, twin: str, serve: Any
) -> None:
    maker = make(twin, url)
    app = FastAPI()
    maker.init_app(app, migrations=Migrations(project / "alembic.ini"))
    app.include_router(health_router())
    client: httpx.Client = serve(app)  # the start-up step migrates the empty database
    assert stored(url) == AT_HEAD
    ready = client.get("/healthz")
    assert ready.status_code == 200, ready.text
    report = ready.json()["databases"]["default"]
    assert report["schema"] == {"status": "current", "current": ["r0002"], "head": ["r0002"]}

    in_process(project, url, "r0001", down=True)
    behind = client.get("/healthz")
    assert behind.status_code == 503
    assert behind.headers["Retry-After"] == "1"
    report = behind.json()["databases"]["default"]
    assert report["status"] == "not_ready"
    assert report["error"] == "schema behind head"
    assert report["schema"] == {"status": "behind", "current": ["r0001"], "head": ["r0002"]}

    in_process(project, url, "head")
    assert client.get("/healthz").status_code == 200


def test_check_mode_refuses_to_start_behind_head_and_starts_at_head(
    project: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)  # the page's Migrations("alembic.ini")
    monkeypatch.setenv("DATABASE_URI", url)
    in_process(project, url, "r0001")
    namespace: dict[str, Any] = {}
    exec(CHECK_PY, namespace)
    app, db = namespace["app"], namespace["db"]

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    try:
        behind = "is behind: at revision r0001, the migrations' head is r0002; run `alembic upgrade head`"
        with pytest.raises(MigrationError, match=re.escape(behind)):
            asyncio.run(start())
        assert stored(url)["version"] == ["r0001"]  # check mode changed nothing
        in_process(project, url, "head")
        asyncio.run(start())
    finally:
        db.dispose()


def apply(migrations: Migrations, twin: str, url: str) -> None:
    """The start-up step once, on a maker of its own (an async one lives in one event loop)."""

    async def run() -> None:
        maker = make(twin, url)
        try:
            await migrations.apply(maker)
        finally:
            if isinstance(maker, AsyncFastAPISessionMaker):
                await maker.dispose()
            else:
                maker.dispose()

    asyncio.run(run())


def test_a_held_lock_makes_the_start_up_step_wait_then_give_up(project: Path, url: str, twin: str) -> None:
    holder = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    migrations = Migrations(project / "alembic.ini", lock_timeout=0.3)
    held = re.escape("for more than 0.3 s")
    try:
        with holder.connect() as connection:
            with database_lock(connection, lock_name(), timeout=5), pytest.raises(MigrationError, match=held):
                apply(migrations, twin, url)
            assert stored(url)["version"] == []  # nothing ran while another process held the lock
        apply(migrations, twin, url)  # free again
        assert stored(url) == AT_HEAD
    finally:
        holder.dispose()


def test_a_schema_ahead_of_the_code_starts_with_a_warning_and_is_ready(
    project: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    in_process(project, url, "head")
    engine = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    try:
        with engine.begin() as connection:  # a newer release migrated it to a revision unknown here
            connection.execute(sa.text("UPDATE alembic_version SET version_num = 'f00d'"))
    finally:
        engine.dispose()
    migrations = Migrations(project / "alembic.ini")
    with caplog.at_level("WARNING", logger="fastapi_sessionmaker"):
        apply(migrations, "sync", url)
    assert "ahead of this code's migrations: at revision f00d, the migrations' head is r0002" in caplog.text
    assert stored(url)["version"] == ["f00d"]  # nothing was run or undone
    db = FastAPISessionMaker(url)
    try:
        assert asyncio.run(migrations.readiness(db)) == (
            None,
            {"schema": {"status": "ahead", "current": ["f00d"], "head": ["r0002"]}},
        )
    finally:
        db.dispose()


WAITING = {  # sessions of this database that wait for a lock of ours
    "postgresql": "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    "mysql": "SELECT count(*) FROM information_schema.processlist "
    "WHERE db = DATABASE() AND info LIKE 'SELECT GET_LOCK(%alembic:alembic_version%'",
}


def waiting_for_the_lock(connection: sa.Connection) -> int:
    count = connection.execute(sa.text(WAITING[connection.dialect.name])).scalar_one()
    connection.rollback()
    return int(count)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])  # the server shows who waits
def test_the_cli_waits_for_a_worker_that_holds_the_lock(project: Path, url: str) -> None:
    holder = sa.create_engine(FastAPISessionMaker(url).url, poolclass=sa.NullPool)
    try:
        with holder.connect() as connection, holder.connect() as observer:
            with database_lock(connection, lock_name(), timeout=5):
                cli = subprocess.Popen(
                    [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), "upgrade", "head"],
                    cwd=project,
                    env={"PATH": os.environ.get("PATH", ""), "DATABASE_URI": url},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                try:
                    wait_until(
                        lambda: waiting_for_the_lock(observer) or cli.poll() is not None,
                        "the CLI waits",
                        SECONDS,
                    )
                    assert cli.poll() is None, cli.communicate()[1]
                    assert stored(url)["version"] == []  # it waits: nothing migrated yet
                except BaseException:  # pragma: no cover - only when a test failed
                    cli.kill()
                    cli.wait(SECONDS)
                    raise
            _, err = cli.communicate(timeout=SECONDS)
        assert cli.returncode == 0, err
        assert stored(url) == AT_HEAD
    finally:
        holder.dispose()


def test_bad_arguments_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("mode='migrate': use 'upgrade'")):
        Migrations(mode="migrate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lock_timeout=0"):
        Migrations(lock_timeout=0)
    missing = Migrations(tmp_path / "nowhere.ini")
    db = FastAPISessionMaker(f"sqlite:///{tmp_path}/app.db")
    try:
        with pytest.raises(ConfigurationError, match=r"no Alembic config at .*nowhere\.ini"):
            asyncio.run(missing.apply(db))
    finally:
        db.dispose()


def test_an_in_memory_sqlite_database_migrates_on_its_one_connection(project: Path) -> None:
    db = FastAPISessionMaker("sqlite://")  # StaticPool: the app and the migrations share it
    migrations = Migrations(project / "alembic.ini", mode="upgrade")
    try:
        asyncio.run(migrations.apply(db))
        with db.context_session() as session:
            assert session.execute(sa.text("SELECT revision FROM alembic_demo_log")).scalars().all() == [
                "r0001",
                "r0002",
            ]
        assert asyncio.run(migrations.readiness(db)) == (
            None,
            {"schema": {"status": "current", "current": ["r0002"], "head": ["r0002"]}},
        )
    finally:
        db.dispose()


def test_without_alembic_the_import_names_the_extra() -> None:
    hide_alembic = "import sys; sys.modules['alembic'] = None; import fastapi_sessionmaker.alembic"
    done = subprocess.run(
        [sys.executable, "-c", hide_alembic],
        capture_output=True,
        text=True,
        timeout=SECONDS,
        check=False,
    )
    assert done.returncode != 0
    assert "pip install 'fastapi-sessionmaker[alembic]'" in done.stderr.splitlines()[-1]
