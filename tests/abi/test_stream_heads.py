"""The header lists a stream hands its filters and back (abi/chain.py): one :status first on
the response, end_of_stream from the first content-length, the filters of a route resolved once."""
from __future__ import annotations

import pytest

from abi.api import LogInfo

from abi_helpers import REQ, info
from abi_wat import Wat

# The chain's behaviour on both filter call paths: NativeFilter's C and Filter's Python.
pytestmark = pytest.mark.usefixtures("crossing_impl")


class _Body:
    """A body the chain hands back untouched (no filter here reads bodies)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise StopAsyncIteration


@pytest.mark.parametrize("status, headers, body, expect, eos", [
    # as the gateway hands them: :status first, the status argument wins
    (201, [(":status", "200"), ("content-length", "3"), ("x-a", "1")], True,
     [(":status", "201"), ("content-length", "3"), ("x-a", "1")], 0),
    # none given
    (200, [("x-a", "1"), ("content-length", "0")], True, [(":status", "200"), ("x-a", "1"), ("content-length", "0")], 1),
    # elsewhere and twice: one, first
    (204, [("x-a", "1"), (":status", "500"), ("x-b", "2"), (":status", "1")], True,
     [(":status", "204"), ("x-a", "1"), ("x-b", "2")], 0),
    (200, [(":status", "200"), (":status", "200"), ("x-a", "1")], True, [(":status", "200"), ("x-a", "1")], 0),
    # the first content-length decides end_of_stream
    (200, [(":status", "200"), ("content-length", "0"), ("content-length", "5")], True,
     [(":status", "200"), ("content-length", "0"), ("content-length", "5")], 1),
    (200, [(":status", "200"), ("content-length", " 7")], True, [(":status", "200"), ("content-length", " 7")], 0),
    # no body: end_of_stream whatever the headers say
    (200, [(":status", "200"), ("content-length", "9")], False, [(":status", "200"), ("content-length", "9")], 1),
])
async def test_response_headers_as_the_filter_sees_them(load, trace, status, headers, body, expect, eos):
    host = await load(Wat())
    s = host.stream(["f"], info())
    await s.request(REQ, None)
    given = list(headers)
    fwd = await s.response(status, headers, _Body() if body else None)
    await s.finish(LogInfo())
    assert fwd.headers == expect
    assert headers == given                          # the caller's list is not changed
    assert f"proxy_on_response_headers 2 {len(expect)} {eos}" in trace.lines("f")


async def test_a_routes_filters_resolved_once(load):
    host = await load({"a": Wat(), "b": Wat()})
    streams = [host.stream(("a", "b"), info()), host.stream(["a", "b"], info()), host.stream(("b",), info())]
    assert streams[0].filters is streams[1].filters
    assert [f.name for f in streams[0].filters] == ["a", "b"] and [f.name for f in streams[2].filters] == ["b"]
    with pytest.raises(ValueError, match="no filter named 'c'"):
        host.stream(("a", "c"), info())
    for s in streams:
        await s.request(REQ, None)
        await s.finish(LogInfo())
