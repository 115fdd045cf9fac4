"""The cyclic garbage collector, tuned for a long-running server (as large Python servers do, e.g.
Instagram's): what start-up (and each reload) leaves behind — config, routes, compiled filters,
modules — lives until the next reload, so it is moved out of the collector's sight with
``gc.freeze()``. Then a collection only walks what requests allocated,
instead of the whole long-lived heap every time the oldest generation comes due.

Request garbage is nearly all freed by reference counting; the collector only finds the few cycles
(exceptions with their tracebacks, cancelled tasks). The young generation's threshold is raised so
those are collected every few hundred requests instead of every few dozen; each young collection
then walks at most ~10,000 objects (0.15 ms measured in process; bench/README.md, Issue 15's glue).
That holds only while an ordinary request leaves no cycle behind: when each one did (the upstream
response and its body generator, until the third pass), a young collection came every ~1,000
requests and freed them all in one 3-5 ms pause under live load, a pause on every request in
flight (bench/README.md, "Issue 15, third pass"; tests/gateway/test_gc_tuning.py checks it).
"""
from __future__ import annotations

import gc

# Objects allocated (net of those freed) before a young collection; CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """Raise the young generation's threshold (older generations keep CPython's ratios)."""
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, g1, g2)


def settle() -> None:
    """Collect what start-up or a reload left as garbage, then freeze the survivors.

    Objects frozen by an earlier settle() are unfrozen first, so a retired generation's config
    and filters (cyclic or not) are collected rather than kept forever in the permanent one."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
