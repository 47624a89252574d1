"""Error classification (``_policy``): by the driver's SQLSTATE or error number, whatever the class.

Pure unit tests on real driver exception objects (psycopg, asyncpg and SQLAlchemy's adapter for it,
PyMySQL / aiomysql, sqlite3 / aiosqlite), wrapped in each ``DBAPIError`` class SQLAlchemy might
give them; plus real servers refusing a connection (asyncpg's 53300 is a plain ``DBAPIError``).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoints' local annotations.

import sqlite3
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import asyncpg
import httpx
import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from fastapi_sessionmaker import default_error_mapper
from fastapi_sessionmaker._errors import (
    classify,
    error_code,
    is_connection_error,
    is_integrity_error,
    is_retryable,
)
from tests import conflicts
from tests.conftest import MakerFactory

# Every DBAPIError class but IntegrityError and InterfaceError (those two decide by class).
WRAPPERS: list[type[sa.exc.DBAPIError]] = [
    sa.exc.DBAPIError,
    sa.exc.DatabaseError,
    sa.exc.OperationalError,
    sa.exc.InternalError,
    sa.exc.ProgrammingError,
    sa.exc.DataError,
    sa.exc.NotSupportedError,
]


def asyncpg_adapted(error: Exception) -> BaseException:
    """What SQLAlchemy's asyncpg adapter raises for ``error`` (``raise Error(...) from error``)."""
    adapted: BaseException = AsyncAdapt_asyncpg_dbapi.Error(  # type: ignore[no-untyped-call]
        f"<class '{type(error).__name__}'>: {error}", error
    )
    adapted.__cause__ = error
    return adapted


def pymysql_error(number: int, sqlstate: str, message: str) -> BaseException:
    """The exception PyMySQL (and aiomysql, which uses its errors) raises for an error packet."""
    packet = b"\xff" + struct.pack("<h", number) + b"#" + sqlstate.encode() + message.encode()
    try:
        pymysql.err.raise_mysql_exception(packet)
    except pymysql.err.MySQLError as exc:
        error: BaseException = exc
        return error
    raise AssertionError("PyMySQL did not raise")  # pragma: no cover


def sqlite_error(tmp: Path, what: str) -> BaseException:
    """A real sqlite3 exception (aiosqlite raises the same ones)."""
    path = tmp / "errors.db"
    try:
        if what == "cantopen":
            sqlite3.connect(tmp / "missing" / "x.db")
        first = sqlite3.connect(path, isolation_level=None)
        second = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            first.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER PRIMARY KEY)")
            first.execute("INSERT OR IGNORE INTO t VALUES (1)")
            if what == "busy":
                first.execute("BEGIN IMMEDIATE")
                second.execute("BEGIN IMMEDIATE")
            elif what == "constraint":
                second.execute("INSERT INTO t VALUES (1)")
            else:
                second.execute("SELECT no_such_column FROM t")
        finally:
            first.close()
            second.close()
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("sqlite3 did not raise")  # pragma: no cover


apg = asyncpg.exceptions

# (id, orig factory, expected status). "Unavailable" is 503, "integrity" 409, anything else 500.
CASES: list[tuple[str, Callable[[Path], BaseException], int]] = [
    ("asyncpg-57P03-adapted", lambda _: asyncpg_adapted(apg.CannotConnectNowError("x")), 503),
    ("asyncpg-57P03-raw", lambda _: apg.CannotConnectNowError("starting up"), 503),
    ("asyncpg-57P01-adapted", lambda _: asyncpg_adapted(apg.AdminShutdownError("x")), 503),
    ("asyncpg-57P02-adapted", lambda _: asyncpg_adapted(apg.CrashShutdownError("x")), 503),
    ("asyncpg-53300-adapted", lambda _: asyncpg_adapted(apg.TooManyConnectionsError("x")), 503),
    ("asyncpg-08006-adapted", lambda _: asyncpg_adapted(apg.ConnectionFailureError("x")), 503),
    ("asyncpg-23505-adapted", lambda _: asyncpg_adapted(apg.UniqueViolationError("x")), 409),
    ("asyncpg-23503-adapted", lambda _: asyncpg_adapted(apg.ForeignKeyViolationError("x")), 409),
    ("asyncpg-42703-adapted", lambda _: asyncpg_adapted(apg.UndefinedColumnError("x")), 500),
    ("psycopg-57P03", lambda _: psycopg.errors.CannotConnectNow("starting up"), 503),
    ("psycopg-57P01", lambda _: psycopg.errors.AdminShutdown("terminating connection"), 503),
    ("psycopg-53300", lambda _: psycopg.errors.TooManyConnections("too many"), 503),
    ("psycopg-08006", lambda _: psycopg.errors.ConnectionFailure("lost"), 503),
    ("psycopg-23505", lambda _: psycopg.errors.UniqueViolation("duplicate"), 409),
    ("psycopg-23514", lambda _: psycopg.errors.CheckViolation("check"), 409),
    ("psycopg-42P01", lambda _: psycopg.errors.UndefinedTable("no table"), 500),
    ("pymysql-2013", lambda _: pymysql_error(2013, "HY000", "Lost connection"), 503),
    ("pymysql-1040", lambda _: pymysql_error(1040, "08004", "Too many connections"), 503),
    ("pymysql-1226", lambda _: pymysql_error(1226, "42000", "max_user_connections"), 503),
    ("pymysql-1053", lambda _: pymysql_error(1053, "08S01", "Server shutdown in progress"), 503),
    ("pymysql-1062", lambda _: pymysql_error(1062, "23000", "Duplicate entry"), 409),
    ("pymysql-1451", lambda _: pymysql_error(1451, "23000", "a foreign key constraint fails"), 409),
    ("pymysql-1452", lambda _: pymysql_error(1452, "23000", "a foreign key constraint fails"), 409),
    ("pymysql-4025", lambda _: pymysql_error(4025, "23000", "CONSTRAINT `c` failed"), 409),
    ("pymysql-3819", lambda _: pymysql_error(3819, "HY000", "Check constraint is violated"), 409),
    ("pymysql-1054", lambda _: pymysql_error(1054, "42S22", "Unknown column"), 500),
    ("sqlite-busy", lambda tmp: sqlite_error(tmp, "busy"), 503),
    ("sqlite-cantopen", lambda tmp: sqlite_error(tmp, "cantopen"), 503),
    ("sqlite-constraint", lambda tmp: sqlite_error(tmp, "constraint"), 409),
    ("sqlite-no-such-column", lambda tmp: sqlite_error(tmp, "other"), 500),
]


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(("make_orig", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_code_decides_whatever_the_class(
    make_orig: Callable[[Path], BaseException],
    status: int,
    wrapper: type[sa.exc.DBAPIError],
    tmp_path: Path,
) -> None:
    orig = make_orig(tmp_path)
    exc = wrapper("SELECT 1", {}, orig)
    problem = default_error_mapper(exc)
    assert problem is not None
    assert problem.status == status, (type(orig), exc)
    assert is_connection_error(exc) is (status == 503)
    assert is_integrity_error(exc) is (status == 409)
    assert not is_retryable(exc)
    if status == 503:
        assert problem.headers == {"Retry-After": "1"}


# (id, orig factory, code, retryable). Serialization failures and deadlocks are retryable; lock
# wait timeouts are not (the lock holder is still there). All of them are 503 with Retry-After.
CONFLICTS: list[tuple[str, Callable[[], BaseException], str, bool]] = [
    ("psycopg-40001", lambda: psycopg.errors.SerializationFailure("could not serialize"), "40001", True),
    ("psycopg-40P01", lambda: psycopg.errors.DeadlockDetected("deadlock detected"), "40P01", True),
    ("asyncpg-40001-adapted", lambda: asyncpg_adapted(apg.SerializationError("x")), "40001", True),
    ("asyncpg-40P01-adapted", lambda: asyncpg_adapted(apg.DeadlockDetectedError("x")), "40P01", True),
    ("pymysql-1213", lambda: pymysql_error(1213, "40001", "Deadlock found"), "1213", True),
    ("pymysql-1020", lambda: pymysql_error(1020, "HY000", "Record has changed"), "1020", True),
    ("pymysql-1205", lambda: pymysql_error(1205, "HY000", "Lock wait timeout"), "1205", False),
    ("psycopg-55P03", lambda: psycopg.errors.LockNotAvailable("could not obtain lock"), "55P03", False),
    ("asyncpg-55P03-adapted", lambda: asyncpg_adapted(apg.LockNotAvailableError("x")), "55P03", False),
]


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(
    ("make_orig", "code", "retryable"), [c[1:] for c in CONFLICTS], ids=[c[0] for c in CONFLICTS]
)
def test_serialization_failures_and_deadlocks_are_retryable_and_503_whatever_the_class(
    make_orig: Callable[[], BaseException], code: str, retryable: bool, wrapper: type[sa.exc.DBAPIError]
) -> None:
    exc = wrapper("UPDATE t SET v = %(v)s", {"v": 1}, make_orig())
    assert is_retryable(exc) is retryable
    assert error_code(exc) == code
    problem = default_error_mapper(exc, retry_after=2)
    assert problem is not None
    assert (problem.status, problem.headers) == (503, {"Retry-After": "2"})
    assert "retry" in problem.detail
    assert not is_connection_error(exc)
    assert not is_integrity_error(exc)


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(
    "make_orig",
    [
        lambda: psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
        lambda: asyncpg_adapted(apg.ReadOnlySQLTransactionError("x")),
    ],
    ids=["psycopg-25006", "asyncpg-25006-adapted"],
)
def test_a_write_in_a_read_only_transaction_is_a_500_that_says_so(
    make_orig: Callable[[], BaseException], wrapper: type[sa.exc.DBAPIError]
) -> None:
    """SQLSTATE 25006: a write sent to a hot standby (a read replica) or a READ ONLY transaction."""
    exc = wrapper("INSERT INTO t VALUES (1)", {}, make_orig())
    assert classify(exc.orig) == "read_only"
    assert error_code(exc) == "25006"
    problem = default_error_mapper(exc)
    assert problem is not None
    assert problem.status == 500
    assert "read-only transaction" in problem.detail
    assert "INSERT" not in problem.detail  # no SQL in the answer
    assert not is_retryable(exc)
    assert not is_connection_error(exc)


def test_unwrapped_asyncpg_conflicts_are_retryable() -> None:
    """asyncpg's own exception, when SQLAlchemy did not wrap it, is classified by its SQLSTATE."""
    for error in (apg.SerializationError("x"), apg.DeadlockDetectedError("x")):
        assert is_retryable(error)
        assert default_error_mapper(error).status == 503  # type: ignore[union-attr]
    assert not is_retryable(apg.UniqueViolationError("x"))
    assert not is_retryable(apg.LockNotAvailableError("x"))


def test_what_is_not_retryable() -> None:
    serialization = psycopg.errors.SerializationFailure("could not serialize")
    assert not is_retryable(sa.exc.IntegrityError("INSERT", {}, serialization))  # the class decides
    assert not is_retryable(sa.exc.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("dup")))
    assert not is_retryable(sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("lost")))
    assert not is_retryable(sa.exc.OperationalError("x", {}, pymysql_error(2013, "HY000", "Lost")))
    assert not is_retryable(sa.exc.PendingRollbackError("roll back first"))
    assert not is_retryable(ValueError("not a database error"))
    assert not is_retryable(ConnectionRefusedError(111, "Connection refused"))
    assert error_code(ValueError("no code")) is None


def test_what_dbapierror_instance_builds_is_classified_by_code() -> None:
    # SQLAlchemy picks the class by the driver's class name: the adapter's "Error" is DBAPIError.
    orig = asyncpg_adapted(asyncpg.exceptions.CannotConnectNowError("the database system is starting up"))
    exc = sa.exc.DBAPIError.instance("SELECT 1", {}, orig, AsyncAdapt_asyncpg_dbapi.Error)
    assert type(exc) is sa.exc.DBAPIError
    problem = default_error_mapper(exc)
    assert problem is not None
    assert problem.status == 503


@pytest.mark.parametrize(
    ("wrapper", "status"),
    [(sa.exc.OperationalError, 503), (sa.exc.DBAPIError, 500), (sa.exc.ProgrammingError, 500)],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_without_a_code_only_operational_errors_are_unavailable(
    wrapper: type[sa.exc.DBAPIError], status: int
) -> None:
    # psycopg's client-side connection failures carry no SQLSTATE and are OperationalError.
    exc = wrapper("SELECT 1", {}, psycopg.OperationalError("connection failed"))
    problem = default_error_mapper(exc)
    assert problem is not None
    assert problem.status == status


def test_an_os_error_args_are_not_read_as_a_mysql_error_number() -> None:
    refused = sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "Connection refused"))
    assert is_connection_error(refused)


def test_interface_errors_and_invalidated_connections_stay_unavailable() -> None:
    no_code = Exception("connection is closed")
    assert is_connection_error(sa.exc.InterfaceError("SELECT 1", {}, no_code))
    lost = sa.exc.DBAPIError("SELECT 1", {}, no_code, connection_invalidated=True)
    assert is_connection_error(lost)


def test_an_integrity_error_is_409_whatever_its_code() -> None:
    exc = sa.exc.IntegrityError("INSERT", {}, Exception("dup"))
    problem = default_error_mapper(exc)
    assert problem is not None
    assert problem.status == 409


def test_classify_reads_the_asyncpg_cause_when_the_adapter_has_no_code() -> None:
    adapted = AsyncAdapt_asyncpg_dbapi.Error("wrapped")  # type: ignore[no-untyped-call]
    adapted.__cause__ = asyncpg.exceptions.CannotConnectNowError("x")
    assert classify(adapted) == "unavailable"
    assert classify(Exception("no code")) is None


# -- real servers ---------------------------------------------------------------------------------


@pytest.fixture
def refusing_url(backend: str, database_url: str, sync_engine: sa.Engine, tmp_path: Path) -> Iterator[str]:
    """A URL the database refuses to connect: a role over its connection limit (PostgreSQL 53300,
    MariaDB 1226), a SQLite file that cannot be opened (SQLITE_CANTOPEN)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/missing/refused.db"
        return
    role = f"fsm_limited_{sa.make_url(database_url).database}"
    url = sa.make_url(database_url).set(username=role)
    admin = sync_engine.execution_options(isolation_level="AUTOCOMMIT")
    held: sa.Connection | None = None
    with admin.connect() as connection:
        if backend == "postgresql":
            connection.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        else:
            connection.exec_driver_sql(f"DROP USER IF EXISTS {role}")
            connection.exec_driver_sql(f"CREATE USER {role} WITH MAX_USER_CONNECTIONS 1")
            connection.exec_driver_sql(f"GRANT ALL ON {url.database}.* TO {role}")
    holder = None
    if backend == "mariadb":  # MariaDB has no limit of 0: hold the one connection allowed
        holder = sa.create_engine(url.set(drivername="mysql+pymysql"), poolclass=sa.NullPool)
        held = holder.connect()
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        if held is not None and holder is not None:
            held.close()
            holder.dispose()
        with admin.connect() as connection:
            if backend == "postgresql":
                connection.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            else:
                connection.exec_driver_sql(f"DROP USER IF EXISTS {role}")


def test_a_database_refusing_connections_is_503(
    make_maker: MakerFactory, refusing_url: str, serve: Callable[..., httpx.Client]
) -> None:
    maker = make_maker(refusing_url, engine_options={"poolclass": sa.NullPool})
    app = FastAPI()
    maker.init_app(app, check_on_startup=False)
    Db = Annotated[Any, maker.dependency]
    if maker.is_async:

        @app.get("/one")
        async def one_async(session: Db) -> int:
            return int((await session.execute(sa.text("SELECT 1"))).scalar_one())
    else:

        @app.get("/one")
        def one_sync(session: Db) -> int:
            return int(session.execute(sa.text("SELECT 1")).scalar_one())

    response = serve(app).get("/one")

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"


CHECKED = sa.Table(
    "fsm_checked",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("quantity", sa.Integer),
    sa.CheckConstraint("quantity > 0", name="fsm_positive"),
)


def test_a_check_violation_is_409_on_every_database(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    # PyMySQL raises MariaDB's "CONSTRAINT failed" (4025) as an OperationalError: the code decides.
    CHECKED.metadata.drop_all(sync_engine)
    CHECKED.metadata.create_all(sync_engine)
    maker = make_maker()
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    if maker.is_async:

        @app.post("/rows/{quantity}")
        async def add_async(quantity: int, session: Db) -> int:
            await session.execute(CHECKED.insert().values(id=quantity + 100, quantity=quantity))
            return quantity
    else:

        @app.post("/rows/{quantity}")
        def add_sync(quantity: int, session: Db) -> int:
            session.execute(CHECKED.insert().values(id=quantity + 100, quantity=quantity))
            return quantity

    client = serve(app)

    assert client.post("/rows/1").status_code == 200
    response = client.post("/rows/-1")

    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == "application/problem+json"
    with sync_engine.connect() as connection:
        assert connection.scalars(sa.select(CHECKED.c.quantity)).all() == [1]


def test_a_driver_error_that_sqlalchemy_did_not_wrap_is_classified_too() -> None:
    """asyncpg's connection-time server errors escape unwrapped on Python 3.10 (seen in CI)."""
    import asyncpg

    refused = asyncpg.exceptions.TooManyConnectionsError("too many connections for role")
    starting = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    unique = asyncpg.exceptions.UniqueViolationError("duplicate key")
    other = asyncpg.exceptions.UndefinedTableError("no such table")
    assert [default_error_mapper(e).status for e in (refused, starting, unique, other)] == [  # type: ignore[union-attr]
        503,
        503,
        409,
        500,
    ]
    assert default_error_mapper(ValueError("not a database error")) is None


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_deadlock_without_retry_is_503_with_retry_after(
    make_maker: MakerFactory, sync_engine: sa.Engine, backend: str, serve: Callable[..., httpx.Client]
) -> None:
    """The endpoint's transaction holds row 1 and asks for row 2, which another transaction holds
    while it waits for row 1: a real deadlock (PostgreSQL 40P01, MariaDB 1213), our side its victim."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker()
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    fast = conflicts.deadlock_timeout_sql(backend, 50)
    other = conflicts.OtherSide(sync_engine, backend)
    if maker.is_async:

        @app.post("/deadlock")
        async def deadlock_async(session: Db) -> int:
            assert await anyio.to_thread.run_sync(other.holds_row_2.wait, conflicts.TIMEOUT)
            if fast is not None:
                await session.execute(fast)
            await session.execute(conflicts.lock_sql(1))
            other.other_holds_row_1.set()
            await session.execute(conflicts.lock_sql(2))
            return 1
    else:

        @app.post("/deadlock")
        def deadlock_sync(session: Db) -> int:
            assert other.holds_row_2.wait(conflicts.TIMEOUT)
            if fast is not None:
                session.execute(fast)
            session.execute(conflicts.lock_sql(1))
            other.other_holds_row_1.set()
            session.execute(conflicts.lock_sql(2))
            return 1

    client = serve(app)
    with other:
        response = client.post("/deadlock")

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"].endswith("retry the request.")
    assert conflicts.value_of(sync_engine, 1) == 100  # the other side went on and committed


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_serialization_failure_without_retry_is_503_with_retry_after(
    make_maker: MakerFactory, sync_engine: sa.Engine, serve: Callable[..., httpx.Client]
) -> None:
    """REPEATABLE READ, then another transaction commits an update of the row we read, then we
    update it: PostgreSQL's "could not serialize access due to concurrent update" (40001)."""
    conflicts.reset_rows(sync_engine)
    maker = make_maker()
    app = FastAPI()
    maker.init_app(app)
    Db = Annotated[Any, maker.dependency]
    repeatable = sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    read = sa.text("SELECT value FROM fsm_conflict_rows WHERE id = 1")
    bump = sa.text("UPDATE fsm_conflict_rows SET value = value + 1 WHERE id = 1")
    if maker.is_async:

        @app.post("/bump")
        async def bump_async(session: Db) -> int:
            await session.execute(repeatable)
            await session.execute(read)
            await anyio.to_thread.run_sync(conflicts.side_update, sync_engine, 1)
            await session.execute(bump)
            return 1
    else:

        @app.post("/bump")
        def bump_sync(session: Db) -> int:
            session.execute(repeatable)
            session.execute(read)
            conflicts.side_update(sync_engine, 1)
            session.execute(bump)
            return 1

    response = serve(app).post("/bump")

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert conflicts.value_of(sync_engine, 1) == 1000  # ours rolled back, the other one stored


def test_every_drivers_own_unwrapped_error_is_classified_by_its_code() -> None:
    """The same rule for psycopg, PyMySQL and sqlite3 exceptions that reach the edge unwrapped."""
    import sqlite3

    import psycopg
    import pymysql

    cases = [
        (psycopg.errors.AdminShutdown("terminating connection"), 503),
        (psycopg.errors.UniqueViolation("duplicate key"), 409),
        (psycopg.errors.SerializationFailure("could not serialize access"), 503),
        (psycopg.errors.UndefinedTable("no such table"), 500),
        (pymysql.err.OperationalError(1040, "Too many connections"), 503),
        (pymysql.err.IntegrityError(1062, "Duplicate entry"), 409),
        (pymysql.err.OperationalError(1213, "Deadlock found"), 503),
        (pymysql.err.ProgrammingError(1146, "Table doesn't exist"), 500),
        (sqlite3.OperationalError("database is locked"), 503),
        (sqlite3.IntegrityError("UNIQUE constraint failed: t.x"), 409),
    ]
    got = [(type(e).__name__, getattr(default_error_mapper(e), "status", None)) for e, _ in cases]
    assert got == [(type(e).__name__, status) for e, status in cases]
