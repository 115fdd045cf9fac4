"""auth filter, unit level through the real wasm (wasmgate's pytest plugin, no sockets): API keys
(header, query, hashed), Basic, JWT HS256 — every option and every reject path. Each route of
the former end-to-end gateway is one loaded filter, picked by the first path segment. End to end
over HTTP: test_auth.py."""
from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from multidict import CIMultiDict

from tests.filters.conftest import DIST, header_values, mint_jwt
from wasmgate.harness import load_filter

SECRET = b"test-secret-0123456789-abcdefghij"
BOB_KEY = "k-bob-5f2a"
SALT = "NaCl-7"


def sha_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


FILTERS = [
    {"name": "keys", "wasm": "auth", "config": {
        "api_key": {"header": "x-api-key", "query": "api_key", "keys": [
            {"key": "k-alice-1", "identity": "alice"},
            {"key_sha256": sha_hex(BOB_KEY), "identity": "bob"}]},
        "method_header": "x-auth-method"}},
    {"name": "keys_strip", "wasm": "auth", "config": {
        "api_key": {"header": "x-api-key", "query": "api_key", "keys": [{"key": "k-alice-1", "identity": "alice"}]},
        "strip_credentials": True, "identity_header": "x-user"}},
    {"name": "keys_default", "wasm": "auth", "config": {
        "api_key": {"keys": [{"key": "k-alice-1", "identity": "alice"}]}, "realm": "shop"}},
    {"name": "basic", "wasm": "auth", "config": {
        "basic": {"users": [
            {"username": "carol", "salt": SALT, "password_sha256": sha_hex(SALT + "hunter2")},
            {"username": "dave", "password_sha256": sha_hex("pässwörd")}]},
        "strip_credentials": True}},
    {"name": "jwt", "wasm": "auth", "config": {
        "jwt": {"secret": SECRET.decode(), "issuer": "https://issuer.test", "audience": ["api", "web"],
                "clock_skew_s": 30}}},
    {"name": "jwt_custom", "wasm": "auth", "config": {
        "jwt": {"secret_base64url": base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode(),
                "header": "x-token", "query": "access_token", "identity_claim": "email",
                "require_exp": False, "clock_skew_s": 0},
        "identity_header": "x-user", "strip_credentials": True}},
    {"name": "jwt_keys", "wasm": "auth", "config": {
        "jwt": {"keys": [{"kid": "2025", "secret": "old-secret-0123456789"},
                         {"kid": "2026", "secret": "new-secret-0123456789"}]}}},
    {"name": "all", "wasm": "auth", "config": {
        "api_key": {"keys": [{"key": "k-alice-1", "identity": "alice"}]},
        "basic": {"users": [{"username": "carol", "salt": SALT, "password_sha256": sha_hex(SALT + "hunter2")}]},
        "jwt": {"secret": SECRET.decode()}}},
]
@pytest.fixture(scope="module")
def gw():
    """One loaded filter per FILTERS entry, by name (module-scoped: loaded once)."""
    loaded = {f["name"]: load_filter(DIST / "auth.wasm", f["config"], name=f["name"]) for f in FILTERS}
    yield loaded
    for h in loaded.values():
        h.close()


def call(gw, path, headers=None):
    """(status, headers, body, forwarded request) as the client and the upstream would see them."""
    r = gw[path.split("/")[1]].request("GET", path, headers=headers)
    if r.local_reply is not None:
        return r.local_reply.status, CIMultiDict(r.local_reply.headers), r.local_reply.body, None
    resp = r.respond(200)
    return resp.status, CIMultiDict(resp.headers), resp.body, r.upstream_request


def expect_401(gw, path, headers=None, message=None):
    status, h, body, fwd = call(gw, path, headers)
    assert status == 401, body
    assert fwd is None, "a rejected request reached the upstream"
    assert h["content-type"].startswith("application/json")
    doc = __import__("json").loads(body)
    assert doc["error"] == "unauthorized"
    if message is not None:
        assert doc["message"] == message
    return h, doc


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------- API keys

def test_api_key_header_passes_identity_and_method(gw):
    status, _, _, fwd = call(gw, "/keys/x", {"X-API-Key": "k-alice-1"})
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["alice"]
    assert header_values(fwd.headers, "x-auth-method") == ["api_key"]
    assert header_values(fwd.headers, "x-api-key") == ["k-alice-1"]   # not stripped by default


def test_api_key_stored_as_sha256(gw):
    status, _, _, fwd = call(gw, "/keys/x", {"x-api-key": BOB_KEY})
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["bob"]


def test_api_key_in_query(gw):
    status, _, _, fwd = call(gw, "/keys/x?a=1&api_key=k-alice-1")
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["alice"]
    assert fwd.path == "/keys/x?a=1&api_key=k-alice-1"


def test_api_key_wrong(gw):
    h, _ = expect_401(gw, "/keys/x", {"x-api-key": "k-alice-2"}, "invalid API key")
    assert header_values(list(h.items()), "www-authenticate") == [
        'ApiKey realm="wasmgate", header="x-api-key", query="api_key"']


def test_api_key_wrong_in_query(gw):
    expect_401(gw, "/keys/x?api_key=nope", None, "invalid API key")


def test_api_key_missing(gw):
    expect_401(gw, "/keys/x", None, "missing credentials")


def test_client_cannot_spoof_identity(gw):
    expect_401(gw, "/keys/x", {"x-auth-identity": "admin"}, "missing credentials")
    status, _, _, fwd = call(gw, "/keys/x", {"x-auth-identity": "admin", "x-auth-method": "jwt",
                                                  "x-api-key": "k-alice-1"})
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["alice"]
    assert header_values(fwd.headers, "x-auth-method") == ["api_key"]


def test_strip_credentials_header_and_query(gw):
    status, _, _, fwd = call(gw, "/keys_strip/x", {"x-api-key": "k-alice-1"})
    assert status == 200
    assert header_values(fwd.headers, "x-api-key") == []
    assert header_values(fwd.headers, "x-user") == ["alice"]
    status, _, _, fwd = call(gw, "/keys_strip/x?a=1&api_key=k-alice-1&b=2")
    assert status == 200
    assert fwd.path == "/keys_strip/x?a=1&b=2"
    status, _, _, fwd = call(gw, "/keys_strip/x?api_key=k-alice-1")
    assert status == 200 and fwd.path == "/keys_strip/x"


def test_default_header_and_realm(gw):
    status, _, _, fwd = call(gw, "/keys_default/x", {"x-api-key": "k-alice-1"})
    assert status == 200 and header_values(fwd.headers, "x-auth-identity") == ["alice"]
    h, _ = expect_401(gw, "/keys_default/x?api_key=k-alice-1", None, "missing credentials")
    assert h["www-authenticate"] == 'ApiKey realm="shop", header="x-api-key"'


# ---------------------------------------------------------------- Basic

def test_basic_valid_and_stripped(gw):
    status, _, _, fwd = call(gw, "/basic/x", {"authorization": basic("carol", "hunter2")})
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["carol"]
    assert header_values(fwd.headers, "authorization") == []


def test_basic_unsalted_utf8_password(gw):
    status, _, _, fwd = call(gw, "/basic/x", {"authorization": basic("dave", "pässwörd")})
    assert status == 200 and header_values(fwd.headers, "x-auth-identity") == ["dave"]


@pytest.mark.parametrize("auth,message", [
    (basic("carol", "hunter3"), "invalid username or password"),
    (basic("mallory", "hunter2"), "invalid username or password"),
    (basic("carol", ""), "invalid username or password"),
    ("Basic !!notbase64!!", "malformed Basic credentials"),
    ("Basic " + base64.b64encode(b"no-colon").decode(), "malformed Basic credentials"),
    ("Digest abc", "missing credentials"),
])
def test_basic_rejects(gw, auth, message):
    h, _ = expect_401(gw, "/basic/x", {"authorization": auth}, message)
    assert h["www-authenticate"] == 'Basic realm="wasmgate", charset="UTF-8"'


# ---------------------------------------------------------------- JWT

def claims(**over):
    now = int(time.time())
    c = {"sub": "erin", "iss": "https://issuer.test", "aud": "api", "exp": now + 300, "iat": now}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def test_jwt_valid(gw):
    status, _, _, fwd = call(gw, "/jwt/x", {"authorization": "Bearer " + mint_jwt(claims(), SECRET)})
    assert status == 200
    assert header_values(fwd.headers, "x-auth-identity") == ["erin"]
    assert len(header_values(fwd.headers, "authorization")) == 1   # kept: strip_credentials is off


def test_jwt_audience_list_and_skew(gw):
    now = int(time.time())
    tok = mint_jwt(claims(aud=["other", "web"], exp=now - 10, nbf=now + 10), SECRET)  # both within 30 s skew
    status, _, _, _ = call(gw, "/jwt/x", {"authorization": "bearer " + tok})
    assert status == 200


@pytest.mark.parametrize("case,message", [
    ("expired", "token expired"),
    ("not_yet_valid", "token not yet valid"),
    ("wrong_signature", "invalid signature"),
    ("alg_none", "alg none is not allowed"),
    ("alg_none_signed", "alg none is not allowed"),
    ("alg_hs512", 'unsupported alg "HS512"'),
    ("alg_rs256", 'unsupported alg "RS256"'),
    ("no_alg", "token header has no alg"),
    ("wrong_issuer", "issuer not allowed"),
    ("no_issuer", "issuer not allowed"),
    ("wrong_audience", "audience not allowed"),
    ("no_exp", "token has no exp"),
    ("no_sub", "token has no sub claim"),
    ("sub_with_crlf", "sub claim is not a valid header value"),
    ("tampered", "invalid signature"),
    ("two_parts", "malformed token"),
    ("garbage", "malformed token (header is not base64url)"),
])
def test_jwt_rejects(gw, case, message):
    now = int(time.time())
    tok = {
        "expired": lambda: mint_jwt(claims(exp=now - 120), SECRET),
        "not_yet_valid": lambda: mint_jwt(claims(nbf=now + 120), SECRET),
        "wrong_signature": lambda: mint_jwt(claims(), b"another-secret-0123456789-abcdefgh"),
        "alg_none": lambda: mint_jwt(claims(), SECRET, {"alg": "none", "typ": "JWT"}, sign=False),
        "alg_none_signed": lambda: mint_jwt(claims(), SECRET, {"alg": "none"}),
        "alg_hs512": lambda: mint_jwt(claims(), SECRET, {"alg": "HS512"}),
        "alg_rs256": lambda: mint_jwt(claims(), SECRET, {"alg": "RS256"}),
        "no_alg": lambda: mint_jwt(claims(), SECRET, {"typ": "JWT"}),
        "wrong_issuer": lambda: mint_jwt(claims(iss="https://evil.test"), SECRET),
        "no_issuer": lambda: mint_jwt(claims(iss=None), SECRET),
        "wrong_audience": lambda: mint_jwt(claims(aud=["mobile"]), SECRET),
        "no_exp": lambda: mint_jwt(claims(exp=None), SECRET),
        "no_sub": lambda: mint_jwt(claims(sub=None), SECRET),
        "sub_with_crlf": lambda: mint_jwt(claims(sub="erin\r\nx-admin: true"), SECRET),
        "tampered": lambda: (lambda t, f: f"{t.split('.')[0]}.{f.split('.')[1]}.{t.split('.')[2]}")(
            mint_jwt(claims(), SECRET), mint_jwt(claims(sub="root"), b"x")),
        "two_parts": lambda: "abc.def",
        "garbage": lambda: "!!.??.**",
    }[case]()
    h, _ = expect_401(gw, "/jwt/x", {"authorization": f"Bearer {tok}"}, message)
    challenge = h["www-authenticate"]
    assert challenge.startswith('Bearer realm="wasmgate", error="invalid_token", error_description="')
    assert message.replace('"', "'") in challenge


def test_jwt_missing_has_plain_bearer_challenge(gw):
    h, _ = expect_401(gw, "/jwt/x", None, "missing credentials")
    assert h["www-authenticate"] == 'Bearer realm="wasmgate"'


def test_jwt_custom_header_query_claim_and_strip(gw):
    tok = mint_jwt({"email": "frank@example.com"}, SECRET)        # no exp: require_exp is false
    status, _, _, fwd = call(gw, "/jwt_custom/x", {"x-token": tok})
    assert status == 200
    assert header_values(fwd.headers, "x-user") == ["frank@example.com"]
    assert header_values(fwd.headers, "x-token") == []
    status, _, _, fwd = call(gw, "/jwt_custom/x", {"x-token": "Bearer " + tok})
    assert status == 200
    status, _, _, fwd = call(gw, f"/jwt_custom/x?access_token={tok}&q=1")
    assert status == 200
    assert fwd.path == "/jwt_custom/x?q=1"
    assert header_values(fwd.headers, "x-user") == ["frank@example.com"]


def test_jwt_custom_rejects(gw):
    now = int(time.time())
    expect_401(gw, "/jwt_custom/x", {"x-token": mint_jwt({"sub": "no-email"}, SECRET)}, "token has no email claim")
    # clock_skew_s: 0 — one second past exp is expired
    expect_401(gw, "/jwt_custom/x", {"x-token": mint_jwt({"email": "a@b", "exp": now - 2}, SECRET)}, "token expired")
    expect_401(gw, "/jwt_custom/x", {"authorization": "Bearer " + mint_jwt({"email": "a@b"}, SECRET)},
                     "missing credentials")


def test_jwt_key_rotation_by_kid(gw):
    exp = int(time.time()) + 60
    old, new = b"old-secret-0123456789", b"new-secret-0123456789"
    for header, secret in [({"alg": "HS256", "kid": "2025"}, old), ({"alg": "HS256", "kid": "2026"}, new),
                           ({"alg": "HS256"}, old), ({"alg": "HS256"}, new)]:
        status, _, _, fwd = call(gw, "/jwt_keys/x", {"authorization": "Bearer " + mint_jwt({"sub": "gina", "exp": exp}, secret, header)})
        assert status == 200, header
        assert header_values(fwd.headers, "x-auth-identity") == ["gina"]
    expect_401(gw, "/jwt_keys/x", {"authorization": "Bearer " + mint_jwt({"sub": "g", "exp": exp}, new, {"alg": "HS256", "kid": "2025"})},
                     "invalid signature")
    expect_401(gw, "/jwt_keys/x", {"authorization": "Bearer " + mint_jwt({"sub": "g", "exp": exp}, new, {"alg": "HS256", "kid": "2027"})},
                     "unknown kid")
    expect_401(gw, "/jwt_keys/x", {"authorization": "Bearer " + mint_jwt({"sub": "g", "exp": exp}, SECRET)},
                     "invalid signature")


# ---------------------------------------------------------------- several methods

def test_any_configured_method_passes(gw):
    for headers, who in [({"x-api-key": "k-alice-1"}, "alice"),
                         ({"authorization": basic("carol", "hunter2")}, "carol"),
                         ({"authorization": "Bearer " + mint_jwt({"sub": "erin", "exp": int(time.time()) + 60}, SECRET)}, "erin")]:
        status, _, _, fwd = call(gw, "/all/x", headers)
        assert status == 200
        assert header_values(fwd.headers, "x-auth-identity") == [who]


def test_all_challenges_and_first_error(gw):
    h, doc = expect_401(gw, "/all/x", {"x-api-key": "bad", "authorization": basic("carol", "x")},
                              "invalid API key")
    assert h.getall("www-authenticate") == [
        'ApiKey realm="wasmgate", header="x-api-key"',
        'Bearer realm="wasmgate"',
        'Basic realm="wasmgate", charset="UTF-8"',
    ]


# ---------------------------------------------------------------- duplicate credentials

def expect_400(gw, path, headers, message):
    """Ambiguous credentials: 400 (RFC 6750 invalid_request), nothing forwarded."""
    status, h, body, fwd = call(gw, path, CIMultiDict(headers))
    assert status == 400, body
    assert fwd is None, "a request with ambiguous credentials reached the upstream"
    assert h["content-type"].startswith("application/json") and h["cache-control"] == "no-store"
    assert json.loads(body) == {"error": "bad_request", "message": message}
    return h


@pytest.mark.parametrize("path,headers,message", [
    # Both copies valid, or the first one valid: neither is used.
    ("/keys/x", [("x-api-key", "k-alice-1"), ("x-api-key", BOB_KEY)], "more than one x-api-key header"),
    ("/keys/x", [("x-api-key", "k-alice-1"), ("x-api-key", "k-alice-1")], "more than one x-api-key header"),
    ("/keys/x", [("x-api-key", "k-alice-1"), ("x-api-key", "forged")], "more than one x-api-key header"),
    ("/keys/x?api_key=k-alice-1", [("x-api-key", "k-alice-1")],
     "API key in both the x-api-key header and the api_key query parameter"),
    ("/keys/x?api_key=k-alice-1&api_key=other", [], "more than one api_key query parameter"),
    ("/basic/x", [("authorization", "Basic Y2Fyb2w6aHVudGVyMg=="), ("authorization", "Basic eDp5")],
     "more than one authorization header"),
    ("/jwt_custom/x?access_token=a", [("x-token", "b")],
     "token in both the x-token header and the access_token query parameter"),
])
def test_duplicate_credentials_are_refused(gw, path, headers, message):
    expect_400(gw, path, headers, message)


def test_two_authorization_headers_across_methods_are_refused(gw):
    token = mint_jwt({"sub": "erin", "exp": int(time.time()) + 60}, SECRET)
    h = expect_400(gw, "/all/x", [("authorization", "Bearer " + token),
                                        ("authorization", basic("carol", "hunter2"))],
                         "more than one authorization header")
    assert h.getall("www-authenticate") == [
        'ApiKey realm="wasmgate", header="x-api-key"',
        'Bearer realm="wasmgate", error="invalid_request", error_description="more than one authorization header"',
        'Basic realm="wasmgate", charset="UTF-8"',
    ]


def test_credentials_the_config_does_not_read_are_not_checked(gw):
    # jwt_custom reads x-token / access_token: two Authorization headers are not its business.
    token = mint_jwt({"email": "e@x", "exp": int(time.time()) + 60}, SECRET)
    status, _, _, fwd = call(gw, "/jwt_custom/x", CIMultiDict([
        ("x-token", token), ("authorization", "a"), ("authorization", "b")]))
    assert status == 200 and header_values(fwd.headers, "x-user") == ["e@x"]
