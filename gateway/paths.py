"""The one reading of a request path that routing, the filters and the upstream all get.

Routing on the raw target while the backend decodes it lets ``/%61pi/hello`` or ``//api/hello``
fall through to a route without filters and reach ``/api/hello`` upstream. So the path is
normalised once, before routing, and exactly that path is forwarded (RFC 3986 §6.2.2, as Envoy's
``normalize_path`` + ``merge_slashes`` + ``path_with_escaped_slashes_action`` and nginx do):

- percent-encoded unreserved characters are decoded (``%61`` → ``a``, ``%2E`` → ``.``), every other
  percent-encoding is kept and upper-cased; a ``%`` not followed by two hex digits, ``%00``, and
  bytes that do not decode as UTF-8 (overlong forms such as ``%c0%af`` included) are refused;
- an encoded slash or backslash (``%2F``, ``%5C``) is refused, kept as data, or decoded with a
  redirect to the decoded path — never routed on one reading and forwarded as another;
- a raw backslash is a separator (as WHATWG URL parsing, browsers and Envoy read it);
- repeated slashes are merged (optional), and dot segments removed after all of the above;
- ``;`` path parameters stay in the forwarded path, but a segment that is empty, ``.`` or ``..``
  before its ``;`` is refused (Tomcat and others strip parameters and would resolve ``/..;/``);
  routing reads the path with parameters removed, the reading such backends use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .http1 import HttpError

ESCAPED_SLASH_ACTIONS = ("reject", "keep", "redirect")

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%(.?.?)")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
# Paths with none of these are already normal (the common case costs one regex search).
_NEEDS_WORK = re.compile(r"%|//|/\.|\\|;|^[^/]")
# Whether ``path`` may differ from its normal form (or from its routing form: ";" is in the
# pattern); the proxy asks this before calling normalize_path, to skip two calls per request.
needs_normalizing = _NEEDS_WORK.search


@dataclass(frozen=True)
class PathPolicy:
    merge_slashes: bool = True
    escaped_slashes: str = "reject"      # one of ESCAPED_SLASH_ACTIONS


class RedirectTo(Exception):
    """``escaped_slashes: redirect``: the client should ask again for ``path`` (307)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def normalize_path(path: str, policy: PathPolicy) -> str:
    """``path`` without the query string. Returns the normal form; raises HttpError(400) or
    RedirectTo."""
    if not _NEEDS_WORK.search(path):
        return path
    if not path.startswith("/"):
        raise HttpError(400, "the request path must start with /")
    redirect = False
    if "%" in path:
        _check_utf8(path)
        path, redirect = _decode(path, policy.escaped_slashes)
    if "\\" in path:
        path = path.replace("\\", "/")
    if ";" in path:
        _check_parameters(path)
    if policy.merge_slashes and "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    if "/." in path:
        path = remove_dot_segments(path)
    if redirect:
        raise RedirectTo(path)
    return path


def routing_path(path: str) -> str:
    """The normal path as routes see it: ``;`` parameters removed from every segment."""
    if ";" not in path:
        return path
    return "/".join(seg.partition(";")[0] for seg in path.split("/"))


def _check_utf8(path: str) -> None:
    raw = unquote_to_bytes(path)
    if b"\x00" in raw:
        raise HttpError(400, "NUL in the request path")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "the request path does not decode as UTF-8") from None


def _decode(path: str, escaped_slashes: str) -> tuple[str, bool]:
    redirect = False

    def one(m: re.Match) -> str:
        nonlocal redirect
        hexpair = m.group(1)
        if not _HEX2.fullmatch(hexpair):
            raise HttpError(400, f"invalid percent-encoding {m.group(0)!r} in the request path")
        byte = int(hexpair, 16)
        if byte in _UNRESERVED:
            return chr(byte)
        if byte == 0x2F or byte == 0x5C:
            if escaped_slashes == "reject":
                raise HttpError(400, "encoded slash or backslash in the request path")
            if escaped_slashes == "redirect":
                redirect = True
                return "/"
        return "%" + hexpair.upper()

    return _PCT.sub(one, path), redirect


def _check_parameters(path: str) -> None:
    for seg in path.split("/"):
        if ";" in seg and seg.partition(";")[0] in ("", ".", ".."):
            raise HttpError(400, f"ambiguous path segment {seg[:40]!r}")


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: what the upstream would resolve "/a/../b" to.

    Routing on the raw path would let "/public/../admin" match a "/public" route while the
    upstream serves /admin, skipping the admin route's filters.
    """
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = segments[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")
