"""Envoy's foreign functions (source/extensions/common/wasm/foreign.cc) as filters call them:
`compress` / `uncompress` byte-identical to Envoy's zlib calls, `clear_route_cache`, and
NOT_FOUND for names no host defines."""
from __future__ import annotations

import zlib

from tests.conformance import watlib
from tests.conformance.probe import filter_entry, one, parse_report, probe_gateway, wait_for

PAYLOAD = b"Proxy-Wasm filters compress with zlib; " * 2 + b"Proxy-Wasm filters compress with zlib!"
OK, NOT_FOUND, SERIALIZATION_FAILURE = "0", "1", "3"      # proxy_status_t


def envoy_compress(data: bytes) -> bytes:
    """Envoy's `compress` foreign function is zlib's compress(): compress2 at
    Z_DEFAULT_COMPRESSION, i.e. deflateInit(level -1) = zlib wrapper, 15-bit window,
    memLevel 8, Z_DEFAULT_STRATEGY — spelled out here rather than relying on defaults."""
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


async def test_compress_on_tick_is_byte_identical_to_envoy_and_uncompress_round_trips(tmp_path, upstream):
    f = filter_entry("zlib", watlib.build("foreign_zlib.wat", tmp_path))
    async with probe_gateway(tmp_path, upstream, [f]) as (gw, s):
        async def after_a_tick():
            async with s.get(gw.url("/z")) as r:
                return (r.status, r.headers.copy(), await r.read()) if r.status == 200 else None
        got = await wait_for(after_a_tick, timeout=20)
    assert got, "no tick compressed the payload within 20 s"
    _, headers, body = got
    assert body == envoy_compress(PAYLOAD)
    assert headers["content-type"] == "application/zlib"
    assert headers["x-plain"] == PAYLOAD.decode()
    rep = parse_report(headers.get("x-report"))
    assert one(rep, "u") == OK
    assert one(rep, "bad") == SERIALIZATION_FAILURE      # Envoy: uncompress() != Z_OK/Z_BUF_ERROR
    assert one(rep, "empty") == SERIALIZATION_FAILURE    # zlib: no stream at all is Z_DATA_ERROR
    assert one(rep, "crc") == OK
    assert one(rep, "unknown") == NOT_FOUND
    assert upstream.main_requests() == []                # answered by the filter
