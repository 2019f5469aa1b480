"""Keeping the garbage collector's passes short and rare on a busy server.

A full (generation 2) collection walks every tracked object in the process. After start-up that
is mostly what the imports made (modules, classes, functions: ~10⁵ objects), none of which ever
becomes garbage; walking them took 45–65 ms per pass with 200 calls in progress, a pause every
call heard at once. :func:`freeze_startup_objects` moves what exists when the server is ready
into the permanent generation (:func:`gc.freeze`), so later passes walk only what calls made.

Calls arriving together then still pay for the young generations: each call set up leaves a few
hundred long-lived objects (its session, tasks, sockets), so at CPython's default threshold (700
up to 3.13) 200 calls arriving at once ran ~90 young and ~8 middle passes, about 10–20 ms of the
~100 ms the burst kept the server busy, every pass re-walking the calls just set up.
:func:`collect_young_less_often` raises the young threshold to :data:`YOUNG_THRESHOLD`: two or
three passes for the same burst (~2–3 ms each), and the burst's time to first audio ~10–20 ms
shorter (medians and p99 of interleaved A/B rounds, in ``bench/deepgram_latency.py``'s setting).
What it costs is garbage in reference cycles living a little longer: up to that many net
allocations of tracked objects between passes, and whatever they hold (audio buffers included).
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "collect_young_less_often", "freeze_startup_objects"]

#: Net allocations of tracked objects between two young-generation passes (700 by default in
#: CPython 3.11–3.13; 3.14's incremental collector starts at 2000 and reads it differently).
YOUNG_THRESHOLD: Final = 20_000


def freeze_startup_objects() -> int:
    """Collect what start-up left as garbage, then freeze every object still alive; returns how
    many objects are frozen. Frozen objects are never collected: call it once, when start-up is
    done, in a process that owns its heap (``callspeak serve``, a benchmark) — not from a
    library inside someone else's application."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def collect_young_less_often() -> None:
    """Raise the young generation's threshold to :data:`YOUNG_THRESHOLD` (never lower it), and
    keep the older generations' thresholds. As with :func:`freeze_startup_objects`, for a
    process that owns its heap."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
