"""{{name}} through the real wasm, with wasmgate's pytest plugin (the engine the gateway runs).
conftest.py rebuilds dist/{{lib}}.wasm first when a source is newer."""
import pytest
from abi.api import FilterLoadError

from conftest import WASM


def test_greets_the_upstream(wasm_filter):
    f = wasm_filter(WASM, config={{config_hi}}{{options}})
    r = f.request("GET", "/hello")
    assert r.upstream_request.headers["x-greeting"] == "hi"
    assert 'filter "{{lib}}": {{name}}: greeted /hello' in [log.message for log in f.logs]
    resp = r.respond(200, body=b"ok")
    assert resp.status == 200 and resp.headers["content-length"] == "2"


def test_blocks(wasm_filter):
    r = wasm_filter(WASM{{options}}).request("GET", "/", headers={"x-block": "1"})
    assert r.local_reply.status == 403 and r.local_reply.body == b"blocked\n"


def test_refuses_a_bad_config(wasm_filter):
    with pytest.raises(FilterLoadError, match="{{bad_match}}"):
        wasm_filter(WASM, config={{config_bad}}{{options}})
