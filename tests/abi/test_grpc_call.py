"""gRPC callouts against a real gRPC server (grpcio, raw bytes) through the gateway's real
gRPC clusters: what each callback receives, as Envoy delivers it to the SDKs — a unary call's
answer (buffer 5) or its failure (on_grpc_close + proxy_get_status: error status and message,
DEADLINE_EXCEEDED on a timeout, UNAVAILABLE on a refused connection), a stream's initial
metadata, messages, trailing metadata and close, half-close and cancel, and the statuses of
every host function."""
from __future__ import annotations

import asyncio
import socket

import pytest

from abi.api import Forward, LocalReply, LogInfo
from abi.pairs import serialize
from gateway.config import Cluster, Endpoint
from gateway.grpc_clusters import GrpcClusters
from tests.grpc_server import grpc_server
from tests.helpers import until

from abi_helpers import REQ, info
from abi_wat import LOG_OUT, OUT, Wat, status

O = f"(i32.const {OUT}) (i32.const {OUT + 4})"
TOKEN, CTX, CODE = OUT + 12, OUT + 16, OUT + 20
NO_MD = serialize([])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def grpc_up(services):
    """A gRPC server, cluster "gc" on it and "down" on a closed port, attached to services."""
    async with grpc_server() as (port, handlers):
        clusters = GrpcClusters((
            Cluster("gc", (Endpoint("127.0.0.1", port),), protocol="grpc"),
            Cluster("down", (Endpoint("127.0.0.1", free_port()),), protocol="grpc"),
        ))
        services.has_grpc_cluster = clusters.has
        services.grpc_call = clusters.call
        services.grpc_stream = clusters.stream
        yield handlers
        await clusters.aclose()


RESUME = (f"(drop (call $proxy_set_effective_context (i32.load (i32.const {CTX}))))"
          "(drop (call $proxy_continue_stream (i32.const 0)))")


def grpc_filter(w: Wat, dispatch: str, *, on_receive: str = "", on_close: str = RESUME) -> Wat:
    """SDK-like: dispatch in on_request_headers and Pause; every gRPC callback traces
    (root, token, n) and reads what it may read."""
    w.on("proxy_on_request_headers",
         f"(i32.store (i32.const {CTX}) (local.get $a))" + dispatch + " (i32.const 1)")
    w.on("proxy_on_grpc_receive_initial_metadata",
         w.trace("initial", 3)
         + status(w, "x-init", f"(call $proxy_get_header_map_value (i32.const 4) {w.s('x-init')} {O})") + LOG_OUT)
    w.on("proxy_on_grpc_receive",
         w.trace("receive", 3)
         + status(w, "buf", f"(call $proxy_get_buffer_bytes (i32.const 5) (i32.const 0) (i32.const -1) {O})")
         + LOG_OUT + on_receive)
    w.on("proxy_on_grpc_receive_trailing_metadata",
         w.trace("trailing", 3)
         + status(w, "x-trail", f"(call $proxy_get_header_map_value (i32.const 5) {w.s('x-trail')} {O})") + LOG_OUT
         + status(w, "grpc-status", f"(call $proxy_get_header_map_value (i32.const 5) {w.s('grpc-status')} {O})") + LOG_OUT)
    w.on("proxy_on_grpc_close",
         w.trace("close", 3)
         + status(w, "getstatus", f"(call $proxy_get_status (i32.const {CODE}) {O})")
         + f"(call $log_num {w.s('code')} (i32.load (i32.const {CODE})))" + LOG_OUT + on_close)
    return w


def unary(w: Wat, method: str, *, cluster: str | bytes = "gc", md: bytes = NO_MD,
          msg: str = "hi", timeout_ms: int = 2000) -> str:
    return (status(w, "call", f"(call $proxy_grpc_call {w.s(cluster)} {w.s('t.Svc')} {w.s(method)} "
                              f"{w.s(md)} {w.s(msg)} (i32.const {timeout_ms}) (i32.const {TOKEN}))")
            + f"(call $log_num {w.s('token')} (i32.load (i32.const {TOKEN})))")


def lines(trace) -> list[str]:
    """The filter's trace; metadata callbacks' counts (how many headers the server's gRPC
    library sends) become "n" after checking they cover what the test reads."""
    out = []
    for ln in trace.lines("f"):
        if ln.startswith(("initial ", "trailing ")):
            head, _, n = ln.rpartition(" ")
            assert int(n) >= 1, ln
            ln = f"{head} n"
        if not ln.startswith("proxy_on_"):
            out.append(ln)
    return out


async def run(load, w: Wat, trace, timeout: float = 10):
    host = await load(w)
    trace.records.clear()
    s = host.stream(["f"], info())
    out = await asyncio.wait_for(s.request(REQ, None), timeout)
    await s.finish(LogInfo())
    return out


async def test_unary_ok_answer_reaches_the_root_and_resumes(load, trace, grpc_up):
    w = Wat()
    md = serialize([(b"X-Req", b"r")])
    out = await run(load, grpc_filter(w, unary(w, "Echo", md=md), on_receive=RESUME), trace)
    assert isinstance(out, Forward)
    # (root 1, token 5: call type 1 in the low bits), the response as buffer 5; a unary call
    # gets no metadata callbacks and no close after its answer (Envoy's GrpcCallClientHandler).
    assert lines(trace) == ["call 0", "token 5", "receive 1 5 9", "buf 0", "echo:hi|r"]
    method, request, metadata = grpc_up.seen[0]
    assert (method, request, metadata["x-req"]) == ("Echo", b"hi", "r")


async def test_unary_error_status_and_message_via_get_status(load, trace, grpc_up):
    w = Wat()
    reject = (f"(drop (call $proxy_set_effective_context (i32.load (i32.const {CTX}))))"
              f"(drop (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0) "
              f"{w.s('denied')} (i32.const 0) (i32.const 0) (i32.const -1)))")
    out = await run(load, grpc_filter(w, unary(w, "Deny"), on_close=reject), trace)
    assert isinstance(out, LocalReply) and out.status == 403 and out.body == b"denied"
    assert lines(trace) == ["call 0", "token 5", "close 1 5 7", "getstatus 0", "code 7", "nope"]


async def test_unary_timeout_is_deadline_exceeded(load, trace, grpc_up):
    w = Wat()
    out = await run(load, grpc_filter(w, unary(w, "Slow", timeout_ms=100)), trace)
    assert isinstance(out, Forward)
    assert lines(trace)[2:5] == ["close 1 5 4", "getstatus 0", "code 4"]


async def test_refused_connection_is_unavailable(load, trace, grpc_up):
    w = Wat()
    out = await run(load, grpc_filter(w, unary(w, "Echo", cluster="down")), trace)
    assert isinstance(out, Forward)
    assert lines(trace)[2:5] == ["close 1 5 14", "getstatus 0", "code 14"]


async def test_grpc_service_proto_names_the_cluster(load, trace, grpc_up):
    # GrpcService{envoy_grpc{cluster_name: "gc"}, initial_metadata{key: "x-req", value: "p"}}
    envoy_grpc = b"\x0a\x02gc"
    header = b"\x0a\x05x-req\x12\x01p"
    proto = b"\x0a" + bytes([len(envoy_grpc)]) + envoy_grpc + b"\x2a" + bytes([len(header)]) + header
    w = Wat()
    out = await run(load, grpc_filter(w, unary(w, "Echo", cluster=proto), on_receive=RESUME), trace)
    assert isinstance(out, Forward)
    assert lines(trace)[2:] == ["receive 1 5 9", "buf 0", "echo:hi|p"]


async def test_dispatch_statuses(load, trace, grpc_up):
    w = Wat()
    probes = (
        unary(w, "Echo", cluster="nope")                              # unknown cluster
        + unary(w, "Echo", md=b"\x05")                                # malformed metadata
        + status(w, "send-unknown", f"(call $proxy_grpc_send (i32.const 10) {w.s('x')} (i32.const 0))")
        + status(w, "send-odd", f"(call $proxy_grpc_send (i32.const 9) {w.s('x')} (i32.const 0))")
        + status(w, "close-unknown", "(call $proxy_grpc_close (i32.const 9))")
        + status(w, "cancel-unknown", "(call $proxy_grpc_cancel (i32.const 9))")
        + unary(w, "Slow")
        + status(w, "send-call", f"(call $proxy_grpc_send (i32.load (i32.const {TOKEN})) {w.s('x')} (i32.const 0))")
        + status(w, "cancel-call", f"(call $proxy_grpc_cancel (i32.load (i32.const {TOKEN})))")
        + status(w, "cancel-again", f"(call $proxy_grpc_cancel (i32.load (i32.const {TOKEN})))"))
    w.on("proxy_on_request_headers", probes + " (i32.const 0)")
    out = await run(load, w, trace)
    assert isinstance(out, Forward)
    # Envoy: unknown cluster PARSE_FAILURE; send on a call's (odd) token BAD_ARGUMENT, known or
    # not; unknown tokens NOT_FOUND.
    assert lines(trace) == ["call 4", "token 0", "call 4", "token 0", "send-unknown 1", "send-odd 2",
                            "close-unknown 1", "cancel-unknown 1", "call 0", "token 5",
                            "send-call 2", "cancel-call 0", "cancel-again 1"]


def stream_open(w: Wat, method: str) -> str:
    return (status(w, "stream", f"(call $proxy_grpc_stream {w.s('gc')} {w.s('t.Svc')} {w.s(method)} "
                                f"{w.s(serialize([(b'x-req', b's')]))} (i32.const {TOKEN}))")
            + f"(call $log_num {w.s('token')} (i32.load (i32.const {TOKEN})))")


def send(w: Wat, msg: str, end: int = 0) -> str:
    return status(w, f"send-{msg}", f"(call $proxy_grpc_send (i32.load (i32.const {TOKEN})) {w.s(msg)} (i32.const {end}))")


async def test_stream_messages_metadata_half_close_and_close(load, trace, grpc_up):
    w = Wat()
    dispatch = (stream_open(w, "Chat") + send(w, "a") + send(w, "b")
                + status(w, "half-close", f"(call $proxy_grpc_close (i32.load (i32.const {TOKEN})))")
                + send(w, "late"))
    out = await run(load, grpc_filter(w, dispatch), trace)
    assert isinstance(out, Forward)
    assert lines(trace) == [
        "stream 0", "token 6", "send-a 0", "send-b 0", "half-close 0", "send-late 0",
        "initial 1 6 n", "x-init 0", "i",
        "receive 1 6 4", "buf 0", "re:a",
        "receive 1 6 4", "buf 0", "re:b",
        "trailing 1 6 n", "x-trail 0", "t", "grpc-status 0", "0",
        "close 1 6 0", "getstatus 0", "code 0", ""]
    assert grpc_up.seen[0][2]["x-req"] == "s"


async def test_stream_end_stream_flag_half_closes(load, trace, grpc_up):
    w = Wat()
    out = await run(load, grpc_filter(w, stream_open(w, "Chat") + send(w, "only", 1)), trace)
    assert isinstance(out, Forward)
    assert [ln for ln in lines(trace) if ln.startswith(("receive", "close"))] == [
        "receive 1 6 7", "close 1 6 0"]


async def test_stream_cancel_resets_it_and_nothing_follows(load, trace, grpc_up):
    w = Wat()
    cancel = (status(w, "cancel", f"(call $proxy_grpc_cancel (i32.load (i32.const {TOKEN})))")
              + send(w, "after") + RESUME)
    grpc_filter(w, stream_open(w, "Hold") + send(w, "a"))
    w.callbacks["proxy_on_grpc_receive_initial_metadata"] += cancel
    out = await run(load, w, trace)
    assert isinstance(out, Forward)
    await asyncio.wait_for(grpc_up.cancelled.wait(), 10)      # the server saw the reset
    assert lines(trace) == ["stream 0", "token 6", "send-a 0", "initial 1 6 n", "x-init 0", "i",
                            "cancel 0", "send-after 1"]


async def test_request_end_drops_its_pending_stream(load, trace, grpc_up):
    w = Wat()
    grpc_filter(w, stream_open(w, "Hold"))
    host = await load(w)
    s = host.stream(["f"], info())
    task = asyncio.ensure_future(s.request(REQ, None))
    await until(lambda: grpc_up.seen)
    task.cancel()
    await s.finish(LogInfo())
    await asyncio.wait_for(grpc_up.cancelled.wait(), 10)
    assert host.filters["f"].grpc.pending == {}


async def test_call_from_the_start_sequence_is_sent_at_the_swap(load, trace, grpc_up):
    # on_vm_start runs on a build thread: the call waits for the instance to be swapped in,
    # then its answer reaches the root like any other (an SDK's on_vm_start → dispatch).
    w = Wat()
    grpc_filter(w, "")
    w.on("proxy_on_vm_start", unary(w, "Echo", msg="boot") + " (i32.const 1)")
    await load(w)
    await until(lambda: any(ln.startswith("receive") for ln in trace.lines("f")))
    assert lines(trace)[:5] == ["call 0", "token 5", "receive 1 5 9", "buf 0", "echo:boot"]
