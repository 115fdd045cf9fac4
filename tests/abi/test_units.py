"""Unit tests of the host's building blocks: header maps, body buffers, store, properties."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abi.api import LogInfo
from abi.buffers import BodyBuffer, HeaderMap
from abi.enums import MetricType, Status
from abi.properties import PropertySource, RootFacts, get_property
from abi.shared_store import LocalStore

from abi_helpers import info


def test_header_replace_keeps_first_position_and_drops_duplicates():
    m = HeaderMap([("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("a", "5")])
    m.replace("a", "x")
    assert m.items == [("a", "x"), ("b", "2"), ("c", "4")]
    m.replace("d", "y")
    assert m.items[-1] == ("d", "y")


def test_header_serialization_cache_invalidated_on_edit():
    m = HeaderMap([("a", "1")])
    before = m.serialized()
    m.add("b", "2")
    assert m.serialized() != before and struct.unpack_from("<I", m.serialized())[0] == 2
    m.remove("a")
    m.remove("zzz")
    assert m.items == [("b", "2")]


def test_body_buffer_envoy_write_semantics():
    b = BodyBuffer()
    b.append(b"hello")
    b.append(b" world")
    assert b.size == 11 and b.read(6, 100) == b"world" and b.read(20, 5) == b""
    assert b.write(0, 5, b"HELLO") == Status.OK and b.data() == b"HELLO world"
    assert b.write(3, 1, b"?") == Status.BAD_ARGUMENT
    assert b.write(b.size, 0, b"!") == Status.OK and b.data() == b"HELLO world!"
    assert BodyBuffer(writable=False, data=b"x").write(0, 0, b"y") == Status.BAD_ARGUMENT


def test_shared_data_cas_semantics():
    s = LocalStore()
    assert s.get(b"k") is None
    assert s.set(b"k", b"v", 12345) == Status.OK          # cas on a missing key still creates
    v, cas = s.get(b"k")
    assert v == b"v" and cas != 0
    assert s.set(b"k", b"w", cas + 1) == Status.CAS_MISMATCH
    assert s.set(b"k", b"w", cas) == Status.OK
    assert s.get(b"k")[1] != cas
    assert s.set(b"k", b"z", 0) == Status.OK               # cas 0: unconditional


def test_shared_data_budget():
    s = LocalStore(max_bytes=10 + 2 * 64)        # two entries' overhead + 10 bytes of keys/values
    assert s.set(b"k", b"12345", 0) == Status.OK
    assert s.set(b"k2", b"123456", 0) == Status.INTERNAL_FAILURE
    assert s.set(b"k", b"1", 0) == Status.OK                 # shrinking frees budget
    assert s.set(b"k2", b"1234", 0) == Status.OK


def test_queues_and_callbacks():
    s = LocalStore(max_queue_items=2)
    seen = []
    s.on_enqueue(seen.append)
    q = s.register_queue("q")
    assert s.register_queue("q") == q and s.resolve_queue("q") == q and s.resolve_queue("x") is None
    assert s.dequeue(q) == Status.EMPTY and s.dequeue(99) == Status.NOT_FOUND
    assert s.enqueue(q, b"1") == Status.OK and s.enqueue(q, b"2") == Status.OK
    assert s.enqueue(q, b"3") == Status.INTERNAL_FAILURE     # full: refused, not dropped
    assert s.enqueue(99, b"x") == Status.NOT_FOUND
    assert seen == [q, q]
    assert s.dequeue(q) == b"1" and s.dequeue(q) == b"2"


def test_metric_ids_encode_type_like_envoy():
    s = LocalStore()
    c1, c2 = s.define_metric(MetricType.COUNTER, "a"), s.define_metric(MetricType.COUNTER, "a")
    g = s.define_metric(MetricType.GAUGE, "g")
    h = s.define_metric(MetricType.HISTOGRAM, "h")
    assert (c1 % 4, g % 4, h % 4) == (0, 1, 2) and c1 != c2
    assert s.increment_metric(c1, 2) == Status.OK and s.increment_metric(c2, 3) == Status.OK
    assert s.get_metric(c1) == (Status.OK, 5)                # both ids name one stat
    assert s.record_metric(g, 9) == Status.OK and s.get_metric(g) == (Status.OK, 9)
    assert s.increment_metric(c1, 0) == Status.BAD_ARGUMENT


def test_properties_after_completion():
    class Facts:
        pass
    f = Facts()
    f.info = info()
    f.request_headers = HeaderMap([(":path", "/a?b=c"), ("x-request-id", "rid"), ("cookie", "1"), ("cookie", "2")])
    f.response_headers = HeaderMap([(":status", "404")])
    f.log = LogInfo(status=404, bytes_in=3, bytes_out=9, duration_ns=1234)
    f.custom = {}
    src = PropertySource("p", f)
    assert get_property(src, b"response\0code") == struct.pack("<q", 404)
    assert get_property(src, b"request\0duration") == struct.pack("<q", 1234)
    assert get_property(src, b"request\0id") == b"rid"
    assert get_property(src, b"request\0headers\0cookie") == b"1,2"
    assert get_property(src, b"request\0time") == struct.pack("<q", 1_700_000_000_000_000_000)
    assert get_property(src, b"connection\0id") == struct.pack("<Q", 7)
    assert get_property(src, b"connection\0mtls") == b"\x00"
    assert get_property(src, b"destination\0port") == struct.pack("<q", 8080)
    root = PropertySource("p", RootFacts())
    assert get_property(root, b"request\0path") is None
    assert get_property(root, b"plugin_name") == b"p"


def test_property_path_with_trailing_nul_and_root_id():
    # The C++ SDK NUL-terminates every segment, the last one too.
    src = PropertySource("p", RootFacts(), root_id="my_root_id")
    assert get_property(src, b"plugin_root_id\0") == b"my_root_id"
    assert get_property(src, b"plugin_root_id") == b"my_root_id"
    assert get_property(src, b"plugin_name\0\0") is None


def test_metric_names_are_bounded():
    s = LocalStore(max_metrics=2)
    assert s.define_metric(MetricType.COUNTER, "a") is not None
    assert s.define_metric(MetricType.GAUGE, "b") is not None
    assert s.define_metric(MetricType.COUNTER, "c") is None
    assert s.define_metric(MetricType.COUNTER, "a") is not None   # known names still resolve


def test_header_text_is_latin1_like_the_wire():
    # The gateway decodes header bytes as latin-1; the guest must see the original bytes.
    from abi.pairs import deserialize_str, serialize_str
    ser = serialize_str([("x-latin", "caf\xe9")])
    assert b"caf\xe9\0" in ser
    assert deserialize_str(ser) == [("x-latin", "caf\xe9")]


def test_vm_namespaces_are_injective_and_leave_default_keys_alone():
    from abi.shared_store import LocalStore, VmStore
    store = LocalStore()
    default, a, ab = VmStore(store, ""), VmStore(store, "a"), VmStore(store, "a\xffb")
    # A default-VM key crafted to look like VM "a"'s encoding of "k" stays apart from it.
    assert default.set(b"\xffa\x00k", b"default", 0) == 0
    assert a.set(b"k", b"vm-a", 0) == 0
    assert ab.set(b"k", b"vm-a\xffb", 0) == 0
    assert default.set(b"plain", b"d", 0) == 0
    assert (default.get(b"\xffa\x00k")[0], a.get(b"k")[0], ab.get(b"k")[0]) == (b"default", b"vm-a", b"vm-a\xffb")
    assert default.get(b"k") is None and a.get(b"plain") is None
    assert store.get(b"plain")[0] == b"d"              # what SDKs write is stored as it was
    # Queues: register in one VM, resolve from another by its vm_id ("" = one's own VM).
    qa = a.register_queue("q")
    qd = default.register_queue("q")
    assert qa != qd
    assert default.resolve_queue("a", "q") == qa and a.resolve_queue("", "q") == qa
    assert a.resolve_queue("", "\uffff\x00q") is None and default.resolve_queue("", "q") == qd
    assert ab.resolve_queue("", "q") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=20))
def test_serialize_str_is_serialize_of_each_header_encoded(pairs):
    """serialize_str's one-pass encoding gives the bytes the per-header path gives, for wire
    text (latin-1) and for a str that did not come off the wire (the utf-8 fallback)."""
    from abi.pairs import _serialize_str, deserialize, serialize, serialize_str, to_bytes
    expected = serialize([(to_bytes(k), to_bytes(v)) for k, v in pairs])
    assert serialize_str(pairs) == expected
    assert _serialize_str(pairs) == expected        # the Python path when the C one is there
    assert deserialize(expected) == [(to_bytes(k), to_bytes(v)) for k, v in pairs]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(max_codepoint=255), max_size=40),
                          st.text(st.characters(max_codepoint=255), max_size=40)), max_size=40))
def test_c_serialize_pairs_is_the_python_serialization(pairs):
    """abi/engine/_crossing.c serialize_pairs: the bytes of pairs._serialize_str for latin-1
    pairs; None (the Python path's turn) for anything but a list of latin-1 str pairs."""
    from abi.engine import serialize_pairs
    from abi.pairs import _serialize_str
    if serialize_pairs is None:
        pytest.skip("abi/engine/_crossing.c is not built")
    assert serialize_pairs(pairs) == _serialize_str(pairs)
    odd = [("k\u0100", "v")], [("k", b"v")], [("k", "v", "w")], [["k", "v"]], (("k", "v"),)
    assert [serialize_pairs(p) for p in odd] == [None] * len(odd)


@pytest.mark.parametrize("case", ["plain", "no-info", "no-headers", "empty-id-header", "id-header", "ipv6"])
def test_stream_properties_answer_what_get_property_does(case):
    """STREAM_PROPERTIES (the hot paths proxy_get_property answers in one step) give exactly
    get_property's bytes or None, for each path as the guest sends it (with or without the
    C++ SDK's final NUL), whatever facts the stream has."""
    from abi.buffers import HeaderMap
    from abi.properties import STREAM_PROPERTIES
    headers = [(":method", "GET"), (":path", "/p?q=1"), (":authority", "h.example"), ("x-a", "é")]
    facts = RootFacts(info=info(), request_headers=HeaderMap(list(headers)))
    if case == "no-info":
        facts.info = None
    elif case == "no-headers":
        facts.request_headers = None
    elif case in ("empty-id-header", "id-header"):
        facts.request_headers.add("x-request-id", "" if case == "empty-id-header" else "rid-7")
    elif case == "ipv6":
        facts.info.client_addr = ("::1", 443)
    src = PropertySource("p", facts)
    assert len(STREAM_PROPERTIES) == 10
    for path, fast in STREAM_PROPERTIES.items():
        assert fast(facts) == get_property(src, path), path


def test_an_http_context_is_built_as_the_python_reference_builds_it_without_a_frame():
    # HttpContext's fields are set by _crossing.c's ContextCore on every request and filter
    # (no Python frame); _ContextFields is the reference (and the base without the C build).
    import gc
    import sys
    import weakref
    from abi.context import Context, HttpContext, _ContextFields
    from abi.engine import ContextCore
    if ContextCore is None:
        pytest.skip("abi/engine/_crossing.c is not built")
    assert HttpContext.__mro__[1] is ContextCore

    class Reference(_ContextFields, Context):
        pass

    filter_, chain = object(), object()
    frames = []
    sys.setprofile(lambda frame, event, arg: event == "call" and frames.append(frame.f_code.co_name))
    try:
        ctx = HttpContext(filter_, 7, 3, chain)
    finally:
        sys.setprofile(None)
    assert frames == []
    ref = Reference(filter_, 7, 3, chain)
    fields = ("filter", "id", "generation", "chain", "bodies", "resumed", "pending_calls")
    assert [getattr(ctx, f) for f in fields] == [getattr(ref, f) for f in fields]
    assert ctx.bodies is not HttpContext(filter_, 8, 3, chain).bodies     # fresh per context
    # The rest of the context works as before: class defaults, attributes set later, release.
    assert ctx.edited is False and ctx.waiter is None and ctx.failure is None
    ctx.edited, ctx.chain = True, None
    assert ctx.__dict__ == {"edited": True} and ctx.chain is None
    with pytest.raises(TypeError):
        HttpContext(filter_, 7, 3)
    # Collected by reference counting once released, and by the GC in a cycle.
    gone = weakref.ref(ctx)
    del ctx
    assert gone() is None
    cyc = HttpContext(filter_, 9, 3, None)
    cyc.chain = cyc
    gone = weakref.ref(cyc)
    del cyc
    gc.collect()
    assert gone() is None


def test_a_header_map_is_built_as_the_python_reference_builds_it_without_a_frame():
    # HeaderMap's fields are set by _crossing.c's HeaderMapCore (twice per request, no Python
    # frame); _HeaderMapFields is the reference (and the base without the C build).
    import sys
    from abi.buffers import _HeaderMapFields
    from abi.engine import HeaderMapCore
    if HeaderMapCore is None:
        pytest.skip("abi/engine/_crossing.c is not built")
    assert HeaderMap.__mro__[1] is HeaderMapCore
    items = [("a", "1")]
    frames = []
    sys.setprofile(lambda frame, event, arg: event == "call" and frames.append(frame.f_code.co_name))
    try:
        m = HeaderMap(items)
    finally:
        sys.setprofile(None)
    assert frames == []
    ref = _HeaderMapFields(items)
    fields = ("items", "_ser", "unsafe", "grown")
    assert [getattr(m, f) for f in fields] == [getattr(ref, f) for f in fields]
    assert m.items is items
    with pytest.raises(AttributeError):
        m.other = 1                 # no __dict__, as with the reference's __slots__
    with pytest.raises(TypeError):
        HeaderMap()
