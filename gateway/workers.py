"""Operations glue for `wasmgate run`: reload triggers, and what worker processes share.

Reload triggers, in one process: SIGHUP, POST /reload, and (``--watch``) a change to the config
file or a wasm file it references. With ``--workers N`` the supervisor owns the triggers that
are not HTTP: SIGHUP to it, and ``--watch``, become a SIGHUP to every worker. A POST /reload is
served by one worker: it reloads first (so it can answer with the errors), then sends SIGUSR1 to
the supervisor, which sends SIGHUP to every worker; the worker that already reloaded finds
nothing changed. The answer waits until every live worker publishes the same config fingerprint.

The ops store is a small LMDB store (abi.api shared store, separate from the filters' shared
data so gateway keys never eat the filters' budget or show up in their key space):

    ``w/<slot>``     msgpack snapshot of worker <slot>'s gauges, filter counters + reload state
                     (gateway/worker_metrics.py)
    ``supervisor``   ``{"restarts": n, "workers": N}``
    ``config``       ``{"text", "source"}``: the config last applied, so a restarted worker starts
                     on the current config even when the file on disk was since broken

Beside it, in the store's directory, ``counters-<slot>``: worker <slot>'s request counters
(gateway/counter_page.py), removed with the store.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgpack

from .config import Config, ConfigError, load_config, parse_config
from .counter_page import CounterPage, read_page
from .metrics import Counts
from .reload import ReloadResult, reload_gateway, state_of
from .watch import Watcher
from .worker_metrics import PUBLISH_INTERVAL_S, pid_alive, render, snapshot

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("wasmgate.workers")

# Budget of the ops store: a snapshot is ~100 bytes per (route, status) and per cluster, so
# 1 MiB per worker covers thousands of routes; tmpfs pages cost nothing until written.
OPS_STORE_BASE_BYTES = 4 * 1024 * 1024
OPS_STORE_PER_WORKER_BYTES = 1024 * 1024
BROADCAST_WAIT_S = 15.0           # a cold compile of several filters can take seconds
_SUPERVISOR = b"supervisor"
_CONFIG = b"config"


def _slot_key(slot: int) -> bytes:
    return b"w/%d" % slot


def _get(store: Any, key: bytes) -> Any:
    got = store.get(key)
    return msgpack.unpackb(got[0]) if got else None


def _put(store: Any, key: bytes, value: Any) -> None:
    status = store.set(key, msgpack.packb(value), 0)
    if status != 0:
        log.warning("ops store: writing %r failed (status %d); /metrics may be stale", key, status)


# -- worker side ----------------------------------------------------------------------------------

class WorkerOps:
    """One worker's link to its siblings: publishes its snapshot, sums theirs, asks for broadcasts."""

    def __init__(self, gw: "Gateway", store: Any, slot: int, count: int):
        self.gw = gw
        self.store = store
        self.slot = slot
        self.count = count
        # A worker restarted in this slot continues its dead predecessor's counters: the request
        # counters in the same file, the snapshot's counters by adding them to its own.
        self.inherited = _get(store, _slot_key(slot))
        gw.metrics.move_to(CounterPage(self._counters_path(slot)))
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.publish()
        self._task = asyncio.ensure_future(self._publish_loop())

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                self.publish()
            except Exception:
                log.exception("publishing worker metrics failed")

    def publish(self) -> None:
        _put(self.store, _slot_key(self.slot), snapshot(self.gw, self.inherited))

    def _counters_path(self, slot: int) -> Path:
        return Path(self.store.path) / f"counters-{slot}"

    def counts(self) -> Counts:
        """The request counters of every slot, summed (the dead workers' included)."""
        total = self.gw.metrics.counts()
        for i in range(self.count):
            if i != self.slot:
                total.add(Counts.from_page(read_page(self._counters_path(i))))
        return total

    def snapshots(self) -> list[dict[str, Any]]:
        own = snapshot(self.gw, self.inherited)
        _put(self.store, _slot_key(self.slot), own)
        others = (_get(self.store, _slot_key(i)) for i in range(self.count) if i != self.slot)
        return [own] + [s for s in others if s is not None]

    def render_metrics(self) -> str:
        sup = _get(self.store, _SUPERVISOR) or {}
        extra = {"wasmgate_worker_restarts_total": ("counter", sup.get("restarts", 0),
                                                    "Worker processes restarted by the supervisor after they died."),
                 "wasmgate_workers": ("gauge", sup.get("workers", self.count), "Worker processes configured.")}
        return render(self.gw, self.snapshots(), self.counts(), extra)

    def applied(self) -> None:
        """After an applied reload: publish it, and record the config text for restarted workers."""
        self.publish()
        config = self.gw.generation.config
        try:
            text = Path(config.source).read_text(encoding="utf-8")
        except OSError:
            return
        _put(self.store, _CONFIG, {"text": text, "source": str(config.source),
                                   "fingerprint": state_of(self.gw).fingerprint})

    async def broadcast(self, result: ReloadResult) -> tuple[bool, str]:
        """Have every other worker reload; wait until all live ones serve ``result.fingerprint``."""
        self.applied()
        try:
            os.kill(os.getppid(), signal.SIGUSR1)
        except OSError as e:
            return False, f"workers: could not reach the supervisor: {e}\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BROADCAST_WAIT_S
        while True:
            lagging = self._lagging(result.fingerprint)
            if not lagging or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if not lagging:
            return True, f"workers: all {self.count} on config {result.fingerprint}\n"
        lines = [f"workers: {len(lagging)} of {self.count} not on config {result.fingerprint} "
                 f"after {BROADCAST_WAIT_S:.0f}s:"]
        lines += [f"  worker {slot} (pid {snap['pid']}): config {snap['reload']['fingerprint']}"
                  + (f"; last reload refused: {'; '.join(snap['reload']['errors'])}"
                     if not snap["reload"]["last_ok"] else "")
                  for slot, snap in lagging]
        return False, "\n".join(lines) + "\n"

    def _lagging(self, fp: str) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for i in range(self.count):
            if i == self.slot:
                continue
            snap = _get(self.store, _slot_key(i))
            if snap is None or not pid_alive(snap["pid"]):
                continue             # starting or restarting: it starts on the current config
            if snap["reload"]["fingerprint"] != fp:
                out.append((i, snap))
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            self.publish()           # the last counts survive into a successor
        except Exception:
            pass


# The fingerprint of the stored config this worker started on (the file may differ by now).
_STARTED_FROM: dict[str, str] = {}


def stored_config(store_name: str) -> Config | None:
    """The config the workers last applied (a restarted worker starts on it), or None."""
    from abi.api import open_shared_store
    got = _get(open_shared_store(store_name), _CONFIG)
    if not got:
        return None
    source = Path(got["source"])
    try:
        config = parse_config(got["text"], str(source), source.resolve().parent)
        _STARTED_FROM["fingerprint"] = got.get("fingerprint", "")
        return config
    except ConfigError as e:
        log.error("stored config no longer valid (%s); using the file", "; ".join(e.errors))
        return None


async def install(gw: "Gateway", *, ops_store: str | None = None, slot: int = 0, count: int = 1,
                  watch_s: float | None = None) -> Callable[[], Awaitable[None]]:
    """Wire reload triggers (SIGHUP, --watch) and, in a worker, the ops store; returns a closer."""
    loop = asyncio.get_running_loop()
    ops: WorkerOps | None = None
    if ops_store is not None:
        from abi.api import open_shared_store
        ops = WorkerOps(gw, open_shared_store(ops_store), slot, count)
        gw.ops = ops
        gw.reload_broadcast = ops.broadcast
    st = state_of(gw)
    if ops is not None:
        st.fingerprint = _STARTED_FROM.get("fingerprint") or st.fingerprint
        ops.start()

    async def on_trigger(why: str) -> None:
        log.info("reload requested (%s)", why)
        result = await reload_gateway(gw, "watch" if why.startswith("--watch") else "signal")
        if ops is not None:
            ops.publish()
            if result.ok and result.changes:
                ops.applied()

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(on_trigger("SIGHUP")))
    watch_task = None
    if watch_s is not None:
        # Built now, not in the task: a change made right after start-up must count as a change.
        watcher = Watcher(Path(gw.generation.config.source))
        watch_task = asyncio.ensure_future(_watch(watcher, watch_s, on_trigger))

    async def close() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        if watch_task is not None:
            watch_task.cancel()
        if ops is not None:
            await ops.close()
    return close


async def _watch(watcher: Watcher, interval_s: float, trigger: Callable[[str], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        changed = await asyncio.to_thread(watcher.poll)
        if changed:
            await trigger(f"--watch: {changed} changed")


# -- supervisor side ----------------------------------------------------------------------------

class SupervisorOps:
    """The supervisor's share: the ops store, reload broadcast, restart count, --watch."""

    def __init__(self, config_path: str, workers: int, watch_s: float | None, config: Config):
        from abi.api import create_shared_store
        self.name = f"wasmgate-{os.getpid()}-ops"
        self.store = create_shared_store(self.name, OPS_STORE_BASE_BYTES + workers * OPS_STORE_PER_WORKER_BYTES)
        self.workers = workers
        self.restarts = 0
        self.reload_requested = False
        self.watcher = Watcher(Path(config_path)) if watch_s is not None else None
        self.watch_s = watch_s or 1.0
        self._next_watch = time.monotonic() + self.watch_s
        _put(self.store, _SUPERVISOR, {"restarts": 0, "workers": workers})
        try:
            text = Path(config_path).read_text(encoding="utf-8")
            from .reload import fingerprint, wasm_digests
            _put(self.store, _CONFIG, {"text": text, "source": str(Path(config_path).resolve()),
                                       "fingerprint": fingerprint(config, wasm_digests(config))})
        except OSError:
            pass

    def worker_args(self, slot: int) -> list[str]:
        return ["--ops-store", self.name, "--worker-slot", f"{slot}/{self.workers}"]

    def install_signals(self) -> None:
        def request(signum: int, _frame: Any) -> None:
            self.reload_requested = True
        signal.signal(signal.SIGHUP, request)      # an operator's reload
        signal.signal(signal.SIGUSR1, request)     # a worker that served POST /reload

    def tick(self, procs: list[Any]) -> None:
        """Called from the supervisor loop (~10/s): forward reloads, poll --watch."""
        if self.watcher is not None and time.monotonic() >= self._next_watch:
            self._next_watch = time.monotonic() + self.watch_s
            changed = self.watcher.poll()
            if changed:
                print(f"wasmgate: {changed} changed; reloading every worker", flush=True)
                self.reload_requested = True
        if not self.reload_requested:
            return
        self.reload_requested = False
        for w in procs:
            w.poll_ready()
            # Not ready yet = its SIGHUP handler may not be installed; it starts on the current config.
            if w.ready and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    def restarted(self, old_pid: int, rc: int, new_pid: int) -> None:
        self.restarts += 1
        log.warning("worker %d exited with %s; restarted as %d (%d restart(s) so far)",
                    old_pid, rc, new_pid, self.restarts)
        try:
            self.store.check_readers()       # free reader slots the dead worker held
        except Exception:
            pass
        _put(self.store, _SUPERVISOR, {"restarts": self.restarts, "workers": self.workers})

    def close(self) -> None:
        from abi.api import remove_shared_store
        remove_shared_store(self.name)


def current_config(path: str, ops_store: str | None) -> Config | None:
    """For a worker: the applied config from the ops store if any, else None (read the file)."""
    if ops_store is None:
        return None
    try:
        return stored_config(ops_store)
    except Exception as e:
        log.warning("reading the stored config failed (%s); using the file", e)
        return None


def load_for_watch(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError:
        return None
