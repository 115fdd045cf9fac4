"""Build WAT filter modules that behave like the official SDKs, for conformance tests.

A module links the import set a Rust SDK 0.2.x module declares (reference §1.1), exports a
bump allocator as ``proxy_on_memory_allocate`` and, by default, SDK-like callbacks that trace
themselves through ``proxy_log`` as "name arg1 arg2 ..." (decimal, unsigned) at INFO level.
Tests replace any callback with their own WAT body.
"""
from __future__ import annotations

RUST_IMPORTS = {
    "proxy_log": 3, "proxy_get_current_time_nanoseconds": 1, "proxy_set_tick_period_milliseconds": 1,
    "proxy_get_buffer_bytes": 5, "proxy_set_buffer_bytes": 5, "proxy_get_header_map_pairs": 3,
    "proxy_set_header_map_pairs": 3, "proxy_get_header_map_value": 5,
    "proxy_add_header_map_value": 5, "proxy_replace_header_map_value": 5,
    "proxy_remove_header_map_value": 3, "proxy_get_property": 4, "proxy_set_property": 4,
    "proxy_get_shared_data": 5, "proxy_set_shared_data": 5, "proxy_register_shared_queue": 3,
    "proxy_resolve_shared_queue": 5, "proxy_dequeue_shared_queue": 3,
    "proxy_enqueue_shared_queue": 3, "proxy_continue_stream": 1, "proxy_close_stream": 1,
    "proxy_send_local_response": 8, "proxy_http_call": 10, "proxy_grpc_call": 12,
    "proxy_grpc_stream": 9, "proxy_grpc_send": 4, "proxy_grpc_cancel": 1, "proxy_grpc_close": 1,
    "proxy_get_status": 3, "proxy_set_effective_context": 1, "proxy_call_foreign_function": 6,
    "proxy_done": 0, "proxy_get_log_level": 1, "proxy_define_metric": 4, "proxy_get_metric": 2,
    "proxy_get_buffer_status": 3, "proxy_get_header_map_size": 2,
}
I64_IMPORTS = {"proxy_increment_metric", "proxy_record_metric"}
# Higress's Redis call ABI, as its Go SDK imports it (proxywasm/internal/abi_hostcalls.go).
REDIS_IMPORTS = {**RUST_IMPORTS, "proxy_redis_init": 7, "proxy_redis_call": 5}

# Default SDK-like callbacks: (param count, has result, result value).
CALLBACKS = {
    "proxy_on_context_create": (2, False, None),
    "proxy_on_vm_start": (2, True, 1),
    "proxy_on_configure": (2, True, 1),
    "proxy_on_request_headers": (3, True, 0),
    "proxy_on_request_body": (3, True, 0),
    "proxy_on_response_headers": (3, True, 0),
    "proxy_on_response_body": (3, True, 0),
    "proxy_on_request_trailers": (2, True, 0),
    "proxy_on_response_trailers": (2, True, 0),
    "proxy_on_done": (1, True, 1),
    "proxy_on_log": (1, False, None),
    "proxy_on_delete": (1, False, None),
    "proxy_on_tick": (1, False, None),
    "proxy_on_queue_ready": (2, False, None),
    "proxy_on_http_call_response": (5, False, None),
    "proxy_on_redis_call_response": (4, False, None),       # Higress
    "proxy_on_grpc_receive_initial_metadata": (3, False, None),
    "proxy_on_grpc_receive": (3, False, None),
    "proxy_on_grpc_receive_trailing_metadata": (3, False, None),
    "proxy_on_grpc_close": (3, False, None),
}

SCRATCH = 0x8000      # trace line buffer
OUT = 0x9000          # out-params the tests' callbacks use: OUT (ptr), OUT+4 (size), OUT+8...
HEAP = 0x10000        # bump allocator start


class Wat:
    def __init__(self, abi: str = "0_2_1", *, pages: int = 2, imports: dict | None = None,
                 wasi: bool = True, allocator: bool = True, max_pages: int | None = None,
                 metric_imports: bool = True):
        self.abi = abi
        self.pages = pages
        self.max_pages = max_pages
        self.imports = RUST_IMPORTS if imports is None else imports
        self.wasi = wasi
        self.allocator = allocator
        self.metric_imports = metric_imports
        self._strings: dict[bytes, int] = {}
        self._next = 0x400
        self.callbacks: dict[str, str | None] = {}
        self.extra: list[str] = []

    def s(self, text: str | bytes) -> str:
        """`(i32.const ptr) (i32.const len)` of a constant string in the data segment."""
        data = text.encode() if isinstance(text, str) else text
        off = self._strings.get(data)
        if off is None:
            off = self._next
            self._strings[data] = off
            self._next += len(data) + 1
            assert self._next < SCRATCH, "too many strings"
        return f"(i32.const {off}) (i32.const {len(data)})"

    def on(self, name: str, body: str) -> "Wat":
        """Replace callback `name`; `body` may use $a $b $c $d $e (its params)."""
        self.callbacks[name] = body
        return self

    def without(self, *names: str) -> "Wat":
        for n in names:
            self.callbacks[n] = None
        return self

    def trace(self, name: str, n: int) -> str:
        k = min(n, 3)
        args = [f"(local.get ${p})" for p in "abc"[:k]] + ["(i32.const 0)"] * (3 - k)
        return f"(call $trace {self.s(name)} (i32.const {k}) {' '.join(args)})"

    def _callback(self, name: str) -> str | None:
        nparams, has_result, default = CALLBACKS.get(name, (None, None, None))
        body = self.callbacks.get(name, "__default__")
        if body is None:
            return None
        if body == "__default__":
            if nparams is None:
                return None
            body = self.trace(name, nparams) + (f" (i32.const {default})" if has_result else "")
        params = " ".join(f"(param ${p} i32)" for p in "abcde"[:nparams])
        result = "(result i32)" if has_result else ""
        return f'(func (export "{name}") {params} {result} {body})'

    def render(self) -> str:
        parts = ["(module"]
        for name, n in self.imports.items():
            params = " ".join(["i32"] * n)
            parts.append(f'(import "env" "{name}" (func ${name} (param {params}) (result i32)))'
                         if n else f'(import "env" "{name}" (func ${name} (result i32)))')
        for name in I64_IMPORTS if self.metric_imports else ():
            parts.append(f'(import "env" "{name}" (func ${name} (param i32 i64) (result i32)))')
        if self.wasi:
            parts.append('(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))')
            parts.append('(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))')
        mx = f" {self.max_pages}" if self.max_pages else ""
        parts.append(f'(memory (export "memory") {self.pages}{mx})')
        parts.append(f"(global $heap (mut i32) (i32.const {HEAP}))")
        parts.append(f'(func (export "proxy_abi_version_{self.abi}"))')
        if self.allocator:
            parts.append(_ALLOCATOR)
        parts.append(_TRACE)
        for name in set(CALLBACKS) | set(self.callbacks):
            cb = self._callback(name)
            if cb:
                parts.append(cb)
        parts.extend(self.extra)
        for data, off in self._strings.items():
            parts.append(f'(data (i32.const {off}) "{_escape(data)}")')
        parts.append(")")
        return "\n".join(parts)


def _escape(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:02x}" for b in data)


_ALLOCATOR = f"""
(func $alloc (export "proxy_on_memory_allocate") (param $size i32) (result i32)
  (local $p i32) (local $need i32)
  (local.set $p (global.get $heap))
  (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7)) (i32.const -8)))
  (local.set $need (i32.shr_u (i32.add (global.get $heap) (i32.const 65535)) (i32.const 16)))
  (if (i32.gt_u (local.get $need) (memory.size))
    (then (if (i32.eq (memory.grow (i32.sub (local.get $need) (memory.size))) (i32.const -1))
      (then unreachable))))
  (local.get $p))
"""

_TRACE = f"""
(func $put_num (param $p i32) (param $v i32) (result i32)
  (local $tmp i32) (local $len i32) (local $q i32)
  (i32.store8 (local.get $p) (i32.const 32))
  (local.set $p (i32.add (local.get $p) (i32.const 1)))
  (local.set $tmp (local.get $v))
  (local.set $len (i32.const 1))
  (block $done (loop $l
    (br_if $done (i32.lt_u (local.get $tmp) (i32.const 10)))
    (local.set $tmp (i32.div_u (local.get $tmp) (i32.const 10)))
    (local.set $len (i32.add (local.get $len) (i32.const 1)))
    (br $l)))
  (local.set $q (i32.add (local.get $p) (local.get $len)))
  (local.set $tmp (local.get $v))
  (loop $w
    (local.set $q (i32.sub (local.get $q) (i32.const 1)))
    (i32.store8 (local.get $q) (i32.add (i32.const 48) (i32.rem_u (local.get $tmp) (i32.const 10))))
    (local.set $tmp (i32.div_u (local.get $tmp) (i32.const 10)))
    (br_if $w (i32.gt_u (local.get $q) (local.get $p))))
  (i32.add (local.get $p) (local.get $len)))
(func $trace (param $name i32) (param $nlen i32) (param $n i32) (param $a i32) (param $b i32) (param $c i32)
  (local $p i32)
  (memory.copy (i32.const {SCRATCH}) (local.get $name) (local.get $nlen))
  (local.set $p (i32.add (i32.const {SCRATCH}) (local.get $nlen)))
  (if (i32.ge_u (local.get $n) (i32.const 1)) (then (local.set $p (call $put_num (local.get $p) (local.get $a)))))
  (if (i32.ge_u (local.get $n) (i32.const 2)) (then (local.set $p (call $put_num (local.get $p) (local.get $b)))))
  (if (i32.ge_u (local.get $n) (i32.const 3)) (then (local.set $p (call $put_num (local.get $p) (local.get $c)))))
  (drop (call $proxy_log (i32.const 2) (i32.const {SCRATCH}) (i32.sub (local.get $p) (i32.const {SCRATCH})))))
(func $log_num (param $name i32) (param $nlen i32) (param $v i32)
  (call $trace (local.get $name) (local.get $nlen) (i32.const 1) (local.get $v) (i32.const 0) (i32.const 0)))
"""


# -- snippets tests combine ----------------------------------------------------------------

LOG_OUT = f"(drop (call $proxy_log (i32.const 2) (i32.load (i32.const {OUT})) (i32.load (i32.const {OUT + 4}))))"


def status(w: Wat, label: str, call: str) -> str:
    """Trace "label <status>" for a host call expression returning a status."""
    return f"(call $log_num {w.s(label)} {call})"


def out_ptr_size(w: Wat, label: str) -> str:
    """Trace "label <ptr> <size>" of the last (ptr, size) out-params."""
    return (f"(call $trace {w.s(label)} (i32.const 2) (i32.load (i32.const {OUT})) "
            f"(i32.load (i32.const {OUT + 4})) (i32.const 0))")
