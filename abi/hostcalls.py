"""The env.proxy_* host functions: thin adapters (cpp-host src/exports.cc).

Each one unmarshals guest memory, calls one method on the effective context (or the filter)
and marshals the result back. Arguments arrive unsigned (the engine masks i32s); i64s arrive
signed. Statuses are the ones the SDKs tolerate (reference §1.3); a bad guest pointer gives
INVALID_MEMORY_ACCESS as in cpp-host, never a Python exception (see guarded()).
"""
from __future__ import annotations

import functools
import logging
import textwrap
from typing import Callable

from . import foreign
from .seam import LocalReply
from .buffers import BAD_VALUE, GOOD_NAMES, lower_key, valid_header
from .enums import BufferType, LogLevel, MapType, MetricType, Status
from .engine import (HostTrap, MemoryAccessError, Trap, guarded_host, native_foreign_set_ttl,
                     native_header_edit, native_shared_data_get, native_stream_property,
                     native_time_ns)
from .limits import MAX_HEADER_MAP_BYTES, MAX_LOG_BYTES
from .pairs import deserialize, deserialize_str, to_bytes, to_str, to_text
from .context import LAST_STREAM_MAP, STREAM_MAPS, FilterView
from .properties import STREAM_PROPERTIES

I32, I64 = "i32", "i64"
_U32 = 0xFFFFFFFF

# Plain ints on the hot paths (the enums are int constants; these skip the attribute lookups).
OK = Status.OK
NOT_FOUND = Status.NOT_FOUND
BAD_ARGUMENT = Status.BAD_ARGUMENT
_MAP_MAX = MapType.MAX

PY_LEVELS = {LogLevel.TRACE: 5, LogLevel.DEBUG: logging.DEBUG, LogLevel.INFO: logging.INFO,
             LogLevel.WARN: logging.WARNING, LogLevel.ERROR: logging.ERROR,
             LogLevel.CRITICAL: logging.CRITICAL}


def proxy_level(py_level: int) -> int:
    """Python logging level → proxy LogLevel (for proxy_get_log_level)."""
    for lvl in (LogLevel.CRITICAL, LogLevel.ERROR, LogLevel.WARN, LogLevel.INFO, LogLevel.DEBUG):
        if py_level >= PY_LEVELS[lvl]:
            return lvl
    return LogLevel.TRACE


# -- logging, time, ticks -----------------------------------------------------------------

def proxy_log(f: FilterView, level, ptr, size):
    if level > LogLevel.CRITICAL:
        return Status.BAD_ARGUMENT
    f.guest_log(level, f.read_prefix(ptr, size, MAX_LOG_BYTES), size)
    return Status.OK


def proxy_get_log_level(f, ret_p):
    f.write_u32(ret_p, proxy_level(f.log.getEffectiveLevel()))
    return Status.OK


def proxy_get_current_time_nanoseconds(f, ret_p):
    f.write_u64(ret_p, f.now_ns())
    return Status.OK


def proxy_set_tick_period_milliseconds(f, period):
    f.set_tick_period(period)
    return Status.OK


# -- buffers ------------------------------------------------------------------------------

def proxy_get_buffer_bytes(f, buffer_type, start, max_size, ret_pp, ret_size_p):
    if buffer_type > BufferType.MAX:
        return Status.BAD_ARGUMENT
    buf = f.ctx().get_buffer(buffer_type)
    if buf is None:
        return Status.NOT_FOUND
    return f.write_result(buf.read(start, max_size), ret_pp, ret_size_p)


def proxy_set_buffer_bytes(f, buffer_type, start, size, data_ptr, data_size):
    if buffer_type > BufferType.MAX:
        return Status.BAD_ARGUMENT
    ctx = f.ctx()
    buf = ctx.get_buffer(buffer_type)
    if buf is not None and buf.limit is not None and buf.size_after_write(start, size, data_size) > buf.limit:
        f.check_out(data_ptr, data_size)      # never copied: a bad pointer is still reported
        return ctx.body_over_limit(buffer_type)
    data = f.read(data_ptr, data_size)
    if buf is None:
        return Status.NOT_FOUND
    return buf.write(start, size, data)


def proxy_get_buffer_status(f, buffer_type, ret_len_p, ret_flags_p):
    if buffer_type > BufferType.MAX:
        return Status.BAD_ARGUMENT
    buf = f.ctx().get_buffer(buffer_type)
    if buf is None:
        return Status.NOT_FOUND
    f.write_u32(ret_len_p, buf.size)
    f.write_u32(ret_flags_p, 0)
    return Status.OK


# -- header maps ----------------------------------------------------------------------------

def proxy_get_header_map_pairs(f, map_type, ret_pp, ret_size_p):
    if map_type > _MAP_MAX:
        return BAD_ARGUMENT
    ctx = f._effective or f._current or f._vm_ctx       # f.ctx(), inlined as _header_edit
    chain = ctx.chain
    m = (getattr(chain, STREAM_MAPS[map_type]) if chain is not None and map_type <= LAST_STREAM_MAP
         else ctx.get_map(map_type))
    # An unavailable map reads as empty: the Rust SDK accepts only OK here.
    return f.write_result(m.serialized() if m is not None else b"", ret_pp, ret_size_p)


def proxy_set_header_map_pairs(f, map_type, ptr, size):
    if map_type > MapType.MAX:
        return Status.BAD_ARGUMENT
    pairs = deserialize(f.read(ptr, size))
    m = f.ctx().writable_map(map_type)
    if m is None or pairs is None:
        return Status.BAD_ARGUMENT
    items = [(lower_key(k), to_str(v)) for k, v in pairs]
    if not m.set_all(items):
        return f.ctx().map_over_limit("proxy_set_header_map_pairs", map_type)
    if not all(valid_header(k, v) for k, v in items):
        m.unsafe = True                    # OK as Envoy; the entry never reaches the wire
    return Status.OK


def proxy_get_header_map_value(f, map_type, key_ptr, key_size, ret_pp, ret_size_p):
    if map_type > _MAP_MAX:
        return BAD_ARGUMENT
    key = f.read(key_ptr, key_size).lower().decode("latin-1")     # buffers.lower_key
    m = f.ctx().get_map(map_type)
    value = m.get(key) if m is not None else None
    if value is None:
        if not f.abi_010:
            return NOT_FOUND
        value = ""                   # ABI 0.1.0 answered OK + empty for a missing key
    return f.write_result(to_bytes(value), ret_pp, ret_size_p)


# Header edits: the key and value are read before the map is looked up (a bad pointer answers
# INVALID_MEMORY_ACCESS even where the map does not exist), as cpp-host.
# Every filter header edit runs _header_edit (through a functools.partial per host function:
# no Python frame), and each of its steps is inlined where it would cost one (measured with
# bench/chain_profile): the guest memory read is one call into the engine (Memory.header_pair;
# C on the native path), the current context is Filter.ctx(), the stream map
# HttpContext.writable_map (other contexts take the method), the name check valid_header()'s
# cache (valid_header itself when it misses).

def _header_pair(f, kp, ks, vp, vs):
    """The key and value of a header edit when the filter has no memory of its own yet."""
    return f.read(kp, ks).lower().decode("latin-1"), f.read(vp, vs).decode("latin-1")


def _header_edit(replace, f, map_type, kp, ks, vp, vs):
    """proxy_replace_header_map_value (``replace``: Envoy setCopy) or
    proxy_add_header_map_value (addCopy)."""
    if map_type > _MAP_MAX:
        return BAD_ARGUMENT
    mem = f._mem
    key, value = (mem.header_pair(kp, ks, vp, vs) if mem is not None
                  else _header_pair(f, kp, ks, vp, vs))
    ctx = f._effective or f._current or f._vm_ctx
    chain = ctx.chain
    if chain is not None and map_type <= LAST_STREAM_MAP:
        ctx.edited = True
        m = getattr(chain, STREAM_MAPS[map_type])
    else:
        m = ctx.writable_map(map_type)
    if m is None:
        return BAD_ARGUMENT
    if not (m.replace(key, value) if replace else m.add(key, value)):
        return ctx.map_over_limit("proxy_replace_header_map_value" if replace
                                  else "proxy_add_header_map_value", map_type)
    if (key not in GOOD_NAMES or BAD_VALUE.search(value)) and not valid_header(key, value):
        m.unsafe = True                    # OK as Envoy; the entry never reaches the wire
    return OK


proxy_add_header_map_value = functools.partial(_header_edit, False)
proxy_replace_header_map_value = functools.partial(_header_edit, True)


def proxy_remove_header_map_value(f, map_type, kp, ks):
    if map_type > _MAP_MAX:
        return BAD_ARGUMENT
    key = f.read(kp, ks).lower().decode("latin-1")
    m = f.ctx().writable_map(map_type)
    if m is None:
        return BAD_ARGUMENT
    m.remove(key)
    return OK


def proxy_get_header_map_size(f, map_type, ret_p):
    if map_type > MapType.MAX:
        return Status.BAD_ARGUMENT
    m = f.ctx().get_map(map_type)
    f.write_u32(ret_p, len(m.serialized()) if m is not None else 0)
    return Status.OK


# -- properties -----------------------------------------------------------------------------

def proxy_get_property(f, path_ptr, path_size, ret_pp, ret_size_p):
    path = f.read(path_ptr, path_size)
    ctx = f._effective or f._current or f._vm_ctx       # f.ctx(), inlined as _header_edit
    chain = ctx.chain                   # an HTTP context's: its properties' facts
    fast = STREAM_PROPERTIES.get(path) if chain is not None else None
    value = fast(chain) if fast is not None else ctx.get_property(path)
    if value is None:
        return Status.NOT_FOUND
    return f.write_result(value, ret_pp, ret_size_p)


def restricted_get_property(readable: Callable[[bytes], bool]) -> Callable:
    """proxy_get_property for a filter with `readable_properties`: a path outside them is
    NOT_FOUND, exactly as an absent property (Envoy's answer for one it does not know), so a
    filter cannot tell a hidden property from a missing one."""
    def proxy_get_property_restricted(f, path_ptr, path_size, ret_pp, ret_size_p):
        path = f.read(path_ptr, path_size)
        if not readable(path):
            f.capability_denied("property " + path.rstrip(b"\0").replace(b"\0", b".").decode("utf-8", "replace"),
                                "readable_properties")
            return Status.NOT_FOUND
        value = f.ctx().get_property(path)
        if value is None:
            return Status.NOT_FOUND
        return f.write_result(value, ret_pp, ret_size_p)
    return proxy_get_property_restricted


def proxy_set_property(f, path_ptr, path_size, val_ptr, val_size):
    path = f.read(path_ptr, path_size)
    return f.ctx().set_property(path, f.read(val_ptr, val_size))


# -- stream control -------------------------------------------------------------------------

def proxy_continue_stream(f, stream_type):
    return f.ctx().continue_stream(stream_type)


def proxy_close_stream(f, stream_type):
    return f.ctx().close_stream(stream_type)


def proxy_continue_request(f):                      # ABI 0.1.0
    return f.ctx().continue_stream(0)


def proxy_continue_response(f):                     # ABI 0.1.0
    return f.ctx().continue_stream(1)


def proxy_clear_route_cache(f):                     # ABI 0.1.0
    return f.ctx().clear_route_cache()


def proxy_get_configuration(f, ret_pp, ret_size_p):  # ABI 0.1.0
    buf = f.ctx().get_buffer(BufferType.PLUGIN_CONFIGURATION)
    return f.write_result(buf.data() if buf is not None else b"", ret_pp, ret_size_p)


def proxy_send_local_response(f, status_code, details_ptr, details_size, body_ptr, body_size,
                              headers_ptr, headers_size, grpc_status):
    details = to_str(f.read(details_ptr, details_size))
    body = f.read(body_ptr, body_size)
    headers = deserialize_str(f.read(headers_ptr, headers_size)) or []
    headers = [(k.lower(), v) for k, v in headers]
    good = [(k, v) for k, v in headers if valid_header(k, v) and not k.startswith(":")]
    if len(good) != len(headers):
        f.log.warning('filter "%s": send_local_response: invalid headers dropped', f.name)
    reply = LocalReply(status_code, good, body, "_".join(details.split()) if details else "")
    grpc = grpc_status if grpc_status <= 16 else -1          # -1 / 0xFFFFFFFF: unset
    return f.ctx().send_local_response(reply, grpc)


def proxy_done(f):
    return f.proxy_done(f.ctx())


def proxy_set_effective_context(f, context_id):
    return f.set_effective_context(context_id)


# -- callouts -------------------------------------------------------------------------------

def proxy_http_call(f, up_ptr, up_size, h_ptr, h_size, b_ptr, b_size, t_ptr, t_size,
                    timeout_ms, ret_token_p):
    cluster = to_text(f.read(up_ptr, up_size))
    headers = deserialize_str(f.read(h_ptr, h_size))
    body = f.read(b_ptr, b_size)
    f.read(t_ptr, t_size)                     # trailers: validated, not sent (HTTP/1.1 upstreams)
    f.write_u32(ret_token_p, 0)               # as cpp-host: prove the out-pointer first
    if headers is None:
        return Status.BAD_ARGUMENT
    status, token = f.http_call(f.ctx(), cluster, headers, body, timeout_ms)
    if status == Status.OK:
        f.write_u32(ret_token_p, token)
    return status


def proxy_get_status(f, ret_code_p, ret_msg_pp, ret_msg_size_p):
    code, message = f.call_status
    f.write_u32(ret_code_p, code)
    return f.write_result(message.encode(), ret_msg_pp, ret_msg_size_p)


# Higress's Redis call ABI (abi/redis_call.py; higress-group/proxy-wasm-cpp-host src/exports.cc).

def proxy_redis_init(f, up_ptr, up_size, user_ptr, user_size, pass_ptr, pass_size, timeout_ms):
    cluster = to_text(f.read(up_ptr, up_size))
    username = to_text(f.read(user_ptr, user_size))
    password = to_text(f.read(pass_ptr, pass_size))
    return f.redis.init(cluster, username, password, timeout_ms)


def proxy_redis_call(f, up_ptr, up_size, query_ptr, query_size, ret_token_p):
    cluster = to_text(f.read(up_ptr, up_size))
    query = f.read(query_ptr, query_size)
    f.write_u32(ret_token_p, 0)               # as Higress: prove the out-pointer first
    status, token = f.redis.call(cluster, query)
    if status == Status.OK:
        f.write_u32(ret_token_p, token)
    return status


# gRPC callouts (abi/grpc_call.py; cpp-host src/exports.cc grpc_call ... grpc_close).

def proxy_grpc_call(f, svc_p, svc_s, name_p, name_s, meth_p, meth_s, md_p, md_s, msg_p, msg_s,
                    timeout_ms, ret_token_p):
    grpc_service = f.read(svc_p, svc_s)
    service = to_text(f.read(name_p, name_s))
    method = to_text(f.read(meth_p, meth_s))
    metadata = deserialize_str(f.read(md_p, md_s))
    message = f.read(msg_p, msg_s)
    f.write_u32(ret_token_p, 0)               # as cpp-host: prove the out-pointer first
    if metadata is None:
        return Status.PARSE_FAILURE           # (the SDKs accept OK, PARSE_ and INTERNAL_FAILURE)
    status, token = f.grpc.call(f.ctx(), grpc_service, service, method, metadata, message, timeout_ms)
    if status == OK:
        f.write_u32(ret_token_p, token)
    return status


def proxy_grpc_stream(f, svc_p, svc_s, name_p, name_s, meth_p, meth_s, md_p, md_s, ret_token_p):
    grpc_service = f.read(svc_p, svc_s)
    service = to_text(f.read(name_p, name_s))
    method = to_text(f.read(meth_p, meth_s))
    metadata = deserialize_str(f.read(md_p, md_s))
    f.write_u32(ret_token_p, 0)
    if metadata is None:
        return Status.PARSE_FAILURE
    status, token = f.grpc.stream(f.ctx(), grpc_service, service, method, metadata)
    if status == OK:
        f.write_u32(ret_token_p, token)
    return status


def proxy_grpc_send(f, token, msg_p, msg_s, end_stream):
    return f.grpc.send(token, f.read(msg_p, msg_s), bool(end_stream))


def proxy_grpc_cancel(f, token):
    return f.grpc.cancel(token)


def proxy_grpc_close(f, token):
    return f.grpc.close(token)


def proxy_call_foreign_function(f, name_ptr, name_size, args_ptr, args_size, ret_pp, ret_size_p):
    status, result = foreign.call(f, f.read(name_ptr, name_size), f.read(args_ptr, args_size))
    if status != OK:
        return status
    return f.write_result(result, ret_pp, ret_size_p)


# -- shared data and queues -------------------------------------------------------------------

def proxy_get_shared_data(f, key_ptr, key_size, ret_pp, ret_size_p, ret_cas_p):
    found = f.store.get(f.read(key_ptr, key_size))
    if found is None:
        return Status.NOT_FOUND
    value, cas = found
    f.check_out(ret_cas_p, 4)
    status = f.write_result(value, ret_pp, ret_size_p)
    if status == Status.OK:
        f.write_u32(ret_cas_p, cas)
    return status


def proxy_set_shared_data(f, key_ptr, key_size, val_ptr, val_size, cas):
    key = f.read(key_ptr, key_size)
    return f.store.set(key, f.read(val_ptr, val_size), cas)


def proxy_register_shared_queue(f, name_ptr, name_size, ret_p):
    name = to_text(f.read(name_ptr, name_size))
    f.check_out(ret_p, 4)
    f.write_u32(ret_p, f.register_queue(name))
    return Status.OK


def proxy_resolve_shared_queue(f, vm_ptr, vm_size, name_ptr, name_size, ret_p):
    vm_id = to_text(f.read(vm_ptr, vm_size))   # "": the caller's own VM
    qid = f.store.resolve_queue(vm_id, to_text(f.read(name_ptr, name_size)))
    if qid is None:
        return Status.NOT_FOUND
    f.write_u32(ret_p, qid)
    return Status.OK


def proxy_enqueue_shared_queue(f, qid, val_ptr, val_size):
    return f.store.enqueue(qid, f.read(val_ptr, val_size))


def proxy_dequeue_shared_queue(f, qid, ret_pp, ret_size_p):
    f.check_out(ret_pp, 4)
    f.check_out(ret_size_p, 4)
    item = f.store.dequeue(qid)
    if isinstance(item, int):
        return item
    return f.write_result(item, ret_pp, ret_size_p)


# -- metrics ----------------------------------------------------------------------------------

def proxy_define_metric(f, metric_type, name_ptr, name_size, ret_p):
    if metric_type > MetricType.HISTOGRAM:
        return Status.BAD_ARGUMENT
    name = to_text(f.read(name_ptr, name_size))
    f.check_out(ret_p, 4)
    metric_id = f.store.define_metric(metric_type, name)
    if metric_id is None or isinstance(metric_id, bool) or metric_id < 0:
        return Status.INTERNAL_FAILURE        # the store is full of metric names
    f.write_u32(ret_p, metric_id)
    return Status.OK


def proxy_increment_metric(f, metric_id, delta):
    return f.store.increment_metric(metric_id, delta)


def proxy_record_metric(f, metric_id, value):
    return f.store.record_metric(metric_id, value)


def proxy_get_metric(f, metric_id, ret_p):
    f.check_out(ret_p, 8)
    status, value = f.store.get_metric(metric_id)
    if status == Status.OK:
        f.write_u64(ret_p, value)
    return status


# -- emscripten leftovers -------------------------------------------------------------------

def emscripten_notify_memory_growth(f, index):
    return None


def pthread_equal(f, a, b):
    return 1 if a == b else 0


def _sig(n: int, *, i64_at: tuple[int, ...] = (), result: bool = True):
    params = tuple(I64 if i in i64_at else I32 for i in range(n))
    return params, ((I32,) if result else ())


# name → (adapter, params, results). Every ABI version gets the whole set (cpp-host registers
# 0.1.0-only and 0.2.x-only names per version; offering both is strictly more permissive).
HOSTCALLS: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    "proxy_log": (proxy_log, *_sig(3)),
    "proxy_get_log_level": (proxy_get_log_level, *_sig(1)),
    "proxy_get_current_time_nanoseconds": (proxy_get_current_time_nanoseconds, *_sig(1)),
    "proxy_set_tick_period_milliseconds": (proxy_set_tick_period_milliseconds, *_sig(1)),
    "proxy_get_buffer_bytes": (proxy_get_buffer_bytes, *_sig(5)),
    "proxy_set_buffer_bytes": (proxy_set_buffer_bytes, *_sig(5)),
    "proxy_get_buffer_status": (proxy_get_buffer_status, *_sig(3)),
    "proxy_get_header_map_pairs": (proxy_get_header_map_pairs, *_sig(3)),
    "proxy_set_header_map_pairs": (proxy_set_header_map_pairs, *_sig(3)),
    "proxy_get_header_map_value": (proxy_get_header_map_value, *_sig(5)),
    "proxy_add_header_map_value": (proxy_add_header_map_value, *_sig(5)),
    "proxy_replace_header_map_value": (proxy_replace_header_map_value, *_sig(5)),
    "proxy_remove_header_map_value": (proxy_remove_header_map_value, *_sig(3)),
    "proxy_get_header_map_size": (proxy_get_header_map_size, *_sig(2)),
    "proxy_get_property": (proxy_get_property, *_sig(4)),
    "proxy_set_property": (proxy_set_property, *_sig(4)),
    "proxy_continue_stream": (proxy_continue_stream, *_sig(1)),
    "proxy_close_stream": (proxy_close_stream, *_sig(1)),
    "proxy_continue_request": (proxy_continue_request, *_sig(0)),
    "proxy_continue_response": (proxy_continue_response, *_sig(0)),
    "proxy_clear_route_cache": (proxy_clear_route_cache, *_sig(0)),
    "proxy_get_configuration": (proxy_get_configuration, *_sig(2)),
    "proxy_send_local_response": (proxy_send_local_response, *_sig(8)),
    "proxy_done": (proxy_done, *_sig(0)),
    "proxy_set_effective_context": (proxy_set_effective_context, *_sig(1)),
    "proxy_http_call": (proxy_http_call, *_sig(10)),
    "proxy_get_status": (proxy_get_status, *_sig(3)),
    "proxy_redis_init": (proxy_redis_init, *_sig(7)),
    "proxy_redis_call": (proxy_redis_call, *_sig(5)),
    "proxy_grpc_call": (proxy_grpc_call, *_sig(12)),
    "proxy_grpc_stream": (proxy_grpc_stream, *_sig(9)),
    "proxy_grpc_send": (proxy_grpc_send, *_sig(4)),
    "proxy_grpc_cancel": (proxy_grpc_cancel, *_sig(1)),
    "proxy_grpc_close": (proxy_grpc_close, *_sig(1)),
    "proxy_call_foreign_function": (proxy_call_foreign_function, *_sig(6)),
    "proxy_get_shared_data": (proxy_get_shared_data, *_sig(5)),
    "proxy_set_shared_data": (proxy_set_shared_data, *_sig(5)),
    "proxy_register_shared_queue": (proxy_register_shared_queue, *_sig(3)),
    "proxy_resolve_shared_queue": (proxy_resolve_shared_queue, *_sig(5)),
    "proxy_enqueue_shared_queue": (proxy_enqueue_shared_queue, *_sig(3)),
    "proxy_dequeue_shared_queue": (proxy_dequeue_shared_queue, *_sig(3)),
    "proxy_define_metric": (proxy_define_metric, *_sig(4)),
    "proxy_increment_metric": (proxy_increment_metric, *_sig(2, i64_at=(1,))),
    "proxy_record_metric": (proxy_record_metric, *_sig(2, i64_at=(1,))),
    "proxy_get_metric": (proxy_get_metric, *_sig(2)),
    "emscripten_notify_memory_growth": (emscripten_notify_memory_growth, *_sig(1, result=False)),
    "pthread_equal": (pthread_equal, *_sig(2)),
}

# Host functions done whole in C on their common path (_crossing.c "host calls of every
# request"), each with its Python function above as the fallback for the rest and the
# reference: guarded() links the C one wherever the C crossings are on. No Python frame for a
# request's header edits, clock read or stream property reads.
IN_C: dict[Callable, Callable] = {}
if native_header_edit is not None:
    _MAP_NAMES = tuple(STREAM_MAPS[t] for t in range(LAST_STREAM_MAP + 1))
    for _fn, _replace in ((proxy_add_header_map_value, False),
                          (proxy_replace_header_map_value, True)):
        IN_C[_fn] = functools.partial(native_header_edit, _fn, _replace, MAX_HEADER_MAP_BYTES,
                                      _MAP_NAMES)
if native_time_ns is not None:
    IN_C[proxy_get_current_time_nanoseconds] = functools.partial(
        native_time_ns, proxy_get_current_time_nanoseconds)
if native_stream_property is not None:
    IN_C[proxy_get_property] = functools.partial(
        native_stream_property, proxy_get_property, STREAM_PROPERTIES, Status.INVALID_MEMORY_ACCESS)
if native_shared_data_get is not None:
    IN_C[proxy_get_shared_data] = functools.partial(
        native_shared_data_get, proxy_get_shared_data, Status.INVALID_MEMORY_ACCESS)
if native_foreign_set_ttl is not None:
    IN_C[proxy_call_foreign_function] = functools.partial(
        native_foreign_set_ttl, proxy_call_foreign_function,
        foreign.SET_SHARED_DATA_TTL.encode(), Status.INVALID_MEMORY_ACCESS)

_GUARDED_SRC = """
def host({args}):
    try:
        return fn(f{comma_args})
    except MemoryAccessError:
        return bad_memory
    except (Trap, HostTrap):
        raise
    except Exception as e:          # noqa: BLE001 - a host bug must not kill the guest call
        f.host_error(name, e)
        return internal
"""


@functools.lru_cache(maxsize=None)
def _guarded_factory(arity: int | None) -> Callable:
    if arity is None:
        args, comma_args = "*args", ", *args"
    else:
        names = ", ".join(f"a{i}" for i in range(arity))
        args, comma_args = names, (", " + names if names else "")
    body = textwrap.indent(_GUARDED_SRC.format(args=args, comma_args=comma_args), "    ")
    code = ("def factory(f, name, fn, bad_memory, internal, MemoryAccessError, Trap, HostTrap):\n"
            f"{body}\n    return host\n")
    scope: dict = {}
    exec(compile(code, f"<wasmgate hostcall/{arity}>", "exec"), scope)
    return scope["factory"]


def guarded(f: FilterView, name: str, fn: Callable, *, bad_memory: int | None,
            internal: int | None, arity: int | None = None, in_c: bool = True) -> Callable:
    """Wrap an adapter so nothing but a deliberate trap leaves it.

    A bad guest pointer → `bad_memory` (INVALID_MEMORY_ACCESS, as cpp-host; WASI: FAULT); a
    bug of ours → logged, counted, `internal`. Trap (a nested guest call such as the allocator
    trapped) and HostTrap (proc_exit) propagate: they end the guest call on purpose.
    On the native path the wrapper is C (engine.guarded_host: no Python frame per host call)
    and wraps ``fn``'s C variant where it has one (IN_C) unless ``in_c`` is false;
    otherwise it is generated once per ``arity`` (the wasm parameter count) and takes exactly
    that many arguments: no *args packing on every host call.
    """
    host = guarded_host(IN_C.get(fn, fn) if in_c else fn, f, bad_memory, internal,
                        functools.partial(f.host_error, name))
    if host is None:                # the C path is off: the same in a generated wrapper
        host = _guarded_factory(arity)(f, name, fn, bad_memory, internal,
                                       MemoryAccessError, Trap, HostTrap)
        host.__name__ = name
    return host
