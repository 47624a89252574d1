"""The PgBouncer load: concurrent clients, each running units of work whose statements check their
own results. Shared by ``tests/test_pgbouncer.py`` and ``benchmarks/pgbouncer.py``.

Each client has its own literal in its statements (``SELECT 'c07' AS who, :i``): a prepared
statement that crossed to another client returns that client's literal, so a wrong row is seen,
not just an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from fastapi_sessionmaker import AsyncFastAPISessionMaker, FastAPISessionMaker

STATEMENTS_PER_UNIT = 3


@dataclasses.dataclass
class Outcome:
    """What a load did: units committed, statements that returned another row, errors."""

    units: int = 0
    wrong: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        first = self.errors[0] if self.errors else "-"
        return f"{self.units} units ok, {self.wrong} wrong rows, {len(self.errors)} errors (first: {first})"


def _statement(client: int) -> sa.TextClause:
    return sa.text(f"SELECT 'c{client:02d}' AS who, CAST(:i AS integer) AS i")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_sync(maker: FastAPISessionMaker, clients: int, units: int) -> Outcome:
    """``clients`` threads, each ``units`` transactions of parametrised statements."""
    outcome = Outcome()
    lock = threading.Lock()

    def client(number: int) -> None:
        statement, me = _statement(number), f"c{number:02d}"
        for unit in range(units):
            wrong = 0
            try:
                with maker.context_session() as session:
                    for k in range(STATEMENTS_PER_UNIT):
                        i = unit * STATEMENTS_PER_UNIT + k
                        row = tuple(session.execute(statement, {"i": i}).one())
                        wrong += row != (me, i)
            except sa.exc.DBAPIError as exc:
                with lock:
                    outcome.errors.append(_first_line(exc))
                continue
            with lock:
                outcome.wrong += wrong
                outcome.units += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return outcome


async def run_async(maker: AsyncFastAPISessionMaker, clients: int, units: int) -> Outcome:
    """``clients`` tasks, each ``units`` transactions of parametrised statements."""
    outcome = Outcome()

    async def client(number: int) -> None:
        statement, me = _statement(number), f"c{number:02d}"
        for unit in range(units):
            wrong = 0
            try:
                async with maker.context_session() as session:
                    for k in range(STATEMENTS_PER_UNIT):
                        i = unit * STATEMENTS_PER_UNIT + k
                        row = tuple((await session.execute(statement, {"i": i})).one())
                        wrong += row != (me, i)
            except sa.exc.DBAPIError as exc:
                outcome.errors.append(_first_line(exc))
                continue
            outcome.wrong += wrong
            outcome.units += 1

    await asyncio.gather(*(client(number) for number in range(clients)))
    return outcome
