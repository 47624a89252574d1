"""Real conflicts on PostgreSQL and MariaDB, for the retry and error-mapping tests: a table of rows
to lock, a deadlock whose victim is known, a serialization failure on demand."""

from __future__ import annotations

import threading

import sqlalchemy as sa

ROWS = sa.Table(
    "fsm_conflict_rows",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("value", sa.Integer, nullable=False),
)
# Rows the other side updates first, so that InnoDB picks the lighter transaction as its victim.
# A table of their own: an update that scans ROWS would lock rows 1 and 2 too (REPEATABLE READ).
WEIGHT = sa.Table(
    "fsm_conflict_weight",
    ROWS.metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("value", sa.Integer, nullable=False),
)
TIMEOUT = 10.0


def reset_rows(engine: sa.Engine) -> None:
    """Rows 1 and 2 (the two locks) and 20 rows of weight for the other side, all at 0."""
    ROWS.metadata.drop_all(engine)
    ROWS.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(ROWS.insert(), [{"id": n, "value": 0} for n in (1, 2)])
        connection.execute(WEIGHT.insert(), [{"id": n, "value": 0} for n in range(20)])


def lock_sql(row: int) -> sa.TextClause:
    return sa.text(f"SELECT value FROM fsm_conflict_rows WHERE id = {row} FOR UPDATE")


def deadlock_timeout_sql(backend: str, milliseconds: int) -> sa.TextClause | None:
    """``SET LOCAL deadlock_timeout`` on PostgreSQL (superuser only); MariaDB detects at once."""
    if backend != "postgresql":
        return None
    return sa.text(f"SET LOCAL deadlock_timeout = '{milliseconds}ms'")


def value_of(engine: sa.Engine, row: int) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(ROWS.c.value).where(ROWS.c.id == row)).scalar_one())


class OtherSide:
    """A transaction on another connection that takes row 2, then waits for row 1.

    It is the heavier transaction (it updated 20 other rows first) and on PostgreSQL it waits 10 s
    before looking for a deadlock, so the deadlock it forms with a transaction that holds row 1 and
    asks for row 2 always picks that other transaction as the victim. It commits once it gets row 1.
    """

    def __init__(self, engine: sa.Engine, backend: str) -> None:
        self.engine = engine
        self.backend = backend
        self.holds_row_2 = threading.Event()
        self.other_holds_row_1 = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.engine.connect() as connection:
                slow = deadlock_timeout_sql(self.backend, 10_000)
                if slow is not None:
                    connection.execute(slow)
                connection.execute(WEIGHT.update().values(value=WEIGHT.c.value + 1))
                connection.execute(lock_sql(2))
                self.holds_row_2.set()
                if not self.other_holds_row_1.wait(TIMEOUT):
                    raise TimeoutError("the other transaction never took row 1")
                connection.execute(lock_sql(1))
                connection.execute(ROWS.update().where(ROWS.c.id == 1).values(value=ROWS.c.value + 100))
                connection.commit()
        except BaseException as exc:  # reported by join()
            self.error = exc

    def __enter__(self) -> OtherSide:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.other_holds_row_1.set()  # never leave it waiting
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the other side did not finish"
        if self.error is not None and exc_info[0] is None:
            raise self.error


def side_update(engine: sa.Engine, row: int) -> None:
    """Commit an update of ``row`` on another connection (it waits for no lock we hold)."""
    with engine.begin() as connection:
        connection.execute(ROWS.update().where(ROWS.c.id == row).values(value=ROWS.c.value + 1000))
