"""This library, async, with observability on (``_observed.OBSERVED``): the ``ours-async-observed`` row."""

from __future__ import annotations

from _observed import OBSERVED
from self_async import build

db, app = build(**OBSERVED)
