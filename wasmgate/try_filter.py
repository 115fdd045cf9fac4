"""`wasmgate try FILTER.wasm …`: one request through one filter (or a chain), in-process and
without sockets (wasmgate.harness), printing what the upstream and the client would see, every
log line, each guest callback with its µs and the host calls it made.

Request options come before ``--response``; ``-H``/``--data`` after it belong to the response:

    wasmgate try f.wasm --config '{"k": 1}' --request 'POST /p' -H 'x-a: 1' --data '{"a":1}' \\
        --response 201 -H 'x-up: 1' --data 'ok' --call-response authz=200:alice --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from abi.api import FilterLoadError

from abi.api import CallFailed, CallResponse

from .harness import (Exchange, FilterHarness, HarnessError, HttpCall, Reply, Response, Timing,
                      UpstreamRequest, load_chain)

USAGE = ("wasmgate try FILTER.wasm [--chain a.wasm,b.wasm] [--config JSON|@file]... [--root-id ID] "
         "[--request 'METHOD /path'] [-H 'name: value']... [--data TEXT|@file]... "
         "[--call-response CLUSTER=STATUS[:BODY]]... [--json] "
         "[--response STATUS [-H 'name: value']... [--data TEXT|@file]...]")


class UsageError(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The request half of the command line (``--response …`` is split off before parsing)."""
    p.add_argument("filter", nargs="?", help="the .wasm filter to run")
    p.add_argument("--chain", help="comma-separated .wasm files, run in this order")
    p.add_argument("--config", action="append", default=[],
                   help="a filter's configuration: JSON text or @file (once per filter of a chain, in order)")
    p.add_argument("--root-id", default="",
                   help="the filters' root_id (C++ and AssemblyScript SDKs pick their root context by it)")
    p.add_argument("--request", default="GET /", help="'METHOD /path' (default: 'GET /')")
    p.add_argument("-H", "--header", action="append", default=[], dest="headers",
                   help="a request header 'name: value' (repeatable)")
    p.add_argument("--data", action="append", default=[],
                   help="request body: text or @file; each --data is one body chunk")
    p.add_argument("--call-response", action="append", default=[], metavar="CLUSTER=STATUS[:BODY]",
                   help="answer the filter's http_calls to CLUSTER (other clusters: connection refused)")
    p.add_argument("--log-level", default="info", choices=["trace", "debug", "info", "warn", "error"],
                   help="the log level the filters see (default: info, as the gateway)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _response_part(argv: list[str]) -> tuple[list[str], dict | None]:
    if "--response" not in argv:
        return argv, None
    i = argv.index("--response")
    rest = argv[i + 1:]
    if not rest or not rest[0].isdigit():
        raise UsageError("--response needs a status code first (e.g. --response 200 -H 'x: 1' --data ok)")
    p = argparse.ArgumentParser(prog="wasmgate try … --response", add_help=False)
    p.add_argument("-H", "--header", action="append", default=[], dest="headers")
    p.add_argument("--data", action="append", default=[])
    ns, extra = p.parse_known_args(rest[1:])
    if extra:
        raise UsageError(f"after --response only -H and --data are allowed, got {extra[0]!r}")
    return argv[:i], {"status": int(rest[0]), "headers": ns.headers, "data": ns.data}


def _text_or_file(value: str) -> bytes:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {value[1:]}: {e.strerror or e}") from None
    return value.encode()


def _header_list(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"-H {item!r}: expected 'name: value'")
        out.append((name.strip().lower(), value.strip()))
    return out


def _configs(items: list[str], n: int) -> list[Any]:
    if len(items) > n:
        raise UsageError(f"{len(items)} --config for {n} filter(s)")
    out = []
    for item in items:
        text = _text_or_file(item).decode()
        try:
            out.append(json.loads(text) if text.strip() else None)
        except json.JSONDecodeError:
            out.append(text)          # not JSON: passed as is, as a YAML string config would be
    return out + [None] * (n - len(out))


def _answers(items: list[str]) -> dict[str, CallResponse]:
    out = {}
    for item in items:
        cluster, sep, answer = item.partition("=")
        status, _, body = answer.partition(":")
        if not sep or not cluster or not status.isdigit():
            raise UsageError(f"--call-response {item!r}: expected CLUSTER=STATUS[:BODY], e.g. authz=200:ok")
        out[cluster] = CallResponse(int(status), [], body.encode())
    return out


def main(argv: list[str]) -> int:
    try:
        request_argv, response = _response_part(argv)
        p = argparse.ArgumentParser(prog="wasmgate try", usage=USAGE,
                                    description="Run a request through filters in-process (no sockets).")
        add_arguments(p)
        args = p.parse_args(request_argv)
        return run(args, response)
    except UsageError as e:
        print(f"wasmgate try: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, response: dict | None) -> int:
    if bool(args.filter) == bool(args.chain):
        raise UsageError("give one FILTER.wasm or --chain a.wasm,b.wasm")
    paths = [args.filter] if args.filter else [s for s in args.chain.split(",") if s]
    configs = _configs(args.config, len(paths))
    answers = _answers(args.call_response)
    method, _, path = args.request.strip().partition(" ")
    if not method or not path.strip().startswith(("/", "*")):
        raise UsageError(f"--request {args.request!r}: expected 'METHOD /path'")

    headers, body = _header_list(args.headers), [_text_or_file(d) for d in args.data] or None
    r = response or {"status": 200, "headers": [], "data": []}
    up_headers, up_body = _header_list(r["headers"]), [_text_or_file(d) for d in r["data"]] or None

    def on_http_call(call: HttpCall) -> CallResponse:
        if call.cluster not in answers:
            raise CallFailed(f"no --call-response for cluster {call.cluster}")
        return answers[call.cluster]

    try:
        h = load_chain([(p, c, {"root_id": args.root_id}) for p, c in zip(paths, configs)],
                       on_http_call=on_http_call, log_level=args.log_level)
    except FilterLoadError as e:
        print(f"wasmgate try: {e}", file=sys.stderr)
        return 1
    started = len(h.timings)
    try:
        ex = h.request(method, path.strip(), headers=headers, body=body)
        if ex.forwarded:
            ex.respond(r["status"], headers=up_headers, body=up_body)
    except HarnessError as e:
        print(f"wasmgate try: {e}", file=sys.stderr)
        h.close()
        return 1
    served = len(h.timings)               # the request's callbacks, teardown (on_log…) included
    h.close()
    phases = {"start": h.timings[:started], "request": h.timings[started:served], "close": h.timings[served:]}
    print(json.dumps(as_json(h, ex, phases), indent=2) if args.json
          else as_text(h, ex, phases, response is None))
    return 0


# -- output ------------------------------------------------------------------------------------

def _body_text(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
        if text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text):
            return text
    except UnicodeDecodeError:
        pass
    return repr(body)


def _block(title: str, headers, body: bytes) -> list[str]:
    lines = [title] + [f"  {k}: {v}" for k, v in headers]
    if body:
        lines.append(f"  body ({len(body)} bytes):")
        lines += [f"    {line}" for line in _body_text(body).splitlines()]
    return lines


def as_text(h: FilterHarness, ex: Exchange, phases: dict[str, list[Timing]], default_response: bool) -> str:
    out: list[str] = [f"filters: {' -> '.join(h.names)}", f"request: {ex.method} {ex.path}"]
    if ex.local_reply is not None:
        r = ex.local_reply
        details = f" ({r.details})" if r.details else ""
        out += _block(f"local reply (the upstream is not called): {r.status}{details}", r.headers, r.body)
    else:
        up = ex.upstream_request
        out += _block(f"upstream request: {up.method} {up.path}", [(":authority", up.authority)] + up.headers,
                      up.body)
        resp = ex.response
        note = " (upstream: 200, no body; give one with --response)" if default_response else ""
        if resp.local_reply is not None:
            details = f" ({resp.local_reply.details})" if resp.local_reply.details else ""
            title = f"client response: {resp.status}, a local reply{details}{note}"
        else:
            title = f"client response: {resp.status}{note}"
        out += _block(title, resp.headers, resp.body)
    if h.http_calls:
        out.append("http calls:")
        out += [f"  {c.cluster}: {c.method} {c.path} -> {c.outcome}" for c in h.http_calls]
    out.append("logs:")
    out += [f"  {line}" for log in h.logs for line in str(log).splitlines()] or ["  (none)"]
    for phase, timings in phases.items():
        out.append(f"{PHASE_TITLES[phase]}:")
        for t in timings:
            out.append(f"  {t.filter} {t.callback} {t.us:.0f} µs")
            out += [f"    {name} -> {status}{f' ×{n}' if n > 1 else ''}" for name, status, n in _runs(t.host_calls)]
    return "\n".join(out)


PHASE_TITLES = {"start": "callbacks at load (µs, host calls)", "request": "callbacks of the request (µs, host calls)",
                "close": "callbacks at close (µs, host calls)"}


def _runs(calls) -> list[tuple[str, str, int]]:
    """Consecutive identical host calls as one line with a count."""
    runs: list[list] = []
    for c in calls:
        if runs and runs[-1][0] == c.name and runs[-1][1] == c.status:
            runs[-1][2] += 1
        else:
            runs.append([c.name, c.status, 1])
    return [tuple(r) for r in runs]


def _msg(headers, body: bytes) -> dict:
    return {"headers": [list(kv) for kv in headers], "body": _body_text(body)}


def as_json(h: FilterHarness, ex: Exchange, phases: dict[str, list[Timing]]) -> dict:
    def reply(r: Reply | None):
        return None if r is None else {"status": r.status, "details": r.details, **_msg(r.headers, r.body)}

    up: UpstreamRequest | None = ex.upstream_request
    resp: Response | None = ex.response
    return {
        "filters": h.names,
        "local_reply": reply(ex.local_reply),
        "upstream_request": None if up is None else {
            "method": up.method, "path": up.path, "authority": up.authority, **_msg(up.headers, up.body)},
        "response": None if resp is None else {
            "status": resp.status, "local_reply": resp.local_reply is not None, **_msg(resp.headers, resp.body)},
        "http_calls": [{"cluster": c.cluster, "method": c.method, "path": c.path, "authority": c.authority,
                        "headers": [list(kv) for kv in c.headers], "body": _body_text(c.body),
                        "outcome": c.outcome}
                       for c in h.http_calls],
        "logs": [{"level": log.level, "message": log.message} for log in h.logs],
        "callbacks": {phase: [{"filter": t.filter, "callback": t.callback, "us": round(t.us, 1),
                               "host_calls": [{"name": c.name, "status": c.status} for c in t.host_calls]}
                              for t in timings] for phase, timings in phases.items()},
    }
