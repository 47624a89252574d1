"""SQLModel's ``Session`` as a request session: ``exec()`` goes through the request session's rules.

SQLModel's ``Session.exec`` calls ``sqlalchemy.orm.Session.execute`` directly (``super()`` from
SQLModel's class), which would skip what :class:`~._sessions.RequestSessionMixin` adds to
``execute``: the per-session lock, the rows fetched in full on SQLite, and the short read
transaction of a statement run after the response started. :class:`ExecThroughExecute` gives the
composed request session an ``exec`` that runs the statement through ``self.execute`` and then
does what SQLModel's does: ``.scalars()`` for a ``select()`` of one entity or column. SQLModel's
``AsyncSession.exec`` calls its sync session's ``exec``, so the async twin gets the same rules;
``_sessions.compose_async`` adds the one-operation-at-a-time check to it.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ExecThroughExecute", "is_sqlmodel_session"]


def is_sqlmodel_session(cls: type[Any]) -> bool:
    """Whether ``cls`` is SQLModel's ``Session`` or a subclass.

    SQLModel is not imported here: a class of it means it was imported already.
    """
    sqlmodel = sys.modules.get("sqlmodel")
    return sqlmodel is not None and issubclass(cls, sqlmodel.Session)


class ExecThroughExecute:
    """Composed in front of SQLModel's ``Session`` by :func:`~._sessions.compose`."""

    def exec(self, statement: Any, **kwargs: Any) -> Any:
        """SQLModel's ``Session.exec``, through this request session's ``execute``."""
        from sqlmodel.sql.expression import SelectOfScalar

        result = self.execute(statement, **kwargs)  # type: ignore[attr-defined]
        return result.scalars() if isinstance(statement, SelectOfScalar) else result
