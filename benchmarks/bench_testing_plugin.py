"""Time per test: the testing plugin's rolled-back transaction against recreating the tables.

Each simulated test does the same small piece of work (insert three rows through a ``Session``,
commit, count them); what differs is how the database is made clean for the next test:

- ``rollback``: the plugin's way (``fsm_connection`` / ``fsm_session``): one connection, an outer
  transaction, a session joined with ``join_transaction_mode="create_savepoint"``, rolled back;
- ``recreate``: ``drop_all()`` + ``create_all()`` before each test;
- ``delete``: commit for real, then ``DELETE FROM`` every table after each test (for context).

It uses the plugin's own ``TestDatabase`` (the same engines, the same SQLite savepoint fix) on a
SQLite file and on PostgreSQL, and prints a Markdown table. ``--quick`` runs in a few seconds.

    python benchmarks/bench_testing_plugin.py --quick
    python benchmarks/bench_testing_plugin.py --postgresql-url postgresql://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from fastapi_sessionmaker.testing import TestDatabase


def make_metadata(tables: int) -> tuple[sa.MetaData, list[sa.Table]]:
    """``tables`` tables, each with a foreign key to the previous one and an index."""
    metadata = sa.MetaData()
    made: list[sa.Table] = []
    for number in range(tables):
        columns: list[sa.Column[object]] = [
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(50), index=True),
        ]
        if made:
            columns.append(sa.Column("parent_id", sa.Integer, sa.ForeignKey(f"bench_t{number - 1}.id")))
        made.append(sa.Table(f"bench_t{number}", metadata, *columns))
    return metadata, made


def work(session: Session, table: sa.Table) -> None:
    """One test's work: three inserts, a commit, a count that must see them."""
    session.execute(sa.insert(table), [{"name": f"row{n}"} for n in range(3)])
    session.commit()
    count = session.scalar(sa.select(sa.func.count()).select_from(table))
    if count != 3:
        raise AssertionError(f"expected 3 rows, found {count}: the previous test left data behind")


def rollback_strategy(engine: sa.Engine, metadata: sa.MetaData, tables: list[sa.Table]) -> None:
    with engine.connect() as connection:
        transaction = connection.begin()
        with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
            work(session, tables[0])
        transaction.rollback()


def recreate_strategy(engine: sa.Engine, metadata: sa.MetaData, tables: list[sa.Table]) -> None:
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with Session(engine) as session:
        work(session, tables[0])


def delete_strategy(engine: sa.Engine, metadata: sa.MetaData, tables: list[sa.Table]) -> None:
    with Session(engine) as session:
        work(session, tables[0])
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(sa.delete(table))


STRATEGIES: dict[str, Callable[[sa.Engine, sa.MetaData, list[sa.Table]], None]] = {
    "rollback (plugin)": rollback_strategy,
    "recreate tables": recreate_strategy,
    "delete rows": delete_strategy,
}


def measure(url: str, *, tests: int, tables: int) -> dict[str, float]:
    """Milliseconds per test (median) for each strategy on the database of ``url``."""
    database = TestDatabase(url)
    database.setup()
    engine = database.engine()
    try:
        metadata, made = make_metadata(tables)
        metadata.create_all(engine)
        results: dict[str, float] = {}
        for name, strategy in STRATEGIES.items():
            strategy(engine, metadata, made)  # warm up (and leave clean tables behind)
            metadata.drop_all(engine)
            metadata.create_all(engine)
            timings = []
            for _ in range(tests):
                started = time.perf_counter()
                strategy(engine, metadata, made)
                timings.append(time.perf_counter() - started)
            results[name] = statistics.median(timings) * 1000
            metadata.drop_all(engine)
            metadata.create_all(engine)
        return results
    finally:
        engine.dispose()
        database.teardown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few tests per strategy (a few seconds)")
    parser.add_argument("--tests", type=int, default=None, help="tests per strategy (default 200, quick 10)")
    parser.add_argument("--tables", type=int, default=8, help="tables in the schema (default 8)")
    parser.add_argument(
        "--postgresql-url",
        default=f"postgresql://postgres@127.0.0.1:5432/fsm_bench_{os.getpid()}",
        help="PostgreSQL to benchmark on (test_<name> is created and dropped); '' to skip",
    )
    args = parser.parse_args(argv)
    tests = args.tests or (10 if args.quick else 200)
    with tempfile.TemporaryDirectory() as folder:
        rows = [("SQLite (file)", measure(f"sqlite:///{folder}/bench.db", tests=tests, tables=args.tables))]
        if args.postgresql_url:
            try:
                rows.append(("PostgreSQL", measure(args.postgresql_url, tests=tests, tables=args.tables)))
            except sa.exc.OperationalError as exc:  # no server: report and go on
                print(f"PostgreSQL skipped: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
    print(f"Time per test, median of {tests} tests, {args.tables} tables:\n")
    print("| database | strategy | ms per test | vs rollback |")
    print("|---|---|---:|---:|")
    for label, results in rows:
        base = results["rollback (plugin)"]
        for name, value in results.items():
            print(f"| {label} | {name} | {value:.2f} | {value / base:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
