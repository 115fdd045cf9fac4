"""The per-request filter trace: what each filter of a chain did with one request.

The chain records into slots preallocated per stream (a few ints per filter and phase: the
action the filter returned, how many calls, when the first began and the last ended, the
nanoseconds spent in the guest); nothing is formatted until the access log, the
``x-wasmgate-trace`` response header or the span exporter asks (``summary``, ``phases``).

Summary format (README "Per-request filter trace"), one entry per filter of the route, in
chain order, separated by ``;``::

    auth:rqh=L401,rsh=C,us=41;ratelimit:-;headers:rqh=C,rsh=C,m=h,us=12

``rqh rqb rqt rsh rsb rst``: request/response headers, body, trailers. An action is ``C``
(continue), ``P`` (pause: stop iteration / buffer / watermark), ``L<status>`` (the filter
answered with a local reply) or ``F`` (the callback failed); a body phase called more than once
adds ``*<calls>`` (the action is the last one's). ``m=`` h/b: the filter changed headers/body;
``us=``: µs in the guest; ``fail=<kind>`` the failure (trap kind, invalid_action, pause_timeout,
host_limit, unavailable). ``name:-``: the filter never saw the request (an earlier one answered).
"""
from __future__ import annotations

import time
from typing import Any

PHASES = ("rqh", "rqb", "rqt", "rsh", "rsb", "rst")
N_PHASES = len(PHASES)
# Per filter and phase: last action, calls, first start, last end (perf_counter_ns), guest ns.
ACT, CALLS, START, END, NS = range(5)
_W = 5
FAILED = -1                       # an action slot below it holds -status of a local reply
_HEADER_PHASES = (0, 3)
_EDITS = ("", "m=h", "m=b", "m=hb")
_now = time.perf_counter_ns


class FilterTrace:
    """Slots for one stream; ``note`` is the only thing the hot path calls."""
    __slots__ = ("filters", "slots", "edited", "failures", "opened")

    def __init__(self, filters: list[Any]):
        n = len(filters)
        self.filters = filters                   # abi.filter.Filter (names read at format time)
        self.slots = [0] * (n * N_PHASES * _W)
        self.edited = [0] * n                    # bit 1: headers, bit 2: body
        self.failures: list[str] = [""] * n
        self.opened = [False] * n

    def note(self, i: int, phase: int, action: int, start: int) -> None:
        """Filter i returned `action` (FAILED: it failed) from a `phase` callback begun at `start`."""
        end = _now()
        s = self.slots
        k = (i * N_PHASES + phase) * _W
        s[k] = action
        s[k + 1] += 1
        if not s[k + 2]:
            s[k + 2] = start
        s[k + 3] = end
        s[k + 4] += end - start

    def replied(self, i: int, phase: int, status: int) -> None:
        """Filter i answered with a local reply in `phase` (in a callback or while paused)."""
        self.slots[(i * N_PHASES + phase) * _W] = -status

    def capture(self, i: int, ctx: Any, failed: bool) -> None:
        """What filter i's context says once it ran: edits and how it failed (ctx may be None)."""
        if ctx is not None:
            self.opened[i] = True
            rq, rs = ctx.bodies
            self.edited[i] = (1 if ctx.edited else 0) | \
                (2 if (rq is not None and rq.edited) or (rs is not None and rs.edited) else 0)
            if ctx.failure:
                self.failures[i] = ctx.failure
        if failed and not self.failures[i]:
            self.failures[i] = "unavailable"     # no live instance (failed to build, or died)

    # -- formatting (log time only) ----------------------------------------------------------

    def summary(self) -> str:
        s = self.slots
        out = []
        width = N_PHASES * _W
        for i, f in enumerate(self.filters):
            seg = s[i * width:(i + 1) * width]
            # Everything but the µs repeats from request to request: formatted once per shape.
            key = (f.name, tuple(seg[ACT::_W]), tuple(seg[CALLS::_W]), self.edited[i], self.failures[i],
                   self.opened[i])
            shape = _shapes.get(key)
            if shape is None:
                shape = _shape(*key)
                if len(_shapes) < _MAX_SHAPES:
                    _shapes[key] = shape
            head, tail = shape
            if tail is None:
                out.append(head)
            else:              # a phase that never ran holds 0 ns: sum them all
                out.append(f"{head}{(sum(seg[NS::_W]) + 500) // 1000}{tail}")
        return ";".join(out)

    def phases(self) -> list[tuple[str, str, str, int, int, int]]:
        """(filter, phase, action, calls, first start, last end) of every phase that ran."""
        s = self.slots
        out = []
        for i, f in enumerate(self.filters):
            for p in range(N_PHASES):
                k = (i * N_PHASES + p) * _W
                if s[k + 1]:
                    out.append((f.name, PHASES[p], _action(s[k], p), s[k + 1], s[k + 2], s[k + 3]))
        return out


# (name, actions, calls, edited, failure, opened) -> (the entry up to "us=", after the µs), or
# (the whole entry, None) for a filter that never saw the request. Bounded: body phases called
# a varying number of times make new shapes.
_shapes: dict[tuple, tuple[str, str | None]] = {}
_MAX_SHAPES = 4096


def _shape(name: str, acts: tuple, calls: tuple, edited: int, failure: str,
           opened: bool) -> tuple[str, str | None]:
    parts = []
    # Phases that ran have calls; a reply while paused can mark one that never returned.
    for p, (act, n) in enumerate(zip(acts, calls)):
        if not n and act >= 0:
            continue
        code = _action(act, p)
        parts.append(f"{PHASES[p]}={code}*{n}" if n > 1 else f"{PHASES[p]}={code}")
    if not parts and not failure and not opened:
        return f"{name}:-", None
    if edited:
        parts.append(_EDITS[edited])
    parts.append("us=")
    return f"{name}:{','.join(parts)}", f",fail={failure}" if failure else ""


def _action(act: int, phase: int) -> str:
    if act < FAILED:
        return f"L{-act}"
    if act == FAILED:
        return "F"
    if phase in _HEADER_PHASES:
        return "C" if act == 0 or act == 2 else "P"      # Continue, ContinueAndEndStream
    return "C" if act == 0 else "P"
