"""Every Python <-> wasm crossing of wasmgate lives in this package; nothing else imports
``wasmtime``. Importers use the names below (``from .engine import Instance``).

* ``Engine`` (compile.py) compiles modules (with an on-disk cache) and owns the epoch ticker
  (ticker.py) that enforces CPU deadlines. One per process (workers are separate processes).
* ``Instance`` (instance.py) is one Store + one instance: host functions are linked from a dict
  keyed by ``(module, name)`` (a pair imported twice with one type is defined once), exports
  are called through cached fast callers. ``close()`` frees it deterministically (otherwise the
  GC does, since callers and memory keep it alive). Each top-level call gets a CPU deadline
  (``set_deadline_ms`` changes it); instantiation gets its own. Host functions called by a
  start function can already use ``memory`` and exports (see ``on_created``); a memory import
  is satisfied with a fresh memory capped by the memory limit.
* ``Memory`` (instance.py) is bounds-checked access to the instance's exported linear memory
  (``read``, ``header_pair``, ``put_result``: C calls on a native instance).
* ``guarded_host`` wraps a host function's errors in C (None without the C build);
  ``serialize_pairs`` is a header map's serialization in C (None likewise);
  ``native_header_edit`` / ``native_time_ns`` / ``native_stream_property`` /
  ``native_shared_data_get`` / ``native_foreign_set_ttl`` are abi/hostcalls.py's header edits,
  clock read, stream property read, shared-data read and wasmgate.set_shared_data_ttl whole in
  C on their common path (None likewise).
* A guest call that ends abnormally raises ``Trap`` (kind: trap | deadline | exit | host) and
  poisons the instance (store.py decides which).
* ``FilterCore`` (None without the C build) is the C base of abi/filter.py's NativeFilter: a
  filter's per-request calls (``call``, ``new_http_context``, ``headers``, ``finish_context``)
  without a Python frame; ``native_crossings()`` says whether what is made now uses the C build.
  ``chain_walks`` (None likewise) are abi/chain.py's per-filter loops (request headers,
  response headers, teardown) in C, calling a NativeFilter's FilterCore directly;
  ``native_stream_head`` (None likewise) its header-map prologue (chain.py's _stream_head).
* ``ContextCore`` / ``HeaderMapCore`` (None without the C build) are the C bases of
  abi/context.py's HttpContext and abi/buffers.py's HeaderMap: their construction (every
  request) without a Python frame.
* ``Tally`` counts the top-level guest calls of the instances given it and their wall time
  (``Instance(..., tally=)``; abi/filter.py's ``calls`` / ``guest_ns``).

The files, innermost first:

=============  ====================================================================
errors.py      the exceptions
crossing.py    raw ctypes bindings over wasmtime's C API + per-signature code generation
               of guest calls and host callbacks: the hot path
_crossing.c    optional C of the hot crossings (a guest call whole: ``GuestFn``; the
               host-callback entry, whole for integer signatures: ``HostFn``), the epoch
               ticker thread (no GIL), and what host functions do most (their error wrapper,
               Memory's read/header_pair/put_result, the header-map serialization), built at
               install by setup.py; crossing.py, ticker.py, instance.py and abi/pairs.py fall
               back to ctypes, generated code, a Python thread and Python code without it
ticker.py      CPU-time deadlines per thread (the epoch ticker, GC time not charged)
store.py       per-Store state every crossing reads: deadline arming, trap classification
binary.py      the wasm binary reader (import/export signatures; Import, Export)
compile.py     Engine (compile + disk cache) and Module
instance.py    Memory and Instance (link, instantiate, callers, close)
public_api.py  the same crossings through wasmtime-py's public API (bench baseline)
=============  ====================================================================

Cold paths (compile, link, instantiate, trap decoding) keep using the public wasmtime-py API,
except type inspection, which aborts the process on v128/GC types and is therefore read from
the binary (binary.py).

Not thread-safe: one thread at a time uses an Instance. abi/filter.py builds and starts each
instance on a build thread, then hands it to the worker's event loop; guest code releases the
GIL (so the loop runs meanwhile) and the CPU deadline follows whichever thread runs the call.
"""
from __future__ import annotations

from .binary import Export, Import
from .compile import Engine, Module
from .crossing import (WASMTIME_VERSION, ContextCore, FilterCore, HeaderMapCore, Tally,
                       chain_walks, guarded_host, native_crossings, native_foreign_set_ttl,
                       native_header_edit, native_shared_data_get, native_stream_head,
                       native_stream_property, native_time_ns, serialize_pairs)
from .errors import EngineError, HostTrap, MemoryAccessError, Trap
from .instance import Instance, Memory
from .public_api import public_api_crossing

__all__ = [
    "ContextCore", "Engine", "EngineError", "Export", "FilterCore", "HeaderMapCore", "HostTrap", "Import", "Instance", "Memory",
    "MemoryAccessError", "Module", "Tally", "Trap", "WASMTIME_VERSION", "guarded_host",
    "native_crossings", "native_header_edit", "native_time_ns", "public_api_crossing",
    "serialize_pairs", "chain_walks", "native_stream_head", "native_stream_property",
    "native_shared_data_get", "native_foreign_set_ttl",
]
