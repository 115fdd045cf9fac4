"""A filter's per-request calls (context open, headers callbacks, teardown): on the C path
(NativeFilter, _crossing.c's FilterCore) they run no Python frame of the filter or the chain's
headers bookkeeping; the pure-Python path (Filter's methods) does the same work in Python."""
from __future__ import annotations

import os
import sys

import pytest

from abi.api import Forward, LogInfo

from abi_helpers import REQ, info
from abi_wat import Wat

pytestmark = pytest.mark.usefixtures("crossing_impl")

# What the C path does without a frame: Filter.call / new_http_context / headers /
# finish_context, Chain._headers (its common case), and the chain's loops (walks) and head.
PER_FILTER = {("filter.py", "call"), ("filter.py", "new_http_context"), ("filter.py", "headers"),
              ("filter.py", "finish_context"), ("chain.py", "_headers"),
              ("chain.py", "_walk_request"), ("chain.py", "_walk_response"),
              ("chain.py", "_walk_finish"), ("chain.py", "_request_headers"),
              ("chain.py", "_hand_back"), ("chain.py", "_finish_one"), ("chain.py", "_stream_head")}


class Frames:
    """(file name, function) of every Python frame entered while active."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def _profile(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            self.seen.append((os.path.basename(code.co_filename), code.co_name))

    def __enter__(self):
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


async def _request(host, names):
    s = host.stream(names, info())
    assert isinstance(await s.request(REQ, None), Forward)
    assert isinstance(await s.response(200, [(":status", "200")], None), Forward)
    await s.finish(LogInfo(status=200))


async def test_a_filters_per_request_calls_run_no_python_frame_on_the_c_path(load, trace,
                                                                              crossing_impl):
    host = await load({"a": Wat(), "b": Wat()})
    await _request(host, ["a", "b"])                 # warm: exports cached
    trace.records.clear()
    with Frames() as frames:
        await _request(host, ["a", "b"])
    # Every callback ran, in order, for both filters (the trace is what the guest logged).
    for name in ("a", "b"):
        assert [line.split()[0] for line in trace.lines(name)] == [
            "proxy_on_context_create", "proxy_on_request_headers", "proxy_on_response_headers",
            "proxy_on_done", "proxy_on_log", "proxy_on_delete"]
    ran = PER_FILTER & set(frames.seen)
    if crossing_impl == "native":
        assert ran == set()
    else:
        assert ran == PER_FILTER
