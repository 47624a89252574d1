"""``get_or_404`` and ``one_or_404``: a row, or a problem JSON 404 (Flask-SQLAlchemy's helpers).

They raise :class:`~fastapi_sessionmaker.exceptions.NotFoundError`, a ``fastapi.HTTPException``
with status 404: in any FastAPI app it becomes a 404 response. ``init_app`` adds an exception
handler that renders it as RFC 9457 problem JSON, like the database errors the guard maps. A
raised exception, it rolls the request's session back under every commit policy.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.requests import Request

from fastapi_sessionmaker._errors import Problem
from fastapi_sessionmaker.exceptions import NotFoundError

__all__ = ["get_or_404", "not_found_response", "one_or_404"]

T = TypeVar("T")


def _missing(model: type[Any], ident: Any) -> str:
    return f"{model.__name__} {ident} was not found."


def _nothing(statement: Any) -> str:
    descriptions = getattr(statement, "column_descriptions", None) or [{}]
    entity = descriptions[0].get("entity")
    return (
        f"No {entity.__name__} matches the request."
        if isinstance(entity, type)
        else "Nothing matches the request."
    )


@overload
def get_or_404(
    session: AsyncSession, model: type[T], ident: Any, *, description: str | None = None
) -> Awaitable[T]: ...
@overload
def get_or_404(session: Session, model: type[T], ident: Any, *, description: str | None = None) -> T: ...
def get_or_404(
    session: Session | AsyncSession, model: type[T], ident: Any, *, description: str | None = None
) -> T | Awaitable[T]:
    """``session.get(model, ident)``, or raise a 404 (:class:`NotFoundError`) when there is no such row.

    With an ``AsyncSession``, await it. Works with any session: a request session, one from
    ``context_session()``, SQLModel's.

    Args:
        session: A ``Session`` or ``AsyncSession``.
        model: The mapped class.
        ident: Its primary key (a tuple or dict for a composite key), as for ``Session.get``.
        description: The problem's ``detail``; by default ``"<Model> <ident> was not found."``.

    Example:
        >>> import sqlalchemy as sa
        >>> from fastapi import FastAPI
        >>> from fastapi.testclient import TestClient
        >>> from sqlalchemy.orm import DeclarativeBase, mapped_column
        >>> from fastapi_sessionmaker import DBSession, FastAPISessionMaker, get_or_404
        >>> class Base(DeclarativeBase): ...
        >>> class Book(Base):
        ...     __tablename__ = "books"
        ...     id = mapped_column(sa.Integer, primary_key=True)
        >>> db = FastAPISessionMaker("sqlite://")
        >>> Base.metadata.create_all(db.cached_engine)
        >>> app = FastAPI()
        >>> db.init_app(app)
        >>> @app.get("/books/{book_id}")
        ... def read_book(book_id: int, session: DBSession) -> int:
        ...     return get_or_404(session, Book, book_id).id
        >>> with TestClient(app) as client:
        ...     client.get("/books/7").json()
        {'type': 'about:blank', 'title': 'Not Found', 'status': 404, 'detail': 'Book 7 was not found.'}
    """
    if isinstance(session, AsyncSession):
        return _aget_or_404(session, model, ident, description)
    found = session.get(model, ident)
    if found is None:
        raise NotFoundError(description or _missing(model, ident))
    return found


async def _aget_or_404(session: AsyncSession, model: type[T], ident: Any, description: str | None) -> T:
    found = await session.get(model, ident)
    if found is None:
        raise NotFoundError(description or _missing(model, ident))
    return found


def _one(session: Session, statement: Any, description: str | None) -> Any:
    try:
        return session.scalars(statement).one()
    except (sa.exc.NoResultFound, sa.exc.MultipleResultsFound):
        raise NotFoundError(description or _nothing(statement)) from None


@overload
def one_or_404(
    session: AsyncSession, statement: Any, *, description: str | None = None
) -> Awaitable[Any]: ...
@overload
def one_or_404(session: Session, statement: Any, *, description: str | None = None) -> Any: ...
def one_or_404(session: Session | AsyncSession, statement: Any, *, description: str | None = None) -> Any:
    """The one row (its first column) of ``statement``; a 404 (:class:`NotFoundError`) when there is
    none or more than one, as in Flask-SQLAlchemy.

    With an ``AsyncSession``, await it. ``select(Model)`` gives the ``Model`` instance.

    Args:
        session: A ``Session`` or ``AsyncSession``.
        statement: A ``select()``.
        description: The problem's ``detail``; by default ``"No <Model> matches the request."``.

    Example:
        >>> import sqlalchemy as sa
        >>> from fastapi_sessionmaker import FastAPISessionMaker, NotFoundError, one_or_404
        >>> db = FastAPISessionMaker("sqlite://")
        >>> with db.context_session() as session:
        ...     one_or_404(session, sa.select(sa.literal(42)))
        42
        >>> with db.context_session() as session:
        ...     one_or_404(session, sa.select(sa.literal(1)).where(sa.false()))
        Traceback (most recent call last):
        ...
        fastapi_sessionmaker.exceptions.NotFoundError: 404: Nothing matches the request.
    """
    if isinstance(session, AsyncSession):
        # Through the sync session: SQLModel's AsyncSession.execute (which scalars() calls) warns.
        return session.run_sync(_one, statement, description)
    return _one(session, statement, description)


async def not_found_response(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler ``init_app`` installs: a :class:`NotFoundError` as problem JSON."""
    problem = Problem(404, "Not Found", str(getattr(exc, "detail", "")) or "Not Found")
    return JSONResponse(problem.body(), status_code=404, media_type="application/problem+json")
