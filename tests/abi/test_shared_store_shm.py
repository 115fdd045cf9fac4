"""abi/shared_store_shm.py: one store shared by every worker process of the gateway.

Processes are real OS processes (multiprocessing fork context, and plain subprocesses for the
kill -9 tests, which open the store by name in a fresh interpreter).
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from abi import shared_store_shm as S  # noqa: E402

FORK = mp.get_context("fork")
#: every test on both LMDB bindings (abi/_lmdb.c and py-lmdb; tests/abi/conftest.py)
pytestmark = pytest.mark.usefixtures("lmdb_binding")


@pytest.fixture
def name():
    n = f"test-{uuid.uuid4().hex[:12]}"
    yield n
    S.remove(n)


@pytest.fixture
def store(name):
    s = S.create(name, 1 << 20)
    yield s
    s.close()


def _cas_increment(s: S.ShmStore, key: bytes) -> int:
    """The rate-limiter pattern: get → modify → set(cas) → retry. Returns retries used."""
    retries = 0
    for _ in range(100_000):
        cur = s.get(key)
        n, cas = (int(cur[0]), cur[1]) if cur else (0, 0)
        st_ = s.set(key, str(n + 1).encode(), cas)
        if st_ == S.OK:
            return retries
        assert st_ == S.CAS_MISMATCH, st_
        retries += 1
    raise AssertionError("CAS loop did not converge")


# ------------------------------------------------------------------ shared data: CAS (§5.4)

def test_cas_semantics(store):
    assert store.get(b"k") is None
    assert store.set(b"k", b"v1", 0) == S.OK
    v, cas1 = store.get(b"k")
    assert v == b"v1" and 0 < cas1 <= 0xFFFFFFFF
    # a stale cas is refused and changes nothing
    assert store.set(b"k", b"v2", cas1 + 1) == S.CAS_MISMATCH
    assert store.get(b"k") == (b"v1", cas1)
    # the current cas succeeds and yields a fresh one
    assert store.set(b"k", b"v2", cas1) == S.OK
    v, cas2 = store.get(b"k")
    assert v == b"v2" and cas2 != cas1 and cas2 != 0
    assert store.set(b"k", b"v3", cas1) == S.CAS_MISMATCH
    # cas 0 = unconditional
    assert store.set(b"k", b"v3", 0) == S.OK and store.get(b"k")[0] == b"v3"
    # cas != 0 on a missing key still succeeds (creates it)
    assert store.set(b"new", b"x", 12345) == S.OK
    assert store.get(b"new")[0] == b"x"
    # CAS values come from ONE global counter: every successful set gets a distinct one
    seen = {store.get(b"k")[1], store.get(b"new")[1]}
    for i in range(20):
        store.set(b"k%d" % (i % 3), b"", 0)
        seen.add(store.get(b"k%d" % (i % 3))[1])
    assert len(seen) == 22
    # empty value is a value (Rust's "remove" writes one), and empty keys work
    assert store.set(b"", b"", 0) == S.OK
    v, cas = store.get(b"")
    assert v == b"" and cas != 0
    assert store.verify() == []


def test_long_keys_are_distinct(store):
    a, b = b"x" * 1000 + b"a", b"x" * 1000 + b"b"
    assert store.set(a, b"A", 0) == S.OK and store.set(b, b"B", 0) == S.OK
    assert store.get(a)[0] == b"A" and store.get(b)[0] == b"B"
    assert store.get(b"x" * 1000 + b"c") is None
    assert store.set(a, b"A2", store.get(b)[1]) == S.CAS_MISMATCH
    assert store.verify() == []


def test_cas_counter_skips_zero_on_wrap(store):
    env = store._ensure_env()
    with env.begin(write=True) as txn:           # put the global counter at u32 max
        meta = S._load_meta(txn.get(S._META))
        meta[0] = 0xFFFFFFFD
        txn.put(S._META, S._dump_meta(meta))
    store.set(b"a", b"1", 0)
    assert store.get(b"a")[1] == 0xFFFFFFFE
    store.set(b"a", b"2", 0)
    assert store.get(b"a")[1] == 1               # wrapped, skipping MISSING_CAS and 0
    assert S.MISSING_CAS == 0xFFFFFFFF


def _worker_cas(name, key, k, q, barrier):
    s = S.open(name)
    barrier.wait(10)                         # all start together: real contention
    retries = sum(_cas_increment(s, key) for _ in range(k))
    q.put(retries)
    s.close()


@pytest.mark.parametrize("nproc", [2, 4])
def test_processes_cas_counter_is_exact(name, nproc):
    s = S.create(name, 1 << 20)
    s.set(b"before-fork", b"1", 0)               # the parent uses the store before forking ...
    # Seed the counter first, as a filter does in on_configure: a get() that finds no key
    # yields no cas, and set(cas=0) is unconditional (§5.4), so concurrent *creation* of a key
    # can lose increments in any proxy-wasm host; updates of an existing key cannot.
    s.set(b"hits", b"0", 0)
    k = 1000
    q = FORK.Queue()
    barrier = FORK.Barrier(nproc)
    procs = [FORK.Process(target=_worker_cas, args=(name, b"hits", k, q, barrier))
             for _ in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    retries = sum(q.get(timeout=5) for _ in procs)
    assert int(s.get(b"hits")[0]) == nproc * k   # exact: no lost update
    print(f"{nproc} procs x {k} CAS increments: {retries} CAS retries")
    assert s.get(b"before-fork")[0] == b"1"      # ... and after (fork-safe env handling)
    assert s.set(b"after-fork", b"2", 0) == S.OK
    assert s.verify() == []
    s.close()


def _worker_cas_unseeded(name, key, k, barrier):
    """The CAS loop with the opt-in MISSING_CAS protocol: a missing key reads as (b"", MISSING_CAS)."""
    s = S.open(name)
    barrier.wait(10)
    for _ in range(k):
        for _ in range(100_000):
            cur = s.get(key) or (b"", S.MISSING_CAS)
            n = int(cur[0]) if cur[0] else 0
            if s.set(key, str(n + 1).encode(), cur[1]) == S.OK:
                break
    s.close()


def test_threads_of_one_process_cas_counter_is_exact(store):
    """A filter's start sequence runs on a build thread while the event loop serves other
    filters: both use the same store object at once."""
    from abi_helpers import on_threads
    store.set(b"t", b"0", 0)
    n = 300
    on_threads(lambda: [_cas_increment(store, b"t") for _ in range(n)], 3)
    assert store.get(b"t")[0] == str(3 * n).encode()


def test_missing_cas_makes_concurrent_creation_exact(name):
    s = S.create(name, 1 << 20)
    nproc, k = 4, 300
    # 20 rounds, each on a fresh (missing) key: every process starts by creating it
    keys = [b"fresh-%d" % r for r in range(20)]
    for key in keys:
        barrier = FORK.Barrier(nproc)
        procs = [FORK.Process(target=_worker_cas_unseeded, args=(name, key, k // 10, barrier))
                 for _ in range(nproc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    assert [int(s.get(key)[0]) for key in keys] == [nproc * (k // 10)] * len(keys)
    # and set(MISSING_CAS) never overwrites an existing key
    assert s.set(keys[0], b"x", S.MISSING_CAS) == S.CAS_MISMATCH
    s.close()


def _ping_pong(name, key, rounds, mine, conn):
    """Lockstep with the other process: wait for its turn, read what it wrote, write on."""
    s = S.open(name)
    for n in range(mine, 2 * rounds, 2):
        assert conn.recv() == n                  # the other process has written n - 1
        v, cas = s.get(key)
        assert int(v) == n - 1, (n, v)           # not an older snapshot
        assert s.set(key, str(n).encode(), cas) == S.OK     # its cas is the current one
        conn.send(n + 1)
    s.close()


def test_a_write_is_seen_by_the_other_process_next_get(name):
    """The rate-limiter's cross-worker contract, one request at a time: the bucket one worker
    wrote is what the other worker's very next get() returns, with a cas its set() accepts.
    Read transactions are reused (max_spare_txns): each get must still see the latest commit."""
    s = S.create(name, 1 << 20)
    s.set(b"bucket", b"0", 0)
    a, b = FORK.Pipe()
    rounds = 300
    procs = [FORK.Process(target=_ping_pong, args=(name, b"bucket", rounds, 1, a)),
             FORK.Process(target=_ping_pong, args=(name, b"bucket", rounds, 2, b))]
    for p in procs:
        p.start()
    b.send(1)                                    # process 1 starts (it reads from a)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert s.get(b"bucket")[0] == str(2 * rounds - 1).encode()
    assert s.verify() == []
    s.close()


# ------------------------------------------------------------------ queues (§5.5)

def test_queue_fifo_and_statuses(store):
    assert store.resolve_queue("jobs") is None
    qid = store.register_queue("jobs")
    assert qid != 0
    assert store.register_queue("jobs") == qid              # re-opens
    assert store.resolve_queue("jobs") == qid
    other = store.register_queue("other")
    assert other not in (0, qid)
    items = [os.urandom(i % 50) + b"#%d" % i for i in range(200)]
    for it in items:
        assert store.enqueue(qid, it) == S.OK
    assert store.enqueue(other, b"o") == S.OK
    assert [store.dequeue(qid) for _ in items] == items
    assert store.dequeue(qid) == S.EMPTY
    assert store.dequeue(other) == b"o"
    unknown = max(qid, other) + 1000
    assert store.enqueue(unknown, b"x") == S.NOT_FOUND
    assert store.dequeue(unknown) == S.NOT_FOUND
    assert store.verify() == []


def _worker_enqueue(name, qname, n, started):
    s = S.open(name)
    qid = s.resolve_queue(qname)
    started.set()
    for i in range(n):
        assert s.enqueue(qid, b"item-%d" % i) == S.OK
    s.close()


async def test_cross_process_notification(name):
    s = S.create(name, 1 << 20)
    qid = s.register_queue("events")
    got: list[int] = []
    arrived = asyncio.Event()
    n = 50

    def ready(q):
        got.append(q)
        if len(got) >= n:
            arrived.set()

    s.on_enqueue(ready)                  # inside a running loop: attaches the wake-up fd
    # idle: waiting costs no CPU (no polling)
    cpu0 = time.process_time()
    await asyncio.sleep(0.3)
    idle_cpu = time.process_time() - cpu0
    assert idle_cpu < 0.05, idle_cpu

    started = FORK.Event()
    p = FORK.Process(target=_worker_enqueue, args=(name, "events", n, started))
    t0 = time.perf_counter()
    p.start()
    await asyncio.wait_for(arrived.wait(), 10)
    latency = time.perf_counter() - t0
    p.join(10)
    assert p.exitcode == 0
    await asyncio.sleep(0.05)
    assert got == [qid] * n              # one callback per item, none extra
    assert [s.dequeue(qid) for _ in range(n)] == [b"item-%d" % i for i in range(n)]
    assert s.dequeue(qid) == S.EMPTY
    print(f"{n} cross-process enqueues delivered within {latency * 1e3:.1f} ms of fork; "
          f"idle CPU over 0.3 s: {idle_cpu * 1e3:.2f} ms")
    s.close()


async def test_notification_latency_same_and_other_process(name):
    s = S.create(name, 1 << 20)
    qid = s.register_queue("lat")
    loop = asyncio.get_running_loop()
    fut: asyncio.Future | None = None

    def ready(q):
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    s.on_enqueue(ready)
    lat = []
    for i in range(20):
        fut = loop.create_future()
        t0 = time.perf_counter()
        assert s.enqueue(qid, b"x") == S.OK
        lat.append(await asyncio.wait_for(fut, 5) - t0)
        assert s.dequeue(qid) == b"x"
    lat.sort()
    print(f"same-process enqueue → on_enqueue callback: median {lat[10] * 1e6:.0f} µs")
    assert lat[10] < 0.05
    s.close()


def test_dead_registrant_is_dropped(name):
    s = S.create(name, 1 << 20)
    ready = FORK.Event()

    def register_and_die():
        w = S.open(name)
        w.register_queue("shared")
        ready.set()
        time.sleep(30)

    p = FORK.Process(target=register_and_die)
    p.start()
    assert ready.wait(10)
    qid = s.resolve_queue("shared")
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert s.enqueue(qid, b"a") == S.OK     # the dead registrant's FIFO has no reader: no error
    assert s.enqueue(qid, b"b") == S.OK     # and it has been dropped from the registrants
    env = s._ensure_env()
    with env.begin() as txn:
        regs = msgpack.unpackb(txn.get(S._QREC + qid.to_bytes(4, "big")))[3]
    assert regs == {}
    assert list((s.path / "wake").iterdir()) == []          # its FIFO was removed
    assert s.dequeue(qid) == b"a" and s.dequeue(qid) == b"b"
    s.close()


# ------------------------------------------------------------------ metrics (§5.6)

def test_metric_statuses(store):
    c = store.define_metric(S.COUNTER, "reqs")
    g = store.define_metric(S.GAUGE, "inflight")
    h = store.define_metric(S.HISTOGRAM, "latency")
    assert (c % 4, g % 4, h % 4) == (0, 1, 2) and 0 not in (c, g, h)
    assert store.define_metric(S.COUNTER, "reqs") == c       # same name → same stat
    with pytest.raises(ValueError):
        store.define_metric(3, "bad")
    assert store.increment_metric(c, 0) == S.BAD_ARGUMENT
    assert store.increment_metric(c, -1) == S.BAD_ARGUMENT
    assert store.increment_metric(c, 5) == S.OK
    assert store.record_metric(c, 2) == S.OK                 # record on a counter adds
    assert store.get_metric(c) == (S.OK, 7)
    assert store.increment_metric(g, -3) == S.OK
    assert store.get_metric(g) == (S.OK, (1 << 64) - 3)        # u64 on the ABI
    assert store.record_metric(g, 10) == S.OK                # record on a gauge sets
    assert store.increment_metric(g, 1) == S.OK
    assert store.get_metric(g) == (S.OK, 11)
    assert store.increment_metric(h, 1) == S.BAD_ARGUMENT
    assert store.record_metric(h, 7) == S.OK
    assert store.get_metric(h)[0] == S.BAD_ARGUMENT
    unknown = c + 4000
    assert store.increment_metric(unknown, 1) == S.NOT_FOUND
    assert store.record_metric(unknown + 1, 1) == S.NOT_FOUND
    assert store.get_metric(unknown)[0] == S.NOT_FOUND
    assert store.increment_metric(c | 3, 1) == S.NOT_FOUND


def _run_all(procs, timeout_s: float) -> None:
    """Start every process, then wait for each (bounded): each must exit cleanly."""
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
        assert p.exitcode == 0


def _worker_metrics(name, k, seed):
    s = S.open(name)
    c = s.define_metric(S.COUNTER, "requests")
    g = s.define_metric(S.GAUGE, "balance")
    h = s.define_metric(S.HISTOGRAM, "size")
    for i in range(k):
        assert s.increment_metric(c, 1) == S.OK
        assert s.increment_metric(g, seed) == S.OK
        assert s.record_metric(h, (i * seed) % 100) == S.OK
    s.close()


def test_metrics_summed_across_processes(name):
    s = S.create(name, 1 << 20)
    k, seeds = 300, [1, 2, 3]
    _run_all([FORK.Process(target=_worker_metrics, args=(name, k, sd)) for sd in seeds], 30)
    by_name = {m.name: m for m in s.metric_values()}
    assert set(by_name) == {"requests", "balance", "size"}
    assert (by_name["requests"].kind, by_name["requests"].value) == ("counter", len(seeds) * k)
    assert by_name["balance"].value == sum(sd * k for sd in seeds)
    h = by_name["size"]
    samples = [(i * sd) % 100 for sd in seeds for i in range(k)]
    assert h.kind == "histogram" and h.count == len(samples) and h.sum == sum(samples)
    assert h.buckets[-1] == (float("inf"), len(samples))
    for le, cum in h.buckets:
        assert cum == sum(1 for x in samples if x <= le)
    # the /metrics shape (same as abi.shared_store.LocalStore): one sum for the gateway
    prom = {(m.name, m.labels.get("le")): m for m in s.metric_samples()}
    assert prom[("wasmcustom_requests", None)].value == len(seeds) * k
    assert prom[("wasmcustom_requests", None)].kind == "counter"
    assert prom[("wasmcustom_balance", None)].kind == "gauge"
    assert prom[("wasmcustom_size_count", None)].value == len(samples)
    assert prom[("wasmcustom_size_sum", None)].value == sum(samples)
    assert prom[("wasmcustom_size_bucket", "+Inf")].value == len(samples)
    assert prom[("wasmcustom_size_bucket", "25.0")].value == sum(1 for x in samples if x <= 25)
    # every process got the same ids
    assert s.define_metric(S.COUNTER, "requests") == s.define_metric(S.COUNTER, "requests")
    assert s.get_metric(s.define_metric(S.COUNTER, "requests")) == (S.OK, len(seeds) * k)
    s.close()


def _worker_counting(name, k, start):
    s = S.open(name)
    c = s.define_metric(S.COUNTER, "hits")
    g = s.define_metric(S.GAUGE, "level")
    h = s.define_metric(S.HISTOGRAM, "latency")
    start.wait(30)
    for i in range(k):
        s.increment_metric(c, 1)
        s.increment_metric(g, -1)
        s.record_metric(c, 2)              # a record on a counter adds
        s.record_metric(h, i % 7)          # buckets 0.5, 1, 5 and 10
    s.close()


def test_counters_lose_no_increment_when_processes_race(name):
    """Three processes increment the same counter and gauge and record into the same histogram
    at once, in tight loops started together: every update lands (an unlocked
    read-modify-write loses some on two cores)."""
    s = S.create(name, 1 << 20)
    k, n = 20_000, 3
    start = FORK.Barrier(n)
    _run_all([FORK.Process(target=_worker_counting, args=(name, k, start)) for _ in range(n)], 60)
    by_name = {m.name: m for m in s.metric_values()}
    assert by_name["hits"].value == 3 * k * n
    assert (by_name["level"].kind, by_name["level"].value) == ("gauge", -k * n)   # an i64
    assert s.get_metric(s.define_metric(S.GAUGE, "level")) == (S.OK, (1 << 64) - k * n)
    samples = [i % 7 for i in range(k)] * n
    h = by_name["latency"]
    assert (h.count, h.sum) == (k * n, sum(samples))
    assert h.buckets == [(le, sum(1 for x in samples if x <= le))
                         for le in S.HISTOGRAM_BOUNDS + (float("inf"),)]
    s.close()


@pytest.mark.parametrize("max_bytes", [S.MIN_MAX_BYTES, 1 << 16])     # the budget, the cap ends it
def test_histograms_defined_to_the_limit_keep_their_own_slots(name, max_bytes):
    """Each histogram's slots (a sum, a count per bucket) are its own: defining as many as the
    store allows, then one sample each, gives each exactly its sample. The next definition
    is a clean StoreFull, not a slot past the file's end."""
    s = S.create(name, max_bytes)
    ids = []
    with pytest.raises(S.StoreFull):
        for i in range(1000):
            ids.append(s.define_metric(S.HISTOGRAM, f"h{i}"))
    cap = S._max_histograms(max_bytes)
    assert (10 <= len(ids) < cap) if max_bytes == S.MIN_MAX_BYTES else len(ids) == cap
    for i, h in enumerate(ids):
        assert s.record_metric(h, i * 1000) == S.OK
    got = {m.name: m for m in s.metric_values()}
    for i in range(len(ids)):
        m = got[f"h{i}"]
        assert (m.count, m.sum) == (1, i * 1000)
        assert [n for _, n in m.buckets] == [int(i * 1000 <= le) for le in S.HISTOGRAM_BOUNDS] + [1]
    s.close()


def _hold_the_writer_lock(name, held, release):
    s = S.open(name)
    with s._lock:
        txn = s._ensure_env().begin(write=True)
    held.set()
    release.wait(30)
    txn.abort()
    s.close()


def test_an_increment_never_waits_for_another_workers_write(name):
    """A counter is an atomic add in shared memory, not an LMDB write: while another process
    holds the store's writer lock, a count still lands at once on the C binding. py-lmdb's
    fallback does its read-modify-write under that lock, so there the count lands once the
    lock is let go — and lands whole either way."""
    s = S.create(name, 1 << 20)
    c = s.define_metric(S.COUNTER, "requests")
    g = s.define_metric(S.GAUGE, "inflight")
    h = s.define_metric(S.HISTOGRAM, "latency")
    held, release = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_hold_the_writer_lock, args=(name, held, release))
    p.start()
    try:
        assert held.wait(30)
        done = threading.Event()

        def count():
            assert s.increment_metric(c, 5) == S.OK
            assert s.record_metric(g, 7) == S.OK
            assert s.record_metric(h, 300) == S.OK
            done.set()

        t = threading.Thread(target=count, daemon=True)
        t.start()
        if S.binding is S._c_lmdb:
            assert done.wait(10), "an increment waited for the LMDB writer lock"
        release.set()
        assert done.wait(30)
        assert s.get_metric(c) == (S.OK, 5) and s.get_metric(g) == (S.OK, 7)
        latency = {m.name: m for m in s.metric_values()}["latency"]
        assert (latency.count, latency.sum) == (1, 300)
        assert [n for le, n in latency.buckets if le in (250, 500)] == [0, 1]
    finally:
        release.set()
        p.join(30)
    s.close()


# ------------------------------------------------------------------ size limit

def test_full_store_clean_status_and_recovery(name):
    s = S.create(name, 8192)
    stored = {}
    status = S.OK
    for i in range(1000):
        status = s.set(b"key-%d" % i, b"v" * 100, 0)
        if status != S.OK:
            break
        stored[b"key-%d" % i] = b"v" * 100
    assert status == S.STATUS_FULL
    assert 0 < len(stored) < 1000
    assert s.usage()["used"] <= 8192
    # nothing written by the refused set, everything else intact
    assert s.get(b"key-%d" % len(stored)) is None
    assert all(s.get(k)[0] == v for k, v in stored.items())
    qid = s.register_queue("q")
    assert s.enqueue(qid, b"x" * 200) == S.STATUS_FULL
    assert s.dequeue(qid) == S.EMPTY
    # growing an existing value is refused; shrinking it is allowed
    k0 = next(iter(stored))
    cas = s.get(k0)[1]
    assert s.set(k0, b"v" * 1000, cas) == S.STATUS_FULL
    assert s.get(k0) == (stored[k0], cas)
    assert s.set(k0, b"", cas) == S.OK
    assert s.verify() == []
    # delete some: room again
    for k in list(stored)[:10]:
        assert s.delete(k) == S.OK
    assert s.set(b"fresh", b"v" * 100, 0) == S.OK
    assert s.enqueue(qid, b"x" * 200) == S.OK
    assert s.dequeue(qid) == b"x" * 200
    assert s.verify() == []
    s.close()


def test_lmdb_map_full_is_a_clean_status(name, monkeypatch):
    # Force the physical LMDB map to be smaller than the logical budget: the backstop path.
    # (With the default sizing, MAP_FACTOR x budget + headroom, this is never reached: a
    # physically full LMDB map cannot even delete, since deletes are copy-on-write too.)
    monkeypatch.setattr(S, "MAP_FACTOR", 0)
    monkeypatch.setattr(S, "MAP_HEADROOM", 256 * 1024)
    s = S.create(name, 64 * 1024 * 1024)
    values = {}
    n, status = 0, S.OK
    for n in range(10_000):
        v = os.urandom(1000)
        status = s.set(b"k%d" % n, v, 0)
        if status != S.OK:
            break
        values[b"k%d" % n] = v
    assert status == S.STATUS_FULL and n > 10                 # clean status, no exception
    qid = s.register_queue("q") if s.resolve_queue("q") is None else s.resolve_queue("q")
    # The set that failed needed a leaf split; a 5000-byte item takes overflow pages instead, so
    # whether the first one still fits depends on the page layout: a few more certainly do not.
    statuses = [s.enqueue(qid, b"x" * 5000) for _ in range(8)]
    assert set(statuses) <= {S.OK, S.STATUS_FULL} and statuses[-1] == S.STATUS_FULL
    assert s.get(b"k%d" % n) is None                          # the refused write left nothing
    assert all(s.get(k)[0] == v for k, v in values.items())   # no corruption
    assert s.verify() == []
    s.close()


def test_budget_keeps_lmdb_map_from_filling(name):
    """Worst-case value sizes for LMDB page usage, filled to the logical budget repeatedly:
    the physical map never fills (the budget always answers first) and deletes always work."""
    budget = 256 * 1024
    s = S.create(name, budget)
    for size in (0, 1, 100, 1000, 2100, 4200, 40_000):
        keys = []
        for i in range(100_000):
            k = b"%d-%d" % (size, i)
            status = s.set(k, b"v" * size, 0)
            if status != S.OK:
                assert status == S.STATUS_FULL
                break
            keys.append(k)
        assert s.usage()["used"] > budget - size - 200 - S.ENTRY_OVERHEAD
        for k in keys:
            assert s.delete(k) == S.OK
        assert s.usage()["used"] == 0
    assert s.verify() == []
    s.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["set", "cas", "del", "enq", "deq"]),
                              st.integers(0, 5), st.binary(max_size=700)), max_size=60))
def test_model_based_budget(ops):
    """Random operations against a dict/deque model with the same byte budget."""
    from collections import deque
    name = f"test-{uuid.uuid4().hex[:12]}"
    budget = 4096
    s = S.create(name, budget)
    try:
        qid = s.register_queue("q")
        used = len(b"q") + S.ENTRY_OVERHEAD
        data: dict[bytes, bytes] = {}
        q: deque[bytes] = deque()
        cost = lambda k, v: len(k) + len(v) + S.ENTRY_OVERHEAD  # noqa: E731
        for op, ki, val in ops:
            key = b"k%d" % ki
            if op in ("set", "cas"):
                cur = s.get(key)
                assert (cur[0] if cur else None) == data.get(key)
                old = cost(key, data[key]) if key in data else 0
                want = S.STATUS_FULL if cost(key, val) > old and used - old + cost(key, val) > budget else S.OK
                assert s.set(key, val, cur[1] if (cur and op == "cas") else 0) == want
                if want == S.OK:
                    used += cost(key, val) - old
                    data[key] = val
            elif op == "del":
                assert s.delete(key) == (S.OK if key in data else S.NOT_FOUND)
                if key in data:
                    used -= cost(key, data.pop(key))
            elif op == "enq":
                want = S.STATUS_FULL if used + len(val) + S.ENTRY_OVERHEAD > budget else S.OK
                assert s.enqueue(qid, val) == want
                if want == S.OK:
                    q.append(val)
                    used += len(val) + S.ENTRY_OVERHEAD
            else:
                got = s.dequeue(qid)
                if q:
                    v = q.popleft()
                    assert got == v
                    used -= len(v) + S.ENTRY_OVERHEAD
                else:
                    assert got == S.EMPTY
            assert s.usage()["used"] == used
        assert s.verify() == []
    finally:
        s.close()
        S.remove(name)


# ------------------------------------------------------------------ same behaviour as LocalStore

@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["get", "set", "set_cas", "set_stale", "enq", "deq",
                                               "incr", "rec", "getm"]),
                              st.integers(0, 3), st.integers(-3, 300)), max_size=50))
def test_same_results_as_local_store(ops):
    """Differential test against the in-process backend (abi/shared_store.py), budget not hit."""
    local_mod = pytest.importorskip("abi.shared_store")
    local = local_mod.LocalStore(max_bytes=1 << 20)
    name = f"test-{uuid.uuid4().hex[:12]}"
    shm = S.create(name, 1 << 20)
    try:
        stores = (local, shm)
        stale = [{}, {}]
        qids = [[st_.register_queue(f"q{i}") for i in range(2)] for st_ in stores]
        mids = [[st_.define_metric(kind, f"m{kind}") for kind in (0, 1, 2)] for st_ in stores]
        for op, i, n in ops:
            key, val = b"key%d" % i, b"v" * max(n, 0)
            res = []
            for j, st_ in enumerate(stores):
                if op == "get":
                    r = st_.get(key)
                    res.append(r and r[0])
                elif op in ("set", "set_cas", "set_stale"):
                    cur = st_.get(key)
                    if op == "set_stale" and key in stale[j]:
                        cas = stale[j][key]
                    else:
                        cas = cur[1] if (cur and op != "set") else 0
                    if cur:
                        stale[j][key] = cur[1]
                    res.append(int(st_.set(key, val, cas)))
                elif op == "enq":
                    res.append(int(st_.enqueue(qids[j][i % 2], val)))
                elif op == "deq":
                    r = st_.dequeue(qids[j][i % 2])
                    res.append(r if isinstance(r, bytes) else int(r))
                elif op == "incr":
                    res.append(int(st_.increment_metric(mids[j][i % 3], n)))
                elif op == "rec":
                    res.append(int(st_.record_metric(mids[j][i % 3], abs(n))))
                else:
                    r = st_.get_metric(mids[j][i % 3])
                    res.append((int(r[0]), r[1]))
            assert res[0] == res[1], (op, i, n, res)
        key_of = lambda m: (m.name, tuple(sorted(m.labels.items())))  # noqa: E731
        # (the wasmgate_shared_data_* usage differs: only ShmStore budgets queues and metrics)
        a = sorted((key_of(m), m.kind, m.value) for m in local.metric_samples() if m.name.startswith("wasmcustom_"))
        b = sorted((key_of(m), m.kind, m.value) for m in shm.metric_samples() if m.name.startswith("wasmcustom_"))
        assert a == b
    finally:
        shm.close()
        S.remove(name)


# ------------------------------------------------------------------ kill -9 robustness

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _ledger_increment(s: S.ShmStore, wid: str) -> None:
    """CAS-update one record whose invariant is total == sum(per-writer counts)."""
    for _ in range(100_000):
        cur = s.get(b"ledger")
        if cur:
            total, counts = msgpack.unpackb(cur[0])
            cas = cur[1]
        else:
            total, counts, cas = 0, {}, 0
        counts[wid] = counts.get(wid, 0) + 1
        if s.set(b"ledger", msgpack.packb([total + 1, counts]), cas) == S.OK:
            return
    raise AssertionError("no progress")


def _writer_main(name: str, wid: str, n: int) -> None:
    """Subprocess body: a burst of mixed writes (ledger CAS, queue, metric, churned keys)."""
    s = S.open(name)
    qid = s.register_queue("log")
    c = s.define_metric(S.COUNTER, "ops")
    print("ready", flush=True)
    for i in range(n):
        _ledger_increment(s, wid)
        s.enqueue(qid, msgpack.packb([wid, i]))
        s.increment_metric(c, 1)
        s.set(b"churn-%d" % (i % 50), os.urandom(i % 700), 0)
        if i % 3 == 0:
            s.dequeue(qid)
    print("done", flush=True)
    s.close()


def _hold_write_lock_main(name: str) -> None:
    s = S.open(name)
    env = s._ensure_env()
    txn = env.begin(write=True)
    txn.put(S._META, b"garbage that must never become visible")
    print("holding", flush=True)
    time.sleep(60)


def test_killed_lock_holder_does_not_block(name):
    s = S.create(name, 1 << 20)
    s.set(b"a", b"1", 0)
    p = _spawn("hold", name)
    try:
        assert p.stdout.readline().strip() == "holding"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        p.kill()
    t0 = time.perf_counter()
    assert s.set(b"a", b"2", s.get(b"a")[1]) == S.OK          # robust mutex: no deadlock
    assert time.perf_counter() - t0 < 1.0
    assert s.get(b"a")[0] == b"2" and s.verify() == []
    s.close()


def test_kill_9_mid_burst_keeps_store_consistent(name):
    s = S.create(name, 4 << 20)
    s.set(b"ledger", msgpack.packb([0, {}]), 0)             # seeded (see the CAS counter test)
    k = 1500
    survivor = _spawn("write", name, "survivor", str(k))
    victims = []
    try:
        assert survivor.stdout.readline().strip() == "ready"
        for r in range(3):                                   # three victims, killed mid-burst
            v = _spawn("write", name, f"victim{r}", "1000000")
            victims.append(v)
            assert v.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:               # let it do some work first
                cur = s.get(b"ledger")
                if cur and msgpack.unpackb(cur[0])[1].get(f"victim{r}", 0) >= 100:
                    break
                time.sleep(0.005)
            v.send_signal(signal.SIGKILL)
            v.wait(10)
        assert survivor.stdout.readline().strip() == "done"
        assert survivor.wait(30) == 0
    finally:
        for p in [survivor, *victims]:
            p.kill()
    s.check_readers()
    assert s.verify() == []
    total, counts = msgpack.unpackb(s.get(b"ledger")[0])
    assert total == sum(counts.values())                    # no torn or lost update
    assert counts["survivor"] == k
    assert all(counts[f"victim{r}"] >= 100 for r in range(3))
    ops = {m.name: m.value for m in s.metric_values()}["ops"]
    assert total - 3 <= ops <= total                         # each victim may die between the two ops
    # queue: FIFO per writer, every item well-formed
    qid = s.resolve_queue("log")
    last: dict[str, int] = {}
    for _ in range(10 * k):
        item = s.dequeue(qid)
        if item == S.EMPTY:
            break
        wid, i = msgpack.unpackb(item)
        assert i > last.get(wid, -1)
        last[wid] = i
    assert last.get("survivor") == k - 1
    # and it keeps working
    for _ in range(100):
        _ledger_increment(s, "parent")
    total2, counts2 = msgpack.unpackb(s.get(b"ledger")[0])
    assert total2 == total + 100 and counts2["parent"] == 100
    assert s.verify() == []
    s.close()


def test_inherited_store_object_is_usable_after_fork(name):
    """A worker forked from a supervisor holding an open store may use the inherited object;
    the parent's own use before, during and after the fork is unaffected (LMDB forbids sharing
    an environment across fork; the module's fork hooks reopen per process)."""
    s = S.create(name, 1 << 20)
    s.set(b"a", b"0", 0)
    qid = s.register_queue("parent-q")
    for _ in range(3):
        s.get(b"a")                                  # leaves py-lmdb's spare read txn around
    result = FORK.Queue()

    def child():
        try:
            for _ in range(100):                     # a CAS loop: the other child may write between
                v, cas = s.get(b"a")
                if s.set(b"a", b"child", cas) == S.OK:
                    break
            else:
                raise AssertionError("100 CAS mismatches in a row")
            cq = s.register_queue("child-q")
            assert cq != qid and s.enqueue(qid, b"from-child") == S.OK
            result.put("ok")
        except Exception as e:                       # pragma: no cover - reported below
            result.put(repr(e))

    procs = [FORK.Process(target=child) for _ in range(2)]
    for p in procs:
        p.start()
        s.get(b"a")                                  # parent keeps reading while children run
    for p in procs:
        p.join(10)
    assert [result.get(timeout=5) for _ in procs] == ["ok", "ok"]
    assert s.get(b"a")[0] == b"child"
    assert s.dequeue(qid) == b"from-child" and s.dequeue(qid) == b"from-child"
    # the children's notifications went to the parent's FIFO (it registered "parent-q")
    got = []
    s.on_enqueue(got.append)
    assert s.dispatch_notifications() == 2 and got == [qid, qid]
    assert s.verify() == []
    s.close()


def test_repeated_kill_9_at_random_points(name):
    """Fork writers and SIGKILL each at a random moment of its write burst, 20 times."""
    import random
    s = S.create(name, 1 << 20)
    s.set(b"ledger", msgpack.packb([0, {}]), 0)
    qid = s.register_queue("log")
    rng = random.Random(6)
    for r in range(20):
        pid = os.fork()
        if pid == 0:                                   # child: inherited store object
            try:
                for i in range(1_000_000):
                    _ledger_increment(s, f"w{r}")
                    s.enqueue(qid, msgpack.packb([f"w{r}", i]))
                    if i % 2:
                        s.dequeue(qid)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.001, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    s.check_readers()
    assert s.verify() == []
    total, counts = msgpack.unpackb(s.get(b"ledger")[0])
    assert total == sum(counts.values()) and total > 0
    for _ in range(50):
        _ledger_increment(s, "parent")
    assert msgpack.unpackb(s.get(b"ledger")[0])[0] == total + 50
    n = 0
    while s.dequeue(qid) != S.EMPTY and n < 10**6:
        n += 1
    assert s.verify() == [] and s.usage()["used"] == len(b"ledger") + len(s.get(b"ledger")[0]) \
        + 2 * S.ENTRY_OVERHEAD + len(b"log")
    s.close()


def test_notification_with_uvloop(name):
    uvloop = pytest.importorskip("uvloop")
    s = S.create(name, 1 << 20)
    qid = s.register_queue("u")

    async def main():
        got = asyncio.Event()
        s.on_enqueue(lambda q: got.set())
        p = FORK.Process(target=_worker_enqueue, args=(name, "u", 1, FORK.Event()))
        p.start()
        await asyncio.wait_for(got.wait(), 5)
        p.join(5)
        s.detach()
        return s.dequeue(qid)

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == b"item-0"
    finally:
        loop.close()
    s.close()


# ------------------------------------------------------------------ lifecycle

def test_open_requires_create_and_remove_cleans_up(name):
    with pytest.raises(FileNotFoundError):
        S.open(name)
    s = S.create(name, 1 << 16)
    w = S.open(s.path)                                       # by path as well as by name
    qid = w.register_queue("q")
    w.close()                                                # close() unregisters from queues
    env = s._ensure_env()
    with env.begin() as txn:
        assert msgpack.unpackb(txn.get(S._QREC + qid.to_bytes(4, "big")))[3] == {}
    assert s.enqueue(qid, b"x") == S.OK and s.dequeue(qid) == b"x"
    s.set(b"a", b"1", 0)
    s.close()
    s2 = S.open(name)                                        # data outlives any one process
    assert s2.get(b"a")[0] == b"1"
    s2.close()
    assert S.open_from_env({}) is None
    w = S.open_from_env({S.ENV_VAR: str(s2.path)})
    assert w.get(b"a")[0] == b"1"
    w.close()
    S.remove(name)
    assert not S.store_path(name).exists()
    with pytest.raises(ValueError):
        S.create(name, 10)


def test_no_room_for_the_map_fails_at_create_not_with_sigbus(name, monkeypatch, tmp_path):
    real_free = S._free_bytes
    monkeypatch.setattr(S, "_free_bytes",
                        lambda d: 1 << 20 if str(d) == "/dev/shm" else real_free(d))
    s = S.create(name, 1 << 20)                      # /dev/shm "too small": falls back to $TMPDIR
    try:
        if os.path.isdir("/dev/shm"):
            assert not str(s.path).startswith("/dev/shm")
        w = S.open(name)                             # a worker finds it by the bare name
        assert w.path == s.path
        s.set(b"a", b"1", 0)
        assert w.get(b"a")[0] == b"1"
        w.close()
    finally:
        s.close()
        S.remove(name)
    assert not s.path.exists()
    monkeypatch.setattr(S, "_free_bytes", lambda d: 1 << 20)
    with pytest.raises(OSError, match="shared_data.max_bytes"):
        S.create(tmp_path / "store", 1 << 20)


def test_preallocate_reserves_the_map(name):
    s = S.create(name, 1 << 20, preallocate=True)
    assert (s.path / "data.mdb").stat().st_blocks * 512 >= s.usage()["map_size"]
    assert s.set(b"a", b"1", 0) == S.OK and s.verify() == []
    s.close()


def test_remove_stale_store_of_dead_supervisor(name):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from abi import shared_store_shm as S; " \
           f"S.create({name!r}, 1 << 16).set(b'a', b'1', 0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)   # "supervisor" exits
    path = S.store_path(name)
    assert path.exists()
    mine = S.create(name + "-alive", 1 << 16)        # created by a live process: kept
    mine.close()
    removed = S.ShmStore.remove_stale()
    assert path in removed and not path.exists()
    assert S.store_path(name + "-alive").exists()
    S.remove(name + "-alive")


if __name__ == "__main__":                                  # subprocess entry points
    cmd, *rest = sys.argv[1:]
    if cmd == "write":
        _writer_main(rest[0], rest[1], int(rest[2]))
    elif cmd == "hold":
        _hold_write_lock_main(rest[0])
