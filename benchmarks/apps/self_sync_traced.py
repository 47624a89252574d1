"""This library, sync, with observability on (``_observed.traced()``): the ``ours-sync-traced`` row."""

from __future__ import annotations

from _observed import traced
from self_sync import build

db, app = build(**traced())
