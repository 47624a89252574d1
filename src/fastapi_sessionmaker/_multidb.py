"""A request that opened sessions of several databases: the commit order, the report of a commit
that stopped half-way, and opt-in two-phase commit.

Only requests with two sessions or more come here (:meth:`RequestState.finish` hands them over);
a request of one database never does.

The order: sessions end in the order their makers were installed on the app with ``init_app``
(then, for makers not installed, in the order the request opened them), whatever order the
endpoint's parameters name them in.

One-phase (the default): each session commits in turn. When one fails, every later one rolls
back; if an earlier one had already committed a transaction, the request is **partly stored**: one
ERROR line names what was committed and what was not (database names, never URLs), and the client
gets a 500 problem (never a 409 or 503: a client retrying would store the first part twice), and
the request is not retried.

Two-phase (``two_phase=True`` on the makers): when two sessions or more are to commit a
transaction, those of two-phase makers are first *prepared* (PostgreSQL ``PREPARE TRANSACTION``,
MySQL/MariaDB ``XA PREPARE``), in order. A failed prepare rolls every session back (the prepared
ones with ``ROLLBACK PREPARED`` / ``XA ROLLBACK``): nothing is stored, and the database's error is
mapped as for one database. Then the one-phase sessions commit (a failure still rolls the prepared
ones back), and last the prepared ones commit. A prepared transaction that then fails to commit
(its connection lost) stays prepared on its server, **in doubt**: the others still commit, one
ERROR line names the database and the transaction id, the client gets a 500 problem, and
``maker.in_doubt()`` / ``maker.resolve_in_doubt(xid)`` (or ``COMMIT PREPARED 'xid'`` /
``XA COMMIT 'xid'``) finish it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa

from fastapi_sessionmaker import _compat
from fastapi_sessionmaker._errors import Problem
from fastapi_sessionmaker._sessions import mark_response_started, sync_of
from fastapi_sessionmaker.exceptions import ConfigurationError

if TYPE_CHECKING:
    from fastapi_sessionmaker._request import RequestMaker, RequestState

__all__ = [
    "PARTIAL",
    "PartialCommit",
    "check_two_phase",
    "discard_on_failed_prepare",
    "finish_several",
    "in_doubt",
    "resolve_in_doubt",
]

logger = logging.getLogger("fastapi_sessionmaker")

PARTIAL = Problem(
    500,
    "Internal Server Error",
    "The request was stored in some of its databases but not in all of them (or its outcome is "
    "not known yet).",
)
"""The problem a client gets when a request was stored in some databases only (or is in doubt)."""

Failure = tuple[BaseException, "RequestMaker"]
_Entry = Any  # one session of the request (``RequestState.entries``)


def check_two_phase(url: sa.URL, *, variable: str) -> None:
    """Refuse ``two_phase=True`` where the database has no two-phase commit (SQLite)."""
    if url.get_backend_name() == "sqlite":
        raise ConfigurationError(
            f"{variable}: SQLite has no two-phase commit (prepared transactions): use two_phase=True "
            "only on PostgreSQL (with max_prepared_transactions > 0) or MySQL/MariaDB (XA)"
        )


def _order(state: RequestState) -> list[_Entry]:
    """The request's unfinished sessions in commit order: install order, then open order."""
    installed = list(state.registry.makers.values())

    def rank(entry: _Entry) -> int:
        for index, maker in enumerate(installed):
            if maker is entry.maker:
                return index
        return len(installed)

    return sorted((e for e in state.entries if not e.finished), key=rank)  # stable: open order


def _xid(session: Any) -> str:
    """The two-phase transaction id of ``session``'s connection (text, as the server lists it)."""
    for connection in _compat.transaction_connections(sync_of(session)):
        transaction = connection.get_transaction()
        xid = getattr(transaction, "xid", None)
        if xid is not None:
            return xid.decode() if isinstance(xid, bytes) else str(xid)
    return "?"


def discard_on_failed_prepare(engine: sa.Engine) -> None:
    """Discard the connection of a PREPARE that failed, instead of rolling it back.

    The server has already rolled the transaction back (PostgreSQL: a failed ``PREPARE
    TRANSACTION`` "becomes a ROLLBACK"; MySQL/MariaDB end the XA transaction), but the driver may
    not know it: psycopg marks the transaction prepared before its PREPARE succeeds, and then
    refuses ``rollback()``. SQLAlchemy's own rollback after the failure would raise that refusal
    in place of the server's error, and the pool's reset would fail again on return. Invalidated,
    the connection is closed (whatever the server still held is ended with it), SQLAlchemy skips
    the rollback, the server's error is the one raised, and the pool opens a fresh connection.
    """
    dialect = engine.dialect
    prepare = dialect.do_prepare_twophase

    def do_prepare_twophase(connection: sa.Connection, xid: Any) -> None:
        try:
            prepare(connection, xid)
        except Exception:
            connection.invalidate()
            raise

    dialect.do_prepare_twophase = do_prepare_twophase  # type: ignore[method-assign]


def _prepare_sync(session: Any) -> str:
    xid = _xid(session)
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        # Deferred constraints (and constraint triggers) are checked here, by a plain statement,
        # rather than by PREPARE TRANSACTION: the database's own error, and a transaction that
        # still rolls back the usual way (psycopg marks the transaction prepared before its
        # PREPARE succeeds, so a failed one leaves its connection refusing rollback()).
        session.execute(sa.text("SET CONSTRAINTS ALL IMMEDIATE"))
    session.prepare()
    return xid


async def _prepare(entry: _Entry) -> str:
    """Prepare ``entry``'s transaction (flushing it first); its transaction id."""
    session = entry.session
    if entry.maker.is_async:
        xid: str = await session.run_sync(_prepare_sync)
        return xid
    return await anyio.to_thread.run_sync(_prepare_sync, session)


async def finish_several(
    state: RequestState, status: int | None, client_gone: Callable[[], Awaitable[bool]] | None
) -> Failure | None:
    """Commit or roll back the sessions of a request of several databases; the first failure."""
    entries = _order(state)
    wants = {id(e): e.policy.should_commit(status=status, raised=state.raised) for e in entries}
    if client_gone is not None and any(wants.values()):
        state.client_gone = await client_gone()
    if state.client_gone:
        wants = dict.fromkeys(wants, False)
    writers = [e for e in entries if wants[id(e)] and e.session.in_transaction()]
    failure: Failure | None = None
    prepared: dict[int, str] = {}  # id(entry) -> xid
    if len(writers) > 1:
        for entry in writers:
            if not getattr(entry.maker, "two_phase", False):
                continue
            try:
                prepared[id(entry)] = await _prepare(entry)
            except Exception as exc:
                failure = (exc, entry.maker)
                break
    # One-phase sessions first, in order; the prepared ones last (a failure before still undoes them).
    entries.sort(key=lambda e: id(e) in prepared)
    committed: list[_Entry] = []
    lost: list[_Entry] = []  # meant to commit a transaction, did not
    doubtful: list[tuple[_Entry, str]] = []
    decided = False  # every transaction prepared and the rest committed: commit the prepared ones
    for entry in entries:
        entry.finished = True
        wrote = entry in writers
        xid = prepared.get(id(entry))
        if xid is not None and failure is None:
            decided = True
        # Once decided, a prepared transaction that fails to commit (in doubt) stops no other.
        commit = wants[id(entry)] and (failure is None or (xid is not None and decided))
        try:
            await entry.maker.lifecycle.end(entry.session, commit)
            entry.committed = commit
            if wrote:
                (committed if commit else lost).append(entry)
        except Exception as exc:
            if xid is not None:  # still prepared on its server (or its outcome unknown)
                doubtful.append((entry, xid))
            elif wrote:
                lost.append(entry)
            if failure is None:
                failure = (exc, entry.maker)
            elif not commit:
                logger.exception("rollback failed on database %r", entry.maker.name)
        finally:
            mark_response_started(entry.session)
            entry.release()
    if failure is not None and (doubtful or (committed and lost)):
        state.partial = PartialCommit(failure, committed, lost, doubtful, commit=decided)
    return failure


class PartialCommit:
    """What a request of several databases stored when it could not store everything."""

    def __init__(
        self,
        failure: Failure,
        committed: list[_Entry],
        lost: list[_Entry],
        doubtful: list[tuple[_Entry, str]],
        *,
        commit: bool,
    ) -> None:
        self.commit = commit
        """Whether the in-doubt transactions are to be committed (else rolled back)."""
        self.error = failure[0]
        self.database = failure[1].name
        self.committed = [e.maker.name for e in committed]
        self.not_committed = [e.maker.name for e in lost]
        self.in_doubt = {e.maker.name: xid for e, xid in doubtful}

    def log(self, method: str, path: str) -> None:
        """The one ERROR line: what was committed, what was not (names and xids, never URLs)."""
        error = type(self.error).__name__
        committed = ", ".join(map(repr, self.committed)) or "none"
        extra = {
            "error_class": error,
            "database": self.database,
            "path": path,
            "committed": self.committed,
            "not_committed": self.not_committed,
            "in_doubt": self.in_doubt,
        }
        if self.in_doubt:
            doubtful = ", ".join(f"{name!r} (xid {xid!r})" for name, xid in self.in_doubt.items())
            logger.error(
                "two-phase commit of %s %s left transactions in doubt: %s on database %r; "
                "committed: %s; in doubt (prepared, not committed): %s: finish them with "
                "maker.resolve_in_doubt(xid, commit=%s)",
                method,
                path,
                error,
                self.database,
                committed,
                doubtful,
                self.commit,
                extra=extra,
            )
            return
        logger.error(
            "partial commit of %s %s: %s on database %r after others committed; "
            "committed: %s; not committed: %s",
            method,
            path,
            error,
            self.database,
            committed,
            ", ".join(map(repr, self.not_committed)),
            extra=extra,
        )


# -- in-doubt transactions ----------------------------------------------------------------------
def in_doubt(connection: sa.Connection) -> list[str]:
    """The ids of the prepared (two-phase) transactions waiting on ``connection``'s database:
    PostgreSQL's of this database (only there can they be finished), MySQL/MariaDB's XA ones."""
    if connection.dialect.name == "postgresql":
        query = sa.text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
        return [str(gid) for gid in connection.execute(query).scalars()]
    return [x.decode() if isinstance(x, bytes) else str(x) for x in connection.recover_twophase()]


def resolve_in_doubt(connection: sa.Connection, xid: str, commit: bool) -> None:
    """Commit (or roll back) the prepared transaction ``xid`` through ``connection``."""
    if commit:
        connection.commit_prepared(xid, recover=True)
    else:
        connection.rollback_prepared(xid, recover=True)
