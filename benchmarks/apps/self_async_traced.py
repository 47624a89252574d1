"""This library, async, with observability on (``_observed.traced()``): the ``ours-async-traced`` row."""

from __future__ import annotations

from _observed import traced
from self_async import build

db, app = build(**traced())
