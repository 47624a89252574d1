"""Readiness beyond ``SELECT 1``: checks registered per maker (e.g. "the schema is at its migrations'
head"), which the health route runs after the database answered."""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

__all__ = ["ReadinessCheck", "add_readiness_check", "readiness_checks"]

ReadinessCheck: TypeAlias = Callable[[Any], Awaitable[tuple[str | None, dict[str, Any]]]]
"""``await check(maker)`` -> ``(reason, details)``: ``reason`` is ``None`` when ready, else a short
text (no secrets); ``details`` are added to the database's health report either way."""

_CHECKS: weakref.WeakKeyDictionary[Any, list[ReadinessCheck]] = weakref.WeakKeyDictionary()


def add_readiness_check(maker: Any, check: ReadinessCheck) -> None:
    """Run ``check(maker)`` in every health check of ``maker`` (once, however often it is added)."""
    checks = _CHECKS.setdefault(maker, [])
    if check not in checks:
        checks.append(check)


def readiness_checks(maker: Any) -> list[ReadinessCheck]:
    """The checks added for ``maker``, in order."""
    return list(_CHECKS.get(maker, ()))
