"""Gateway-wide SharedStore: shared data, shared queues and metrics shared by ALL worker processes.

Backend: LMDB in a directory on tmpfs (``/dev/shm``). LMDB gives us, for free, what a
hand-written shared-memory zone would have to re-invent:

* an mmap shared by every process that opens the directory — reads are lock-free snapshots;
* one writer at a time via a *robust* pthread mutex in ``lock.mdb``: a process killed with -9
  while holding it does not leave the store locked (the next writer gets EOWNERDEAD and LMDB
  discards the dead writer's uncommitted transaction);
* copy-on-write B-tree pages + a meta-page commit: a transaction is either fully visible or not
  at all, so a worker dying mid-write can never leave a torn record;
* a hard size cap (``map_size``) with a clean ``MapFullError``.

Everything that crosses the process boundary is msgpack, except the two records every set()
rewrites (below).

Two bindings, the same records: abi/_lmdb.c (built at install against the system's liblmdb),
whose ``get_entry`` and ``set_entry`` are a rate limiter's ``get`` and ``set`` whole in C —
``set_entry`` is ``set`` with ``_set_txn`` for a short key when nothing has to be evicted, and
hands every other case back to them, having written nothing — and py-lmdb, where all of it is
Python (no C extension, or ``WASMGATE_PURE_PYTHON=1``). Everything else runs the same Python
over either.
A process uses one binding for a store (``binding``, chosen at import): LMDB must never open
one environment twice in a process, and two copies of LMDB cannot share one.

Layout: ONE LMDB B-tree (the main database), records told apart by a key prefix — a write
touching two named sub-databases costs about 1 µs more, since each sub-database root is itself a
record in the main tree.

===========================================  ===================================================
key                                          value (msgpack unless noted)
===========================================  ===================================================
``M``                                        8 × u64 little-endian: ``cas_counter, used_bytes,
                                             queue_seq, metric_seq, evictable_bytes,
                                             expired_count, evicted_count, reap_hint``
``k``+key  (``h``+blake2b(key) if ≥ 480 B)   binary: cas (u32 BE), deadline (u64 BE, 0 = never
                                             expires), then the value (``h``: key length u16
                                             BE and the key first)
``E``+deadline (u64 BE)+data key             empty: expiring entries in deadline order
``Qn``+name                                  qid
``Qi``+qid (u32 BE)                          ``[name, head, tail, {token: [pid, pending]}]``
``I``+qid (u32 BE)+seq (u64 BE)              the item (raw bytes)
``Xn``+kind (1 byte)+name                    metric id  (``(seq << 2) | kind``, as Envoy)
``Xi``+id (u32 BE)                           ``[kind, name]``; histogram ``[2, name, slot]``
``Xh``                                       the number of histograms defined
===========================================  ===================================================

A metric's values are not in LMDB: a counter's or gauge's is the u64 at slot ``seq`` of
``metrics.u64`` (a file of u64 slots beside the map, mapped shared by every process), changed
with an atomic add or store by abi/_lmdb.c's ``counters``. A rate limiter counts every request;
as a write transaction that cost ~4 µs and took the writer lock every worker's writes wait on,
as an atomic add it costs ~0.5 µs and waits for nothing. A histogram's are 21 slots after the
``seq`` ones, from the ``slot`` its record names: the sum, then one count per bucket (its count
is theirs, so ``_count`` always equals the ``+Inf`` bucket); a sample is two atomic adds, and a
reader between them may see the bucket before the sum, as Envoy's merged histograms can be a
sample apart. (py-lmdb's fallback does the same read-modify-write inside a write transaction:
the writer lock makes it atomic among processes that all use py-lmdb, which a gateway's workers
do.) A killed process leaves a slot either added to or not.

The meta and data records are read and rewritten inside the write lock on every set(), so they
are fixed binary layouts (struct) rather than msgpack. ``reap_hint`` is a lower bound of the
earliest deadline in the ``E`` index (u64 max when it is empty): an expiring write looks for
expired entries to drop only once the clock has reached it, instead of opening a cursor on every
write. Each set() takes the clock and derives its keys and deadline *before* it takes the
write lock: every other worker's writes wait while it is held (and py-lmdb releases the GIL
around each LMDB call, so every call inside the lock is a point where another thread of the
worker may run first; abi/_lmdb.c releases it only while waiting for the lock).

Size: ``max_bytes`` is a *logical* budget, enforced exactly by this module: every shared-data
entry costs ``len(key) + len(value) + ENTRY_OVERHEAD`` and every queued item
``len(item) + ENTRY_OVERHEAD`` (metric definitions ``len(name) + ENTRY_OVERHEAD``). A write that
would exceed it first drops expiring entries, earliest deadline first, by walking the ``E``
records from the start of their range (abi/shared_store.py explains expiry; both backends share
the rules); if those cannot free enough, it returns ``STATUS_FULL`` and changes nothing. The
deadline index is exact (every expiring write replaces its own ``E`` record in the same
transaction), so a SIGKILLed worker leaves either the whole write or none of it. Deadlines are
``CLOCK_MONOTONIC`` nanoseconds, one clock for every process on the machine. The LMDB map is sized
``MAP_FACTOR * max_bytes + MAP_HEADROOM`` so B-tree slack, copy-on-write and metric updates never
reach the physical limit; if they somehow do (``MapFullError``), the write is retried once after
clearing dead readers and then reported as ``STATUS_FULL`` too. tmpfs pages are only allocated
when touched, so the map's virtual size costs nothing until used.

Queue-ready notification: each process that registers a queue gets a FIFO
``<dir>/wake/<token>`` (opened O_RDWR|O_NONBLOCK) that its event loop watches with
``loop.add_reader``. An enqueue increments, inside its transaction, a per-(queue, registrant)
``pending`` count; on a 0→1 transition it writes one byte to that registrant's FIFO after
commit. The registrant drains its FIFO, then atomically takes and zeroes its pending counts and
calls ``callback(qid)`` once per enqueued item (the Rust SDK's usual on_queue_ready handler
dequeues ONE item per call, so coalescing calls would strand items). No polling, no busy wait.
Every process that registered a queue is notified; only one of them gets each item on dequeue
(the others see EMPTY, which every SDK tolerates).

Fork safety: an LMDB environment must not be used across fork(), and a child must not close
the parent's (it would wipe the parent's reader slots). ``os.register_at_fork`` closes every
open environment in the parent just before fork; each process (re)opens lazily on first use.
One environment per path per process is shared by every ShmStore object on that path.

Full store: ``set``/``enqueue`` return ``STATUS_FULL`` = INTERNAL_FAILURE (10). Not CAS_MISMATCH,
although it is the only non-OK status the Rust SDK's set_shared_data accepts: every CAS loop
(rate limiters) retries on CAS_MISMATCH, so a full store would spin the worker forever on the
request path. A Rust filter panics on 10 — a trap, which the host contains (the instance is
rebuilt, the request follows the filter's failure_policy); Go/C++ SDKs surface it as an error.
That is the same status abi.shared_store.LocalStore returns for set and enqueue (both refuse the
new item, so nothing is ever lost silently).

Known limits: a process *stopped* (SIGSTOP, debugger) while inside a write transaction blocks
every other writer until it continues (killing it is fine). Concurrent *creation* of a key is
racy in any proxy-wasm host: a get() that finds nothing yields no cas and set(cas=0) is
unconditional (§5.4) — filters should seed counters (e.g. in on_configure). If the LMDB map
itself ever filled up (it cannot while the budget holds), even deletes would fail until
dead readers are cleared, since LMDB deletes are copy-on-write too.

Wiring (supervisor / worker / host)::

    # supervisor, before starting workers (config: shared_data.max_bytes)
    store = ShmStore.create(f"gw-{os.getpid()}", cfg.shared_data.max_bytes)
    ...; store.close()                       # optional: the supervisor need not keep it open
    env[ENV_VAR] = str(store.path)           # in each worker's environment (subprocess env=)
    # every worker (forked or spawned), once, inside its event loop
    store = open_from_env()                  # = ShmStore.open(os.environ[ENV_VAR])
    store.on_enqueue(host.queue_ready)       # attaches the wake-up fd to the running loop
    # supervisor: after reaping a dead worker → store.check_readers(); on exit → ShmStore.remove(name)
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import weakref
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lmdb as _py_lmdb
import msgpack

from .seam import MetricSample
from .shared_store import ENTRY_OVERHEAD, REAP_PER_WRITE, deadline, entry_cost, usage_samples

try:
    from . import _lmdb as _c_lmdb      # abi/_lmdb.c: built at install when liblmdb-dev is there
except ImportError:
    _c_lmdb = None

log = logging.getLogger("wasmgate.shared_store")


def _default_binding():
    if _c_lmdb is None or os.environ.get("WASMGATE_PURE_PYTHON"):
        return _py_lmdb
    return _c_lmdb


#: The LMDB binding that environments opened from now on use: abi/_lmdb.c (the store's request
#: path whole in C) or py-lmdb (the same records, everything in Python). One binding per process
#: for a given store: a worker inherits WASMGATE_PURE_PYTHON with the rest of its environment.
#: The tests set it to run the store on both.
binding = _default_binding()
_MAP_FULL = (_py_lmdb.MapFullError,) + ((_c_lmdb.MapFullError,) if _c_lmdb else ())

# proxy_status_t (§3.1)
OK = 0
NOT_FOUND = 1
BAD_ARGUMENT = 2
EMPTY = 7
CAS_MISMATCH = 8
INTERNAL_FAILURE = 10
#: what set()/enqueue() return when the budget is exhausted (see module docstring / report).
STATUS_FULL = INTERNAL_FAILURE
#: A cas value this store never issues. A host may answer get() on a missing key with
#: (b"", MISSING_CAS) instead of NOT_FOUND (opt-in): the guest's CAS loop then sends
#: set(key, v, MISSING_CAS), which creates the key if it is still missing (§5.4: cas != 0 on a
#: missing key succeeds) and gets CAS_MISMATCH if another worker created it first — making the
#: *creation* of a counter/bucket atomic, which plain §5.4 (cas 0 = unconditional) cannot.
MISSING_CAS = 0xFFFFFFFF

COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "histogram"}

MAP_FACTOR = 4
MAP_HEADROOM = 8 * 1024 * 1024
MIN_MAX_BYTES = 4096
LONG_KEY = 480                      # LMDB keys are limited to 511 bytes
#: histogram bucket upper bounds (Envoy's default supported_buckets, integer-valued samples)
HISTOGRAM_BOUNDS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000,
                                       10000, 30000, 60000, 300000, 600000, 1800000, 3600000)

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
#: ShmStore's default clock; abi/_lmdb.c reads the same CLOCK_MONOTONIC itself when it is in use.
_MONOTONIC = time.monotonic_ns
_CONFIG_FILE = "wasmgate-store.msgpack"
_COUNTERS_FILE = "metrics.u64"
_FORMAT = 5                         # 2: expiring entries (deadline index, meta[4:7]); 3: binary
                                    # meta and data records, reap hint meta[7]; 4: counter and
                                    # gauge values in _COUNTERS_FILE; 5: histograms' too

_packb = msgpack.packb
_unpackb = msgpack.unpackb
_QKEY = struct.Struct(">I")
_qkey = _QKEY.pack
_U64S = struct.Struct(">Q")
_u64 = _U64S.pack
_itemkey = struct.Struct(">IQ").pack
# key prefixes in the single LMDB tree (data keys start with b"k" or b"h")
_META = b"M"
_QNAME, _QREC, _ITEM = b"Qn", b"Qi", b"I"
_MNAME, _MREC, _MHISTS = b"Xn", b"Xi", b"Xh"
_EXP = b"E"                         # E + deadline (u64 BE) + data key: expiring entries by deadline
# Meta and data records are fixed binary headers, not msgpack: they are decoded and re-encoded
# inside the write lock on every set(), and struct does that in a fraction of msgpack's time.
_META_S = struct.Struct("<8Q")      # the meta record's 8 counters (module docstring)
_REC = struct.Struct(">IQ")         # data record header: cas, deadline (0 = never expires)
_REC_LEN = _REC.size
_KLEN = struct.Struct(">H")         # hashed keys: the full key's length, after the header
_HREC_LEN = _REC_LEN + _KLEN.size


def _load_meta(raw: bytes) -> list[int]:
    return list(_META_S.unpack(raw))


def _dump_meta(meta: list[int]) -> bytes:
    return _META_S.pack(*meta)


class StoreFull(Exception):
    """define_metric() when the budget is exhausted (set/enqueue return STATUS_FULL instead)."""


@dataclass
class StoreMetric:
    """One metric summed over the whole gateway, for /metrics."""
    name: str
    kind: str                                   # "counter" | "gauge" | "histogram"
    value: int                                  # counter/gauge value; histogram: sample count
    buckets: list[tuple[float, int]] = field(default_factory=list)  # (le, CUMULATIVE count), +Inf last
    sum: int = 0
    count: int = 0


def _candidates(path_or_name: str | os.PathLike) -> list[Path]:
    s = os.fspath(path_or_name)
    if os.sep in s:
        return [Path(s)]
    bases = [Path("/dev/shm")] if os.path.isdir("/dev/shm") else []
    bases.append(Path(tempfile.gettempdir()))
    return [b / f"wasmgate-{s}" for b in bases]


def store_path(path_or_name: str | os.PathLike) -> Path:
    """Where an existing store lives. A bare name means ``/dev/shm/wasmgate-<name>`` (tmpfs), or
    ``$TMPDIR/wasmgate-<name>`` if create() had to fall back there; a name with '/' is a path."""
    cands = _candidates(path_or_name)
    for c in cands:
        if (c / _CONFIG_FILE).exists():
            return c
    return cands[0]


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _pick_location(path_or_name: str | os.PathLike, map_size: int) -> Path:
    """The first candidate whose filesystem can hold the whole map. Writing to an mmap'ed page
    that the filesystem cannot back raises SIGBUS — a crash — so refuse up front instead."""
    cands = _candidates(path_or_name)
    report = []
    for c in cands:
        parent = c.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            free = _free_bytes(parent) + (_du(c) if c.exists() else 0)
        except OSError as e:
            report.append(f"{parent}: {e}")
            continue
        if free >= map_size:
            if c != cands[0]:
                log.warning("shared store: %s lacks room for %d MiB, using %s", cands[0].parent,
                            map_size >> 20, parent)
            return c
        report.append(f"{parent}: {free >> 20} MiB free")
    raise OSError(errno.ENOSPC, f"shared store needs {map_size >> 20} MiB "
                  f"({MAP_FACTOR} x shared_data.max_bytes + {MAP_HEADROOM >> 20} MiB) but "
                  + "; ".join(report) + " — lower shared_data.max_bytes or make room")


def _du(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            st = f.lstat()
        except OSError:
            continue
        total += st.st_blocks * 512
    return total


def _map_size(max_bytes: int) -> int:
    page = 4096
    size = MAP_FACTOR * max_bytes + MAP_HEADROOM
    return (size + page - 1) // page * page


def _counter_slots(max_bytes: int) -> int:
    """The first slots of _COUNTERS_FILE: one per metric sequence number the budget allows (a
    definition costs at least ENTRY_OVERHEAD and is never dropped; sequence numbers start at 1)."""
    return max_bytes // ENTRY_OVERHEAD + 1


#: a histogram's slots: its sum, then one per bucket (the last one past every bound)
_HIST_SLOTS = 1 + len(HISTOGRAM_BOUNDS) + 1
#: what a histogram's definition costs in the budget beyond a counter's: its slots
_HIST_COST = _HIST_SLOTS * 8


def _max_histograms(max_bytes: int) -> int:
    """Histograms a store may define: 16,400 for the default 16 MiB. As many as the budget
    allows (ENTRY_OVERHEAD + _HIST_COST each) would make their slots 0.72 × max_bytes."""
    return max_bytes // 1024 + 16


def _all_slots(max_bytes: int) -> int:
    """Slots of _COUNTERS_FILE: the sequence numbers', then the histograms'."""
    return _counter_slots(max_bytes) + _max_histograms(max_bytes) * _HIST_SLOTS


def _add_sample(counters, slot: int, v: int) -> None:
    """A histogram's sample: its sum, and the count of its bucket."""
    counters.add(slot, v)
    counters.add(slot + 1 + bisect_left(HISTOGRAM_BOUNDS, v), 1)


def _run_uncommitted(_txn, fn, args):
    fn(*args)
    return False, OK


class _MappedCounters:
    """py-lmdb's side of ``abi._lmdb.counters``: the same file, the same u64 slots in native
    byte order. Its read-modify-write is not atomic by itself: ShmStore runs ``add`` and
    ``store`` inside an LMDB write transaction, whose writer lock every process takes."""

    _SLOT = struct.Struct("=Q")

    def __init__(self, path: str, count: int):
        with Path(path).open("r+b") as f:
            self._map = mmap.mmap(f.fileno(), count * 8)
        self.count = count

    def _at(self, i: int) -> int:
        if not 0 <= i < self.count:
            raise IndexError("counter index out of range")
        return i * 8

    def add(self, i: int, delta: int) -> None:
        at = self._at(i)
        self._SLOT.pack_into(self._map, at, (self._SLOT.unpack_from(self._map, at)[0] + delta) & _U64)

    def store(self, i: int, value: int) -> None:
        self._SLOT.pack_into(self._map, self._at(i), value & _U64)

    def load(self, i: int) -> int:
        return self._SLOT.unpack_from(self._map, self._at(i))[0]


def _data_key(key: bytes) -> tuple[bytes, bool]:
    if len(key) < LONG_KEY:
        return b"k" + key, False
    return b"h" + hashlib.blake2b(key, digest_size=32).digest(), True


def _hashed_body(key: bytes, value: bytes) -> bytes:
    """What follows the header of a hashed key's data record: the full key, then the value."""
    return _KLEN.pack(len(key)) + key + value


def _record_cost(dk: bytes, raw: bytes) -> int:
    """Accounted bytes (key + value + ENTRY_OVERHEAD) of the data record ``raw`` under ``dk``."""
    if dk[:1] == b"h":                             # header, key length, key, value
        return len(raw) - _HREC_LEN + ENTRY_OVERHEAD
    return len(dk) - 1 + len(raw) - _REC_LEN + ENTRY_OVERHEAD


def _record_key(raw: bytes) -> bytes:
    """The full key stored in a hashed key's record."""
    return raw[_HREC_LEN:_HREC_LEN + _KLEN.unpack_from(raw, _REC_LEN)[0]]


def _hashed_value(raw: bytes) -> bytes:
    return raw[_HREC_LEN + _KLEN.unpack_from(raw, _REC_LEN)[0]:]


class _Env:
    """One LMDB environment per path per process, shared by every ShmStore object on that path
    (LMDB forbids opening the same environment twice in one process)."""

    def __init__(self, path: Path, map_size: int):
        self.path = path
        self.map_size = map_size
        self.lock = threading.Lock()
        self.env = None
        self.native = False                    # env is abi._lmdb's: get_entry / set_entry
        self.refs = 0
        self.pack = msgpack.Packer().pack      # reused; only called under self.lock
        self.counters = None                   # the metric values (_counters), opened lazily
        self.defined: set[int] = set()         # metric ids seen defined (never undefined)
        self.hist_slots: dict[int, int] = {}   # histogram id → its first slot (never moves)

    def ensure(self, create: bool = False):
        env = self.env
        if env is None:
            # create=False: a worker outliving a removed store must not silently recreate it
            env = binding.open(str(self.path), map_size=self.map_size, subdir=True, max_dbs=0,
                            max_readers=1024, max_spare_txns=1, sync=False, metasync=False,
                            writemap=True, readahead=False, meminit=False, lock=True,
                            create=create)
            # One (main) B-tree with key prefixes: a write touching two named databases
            # costs ~1 µs more (each sub-database root is a record in the main tree).
            # max_spare_txns=1: py-lmdb >= 2 defaults to 0, so every get() took a reader slot
            # under the lock file's mutex (a scan of the reader table) and gave it back; a
            # spare read transaction keeps its slot and is renewed on the next begin() — a
            # fresh snapshot each time, and reset (pins no pages) while unused. The fork
            # hooks close the environment, spare included, so a child never inherits it.
            self.env = env
            self.native = hasattr(env, "set_entry")
        return env

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


_envs: dict[str, _Env] = {}
_envs_lock = threading.Lock()
_open_stores: "weakref.WeakSet[ShmStore]" = weakref.WeakSet()


def _acquire_env(path: Path, map_size: int) -> _Env:
    key = os.path.realpath(path)
    with _envs_lock:
        e = _envs.get(key)
        if e is None:
            e = _envs[key] = _Env(path, map_size)
        e.refs += 1
        return e


def _release_env(e: _Env) -> None:
    with _envs_lock:
        e.refs -= 1
        if e.refs > 0:
            return
        _envs.pop(os.path.realpath(e.path), None)
    with e.lock:
        e.close()


def _before_fork() -> None:
    # LMDB: never use an environment across fork(), and never close the parent's in the child
    # (it would wipe the parent's reader slots). So close them all here; reopened lazily.
    _envs_lock.acquire()
    for e in list(_envs.values()):
        e.lock.acquire()
        e.close()


def _after_fork_parent() -> None:
    for e in list(_envs.values()):
        e.lock.release()
    _envs_lock.release()


def _after_fork_child() -> None:
    global _envs_lock
    _envs_lock = threading.Lock()
    for e in list(_envs.values()):
        e.lock = threading.Lock()
        e.env = None
    for s in list(_open_stores):
        s._forget_process_state()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_child,
                    after_in_parent=_after_fork_parent)


class ShmStore:
    """A SharedStore (see abi/shared_store.py) shared by every process that opens the same path.

    Construct with :meth:`create` (supervisor, once, before the workers start) or :meth:`open`
    (each worker). Methods are synchronous and cost a few microseconds (one LMDB transaction).
    """

    # ---------------------------------------------------------------- lifecycle
    def __init__(self, path: Path, max_bytes: int, map_size: int):
        self.path = path
        self.max_bytes = max_bytes
        self._map_size = map_size
        self._e = _acquire_env(path, map_size)
        self._pid = os.getpid()
        self._token = os.urandom(8)
        self._my_queues: set[int] = set()
        self._callbacks: list[Callable[[int], None]] = []
        self._wake_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer_fds: dict[bytes, int] = {}
        self._dead_tokens: set[bytes] = set()
        self._closed = False
        self.clock: Callable[[], int] = _MONOTONIC   # CLOCK_MONOTONIC: one clock machine-wide
        _open_stores.add(self)

    @classmethod
    def create(cls, path_or_name: str | os.PathLike, max_bytes: int,
               preallocate: bool = False) -> "ShmStore":
        """Create a fresh, empty store (wiping a stale one left by a crashed supervisor).

        Raises OSError(ENOSPC) if no candidate filesystem has room for the whole map.
        ``preallocate`` reserves it now (posix_fallocate), so another tmpfs user can never
        take the pages later; otherwise pages are allocated when first touched."""
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"shared_data.max_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
        for c in _candidates(path_or_name):
            if os.path.realpath(c) in _envs:
                raise RuntimeError(f"shared store {c} is open in this process; close it before create()")
        map_size = _map_size(max_bytes)
        counters_size = _all_slots(max_bytes) * 8
        path = _pick_location(path_or_name, map_size + counters_size)
        for c in _candidates(path_or_name):
            shutil.rmtree(c, ignore_errors=True)
        (path / "wake").mkdir(parents=True, exist_ok=True)
        with (path / _COUNTERS_FILE).open("wb") as f:
            f.truncate(counters_size)                  # zeros: every metric starts at 0
        store = cls(path, max_bytes, map_size)
        with store._lock:
            env = store._e.ensure(create=True)
            with env.begin(write=True) as txn:
                txn.put(_META, _dump_meta([0] * 7 + [_U64]))
        if preallocate:
            for name, size in (("data.mdb", map_size), (_COUNTERS_FILE, counters_size)):
                fd = os.open(path / name, os.O_RDWR)
                try:
                    os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
        cfg = path / _CONFIG_FILE
        tmp = path / (_CONFIG_FILE + ".tmp")
        tmp.write_bytes(_packb({"format": _FORMAT, "max_bytes": max_bytes, "map_size": map_size,
                                "creator_pid": os.getpid()}))
        os.replace(tmp, cfg)          # written last: open() only succeeds on a complete store
        return store

    @classmethod
    def open(cls, path_or_name: str | os.PathLike) -> "ShmStore":
        """Open a store created by :meth:`create` (typically in the supervisor)."""
        path = store_path(path_or_name)
        try:
            cfg = _unpackb((path / _CONFIG_FILE).read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"no shared store at {path} (create() it first)") from None
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"shared store at {path} has format {cfg.get('format')}, expected {_FORMAT}")
        store = cls(path, int(cfg["max_bytes"]), int(cfg["map_size"]))
        with store._lock:
            env = store._ensure_env()
            env.reader_check()        # clear reader slots of dead processes
        return store

    @staticmethod
    def remove(path_or_name: str | os.PathLike) -> None:
        """Delete the store's files (supervisor, on exit). Open mappings stay valid until closed."""
        for c in _candidates(path_or_name):
            shutil.rmtree(c, ignore_errors=True)

    @staticmethod
    def remove_stale() -> list[Path]:
        """Remove stores (bare-name locations) whose creating supervisor is dead — left behind by
        a supervisor killed with -9. Returns the removed paths."""
        removed = []
        for base in {c.parent for c in _candidates("x")}:
            for d in base.glob("wasmgate-*"):
                try:
                    cfg = _unpackb((d / _CONFIG_FILE).read_bytes())
                    pid = int(cfg["creator_pid"])
                except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
                    continue
                if not _pid_alive(pid) and os.path.realpath(d) not in _envs:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    def close(self) -> None:
        """Unregister this process from its queues, close the wake-up FIFO and the environment."""
        if self._closed:
            return
        try:
            if self._my_queues and self._pid == os.getpid():
                self._write(self._unregister_txn)
        except Exception:                                      # pragma: no cover - best effort
            log.exception("shared store: unregistering queues failed")
        self._closed = True
        self.detach()
        for fd in self._writer_fds.values():
            _close_quietly(fd)
        self._writer_fds.clear()
        if self._wake_fd is not None:
            _close_quietly(self._wake_fd)
            self._wake_fd = None
            try:
                os.unlink(self._wake_path(self._token))
            except OSError:
                pass
        _open_stores.discard(self)
        _release_env(self._e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # fork ---------------------------------------------------------------
    def _forget_process_state(self) -> None:
        """In a forked child: nothing of the parent's process identity may be reused."""
        self._pid = os.getpid()
        self._token = os.urandom(8)
        self._my_queues = set()
        self._callbacks = []
        if self._wake_fd is not None:
            _close_quietly(self._wake_fd)      # the parent's FIFO: not ours to read
            self._wake_fd = None
        self._loop = None
        for fd in self._writer_fds.values():
            _close_quietly(fd)
        self._writer_fds = {}

    # env ----------------------------------------------------------------
    @property
    def _lock(self) -> threading.Lock:
        return self._e.lock          # per path per process; replaced in a forked child

    def _ensure_env(self):
        if self._closed:
            raise RuntimeError("shared store is closed")
        return self._e.ensure()

    def check_readers(self) -> int:
        """Clear reader slots left by dead processes; returns how many were cleared."""
        with self._lock:
            env = self._ensure_env()
            return env.reader_check()

    def _write(self, fn, *args):
        """Run fn(txn, *args) in one write transaction. fn returns (commit, result)."""
        e = self._e
        with e.lock:
            env = e.env
            if env is None or self._closed:      # (checked inline: this is the request path)
                env = self._ensure_env()
            try:
                return _in_write_txn(env, fn, args)
            except _MAP_FULL:
                env.reader_check()               # dead readers' snapshots pin pages: once more
                try:
                    return _in_write_txn(env, fn, args)
                except _MAP_FULL:
                    pass
        log.warning("shared store %s: LMDB map full (%d bytes)", self.path, self._map_size)
        return _FULL

    @staticmethod
    def _meta(txn) -> list[int]:
        return _load_meta(txn.get(_META))

    # ---------------------------------------------------------------- shared data (§5.4)
    def get(self, key: bytes) -> tuple[bytes, int] | None:
        # The request path (a rate limiter's get + set per request). abi/_lmdb.c's get_entry is
        # all of it for a short key, without the lock: it never releases the GIL, so no other
        # thread can close the environment under it (a closed one answers NotImplemented).
        e = self._e
        env = e.env
        if e.native and env is not None and not self._closed:
            clock = self.clock
            r = env.get_entry(key, None if clock is _MONOTONIC else clock())
            if r is not NotImplemented:
                return r
        # No context manager, the environment checked inline; a read transaction reuses one
        # reader slot (max_spare_txns).
        dk, hashed = _data_key(key)
        with e.lock:
            env = e.env
            if env is None or self._closed:
                env = self._ensure_env()
            if e.native:
                raw = env.get_record(dk)
            else:
                txn = env.begin()
                try:
                    raw = txn.get(dk)
                finally:
                    txn.abort()
        if raw is None:
            return None
        cas, due = _REC.unpack_from(raw)
        if due and due <= self.clock():
            return None                            # expired: absent (reclaimed by a later write)
        if hashed:
            if _record_key(raw) != key:
                return None
            return _hashed_value(raw), cas
        return raw[_REC_LEN:], cas

    def set(self, key: bytes, value: bytes, cas: int, ttl_ns: int | None = None) -> int:
        """§5.4 set; ``ttl_ns`` makes the entry expiring (abi/shared_store.py docstring)."""
        # Everything that does not depend on the stored state is computed before the write lock
        # is taken: every other worker's writes wait while it is held. abi/_lmdb.c's set_entry
        # is all of it for a short key when nothing has to be evicted (else SLOW, nothing
        # written, and the Python below decides).
        e = self._e
        if e.native and not self._closed:
            clock = self.clock
            with e.lock:
                env = e.env
                if env is not None:
                    r = env.set_entry(key, value, cas, ttl_ns,
                                      None if clock is _MONOTONIC else clock(),
                                      self.max_bytes, ENTRY_OVERHEAD, REAP_PER_WRITE)
                    if r >= 0:
                        return r
        key = bytes(key)
        value = bytes(value)
        dk, hashed = _data_key(key)
        now = self.clock()
        if ttl_ns is None:
            due = 0
        else:
            ttl_ns &= _U64
            due = deadline(now, ttl_ns) if ttl_ns else -1
        r = self._write(self._set_txn, dk, key, value, hashed, cas & _U32, now, due)
        return STATUS_FULL if r is _FULL else r

    def _set_txn(self, txn, dk, key, value, hashed, cas, now, due):
        """``due``: the new deadline, 0 = never expires, -1 = expires at once."""
        meta = _load_meta(txn.get(_META))
        raw = txn.get(dk)
        if raw is None:
            prev_due = prev_cost = 0
        else:                                      # what occupies dk (maybe expired)
            prev_cas, prev_due = _REC.unpack_from(raw)
            live = (not prev_due or prev_due > now) and (not hashed or _record_key(raw) == key)
            if live and cas and cas != prev_cas:   # (hashed and another key: a hash collision)
                return False, CAS_MISMATCH
            prev_cost = _record_cost(dk, raw)
            if due < 0:                            # expires at once: a CAS-guarded delete
                self._drop_txn(txn, meta, dk, raw, now, counted=not live)
                txn.put(_META, _dump_meta(meta))
                return True, OK
        if due < 0:
            return False, OK
        new_cost = entry_cost(key, value)
        if new_cost > prev_cost and not self._fits(txn, meta, new_cost - prev_cost, now, dk,
                                                   prev_cost if prev_due else 0):
            return False, STATUS_FULL
        if prev_due:
            txn.delete(_EXP + _u64(prev_due) + dk)
            meta[4] -= prev_cost
            if not meta[4]:
                meta[7] = _U64                     # the deadline index is empty
        fresh = meta[0] % (MISSING_CAS - 1) + 1    # global counter 1..2^32-2: skips 0 and MISSING_CAS
        meta[0] = fresh
        meta[1] += new_cost - prev_cost
        txn.put(dk, _REC.pack(fresh, due) + (_hashed_body(key, value) if hashed else value))
        if due:
            txn.put(_EXP + _u64(due) + dk, b"")
            meta[4] += new_cost
            if due < meta[7]:
                meta[7] = due
            if meta[7] <= now:                     # something may be due: reap a little
                self._reap(txn, meta, now)
        txn.put(_META, _dump_meta(meta))
        return True, OK

    def _fits(self, txn, meta, grow: int, now: int, keep: bytes = b"", keep_cost: int = 0) -> bool:
        """Make room for ``grow`` more bytes by dropping expiring entries (earliest deadline
        first, never the data key ``keep``), if they can free enough; else change nothing."""
        need = meta[1] + grow - self.max_bytes
        if need <= 0:
            return True
        if need > meta[4] - keep_cost:
            return False
        start = _EXP
        cur = txn.cursor()
        while need > 0:
            cur.set_range(start)                   # re-seek: each drop changed the tree
            ik = cur.key()
            dk = ik[9:]
            if dk == keep:
                start = ik + b"\0"
                continue
            need -= self._drop_txn(txn, meta, dk, txn.get(dk), now)
        return True

    def _reap(self, txn, meta, now: int) -> None:
        """Drop up to REAP_PER_WRITE expired entries; meta[7] (a lower bound of the earliest
        deadline in the index, so a write can skip this when nothing is due) becomes exact."""
        cur = txn.cursor()
        dropped = 0
        while cur.set_range(_EXP):
            ik = cur.key()
            if ik[:1] != _EXP:
                break
            due = _U64S.unpack_from(ik, 1)[0]
            if due > now or dropped == REAP_PER_WRITE:
                meta[7] = due
                return
            self._drop_txn(txn, meta, ik[9:], txn.get(ik[9:]), now)
            dropped += 1
        meta[7] = _U64                             # the deadline index is empty

    @staticmethod
    def _drop_txn(txn, meta, dk: bytes, raw: bytes, now: int, counted: bool = True) -> int:
        """Delete one data record (and its deadline record); returns the bytes freed.
        ``counted``: an expiry or eviction (not a delete the filter asked for)."""
        cost = _record_cost(dk, raw)
        txn.delete(dk)
        meta[1] -= cost
        due = _REC.unpack_from(raw)[1]
        if due:
            txn.delete(_EXP + _u64(due) + dk)
            meta[4] -= cost
            if not meta[4]:
                meta[7] = _U64                     # the deadline index is empty
            if counted:
                meta[5 if due <= now else 6] += 1
        return cost

    def delete(self, key: bytes) -> int:
        """Remove a key entirely (not part of the ABI; Rust's 'remove' writes an empty value)."""
        r = self._write(self._delete_txn, bytes(key))
        return STATUS_FULL if r is _FULL else r

    def _delete_txn(self, txn, key):
        dk, hashed = _data_key(key)
        raw = txn.get(dk)
        if raw is None or (hashed and _record_key(raw) != key):
            return False, NOT_FOUND
        meta = self._meta(txn)
        self._drop_txn(txn, meta, dk, raw, 0, counted=False)
        txn.put(_META, _dump_meta(meta))
        return True, OK

    # ---------------------------------------------------------------- shared queues (§5.5)
    def register_queue(self, name: str) -> int:
        self._ensure_wake_fifo()
        qid = self._write(self._register_txn, name)
        if qid is _FULL:
            raise StoreFull(f"shared store full: cannot register queue {name!r}")
        self._my_queues.add(qid)
        return qid

    def _register_txn(self, txn, name):
        nkey = _QNAME + name.encode()
        raw = txn.get(nkey)
        if raw is None:
            meta = self._meta(txn)
            meta[2] = meta[2] % _U32 + 1
            qid = meta[2]
            meta[1] += len(nkey) - 2 + ENTRY_OVERHEAD  # the definition is accounted, not refused:
            txn.put(_META, _dump_meta(meta))  # Rust accepts only OK from register
            txn.put(nkey, self._e.pack(qid))
            rec = [name, 0, 0, {}]
        else:
            qid = _unpackb(raw)
            rec = _unpackb(txn.get(_QREC + _qkey(qid)))
        regs = rec[3]
        for tok, (pid, _pending) in list(regs.items()):
            if tok != self._token and not _pid_alive(pid):
                del regs[tok]
        if self._token not in regs:
            regs[self._token] = [os.getpid(), 0]
        txn.put(_QREC + _qkey(qid), self._e.pack(rec))
        return True, qid

    def _unregister_txn(self, txn):
        for qid in self._my_queues:
            ik = _QREC + _qkey(qid)
            raw = txn.get(ik)
            if raw is None:
                continue
            rec = _unpackb(raw)
            if rec[3].pop(self._token, None) is not None:
                txn.put(ik, self._e.pack(rec))
        return True, None

    def resolve_queue(self, name: str) -> int | None:
        with self._lock:
            env = self._ensure_env()
            with env.begin() as txn:
                raw = txn.get(_QNAME + name.encode())
        return None if raw is None else _unpackb(raw)

    def enqueue(self, qid: int, data: bytes) -> int:
        r = self._write(self._enqueue_txn, qid & _U32, bytes(data))
        if r is _FULL:
            return STATUS_FULL
        status, wake = r
        for tok in wake:
            self._wake(tok)
        return status

    def _enqueue_txn(self, txn, qid, data):
        ik = _QREC + _qkey(qid)
        raw = txn.get(ik)
        if raw is None:
            return False, (NOT_FOUND, ())
        meta = self._meta(txn)
        if not self._fits(txn, meta, len(data) + ENTRY_OVERHEAD, 0):
            return False, (STATUS_FULL, ())
        used = meta[1] + len(data) + ENTRY_OVERHEAD
        rec = _unpackb(raw)
        tail = rec[2]
        txn.put(_ITEM + _itemkey(qid, tail), data)
        rec[2] = tail + 1
        wake = []
        regs = rec[3]
        for tok in list(regs):
            if tok in self._dead_tokens:
                del regs[tok]
                continue
            ent = regs[tok]
            ent[1] += 1
            if ent[1] == 1:
                wake.append(tok)
        meta[1] = used
        txn.put(ik, self._e.pack(rec))
        txn.put(_META, _dump_meta(meta))
        return True, (OK, wake)

    def dequeue(self, qid: int) -> bytes | int:
        r = self._write(self._dequeue_txn, qid & _U32)
        return INTERNAL_FAILURE if r is _FULL else r

    def _dequeue_txn(self, txn, qid):
        ik = _QREC + _qkey(qid)
        raw = txn.get(ik)
        if raw is None:
            return False, NOT_FOUND
        rec = _unpackb(raw)
        head = rec[1]
        if head >= rec[2]:
            return False, EMPTY
        k = _ITEM + _itemkey(qid, head)
        item = txn.pop(k)
        rec[1] = head + 1
        meta = self._meta(txn)
        meta[1] -= len(item) + ENTRY_OVERHEAD
        txn.put(ik, self._e.pack(rec))
        txn.put(_META, _dump_meta(meta))
        return True, bytes(item)

    # notification ------------------------------------------------------
    def _wake_path(self, token: bytes) -> str:
        return os.path.join(self.path, "wake", token.hex())

    def _ensure_wake_fifo(self) -> int:
        if self._wake_fd is None:
            p = self._wake_path(self._token)
            try:
                os.mkfifo(p, 0o600)
            except FileExistsError:
                pass
            # O_RDWR: we never see EOF/POLLHUP when writers come and go, and when this process
            # dies the last reader is gone, so writers get EPIPE and drop us.
            self._wake_fd = os.open(p, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return self._wake_fd

    def _wake(self, token: bytes) -> None:
        fd = self._writer_fds.get(token)
        try:
            if fd is None:
                fd = os.open(self._wake_path(token), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._writer_fds[token] = fd
            os.write(fd, b"\x01")
        except BlockingIOError:
            pass                          # pipe full: the reader has wake-ups pending anyway
        except OSError as e:              # ENOENT / ENXIO (no reader) / EPIPE: registrant is dead
            if e.errno not in (errno.ENOENT, errno.ENXIO, errno.EPIPE):
                log.warning("shared store: waking queue registrant failed: %s", e)
            old = self._writer_fds.pop(token, None)
            if old is not None:
                _close_quietly(old)
            self._dead_tokens.add(token)
            if e.errno in (errno.ENXIO, errno.EPIPE):   # FIFOs are opened before registering,
                try:                                    # so "no reader" means the owner died
                    os.unlink(self._wake_path(token))
                except OSError:
                    pass

    def fileno(self) -> int:
        """The fd to watch for queue-ready notifications of this process."""
        return self._ensure_wake_fifo()

    def on_enqueue(self, callback: Callable[[int], None]) -> None:
        """callback(qid) once per item enqueued (by any process) to a queue this process registered.

        Delivered from the event loop: if called inside a running loop, the wake-up fd is attached
        to it now; otherwise call :meth:`attach` later (or :meth:`dispatch_notifications` yourself).
        """
        self._callbacks.append(callback)
        self._ensure_wake_fifo()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.attach(loop)

    def remove_enqueue_callback(self, callback: Callable[[int], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        self.detach()
        loop.add_reader(self._ensure_wake_fifo(), self.dispatch_notifications)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None and self._wake_fd is not None:
            try:
                self._loop.remove_reader(self._wake_fd)
            except Exception:                                   # loop already closed
                pass
        self._loop = None

    def dispatch_notifications(self) -> int:
        """Drain the wake-up fd, take this process's pending counts, call the callbacks.
        Returns the number of callback invocations (per callback)."""
        fd = self._ensure_wake_fifo()
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        if not self._my_queues:
            return 0
        due = self._write(self._take_pending_txn)
        if due is _FULL:
            return 0
        n = 0
        for qid, count in due:
            for _ in range(count):
                n += 1
                for cb in list(self._callbacks):
                    try:
                        cb(qid)
                    except Exception:
                        log.exception("shared store: on_enqueue callback failed for queue %d", qid)
        return n

    def _take_pending_txn(self, txn):
        due = []
        for qid in sorted(self._my_queues):
            ik = _QREC + _qkey(qid)
            raw = txn.get(ik)
            if raw is None:
                continue
            rec = _unpackb(raw)
            ent = rec[3].get(self._token)
            if ent is None:
                ent = rec[3][self._token] = [os.getpid(), 0]
            elif ent[1]:
                due.append((qid, ent[1]))
                ent[1] = 0
            else:
                continue
            txn.put(ik, self._e.pack(rec))
        return bool(due), due

    # ---------------------------------------------------------------- metrics (§5.6)
    # A definition is an LMDB record (name → id, id → [kind, name], a histogram's with its
    # first slot). A counter's or gauge's value is slot ``id >> 2`` of _COUNTERS_FILE, changed by
    # an atomic add or store (abi/_lmdb.c's counters) without a write transaction: a rate
    # limiter counts every request, and each transaction takes the writer lock every worker's
    # writes wait on. A histogram's sample is two atomic adds to its slots, for the same reason
    # (a filter timing every request).
    def define_metric(self, kind: int, name: str) -> int:
        """Same (kind, name) → same id in every process. Raises ValueError for kind > 2."""
        if kind not in KIND_NAMES:
            raise ValueError(f"bad metric kind {kind}")
        with self._lock:
            env = self._ensure_env()
            with env.begin() as txn:
                raw = txn.get(_MNAME + bytes([kind]) + name.encode())
        if raw is not None:
            return _unpackb(raw)
        mid = self._write(self._define_txn, kind, name)
        if mid is _FULL or mid is None:
            raise StoreFull(f"shared store full: cannot define metric {name!r}")
        return mid

    def _define_txn(self, txn, kind, name):
        nkey = _MNAME + bytes([kind]) + name.encode()
        raw = txn.get(nkey)
        if raw is not None:
            return False, _unpackb(raw)
        meta = self._meta(txn)
        cost = len(nkey) - 3 + ENTRY_OVERHEAD + (_HIST_COST if kind == HISTOGRAM else 0)
        if not self._fits(txn, meta, cost, 0):
            return False, None
        meta[3] += 1
        mid = (meta[3] << 2) | kind
        if mid > _U32 or meta[3] >= _counter_slots(self.max_bytes):
            return False, None
        meta[1] += cost
        rec = [kind, name]
        if kind == HISTOGRAM:
            raw = txn.get(_MHISTS)
            n = 0 if raw is None else _unpackb(raw)
            if n >= _max_histograms(self.max_bytes):
                return False, None
            rec.append(_counter_slots(self.max_bytes) + n * _HIST_SLOTS)
            txn.put(_MHISTS, self._e.pack(n + 1))
        txn.put(nkey, self._e.pack(mid))
        txn.put(_MREC + _qkey(mid), self._e.pack(rec))
        txn.put(_META, _dump_meta(meta))
        return True, mid

    def increment_metric(self, metric_id: int, delta: int) -> int:
        kind = metric_id & 3
        if kind == HISTOGRAM:
            return BAD_ARGUMENT
        if kind not in (COUNTER, GAUGE):
            return NOT_FOUND
        mid = metric_id & _U32
        if not self._is_defined(mid):
            return NOT_FOUND
        if kind == COUNTER and delta <= 0:
            return BAD_ARGUMENT
        return self._count(mid >> 2, delta, True)

    def record_metric(self, metric_id: int, value: int) -> int:
        kind = metric_id & 3
        mid = metric_id & _U32
        if kind == 3 or not self._is_defined(mid):
            return NOT_FOUND
        if kind == HISTOGRAM:
            return self._atomically(_add_sample, self._counters(), self._e.hist_slots[mid],
                                    value & _U64)
        return self._count(mid >> 2, value, kind == COUNTER)   # a counter adds, a gauge is set

    def _is_defined(self, mid: int) -> bool:
        """Whether metric ``mid`` has a definition; remembered (with a histogram's first slot,
        in hist_slots), as definitions are never dropped and slots never move."""
        if mid in self._e.defined:
            return True
        with self._lock:
            env = self._ensure_env()
            with env.begin() as txn:
                raw = txn.get(_MREC + _qkey(mid))
        if raw is None:
            return False
        if mid & 3 == HISTOGRAM:
            self._e.hist_slots[mid] = _unpackb(raw)[2]
        self._e.defined.add(mid)
        return True

    def _counters(self):
        """The metric values' slots, mapped once per process and path (raises once closed)."""
        counters = None if self._closed else self._e.counters
        if counters is not None:
            return counters
        e = self._e
        with e.lock:
            self._ensure_env()                 # (sets e.native for the binding in use)
            if e.counters is None:
                where, count = str(self.path / _COUNTERS_FILE), _all_slots(self.max_bytes)
                e.counters = (_c_lmdb.counters(where, count) if e.native
                              else _MappedCounters(where, count))
            return e.counters

    def _count(self, slot: int, value: int, add: bool) -> int:
        counters = self._counters()
        fn = counters.add if add else counters.store
        if self._e.native:          # _atomically's first branch, inlined: a rate limiter
            fn(slot, value)         # increments on every request (bench/README.md)
            return OK
        return self._atomically(fn, slot, value)

    def _atomically(self, fn, *args) -> int:
        """fn(*args) on the metric slots, atomic among the workers: at once on the C binding
        (its add and store are atomic instructions: no lock to take); on py-lmdb inside a
        write transaction, whose writer lock every process takes (LMDB writes nothing)."""
        if self._e.native:
            fn(*args)
            return OK
        r = self._write(_run_uncommitted, fn, args)
        return INTERNAL_FAILURE if r is _FULL else r

    def get_metric(self, metric_id: int) -> tuple[int, int]:
        kind = metric_id & 3
        mid = metric_id & _U32
        if kind == 3 or not self._is_defined(mid):
            return NOT_FOUND, 0
        if kind == HISTOGRAM:
            return BAD_ARGUMENT, 0
        return OK, self._counters().load(mid >> 2)     # the ABI value is a u64 (a negative gauge wraps)

    def metric_values(self) -> list[StoreMetric]:
        """Every metric, gateway-wide (one value shared by all workers), ordered by definition."""
        out: list = []
        with self._lock:
            env = self._ensure_env()
            with env.begin(buffers=False) as txn:
                cur = txn.cursor()
                if cur.set_range(_MREC):
                    for k, raw in cur:
                        if not k.startswith(_MREC):
                            break
                        out.append((_QKEY.unpack_from(k, len(_MREC))[0], _unpackb(raw)))
        counters = self._counters() if out else None
        values = []
        for mid, rec in out:
            kind = rec[0]
            if kind == HISTOGRAM:
                slot = rec[2]
                cum, buckets = 0, []
                for i, le in enumerate(HISTOGRAM_BOUNDS + (float("inf"),), slot + 1):
                    cum += counters.load(i)
                    buckets.append((le, cum))
                values.append(StoreMetric(rec[1], "histogram", cum, buckets, counters.load(slot), cum))
            else:
                v = counters.load(mid >> 2)
                if kind == GAUGE and v >> 63:
                    v -= 1 << 64                   # a gauge is an i64
                values.append(StoreMetric(rec[1], KIND_NAMES[kind], v))
        return values

    def metric_samples(self) -> list[MetricSample]:
        """For /metrics, in the same shape as abi.shared_store.LocalStore.metric_samples():
        ``wasmcustom_<name>``; histograms as ``_bucket{le}`` (cumulative), ``_sum``, ``_count``."""
        out = usage_samples(self.usage())
        for m in self.metric_values():
            prom = _prometheus_name("wasmcustom_" + m.name)
            help_ = f"wasm metric {m.name}"
            if m.kind != "histogram":
                out.append(MetricSample(prom, m.kind, float(m.value), help=help_))
                continue
            for le, cum in m.buckets:
                out.append(MetricSample(prom + "_bucket", "histogram", float(cum),
                                        {"le": "+Inf" if le == float("inf") else repr(float(le))},
                                        help=help_))
            out.append(MetricSample(prom + "_sum", "histogram", float(m.sum), help=help_))
            out.append(MetricSample(prom + "_count", "histogram", float(m.count), help=help_))
        return out

    # ---------------------------------------------------------------- introspection
    def usage(self) -> dict:
        """{'used': accounted bytes, 'max_bytes': budget, 'map_size': LMDB map size, ...}."""
        with self._lock:
            env = self._ensure_env()
            with env.begin() as txn:
                meta = self._meta(txn)
            info = env.info()
        return {"used": meta[1], "max_bytes": self.max_bytes, "map_size": self._map_size,
                "lmdb_last_pgno": info["last_pgno"], "cas_counter": meta[0],
                "evictable": meta[4], "expired": meta[5], "evicted": meta[6]}

    def verify(self) -> list[str]:
        """Full consistency check (tests, debugging): recompute accounted bytes from the records.
        Returns a list of problems (empty = consistent)."""
        problems: list[str] = []
        used = evictable = 0
        deadlines: dict[bytes, int] = {}          # data key → deadline, from the data records
        indexed: dict[bytes, int] = {}            # the same, from the deadline index
        items: dict[int, list[int]] = {}
        qnames: dict[int, bytes] = {}
        qrecs: dict[int, list] = {}
        with self._lock:
            env = self._ensure_env()
            with env.begin(buffers=False) as txn:
                meta = self._meta(txn)
                for k, raw in txn.cursor():
                    p1, p2 = k[:1], k[:2]
                    if p1 in (b"k", b"h"):
                        hashed = p1 == b"h"
                        if (len(raw) < (_HREC_LEN if hashed else _REC_LEN)
                                or not 0 < _REC.unpack_from(raw)[0] < MISSING_CAS
                                or (hashed and _data_key(_record_key(raw))[0] != k)):
                            problems.append(f"bad data record {k!r}")
                            continue
                        used += _record_cost(k, raw)
                        due = _REC.unpack_from(raw)[1]
                        if due:
                            deadlines[k] = due
                            evictable += _record_cost(k, raw)
                    elif p1 == _EXP:
                        if indexed.setdefault(k[9:], _U64S.unpack_from(k, 1)[0]) != _U64S.unpack_from(k, 1)[0]:
                            problems.append(f"two deadlines for {k[9:]!r}")
                    elif p1 == _ITEM:
                        qid, seq = struct.unpack(">IQ", k[1:])
                        items.setdefault(qid, []).append(seq)
                        used += len(raw) + ENTRY_OVERHEAD
                    elif p2 in (_QNAME, _MNAME):
                        used += len(k) - (2 if p2 == _QNAME else 3) + ENTRY_OVERHEAD
                        if p2 == _QNAME:
                            qnames[_unpackb(raw)] = k[2:]
                    elif p2 == _QREC:
                        qrecs[struct.unpack(">I", k[2:])[0]] = _unpackb(raw)
                    elif k not in (_META,) and p2 != _MREC:
                        problems.append(f"unknown key {k!r}")
        if set(qnames) != set(qrecs):
            problems.append(f"queue names {sorted(qnames)} != queue records {sorted(qrecs)}")
        for qid, rec in qrecs.items():
            _name, head, tail, _regs = rec
            seqs = items.pop(qid, [])
            if seqs != list(range(head, tail)):
                problems.append(f"queue {qid}: items {seqs[:5]}… != range({head},{tail})")
        if items:
            problems.append(f"items of unknown queues {sorted(items)}")
        if used != meta[1]:
            problems.append(f"accounted bytes {meta[1]} != recomputed {used}")
        if deadlines != indexed:
            problems.append(f"deadline index {len(indexed)} records != {len(deadlines)} expiring entries")
        if evictable != meta[4]:
            problems.append(f"evictable bytes {meta[4]} != recomputed {evictable}")
        if meta[7] > min(indexed.values(), default=_U64):
            problems.append(f"reap hint {meta[7]} is past the earliest deadline {min(indexed.values())}")
        return problems


_FULL = object()      # sentinel: the LMDB map itself was full


def _in_write_txn(env, fn, args):
    """fn(txn, *args) in a write transaction: committed if fn says so, else (or if anything
    raises, MapFullError included) aborted."""
    txn = env.begin(write=True)
    try:
        commit, result = fn(txn, *args)
        if commit:
            txn.commit()
        else:
            txn.abort()
        return result
    except BaseException:
        txn.abort()
        raise


_PROM_BAD = re.compile(r"[^a-zA-Z0-9_:]")


def _prometheus_name(name: str) -> str:       # same rule as abi.shared_store.prometheus_name
    name = _PROM_BAD.sub("_", name)
    return name if not name[:1].isdigit() else "_" + name


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create(path_or_name: str | os.PathLike, max_bytes: int, preallocate: bool = False) -> ShmStore:
    return ShmStore.create(path_or_name, max_bytes, preallocate)


def open(path_or_name: str | os.PathLike) -> ShmStore:      # noqa: A001 - mirrors the brief
    return ShmStore.open(path_or_name)


def remove(path_or_name: str | os.PathLike) -> None:
    ShmStore.remove(path_or_name)


#: The supervisor puts ``str(store.path)`` here in each worker's environment.
ENV_VAR = "WASMGATE_SHARED_STORE"


def open_from_env(environ=os.environ) -> ShmStore | None:
    """In a worker: the gateway-wide store named by $WASMGATE_SHARED_STORE, or None (single
    process: use abi.shared_store.LocalStore)."""
    where = environ.get(ENV_VAR)
    return ShmStore.open(where) if where else None


# ---------------------------------------------------------------------- benchmark
def _bench(n: int = 20000) -> None:            # python -m abi.shared_store_shm
    import multiprocessing as mp
    import time

    name = f"bench-{os.getpid()}"
    s = create(name, 64 << 20)
    try:
        s.set(b"ctr", b"0", 0)
        qid = s.register_queue("bench")
        c = s.define_metric(COUNTER, "c")
        h = s.define_metric(HISTOGRAM, "h")

        def cas_inc():
            while True:
                v, cas = s.get(b"ctr")
                if s.set(b"ctr", str(int(v) + 1).encode(), cas) == OK:
                    return

        cases = [("get (hit, 16 B)", lambda i: s.get(b"ctr")),
                 ("get (miss)", lambda i: s.get(b"nope")),
                 ("set cas=0 (64 B)", lambda i: s.set(b"k%d" % (i & 1023), b"v" * 64, 0)),
                 ("CAS increment = get + set(cas)", lambda i: cas_inc()),
                 ("enqueue (64 B)", lambda i: s.enqueue(qid, b"q" * 64)),
                 ("dequeue (64 B)", lambda i: s.dequeue(qid)),
                 ("increment_metric counter", lambda i: s.increment_metric(c, 1)),
                 ("record_metric histogram", lambda i: s.record_metric(h, i & 1023)),
                 ("get_metric", lambda i: s.get_metric(c))]
        for label, fn in cases:
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            print(f"{label:34s} {(time.perf_counter() - t0) / n * 1e6:6.2f} µs/op")
        # expiring entries, side by side with the one-process LocalStore (same rules)
        from .shared_store import LocalStore
        for kind, st_ in (("shm", create(name + "-x", 1 << 20)), ("local", LocalStore(1 << 20))):
            for label, ttl in (("plain set, 1024 keys (64 B)", None), ("expiring set, 1024 keys", 10**12)):
                t0 = time.perf_counter()
                for i in range(n):
                    st_.set(b"x%d" % (i & 1023), b"v" * 64, 0, ttl)
                print(f"{kind:5s} {label:28s} {(time.perf_counter() - t0) / n * 1e6:6.2f} µs/op")
            i = 0
            while st_.usage()["evicted"] == 0:        # fill the budget with expiring entries
                st_.set(b"fill-%d" % i, b"v" * 16, 0, 10**12)
                i += 1
            t0 = time.perf_counter()
            for i in range(n):                        # budget full: each drops the oldest entry
                st_.set(b"fresh-%d" % i, b"v" * 16, 0, 10**12 + i)
            print(f"{kind:5s} {'fresh key, store full (evicts)':28s} {(time.perf_counter() - t0) / n * 1e6:6.2f} "
                  f"µs/op ({st_.usage()['evicted']} evicted)")
            if kind == "shm":
                st_.close()
                remove(name + "-x")
        t0 = time.perf_counter()
        k = s.dispatch_notifications()
        print(f"dispatch_notifications ({k} callbacks, none registered) "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")

        def worker(barrier, k):
            w = open(name)
            barrier.wait()
            for _ in range(k):
                while True:
                    v, cas = w.get(b"ctr")
                    if w.set(b"ctr", str(int(v) + 1).encode(), cas) == OK:
                        break
            w.close()

        ctx = mp.get_context("fork")
        for procs in (1, 2, 4):
            k = n // procs
            start = int(s.get(b"ctr")[0])
            barrier = ctx.Barrier(procs + 1)
            ps = [ctx.Process(target=worker, args=(barrier, k)) for _ in range(procs)]
            for p in ps:
                p.start()
            barrier.wait()
            t0 = time.perf_counter()
            for p in ps:
                p.join()
            dt = time.perf_counter() - t0
            total = int(s.get(b"ctr")[0]) - start
            print(f"{procs} process(es) x {k} CAS increments: {total} counted (expected {procs * k}), "
                  f"{total / dt:,.0f} increments/s gateway-wide")
        # cross-process queue-ready latency: another process enqueues its send time
        def producer(k):
            w = open(name)
            q = w.resolve_queue("bench")
            for _ in range(k):
                time.sleep(0.002)
                w.enqueue(q, struct.pack("<d", time.perf_counter()))
            w.close()

        async def consume(k):
            while s.dequeue(qid) != EMPTY:
                pass
            lat: list[float] = []
            done = asyncio.get_running_loop().create_future()

            def ready(q):
                item = s.dequeue(q)
                if isinstance(item, bytes):
                    lat.append(time.perf_counter() - struct.unpack("<d", item)[0])
                if len(lat) >= k and not done.done():
                    done.set_result(None)

            s.on_enqueue(ready)
            p = ctx.Process(target=producer, args=(k,))
            p.start()
            cpu0 = time.process_time()
            await asyncio.wait_for(done, 30)
            cpu = time.process_time() - cpu0
            p.join()
            s.remove_enqueue_callback(ready)
            s.detach()
            lat.sort()
            print(f"cross-process enqueue → on_enqueue callback (+dequeue), {k} items: "
                  f"median {lat[k // 2] * 1e6:.0f} µs, p99 {lat[k * 99 // 100] * 1e6:.0f} µs; "
                  f"consumer CPU {cpu / k * 1e6:.0f} µs per item")

        asyncio.run(consume(500))
    finally:
        s.close()
        remove(name)


if __name__ == "__main__":
    _bench()
