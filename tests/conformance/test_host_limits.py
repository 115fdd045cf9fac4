"""Host limits over the real gateway: max_buffered_body_bytes (413 on the request, 500 on the
response, as Envoy's buffer limits) with the risk filter and with a WAT filter that buffers
forever, teardown callbacks still running; max_callout_bytes against a real upstream's 3 MiB
callout response."""
from __future__ import annotations

import json
import logging

import aiohttp
import pytest
import pytest_asyncio
import yaml

from abi.pairs import serialize
from tests.abi.abi_wat import OUT, Wat
from tests.conformance.probe import BIG_BODY, filter_entry, gateway_yaml, wait_for
from tests.filters.conftest import DIST
from tests.helpers import run_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMALL = 4096


def buffering_wat(tmp_path, name: str, callback: str) -> str:
    """A filter that buffers a body whole: Pause (StopIterationAndBuffer) to every `callback`
    until the end of stream, then Continue; the other callbacks trace themselves."""
    w = Wat()
    w.on(callback, "(if (result i32) (local.get $c) (then (i32.const 0)) (else (i32.const 1)))")
    path = tmp_path / f"{name}.wat"
    path.write_text(w.render())
    return str(path)


def callout_wat(tmp_path, name: str) -> str:
    """Dispatch GET /big (3 MiB) to cluster "callout" and pause; on the response trace
    "counts <headers> <body> <trailers>" and "code <status>", then resume the request."""
    w = Wat()
    hdrs = serialize([(b":method", b"GET"), (b":path", b"/big"), (b":authority", b"callout")])
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {OUT + 16}) (local.get $a))"
         f"(drop (call $proxy_http_call {w.s('callout')} {w.s(hdrs)} (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)"
         f" (i32.const 10000) (i32.const {OUT + 12}))) (i32.const 1)")
    w.on("proxy_on_http_call_response",
         f"(call $trace {w.s('counts')} (i32.const 3) (local.get $c) (local.get $d) (local.get $e))"
         f"(drop (call $proxy_get_status (i32.const {OUT + 20}) (i32.const {OUT}) (i32.const {OUT + 4})))"
         f"(call $log_num {w.s('code')} (i32.load (i32.const {OUT + 20})))"
         f"(drop (call $proxy_set_effective_context (i32.load (i32.const {OUT + 16}))))"
         "(drop (call $proxy_continue_stream (i32.const 0)))")
    path = tmp_path / f"{name}.wat"
    path.write_text(w.render())
    return str(path)


def config(tmp_path, up_port: int) -> str:
    filters = [
        # The gateway-wide default (below) applies: limits has no max_buffered_body_bytes.
        filter_entry("risk_default", DIST / "risk.wasm", config={"threshold": 10000}),
        filter_entry("risk_small", DIST / "risk.wasm", config={"threshold": 10000},
                     limits={"max_buffered_body_bytes": 1024}),
        filter_entry("hold_request", buffering_wat(tmp_path, "hold_request", "proxy_on_request_body")),
        filter_entry("hold_response", buffering_wat(tmp_path, "hold_response", "proxy_on_response_body")),
        filter_entry("hold_response_big", buffering_wat(tmp_path, "hold_response_big", "proxy_on_response_body"),
                     limits={"max_buffered_body_bytes": 8 << 20}),
        filter_entry("callout_small", callout_wat(tmp_path, "callout_small"), limits={"max_callout_bytes": 1 << 20}),
        filter_entry("callout_big", callout_wat(tmp_path, "callout_big"), limits={"max_callout_bytes": 8 << 20}),
    ]
    routes = [{"name": f["name"], "match": {"prefix": f"/{f['name']}/"}, "rewrite": {"prefix": "/"},
               "cluster": "backend", "filters": [f["name"]]} for f in filters]
    doc = yaml.safe_load(gateway_yaml(up_port, filters, routes))
    doc["limits"] = {"max_buffered_body_bytes": SMALL}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(tmp_path_factory):
    from tests.conformance.probe import recording_upstream
    tmp = tmp_path_factory.mktemp("limits")
    async with recording_upstream() as up:
        async with run_gateway(config(tmp, up.port), tmp) as g:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
                yield g, up, s


async def post(gw, path, body: bytes, **kw):
    g, up, s = gw
    before = len(up.main_requests())
    async with s.post(g.url(path), data=body, **kw) as r:
        return r.status, await r.read(), up.main_requests()[before:]


def payment(size: int, amount: int = 5) -> bytes:
    doc = {"amount": amount, "note": ""}
    doc["note"] = "n" * (size - len(json.dumps(doc)))
    return json.dumps(doc).encode()


# Over 256 KiB, so the gateway reads it in more than one chunk: the host holds a body only while
# the filter pauses it (a whole body in one final chunk that the filter passes is never held).
BIG = 300_000


async def test_risk_body_over_the_gateway_default_is_413_and_never_forwarded(gw):
    status, body, seen = await post(gw, "/risk_default/pay", payment(BIG),
                                    headers={"content-type": "application/json"})
    assert status == 413 and body == b"request body over the buffer limit\n"
    assert seen == []                           # no request reached the upstream's handler
    # Within the limit the same filter buffers, checks and forwards the body whole.
    ok = payment(SMALL - 100)
    status, body, seen = await post(gw, "/risk_default/pay", ok)
    assert status == 200 and [r.body for r in seen] == [ok]


async def test_risk_per_filter_override_and_chunked_body(gw):
    async def chunks():
        data = payment(BIG)
        for i in range(0, len(data), 50_000):
            yield data[i:i + 50_000]
    # risk_small allows 1 KiB: a chunked body (no content-length for risk to pre-check).
    status, body, seen = await post(gw, "/risk_small/pay", chunks())
    assert status == 413 and b"buffer limit" in body and seen == []
    status, _, seen = await post(gw, "/risk_small/pay", payment(900))
    assert status == 200 and len(seen) == 1


async def test_wat_filter_holding_the_request_body_gets_413(gw, caplog):
    caplog.set_level(logging.INFO, logger="wasmgate.filters")
    status, body, seen = await post(gw, "/hold_request/x", b"z" * BIG)
    assert status == 413 and seen == []
    # on_done → on_log → on_delete ran for the stream the 413 ended.
    assert await wait_for(torn_down(caplog, "hold_request"))


async def test_wat_filter_holding_the_response_body_gets_500(gw, caplog):
    caplog.set_level(logging.INFO, logger="wasmgate.filters")
    g, up, s = gw
    async with s.get(g.url("/hold_response/big")) as r:
        status, body = r.status, await r.read()
    assert status == 500 and body == b"response body over the buffer limit\n"
    assert await wait_for(torn_down(caplog, "hold_response"))
    # The gateway serves on: a response within the limit is held, then released at its end.
    async with s.get(g.url("/hold_response/small")) as r:
        assert r.status == 200 and json.loads(await r.read())["path"] == "/small"


async def test_per_filter_override_lets_a_big_response_through(gw):
    g, up, s = gw
    async with s.get(g.url("/hold_response_big/big")) as r:
        assert r.status == 200 and await r.read() == BIG_BODY       # 3 MiB held under an 8 MiB limit


def torn_down(caplog, name: str):
    """A wait_for predicate: the filter's last context got on_done → on_log → on_delete."""
    prefix = f'filter "{name}": '

    async def check() -> bool:
        seen = [r.getMessage()[len(prefix):].split()[0] for r in caplog.records
                if r.getMessage().startswith(prefix)]
        order = [c for c in seen if c in ("proxy_on_done", "proxy_on_log", "proxy_on_delete")]
        return order[-3:] == ["proxy_on_done", "proxy_on_log", "proxy_on_delete"]
    return check


def traced(caplog, name: str) -> list[str]:
    """The filter's "counts …" and "code …" trace lines."""
    prefix = f'filter "{name}": '
    lines = [r.getMessage()[len(prefix):] for r in caplog.records if r.getMessage().startswith(prefix)]
    return [l for l in lines if l.startswith(("counts ", "code "))]


async def test_callout_response_over_max_callout_bytes_is_a_failed_call(gw, caplog):
    caplog.set_level(logging.INFO, logger="wasmgate.filters")
    g, up, s = gw
    async with s.get(g.url("/callout_small/x")) as r:
        assert r.status == 200                 # the filter resumed after its failed call
    # As Envoy delivers an async response over its buffer limit: (0, 0, 0), BrokenConnection.
    assert traced(caplog, "callout_small") == ["counts 0 0 0", "code 11"]
    assert any("http call to callout failed: response body over the filter's max_callout_bytes" in r.getMessage()
               for r in caplog.records)
    # Under a larger budget the same 3 MiB response is delivered whole.
    async with s.get(g.url("/callout_big/x")) as r:
        assert r.status == 200
    counts = traced(caplog, "callout_big")
    assert counts[0].split()[2] == str(len(BIG_BODY)) and counts[1] == "code 0"
