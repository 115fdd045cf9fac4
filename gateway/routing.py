"""First-match routing on host (port ignored), exact path or prefix, methods and headers."""
from __future__ import annotations

from typing import Any

from .config import Cluster, Route

Headers = list[tuple[str, str]]


def strip_port(authority: str) -> str:
    """Lower-cased host of a Host header / :authority, without the port."""
    host = authority.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(":")
    return host[:colon] if colon != -1 else host


class Router:
    def __init__(self, routes: tuple[Route, ...], clusters: tuple[Cluster, ...] = ()):
        self.routes = routes
        # Header names some route matches on: only a change to one of these (or to the
        # method, :authority or :path) can make a re-match after the filters pick another route.
        self.header_names = frozenset(name for r in routes for name, _ in r.match.headers)
        self.cluster_metadata: dict[str, dict[str, Any]] = {c.name: c.metadata for c in clusters}

    def headers_changed(self, before: Headers, after: Headers) -> bool:
        """Whether a header some route matches on differs between the two header lists."""
        names = self.header_names
        if not names:
            return False
        return [kv for kv in before if kv[0] in names] != [kv for kv in after if kv[0] in names]

    def match(self, method: str, authority: str, path: str, headers: Headers) -> Route | None:
        """``path`` without the query string; ``headers`` lower-case names."""
        host = None
        for route in self.routes:
            m = route.match
            if m.host is not None:
                if host is None:
                    host = strip_port(authority)
                if m.host != host:
                    continue
            if m.path is not None:
                if path != m.path:
                    continue
            elif m.prefix is not None and not path.startswith(m.prefix):
                continue
            if m.methods is not None and method not in m.methods:
                continue
            if m.headers and not _headers_match(m.headers, headers):
                continue
            return route
        return None


def _headers_match(wanted: tuple[tuple[str, str], ...], headers: Headers) -> bool:
    for name, value in wanted:
        if not any(n == name and v == value for n, v in headers):
            return False
    return True


def rewrite_target(route: Route, target: str) -> str:
    """Apply the route's prefix rewrite to a request target (query string kept)."""
    rw = route.rewrite
    if rw is None or rw.prefix is None:
        return target
    path, q, query = target.partition("?")
    m = route.match
    if m.path is not None:
        path = rw.prefix or "/"
    elif m.prefix is not None:
        rest = path[len(m.prefix):]
        # `prefix: /items` + `rewrite: {prefix: /}` must give /42 for /items/42, not //42.
        if rw.prefix.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        path = rw.prefix + rest
        if not path.startswith("/"):
            path = "/" + path
    return path + q + query
