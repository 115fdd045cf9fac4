"""The proxy's reading of the headers a filter chain hands back: the usual layout (pseudo-headers
where the gateway put them) read by position, anything else by name, with the same answers."""
from __future__ import annotations

from abi.api import Forward
from gateway.proxy import Exchange, _after_chain, _split_pseudo

PSEUDO = [(":method", "GET"), (":path", "/a?q"), (":authority", "h"), (":scheme", "http")]


def test_split_pseudo_usual_layout_and_moved_pseudo_headers():
    rest = [("accept", "*/*"), ("x-a", "1")]
    assert _split_pseudo(PSEUDO + rest, "GET", "/a?q", "h") == ("GET", "/a?q", "h", rest)
    # A filter appended a second :path: the last one counts, and no pseudo-header is left in rest.
    assert _split_pseudo(PSEUDO + rest + [(":path", "/b")], "GET", "/a?q", "h") == ("GET", "/b", "h", rest)
    # A filter removed :authority: the request's own stays.
    moved = [PSEUDO[1], PSEUDO[0], PSEUDO[3]] + rest
    assert _split_pseudo(moved, "POST", "/x", "orig") == ("GET", "/a?q", "orig", rest)


def test_after_chain_usual_layout_and_others():
    ex = Exchange("GET", "/")
    body = object()
    hs = [("content-type", "text/plain"), ("content-length", "30")]
    assert _after_chain(Forward([(":status", "201")] + hs, body), 200, 30, body, ex) == (201, hs, 30, body)
    # Content-Length changed by a filter: length unknown; dropped: the same.
    changed = [hs[0], ("content-length", "31")]
    assert _after_chain(Forward([(":status", "200")] + changed, body), 200, 30, body, ex)[2] is None
    assert _after_chain(Forward([(":status", "200"), hs[0]], body), 200, 30, body, ex)[2] is None
    # :status not first, or a second one: the first :status counts and no pseudo-header goes on.
    assert _after_chain(Forward(hs + [(":status", "404"), (":status", "500")], body), 200, 30, body, ex) == \
        (404, hs, 30, body)
    # An unparsable :status keeps the upstream's; a status outside 200..599 becomes 500.
    assert _after_chain(Forward([(":status", "abc")] + hs, body), 202, 30, body, ex)[0] == 202
    assert _after_chain(Forward([(":status", "103")] + hs, body), 200, 30, body, ex)[0] == 500
    # No headers at all, and no body: length 0.
    assert _after_chain(Forward([], None), 204, None, body, ex) == (204, [], 0, None)
