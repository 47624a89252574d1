"""The commit rule, written once for both twins, requests and sessions outside requests."""

from __future__ import annotations

from enum import Enum

__all__ = ["CommitPolicy"]


class CommitPolicy(str, Enum):
    """When a request's session commits. The session always closes and its connection goes back.

    | policy | what it does |
    |---|---|
    | ``AUTO`` (default) | commit before the response unless it raised or its status is >= 400 |
    | ``COMMIT_UNLESS_RAISED`` | as ``AUTO``, but a *returned* error response (status >= 400) commits |
    | ``MANUAL`` | never commit for you: call ``session.commit()``; the rest rolls back |
    | ``READ_ONLY`` | never commit; an ORM flush of changes raises ``ReadOnlySessionError`` |

    Example:
        >>> from fastapi_sessionmaker import CommitPolicy, FastAPISessionMaker
        >>> maker = FastAPISessionMaker("sqlite://", policy=CommitPolicy.MANUAL)
        >>> maker.policy.should_commit(status=200, raised=False)
        False
    """

    AUTO = "auto"
    COMMIT_UNLESS_RAISED = "commit_unless_raised"
    MANUAL = "manual"
    READ_ONLY = "read_only"

    def should_commit(self, *, status: int | None, raised: bool) -> bool:
        """Whether a unit of work that ended with ``status`` (None outside HTTP) commits."""
        if raised or self is CommitPolicy.MANUAL or self is CommitPolicy.READ_ONLY:
            return False
        if self is CommitPolicy.AUTO:
            return status is None or status < 400
        return True
