"""The chain's per-filter loops (abi/chain.py ``walk_request`` / ``walk_response`` /
``walk_finish``): _crossing.c's walks run the plain part in C and hand back to the chain's
coroutine exactly where the Python reference walks (``chain.PY_WALKS``) do, with the same
outcome, for every case off the plain path: a pause, a local reply, a trap, a failed open, an
invalid action, a body to stage, a trace, a teardown that fails, a finish while paused.
Each case runs on every pair of (filter call path, walk): NativeFilter or Filter, C or Python
walks, and all four must agree."""
from __future__ import annotations

import asyncio
import re

import pytest

from abi import chain as chain_mod
from abi.api import Forward, LocalReply, LogInfo
from abi.context import REQUEST, RESPONSE
from abi.engine import crossing
from abi.pairs import serialize
from tests.helpers import until

from abi_helpers import REQ, body_iter, collect, info, rebuilt
from abi_wat import CALLBACKS, Wat

NAMES = ["a", "b", "c"]
BODY_CBS = ("proxy_on_request_body", "proxy_on_request_trailers", "proxy_on_response_body",
            "proxy_on_response_trailers")
WAIT_S = 10.0


def _plain() -> Wat:
    return Wat().without(*BODY_CBS)


def _returning(cb: str, action: int) -> Wat:
    w = _plain()
    return w.on(cb, f"{w.trace(cb, 3)} (i32.const {action})")


def _replier() -> Wat:
    w = _plain()
    hdrs = serialize([(b"x-denied-by", b"b")])
    return w.on("proxy_on_request_headers",
                f"{w.trace('proxy_on_request_headers', 3)} (drop (call $proxy_send_local_response "
                f"(i32.const 403) (i32.const 0) (i32.const 0) {w.s('no')} {w.s(hdrs)} "
                f"(i32.const -1))) (i32.const 1)")


def _trapping(cb: str) -> Wat:
    w = _plain()
    return w.on(cb, f"{w.trace(cb, CALLBACKS[cb][0])} unreachable")


def _failing_open() -> Wat:
    w = _plain()                             # an HTTP context's creation traps (not the root's)
    cb = "proxy_on_context_create"
    return w.on(cb, f"{w.trace(cb, 2)} (if (local.get $b) (then unreachable))")


def _with_body() -> Wat:
    return Wat().without("proxy_on_request_trailers", "proxy_on_response_trailers")


# name -> (filter b's module, FilterSpec keywords, a request body, resume b's pause in)
CASES = {
    "plain": (_plain(), {}, None, None),
    "pause_request": (_returning("proxy_on_request_headers", 1), {}, None, REQUEST),
    "pause_response": (_returning("proxy_on_response_headers", 1), {}, None, RESPONSE),
    "reply": (_replier(), {}, None, None),
    "trap_fail_closed": (_trapping("proxy_on_request_headers"), {}, None, None),
    "trap_fail_open": (_trapping("proxy_on_request_headers"), {"failure_policy": "fail_open"},
                       None, None),
    "failed_open": (_failing_open(), {"failure_policy": "fail_open"}, None, None),
    "invalid_action": (_returning("proxy_on_response_headers", 9), {}, None, None),
    "body_callbacks": (_with_body(), {}, [b"ab", b"cd"], None),
    "teardown_trap": (_trapping("proxy_on_done"), {}, None, None),
}


def _result(r) -> tuple:
    if isinstance(r, LocalReply):
        return ("reply", r.status, r.headers, r.body, r.details)
    assert isinstance(r, Forward)
    return ("forward", r.headers)


async def _run(load, trace, case: str, native: bool, walks, monkeypatch, traced: bool = False,
               finish_paused: bool = False) -> tuple:
    """One request through a → b → c (b the case's module), as the gateway makes it."""
    b, spec_kw, body, resume = CASES[case]
    monkeypatch.setattr(crossing, "USE_NATIVE", native)
    for name, walk in zip(("walk_request", "walk_response", "walk_finish"), walks):
        monkeypatch.setattr(chain_mod, name, walk)
    host = await load({"a": _plain(), "b": b, "c": _plain()}, **spec_kw)
    assert all(isinstance(f, crossing.FilterCore) == native for f in host.filters.values())
    trace.records.clear()                    # the start sequences' lines
    s = host.stream(NAMES, info(trace=traced))
    out = []
    headers = REQ + ([("content-length", "4")] if body else [])
    task = asyncio.ensure_future(s.request(headers, body_iter(*body) if body else None))
    if resume == REQUEST:
        await until(lambda: s.ctxs[1] is not None and s.ctxs[1].waiter is not None, WAIT_S, interval=0)
        if finish_paused:
            await s.finish(LogInfo(status=0))
        else:
            s.ctxs[1].continue_stream(REQUEST)
    r = await task
    out.append(_result(r))
    if isinstance(r, Forward):
        out.append(await collect(r.body))
        task = asyncio.ensure_future(s.response(200, [(":status", "200")], None))
        if resume == RESPONSE:
            await until(lambda: s.ctxs[1].waiter is not None, WAIT_S, interval=0)
            s.ctxs[1].continue_stream(RESPONSE)
        out.append(_result(await task))
    summary = re.sub(r"us=\d+,?", "", s.trace_summary())
    if not s._finished:
        await s.finish(LogInfo(status=200))
    for f in host.filters.values():          # a trapped instance's rebuild logs its start too
        await rebuilt(f)
    lines = {n: trace.lines(n) for n in NAMES}
    failures = {n: dict(f.failures) for n, f in host.filters.items()}
    left = {n: sorted(c for c, ctx in f.contexts.items() if ctx is not f.root)
            for n, f in host.filters.items()}
    return out, list(s.skipped), list(s.failed), summary, lines, failures, left


C_WALKS = crossing.chain_walks
COMBOS = [(native, walks) for native in (True, False) for walks in ("c", "py")]
needs_c = pytest.mark.skipif(C_WALKS is None, reason="abi/engine/_crossing.c is not built")


async def _all_agree(load, trace, monkeypatch, case, **kw) -> tuple:
    outcomes = {}
    for native, walks in COMBOS:
        outcomes[(native, walks)] = await _run(
            load, trace, case, native, C_WALKS if walks == "c" else chain_mod.PY_WALKS,
            monkeypatch, **kw)
    ref = outcomes[(False, "py")]
    for combo, outcome in outcomes.items():
        assert outcome == ref, f"{case}: {combo} differs from the pure-Python reference"
    return ref


@needs_c
@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@pytest.mark.parametrize("case", list(CASES))
async def test_the_c_walks_end_every_case_as_the_python_walks(load, trace, monkeypatch, case,
                                                              traced):
    out, skipped, failed, summary, lines, failures, left = await _all_agree(
        load, trace, monkeypatch, case, traced=traced)
    # What each case must come to (so agreement is not agreement on nothing).
    assert left == {n: [] for n in NAMES}                     # every context torn down
    assert lines["a"][0].startswith("proxy_on_context_create")
    assert ("proxy_on_delete" in lines["a"][-1]) or case == "teardown_trap"
    expect = {
        "reply": ("reply", 403), "trap_fail_closed": ("reply", 503),
        "invalid_action": ("reply", 503),
    }
    if case in expect:
        assert out[-1][:2] == expect[case]
    else:
        assert out[0][0] == "forward" and out[-1][0] == "forward"
    if case in ("reply", "trap_fail_closed"):
        assert not any(line.startswith("proxy_on_request_headers") for line in lines["c"])
    if case in ("trap_fail_open", "failed_open"):
        assert skipped == [False, True, False] and failed == [False, True, False]
        assert any(line.startswith("proxy_on_response_headers") for line in lines["c"])
    if case == "body_callbacks":
        assert out[1] == b"abcd"
        assert [line.split()[0] for line in lines["b"]].count("proxy_on_request_body") >= 1
    if case in ("pause_request", "pause_response"):
        assert [line.split()[0] for line in lines["c"]][:3] == [
            "proxy_on_context_create", "proxy_on_request_headers", "proxy_on_response_headers"]
    if case == "teardown_trap":
        assert any(k[1] == "trap" for k in failures["b"])
    if traced:
        assert summary.startswith("a:") and "b:" in summary
    else:
        assert summary == ""


@needs_c
async def test_a_finish_while_paused_wakes_the_pause_on_every_walk(load, trace, monkeypatch):
    out, *_ = await _all_agree(load, trace, monkeypatch, "pause_request", finish_paused=True)
    assert out == [("reply", 503, [], b"", "stream_finished")]


@needs_c
@pytest.mark.parametrize("case, eos, request_stop, response_stop", [
    ("plain", True, None, None),
    ("pause_request", True, 1 * 4 + chain_mod.PAUSED, None),
    ("pause_response", True, None, 1 * 4 + chain_mod.PAUSED),
    ("body_callbacks", False, 1 * 4 + chain_mod.CONTINUE, 1 * 4 + chain_mod.CONTINUE),
    ("trap_fail_open", True, None, None),
    ("failed_open", False, None, None),
])
async def test_the_c_walks_hand_back_where_the_python_walks_do(load, trace, monkeypatch, case, eos,
                                                               request_stop, response_stop):
    """The walks' answers themselves, called as the chain calls them, on NativeFilters."""
    b, spec_kw, _body, _resume = CASES[case]
    monkeypatch.setattr(crossing, "USE_NATIVE", True)
    answers = {}
    for kind, (walk_request, walk_response, walk_finish) in (("c", C_WALKS),
                                                             ("py", chain_mod.PY_WALKS)):
        host = await load({"a": _plain(), "b": b, "c": _plain()}, **spec_kw)
        s = host.stream(NAMES, info())
        s.request_headers = chain_mod.HeaderMap(list(REQ))
        got = [walk_request(s, 0, eos)]
        if got[0] is not None:
            got.append(walk_request(s, (got[0] >> 2) + 1, eos))
        s.response_headers = chain_mod.HeaderMap([(":status", "200")])
        got.append(walk_response(s, 2, eos))
        if got[-1] is not None:
            got.append(walk_response(s, (got[-1] >> 2) - 1, eos))
        for ctx in s.ctxs:
            if ctx is not None and ctx.waiter is None:
                ctx.resumed = [True, True]
        walk_finish(s)
        answers[kind] = (got, list(s.skipped), [c is None or c.chain is None for c in s.ctxs])
    assert answers["c"] == answers["py"]
    got = answers["c"][0]
    assert got[0] == request_stop
    assert (got[2] if request_stop is not None else got[1]) == response_stop
    assert all(detached for detached in answers["c"][2])     # walk_finish tore every one down


@needs_c
async def test_a_teardown_that_raises_is_logged_and_the_others_still_run(load, trace, monkeypatch):
    """A bug of ours in a filter's teardown (not a trap) is logged, never raised; on the C walk
    too, for a filter whose teardown is Python (Filter's finish_context)."""
    monkeypatch.setattr(crossing, "USE_NATIVE", False)
    monkeypatch.setattr(chain_mod, "walk_finish", C_WALKS[2])
    host = await load({"a": _plain(), "b": _plain(), "c": _plain()})
    b = host.filters["b"]
    real = b.finish_context

    def broken(ctx, failed):
        real(ctx, failed)
        raise RuntimeError("boom")
    monkeypatch.setattr(b, "finish_context", broken)
    s = host.stream(NAMES, info())
    assert isinstance(await s.request(REQ, None), Forward)
    await s.finish(LogInfo(status=200))
    assert 'filter "b": teardown failed' in trace.text()
    assert [r.exc_info[1].args for r in trace.records if r.exc_info] == [("boom",)]
    assert any(line.startswith("proxy_on_delete") for line in trace.lines("c"))


S200 = (":status", "200")
CL = ("content-length", "12")


@pytest.mark.skipif(crossing.native_stream_head is None, reason="abi/engine/_crossing.c is not built")
@pytest.mark.parametrize("status, headers, has_body", [
    (None, [("a", "1"), CL], True),
    (None, [("a", "1"), CL], False),
    (None, [], True),
    (204, [S200, ("b", "2"), CL, ("content-length", "99")], True),    # the first one counts
    (503, [("b", "2"), S200], True),                                 # :status not first
    (503, [S200, ("b", "2"), S200], False),                          # twice
    (200, [("b", "2")], True),                                       # none
    (200, [S200, ("content-length", " 12 ")], True),                 # not plain: the reference
    (200, [S200, ("content-length", "1x")], True),
    (200, [S200, ("content-length", "")], True),
    (200, [S200, ("content-length", "9" * 30)], True),
    (200, [S200, ["b", "2"]], True),                                 # not pairs: the reference
    (200, ((":status", "200"),), True),                              # not a list: the reference
])
def test_the_c_stream_head_is_the_python_one(status, headers, has_body):
    c = crossing.native_stream_head(status, headers, has_body)
    py = chain_mod._stream_head(status, headers, has_body)
    plain = type(headers) is list and all(type(h) is tuple for h in headers) and not any(
        h[0] == "content-length" and not (h[1].isascii() and h[1].isdigit() and len(h[1]) < 19)
        for h in headers)
    if plain:
        assert c == py and c[0] is not headers
    else:
        assert c is None                     # the chain asks the reference
    if status is not None:
        assert py[0][0] == (":status", str(status))
        assert [h for h in py[0] if h[0] == ":status"] == [(":status", str(status))]
