"""This library, sync, with observability on (``_observed.OBSERVED``): the ``ours-sync-observed`` row."""

from __future__ import annotations

from _observed import OBSERVED
from self_sync import build

db, app = build(**OBSERVED)
