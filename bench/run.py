"""`python -m bench`: every scenario in one run, a table, and bench/results/latest.json.

See bench/README.md for what each scenario is and how the numbers are taken.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

from bench import gateway_cfg as gcfg
from bench import rebuild_stall
from bench.nginx import start_nginx
from bench.procs import (Proc, free_port, http_get, install_signal_handlers, loadavg,
                         own_cpu_seconds, stop_all, system_busy_seconds, tree_cpu_seconds,
                         tree_pids, tree_wait_seconds, wait_ready)
from bench.h2load import run_h2load
from bench.tools import ROOT, ensure_tools, machine_info
from bench.wrk import WrkResult, run_wrk

SCENARIOS = ["baseline_aiohttp", "gateway_plain", "gateway_chain", "gateway_chain_traced", "gateway_chain_otlp",
             "gateway_chain_redis",
             "gateway_chain_2w", "nginx_proxy", "gateway_tls", "nginx_tls", "gateway_tls_handshake",
             "nginx_tls_handshake", "gateway_h2", "nginx_h2", "gateway_h2c", "nginx_h2c"]
# wrk sends "Connection: close" in these: every request is a new connection and a full handshake.
HANDSHAKE_SCENARIOS = {"gateway_tls_handshake": "gateway", "nginx_tls_handshake": "nginx"}
# HTTP/2 scenarios: h2load with this many streams in flight per connection (connections =
# --connections ÷ this, so as many requests are in flight as in the wrk scenarios).
H2_STREAMS = 16
EXTRAS = ["core_rounds", "worker_rounds", "chain_half_rate", "chain_redis_half_rate", "crossing", "chain_profile",
          "cold_start", "rebuild_stall"]
ALL = SCENARIOS + EXTRAS

TARGETS = [  # key, description, comparison, bar
    ("chain_cpu_vs_baseline", "gateway_chain CPU/req ÷ baseline_aiohttp CPU/req", "<=", 1.0),
    ("chain_cpu_vs_plain", "gateway_chain CPU/req ÷ gateway_plain CPU/req", "<=", 2.5),
    ("chain_2w_cpu_vs_chain", "gateway_chain_2w CPU/req ÷ gateway_chain CPU/req", "<=", 1.1),
    ("chain_2w_rps_vs_chain", "gateway_chain_2w rps ÷ gateway_chain rps", ">=", 1.6),
    ("chain_p99_at_half_peak_ms", "gateway_chain p99 at half its peak rate (ms)", "<=", 5.0),
    ("redis_cpu_added_us", "CPU/req backend: redis adds to the chain (µs, paired)", "<=", 30.0),
    ("redis_p99_added_at_half_peak_ms", "p99 backend: redis adds at half its peak (ms, paired)",
     "<=", 1.0),
    ("cold_start_5_filters_s", "cold start, 5 filters, warm module cache (s)", "<=", 1.0),
    ("chain_profile_us", "the three filters in process (µs/request, chain_profile)", "<=", 50.0),
    ("guest_call_us", "one guest callback that does nothing (µs)", "<=", 1.0),
    ("host_call_us", "one host call (µs)", "<=", 1.5),
    ("tls_cpu_vs_plain", "gateway_tls CPU/req ÷ gateway_plain CPU/req", "<=", 1.3),
    ("rebuild_other_route_p99_ms", "another route's p99 while a filter rebuilds, 1 s start (ms)",
     "<=", 50.0),
    ("trace_cpu_vs_logged", "chain_traced CPU/req ÷ chain + access log w/o trace (paired)", "<=", 1.05),
    ("otlp_cpu_vs_chain", "chain_otlp CPU/req ÷ gateway_chain (paired)", "<=", 1.15),
    ("plain_cpu_vs_nginx", "stretch: gateway_plain CPU/req ÷ nginx_proxy CPU/req", "<=", 2.5),
    ("paired_chain_cpu_vs_baseline", "the same, paired rounds: gateway_chain ÷ baseline_aiohttp", "<=", 1.0),
    ("paired_chain_cpu_vs_plain", "the same, paired rounds: gateway_chain ÷ gateway_plain", "<=", 2.5),
    ("paired_chain_2w_cpu_vs_chain", "the same, paired rounds: gateway_chain_2w ÷ gateway_chain", "<=", 1.1),
    ("paired_plain_cpu_vs_nginx", "stretch, paired rounds: gateway_plain ÷ nginx_proxy", "<=", 2.5),
]
# core_rounds: the four proxies of the headline ratios, side by side in interleaved rounds.
CORE_ROUNDS = 3
# worker_rounds: the chain with one worker on each core and with two workers, the same way.
WORKER_ROUNDS = 3
# The tracing scenarios: four gateway processes (the same chain) measured in interleaved rounds.
TRACE_VARIANTS = ("gateway_chain", "gateway_chain_untraced", "gateway_chain_logged", "gateway_chain_traced",
                  "gateway_chain_otlp")
TRACE_ROUNDS = 3


class Skip(Exception):
    """The scenario cannot run yet (missing component): reported, not a failure."""


class Failed(Exception):
    """The scenario ran and something is wrong: reported loudly, exit status 1."""


def log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def stopped_after(procs: "dict[str, tuple[Proc, str, dict | None]]") -> Iterator[None]:
    """The proxies of ``procs`` (filled inside the block) all stopped when it ends; a Failed
    raised inside carries their log tails."""
    try:
        yield
    except Failed as e:
        tails = "\n".join(f"--- {v}:\n{p.log_tail()}" for v, (p, _, _) in procs.items())
        raise Failed(f"{e}\n{tails}")
    finally:
        for proc, _, _ in procs.values():
            proc.stop()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="wasmgate-bench-"))
        self.pin = not args.no_pin
        self.proxy_cpus = "1" if self.pin else None          # single-process proxies
        self.proxy_cpus_2w = "0,1" if self.pin else None     # 2 workers: both cores
        self.load_cpus = "0" if self.pin else None           # wrk, paced client, upstream nginx
        self.scenarios: dict[str, dict] = {}
        self.details: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.notes: list[str] = []
        self.crossing: dict = {"guest_call_us": None, "host_call_us": None}
        self.chain_profile: dict | None = None    # bench.chain_profile.measure(), in process
        self.cold_start: dict | None = None
        self.half_rate: dict | None = None
        self.half_rate_redis: dict | None = None
        self.rebuild_stall: dict | None = None
        self.redis: dict | None = None            # gateway_chain_redis: the Redis server's CPU
        self.core: dict | None = None             # core_rounds: the headline ratios, paired
        self.workers: dict | None = None          # worker_rounds: what a second worker costs, paired
        self.tracing: dict | None = None          # gateway_chain_traced / _otlp: paired rounds
        self.tools: dict[str, str] = {}
        self.upstream_port = 0
        self.upstream: Proc | None = None
        # Other servers the bench starts beside the upstream (redis-server, the OTLP sink): their
        # CPU is the bench's own, not other work on the machine.
        self.helpers: list[Proc] = []
        self.tls_files: tuple[str, str] | None = None     # the TLS scenarios' certificate and key

    # ---------------------------------------------------------------- helpers
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def py(self, *args: str, cpus: str | None = None) -> list[str]:
        argv = [sys.executable, *args]
        return (["taskset", "-c", cpus] + argv) if cpus else argv

    def wrk(self, url: str, duration: float, headers: dict | None) -> WrkResult:
        return run_wrk(self.tools["wrk"], url, duration_s=duration,
                       connections=self.args.connections, headers=headers,
                       cpus=self.load_cpus, workdir=self.tmp)

    def h2load(self, url: str, duration: float, headers: dict | None) -> WrkResult:
        return run_h2load(self.tools["h2load"], url, duration_s=duration,
                          connections=max(1, self.args.connections // H2_STREAMS), streams=H2_STREAMS,
                          headers=headers, cpus=self.load_cpus, workdir=self.tmp)

    def foreign_mark(self) -> tuple[float, float, float]:
        up = tree_cpu_seconds(self.upstream.pid) if self.upstream else 0.0
        up += sum(tree_cpu_seconds(p.pid) for p in self.helpers if p.alive())
        return system_busy_seconds(), own_cpu_seconds(), up

    def foreign_share(self, m0, m1, proxy_cpu: float, duration: float) -> float:
        """Share of the machine's cores used during a run by processes the bench did not start
        (other people's builds and tests): machine busy time − proxy − upstream − wrk/client."""
        busy = m1[0] - m0[0]
        ours = proxy_cpu + (m1[1] - m0[1]) + (m1[2] - m0[2])
        return round(max(0.0, busy - ours) / (duration * (os.cpu_count() or 1)), 3)

    def wait_quiet(self) -> None:
        """--wait-quiet S: before a scenario, wait up to S seconds for the machine to be idle
        (< 10 % busy over 1 s), so someone else's build doesn't end up in the numbers."""
        if self.args.wait_quiet <= 0:
            return
        deadline = time.monotonic() + self.args.wait_quiet
        said = False
        while True:
            b0, t0 = system_busy_seconds(), time.monotonic()
            time.sleep(1.0)
            share = (system_busy_seconds() - b0) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
            if share < 0.10:
                return
            if time.monotonic() >= deadline:
                log(f"  machine still {share:.0%} busy after --wait-quiet {self.args.wait_quiet:g}s; "
                    f"going on")
                return
            if not said:
                log(f"  machine {share:.0%} busy; waiting up to {self.args.wait_quiet:g}s for it "
                    f"to quieten")
                said = True

    def warn_foreign(self, name: str, share: float) -> None:
        if share > 0.05:
            msg = (f"{name}: other processes used {share:.0%} of the machine during the "
                   f"measured run — numbers are noisy")
            self.notes.append(msg)
            log(f"  WARNING {msg}")

    def certificate(self) -> tuple[str, str]:
        """The TLS scenarios' certificate: self-signed ECDSA P-256 for 127.0.0.1, one for all."""
        if self.tls_files is None:
            from gateway.tls import write_self_signed
            cert, key = self.tmp / "tls" / "cert.pem", self.tmp / "tls" / "key.pem"
            write_self_signed(cert, key, names=("127.0.0.1",))
            self.tls_files = (str(cert), str(key))
        return self.tls_files

    def measure(self, name: str, proc: Proc, url: str, headers: dict | None = None,
                cpus: str | None = None, loader=None, check_url: str | None = None) -> WrkResult:
        """Check one request (HTTP/1.1, on ``check_url`` if given), warm up under the load
        generator (wrk, or ``loader``: must be all 2xx), then the measured run with CPU time of the
        proxy's process tree read before and after."""
        loader = loader or self.wrk
        if name in HANDSHAKE_SCENARIOS:
            headers = {**(headers or {}), "Connection": "close"}
        check_url = check_url or url
        status, _, body = http_get(check_url, headers,
                                   cafile=self.tls_files[0] if check_url.startswith("https") else None)
        if status != 200:
            raise Failed(f"{name}: first request answered {status}: {body[:200]!r}")
        warm = loader(url, self.args.warmup, headers)
        if not warm.ok():
            raise Failed(f"{name}: warm-up had {warm.non_2xx} non-2xx responses and "
                         f"{warm.socket_errors} socket errors out of {warm.requests}")
        if not proc.alive():
            raise Failed(f"{name}: proxy exited during warm-up:\n{proc.log_tail()}")
        load = loadavg()
        cpu0, mark0 = tree_cpu_seconds(proc.pid), self.foreign_mark()
        res = loader(url, self.args.duration, headers)
        cpu1, mark1 = tree_cpu_seconds(proc.pid), self.foreign_mark()
        foreign = self.foreign_share(mark0, mark1, cpu1 - cpu0, res.duration_s)
        cpu_us = (cpu1 - cpu0) / res.requests * 1e6 if res.requests else float("nan")
        measured = {"rps": round(res.rps, 1), "p50_ms": round(res.p50_ms, 3),
                    "p99_ms": round(res.p99_ms, 3), "cpu_us_per_req": round(cpu_us, 1)}
        self.details[name] = {
            "requests": res.requests, "duration_s": round(res.duration_s, 3),
            "non_2xx": res.non_2xx, "socket_errors": res.socket_errors,
            "p90_ms": round(res.p90_ms, 3), "max_ms": round(res.max_ms, 3),
            "proxy_cpu_s": round(cpu1 - cpu0, 3),
            "proxy_cpu_utilisation": round((cpu1 - cpu0) / res.duration_s, 3),
            "proxy_processes": len(tree_pids(proc.pid)),
            "proxy_cpus": cpus or "any", "wrk_cpus": self.load_cpus or "any",
            "connections": self.args.connections,
            "load_generator": "wrk" if loader == self.wrk else
            f"h2load -c{max(1, self.args.connections // H2_STREAMS)} -m{H2_STREAMS} (h2c prior knowledge)",
            "warmup": {"requests": warm.requests, "rps": round(warm.rps, 1)},
            "loadavg_before": load,
            "foreign_cpu_share": foreign,
        }
        self.warn_foreign(name, foreign)
        if not res.ok():
            # numbers kept in details for diagnosis, but not reported as the scenario's result
            self.details[name]["rejected_result"] = measured
            raise Failed(f"{name}: measured run had {res.non_2xx} non-2xx responses and "
                         f"{res.socket_errors} socket errors out of {res.requests}")
        self.scenarios[name] = measured
        log(f"  {name}: {res.rps:,.0f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  "
            f"CPU {cpu_us:.1f} µs/req  (proxy busy {(cpu1 - cpu0) / res.duration_s:.2f} cores)")
        return res

    # ---------------------------------------------------------------- gateway
    def gateway_available(self) -> None:
        if importlib.util.find_spec("gateway.cli") is None and not (ROOT / "gateway/cli.py").exists():
            raise Skip("gateway/cli.py not present yet")

    def start_gateway(self, name: str, cfg: dict, workers: int | None, cpus: str | None,
                      ready_timeout: float = 60.0) -> tuple[Proc, int, float]:
        path = gcfg.write_config(self.tmp / f"{name}.yaml", cfg)
        chk = subprocess.run(self.py("-m", "gateway.cli", "check", str(path)), cwd=ROOT,
                             env=self.env(), capture_output=True, text=True, timeout=60)
        if chk.returncode != 0:
            out = (chk.stdout + chk.stderr).strip()
            if "No module named gateway.cli" in out or "No module named 'gateway.cli'" in out:
                raise Skip("gateway.cli not importable yet")
            raise Failed(f"{name}: `wasmgate check` rejected the generated config "
                         f"({path}):\n{out[-2000:]}")
        argv = self.py("-m", "gateway.cli", "run", "-c", str(path), cpus=cpus)
        if workers:
            argv += ["--workers", str(workers)]
        t0 = time.monotonic()
        proc = Proc(name, argv, cwd=ROOT, env=self.env(), log_path=self.tmp / f"{name}.log")
        admin = cfg["admin"]["port"]
        try:
            t_ready = wait_ready(f"http://127.0.0.1:{admin}/ready", proc, ready_timeout)
        except RuntimeError as e:
            proc.stop()
            raise Failed(f"{name}: gateway did not become ready: {e}")
        return proc, cfg["listeners"][0]["port"], t_ready - t0

    def need_chain(self) -> None:
        """The gateway and the chain's filters are there, else Skip."""
        self.gateway_available()
        miss = gcfg.missing_wasm()
        if miss:
            raise Skip(f"filters not built: {', '.join(miss)}")

    def gateway_scenario(self, name: str, filters, workers: int | None, cpus: str | None,
                         half_rate: bool = False, redis: Proc | None = None,
                         redis_port: int | None = None, tls: bool = False) -> None:
        if filters:
            self.need_chain()
        else:
            self.gateway_available()
        cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(),
                                  upstream_port=self.upstream_port, filters=filters,
                                  redis_port=redis_port, tls=self.certificate() if tls else None)
        proc, port, _ = self.start_gateway(name, cfg, workers, cpus)
        try:
            url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/bench"
            headers = gcfg.AUTH_HEADERS if filters else None
            if filters:
                status, _, body = http_get(url, None)
                if status not in (401, 403):
                    raise Failed(f"{name}: a request WITHOUT the API key answered {status} — "
                                 f"the auth filter is not active: {body[:200]!r}")
                status, rh, body = http_get(url, headers)
                if status != 200:
                    raise Failed(f"{name}: a request WITH the API key answered {status}: "
                                 f"{body[:200]!r}")
                missing = [h for h in gcfg.CHAIN_EVIDENCE if h not in rh]
                if missing:
                    raise Failed(f"{name}: response lacks {missing}: not every filter of the "
                                 f"chain ran (headers seen: {sorted(rh)})")
            redis_cpu0 = tree_cpu_seconds(redis.pid) if redis else 0.0
            res = self.measure(name, proc, url, headers, cpus)
            if redis:
                self.redis = {"server_cpu_us_per_req": round(
                    (tree_cpu_seconds(redis.pid) - redis_cpu0) / max(1, self.details[name]["warmup"]["requests"]
                                                                      + res.requests) * 1e6, 1),
                    "note": "redis-server's own CPU over warm-up + measured run ÷ their requests "
                            "(not in the proxy's CPU µs/req)"}
                self.paired_with_local(proc, port, headers, res.rps)
            if half_rate:
                key = "chain_half_rate"
                log(f"== {key}")
                try:
                    self.half_rate = self.run_half_rate(url, headers, res.rps, proc, key)
                except Failed as e:   # its own verdict; the scenario's numbers stand
                    msg = f"{e}\n--- {name} log tail ({proc.log_path}):\n{proc.log_tail()}"
                    self.failed[key] = msg
                    log(f"  {key}: FAILED: {msg}")
        except Failed as e:
            raise Failed(f"{e}\n--- {name} log tail ({proc.log_path}):\n{proc.log_tail()}")
        finally:
            proc.stop()

    def paired_with_local(self, proc: Proc, port: int, headers: dict | None, peak: float) -> None:
        """What Redis adds, measured side by side in the one gateway process (its /local route is
        the same chain with `backend: local`): wrk runs alternating local, redis (3 pairs), and
        one paced run of each at the same rate (half the redis chain's peak). Differences of
        neighbouring runs cancel most of what other work on the machine does to both."""
        pairs = []
        urls = {"local": f"http://127.0.0.1:{port}/local", "redis": f"http://127.0.0.1:{port}/bench"}
        for _ in range(3):
            pair = {}
            for side in ("local", "redis"):
                cpu0 = tree_cpu_seconds(proc.pid)
                r = self.wrk(urls[side], max(1.0, self.args.duration / 2), headers)
                if not r.ok():
                    raise Failed(f"gateway_chain_redis: paired {side} run had {r.non_2xx} non-2xx")
                pair[side] = round((tree_cpu_seconds(proc.pid) - cpu0) / r.requests * 1e6, 1)
            pairs.append([pair["local"], pair["redis"]])
        added = statistics.median(b - a for a, b in pairs)
        log("== chain_redis_half_rate (and the same chain on backend: local, same rate)")
        runs = {side: self.run_half_rate(urls[side], headers, peak, proc,
                                         "chain_redis_half_rate" if side == "redis" else "  local")
                for side in ("local", "redis")}
        self.half_rate_redis = runs["redis"]
        p99 = {side: d["p99_ms"] for side, d in runs.items()}
        self.redis.update({"paired_cpu_us_local_redis": pairs, "cpu_added_us": round(added, 1),
                           "half_peak_p99_ms": p99,
                           "p99_added_ms": round(p99["redis"] - p99["local"], 3),
                           "method": "one gateway process, routes /local (backend: local) and /bench "
                                     "(backend: redis); alternating wrk runs; paced runs at half the "
                                     "redis chain's peak"})
        log(f"  paired in one process: redis adds {added:.1f} µs CPU/req (pairs {pairs}), "
            f"p99 at {peak / 2:,.0f} req/s local {p99['local']:.2f} ms, redis {p99['redis']:.2f} ms")

    def paced(self, name: str, url: str, rate: float, connections: int, proc: Proc,
              headers: dict | None = None) -> dict:
        """One open-loop run of bench/paced.py against `url` (all answers must be 200)."""
        argv = self.py("-m", "bench.paced", "--url", url, "--rate", f"{rate:.1f}",
                       "--duration", str(self.args.duration), "--warmup", "1",
                       "--connections", str(connections), cpus=self.load_cpus)
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        cpu0, mark0, wait0 = tree_cpu_seconds(proc.pid), self.foreign_mark(), tree_wait_seconds(proc.pid)
        t0 = time.monotonic()
        r = subprocess.run(argv, cwd=ROOT, env=self.env(), capture_output=True, text=True,
                           timeout=self.args.duration + 60)
        cpu1, mark1, wait1 = tree_cpu_seconds(proc.pid), self.foreign_mark(), tree_wait_seconds(proc.pid)
        foreign = self.foreign_share(mark0, mark1, cpu1 - cpu0, time.monotonic() - t0)
        if r.returncode != 0:
            raise Failed(f"{name}: paced client failed: {r.stderr[-2000:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d["proxy_cpu_us_per_req"] = (round((cpu1 - cpu0) / d["completed"] * 1e6, 1)
                                     if d["completed"] else None)
        # The proxy's main threads runnable but not running (its core taken by something else), over
        # the whole client run: a stall of a few ms there is a few ms on every request in flight.
        d["proxy_wait_ms_per_s"] = round((wait1 - wait0) / (time.monotonic() - t0) * 1000, 2)
        d["method"] = ("bench/paced.py: open-loop fixed-rate asyncio client, keep-alive "
                       f"connections={connections}, latency from issue to last byte")
        for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "lag_p99_ms", "achieved_rps",
                  "client_wait_ms_per_s"):
            if d.get(k) is not None:
                d[k] = round(d[k], 3)
        d["foreign_cpu_share"] = foreign
        self.warn_foreign(name, foreign)
        bad = sum(v for k, v in d["statuses"].items() if k != "200")
        if bad or d["errors"] or d["unanswered"]:
            raise Failed(f"{name}: {bad} non-200, {d['errors']} errors, "
                         f"{d['unanswered']} unanswered: {d['statuses']}")
        return d

    def run_half_rate(self, url: str, headers: dict | None, peak: float, proc: Proc,
                      key: str = "chain_half_rate") -> dict:
        rate = max(1.0, peak / 2)
        self.wait_quiet()       # --wait-quiet: others' work on the cores shows up in the p99
        log(f"  {key}: paced open-loop load at {rate:,.0f} req/s (half of {peak:,.0f})")
        d = self.paced(key, url, rate, self.args.connections, proc, headers)
        d["peak_rps"] = round(peak, 1)
        log(f"  {key}: achieved {d['achieved_rps']:,.0f} req/s  p50 {d['p50_ms']:.2f} ms"
            f"  p99 {d['p99_ms']:.2f} ms  (client lag p99 {d['lag_p99_ms']:.2f} ms; waited for a CPU: "
            f"proxy {d['proxy_wait_ms_per_s']:.1f} ms/s, client {d['client_wait_ms_per_s']:.1f} ms/s)")
        return d

    # ---------------------------------------------------------------- scenarios
    def sc_baseline_aiohttp(self) -> None:
        port = free_port()
        proc = Proc("baseline_aiohttp",
                    self.py("-m", "bench.baseline_proxy", "--port", str(port), "--upstream",
                            f"127.0.0.1:{self.upstream_port}", cpus=self.proxy_cpus),
                    cwd=ROOT, env=self.env(), log_path=self.tmp / "baseline.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}/", proc, 30)
            self.measure("baseline_aiohttp", proc, f"http://127.0.0.1:{port}/bench", None,
                         self.proxy_cpus)
        finally:
            proc.stop()

    def sc_gateway_plain(self) -> None:
        self.gateway_scenario("gateway_plain", None, None, self.proxy_cpus)

    def sc_gateway_chain(self) -> None:
        self.gateway_scenario("gateway_chain", gcfg.CHAIN_FILTERS, None, self.proxy_cpus,
                              half_rate="chain_half_rate" in self.selected)

    def sc_gateway_chain_traced(self) -> None:
        self.tracing_rounds()

    def sc_gateway_chain_otlp(self) -> None:
        self.tracing_rounds()

    def tracing_rounds(self) -> None:
        """The per-request trace's cost, side by side: gateway_chain as is (W3C propagation on, the
        default), with all tracing off (`propagate: false`), with an access log (no `filters`
        field), with the access log's filter trace, and with OTLP export to a local sink — five
        processes on the same core, wrk against each in turn, TRACE_ROUNDS rounds
        (order rotated); per variant the median CPU µs/req. Neighbouring runs share whatever
        else the machine does, so the ratios are steadier than separate scenarios'."""
        if self.tracing is not None:
            return
        self.need_chain()
        sink_port = free_port()
        sink = Proc("otlp_sink", self.py("-m", "bench.otlp_sink", "--port", str(sink_port), cpus=self.load_cpus),
                    cwd=ROOT, env=self.env(), log_path=self.tmp / "otlp_sink.log")
        procs: dict[str, tuple[Proc, str, dict | None]] = {}
        self.helpers.append(sink)
        try:
            with stopped_after(procs):
                wait_ready(f"http://127.0.0.1:{sink_port}/stats", sink, 30)
                for v in TRACE_VARIANTS:
                    cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(),
                                              upstream_port=self.upstream_port, filters=gcfg.CHAIN_FILTERS)
                    if v in ("gateway_chain_logged", "gateway_chain_traced"):
                        cfg["access_log"] = {"path": str(self.tmp / f"{v}.access.log"),
                                             "filters": v == "gateway_chain_traced"}
                    if v == "gateway_chain_otlp":
                        cfg["tracing"] = {"otlp_endpoint": f"http://127.0.0.1:{sink_port}"}
                        otlp_admin = cfg["admin"]["port"]
                    if v == "gateway_chain_untraced":      # tracing all off: what the default's propagation costs
                        cfg["tracing"] = {"propagate": False}
                    proc, port, _ = self.start_gateway(v, cfg, None, self.proxy_cpus)
                    procs[v] = (proc, f"http://127.0.0.1:{port}/bench", gcfg.AUTH_HEADERS)
                cpu, last = self.rounds(procs, TRACE_ROUNDS, self.args.duration)
                med = {v: statistics.median(c) for v, c in cpu.items()}
                _, _, metrics = http_get(f"http://127.0.0.1:{otlp_admin}/metrics", None)
                gateway_spans = {m.group(1): int(float(m.group(2))) for m in re.finditer(
                    r'^wasmgate_otlp_spans_total\{outcome="(\w+)"\} (\S+)$', metrics.decode(), re.M)}
                procs["gateway_chain_otlp"][0].stop()     # flushes the spans still queued
                _, _, body = http_get(f"http://127.0.0.1:{sink_port}/stats", None)
                exported = json.loads(body)
        finally:
            self.helpers.remove(sink)
            sink.stop()
        for v in ("gateway_chain_traced", "gateway_chain_otlp"):
            self.scenarios[v] = {**{k: last[v][k] for k in ("rps", "p50_ms", "p99_ms")},
                                 "cpu_us_per_req": round(med[v], 1)}
        ratio = lambda a, b: round(med[a] / med[b], 3)   # noqa: E731
        self.tracing = {
            "cpu_us_per_req_rounds": cpu, "cpu_us_per_req_median": med, "last_round": last,
            "traced_vs_logged": ratio("gateway_chain_traced", "gateway_chain_logged"),
            "traced_vs_chain": ratio("gateway_chain_traced", "gateway_chain"),
            "logged_vs_chain": ratio("gateway_chain_logged", "gateway_chain"),
            "chain_vs_untraced": ratio("gateway_chain", "gateway_chain_untraced"),
            "otlp_vs_chain": ratio("gateway_chain_otlp", "gateway_chain"),
            "otlp_sink": exported,
            # The otlp gateway's own count before its final flush: dropped/failed must be 0.
            "otlp_gateway_spans": gateway_spans,
            "method": f"five gateway processes (same chain, same core), wrk {self.args.duration:g} s "
                      f"against each in turn, {TRACE_ROUNDS} rounds, order rotated; median CPU µs/req "
                      f"per variant. untraced = tracing.propagate false, no access log; logged = access log to a file without the filters field; "
                      f"traced = with it; otlp = no access log, tracing.otlp_endpoint to bench/otlp_sink.py",
        }
        log(f"  paired medians: chain {med['gateway_chain']:.1f} (untraced {med['gateway_chain_untraced']:.1f}), +access log {med['gateway_chain_logged']:.1f}, "
            f"+filter trace {med['gateway_chain_traced']:.1f}, otlp {med['gateway_chain_otlp']:.1f} µs/req; "
            f"traced ÷ logged {self.tracing['traced_vs_logged']}, otlp ÷ chain {self.tracing['otlp_vs_chain']}; "
            f"sink got {exported['spans']:,} spans in {exported['requests']} exports; gateway counted {gateway_spans}")

    def rounds(self, procs: dict[str, tuple[Proc, str, dict | None]], rounds: int,
               duration: float) -> tuple[dict[str, list[float]], dict[str, dict]]:
        """Proxies running side by side: each checked (one 200) and warmed up, then wrk against
        each in turn, ``rounds`` rounds with the order rotated. Returns each one's CPU µs/req per
        round and its last round's rps / p50 / p99."""
        for v, (proc, url, headers) in procs.items():
            status, _, body = http_get(url, headers)
            if status != 200:
                raise Failed(f"{v}: first request answered {status}: {body[:200]!r}")
            warm = self.wrk(url, self.args.warmup, headers)
            if not warm.ok():
                raise Failed(f"{v}: warm-up had {warm.non_2xx} non-2xx responses")
        cpu: dict[str, list[float]] = {v: [] for v in procs}
        last: dict[str, dict] = {}
        order = list(procs)
        for _ in range(rounds):
            for v in order:
                proc, url, headers = procs[v]
                cpu0, mark0 = tree_cpu_seconds(proc.pid), self.foreign_mark()
                res = self.wrk(url, duration, headers)
                cpu1, mark1 = tree_cpu_seconds(proc.pid), self.foreign_mark()
                if not res.ok():
                    raise Failed(f"{v}: measured run had {res.non_2xx} non-2xx responses and "
                                 f"{res.socket_errors} socket errors")
                self.warn_foreign(v, self.foreign_share(mark0, mark1, cpu1 - cpu0, res.duration_s))
                cpu[v].append(round((cpu1 - cpu0) / res.requests * 1e6, 1))
                last[v] = {"rps": round(res.rps, 1), "p50_ms": round(res.p50_ms, 3),
                           "p99_ms": round(res.p99_ms, 3), "requests": res.requests}
                log(f"  {v}: {res.rps:,.0f} req/s  CPU {cpu[v][-1]:.1f} µs/req")
            order = order[1:] + order[:1]
        return cpu, last

    def sc_core_rounds(self) -> None:
        """The headline ratios side by side: baseline_aiohttp, gateway_plain, gateway_chain and
        nginx_proxy running at once on the proxy core, wrk against each in turn (half the
        scenario duration each, at least 5 s), CORE_ROUNDS rounds with the order rotated; per
        proxy the median CPU µs/req. The single scenarios run minutes apart, and this VM's speed
        drifts by tens of percent over minutes; neighbouring runs share the drift."""
        self.need_chain()
        procs: dict[str, tuple[Proc, str, dict | None]] = {}
        with stopped_after(procs):
            port = free_port()
            proc = Proc("core_baseline_aiohttp",
                        self.py("-m", "bench.baseline_proxy", "--port", str(port), "--upstream",
                                f"127.0.0.1:{self.upstream_port}", cpus=self.proxy_cpus),
                        cwd=ROOT, env=self.env(), log_path=self.tmp / "core_baseline.log")
            procs["baseline_aiohttp"] = (proc, f"http://127.0.0.1:{port}/bench", None)
            wait_ready(f"http://127.0.0.1:{port}/", proc, 30)
            for name, filters in (("gateway_plain", None), ("gateway_chain", gcfg.CHAIN_FILTERS)):
                cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(),
                                          upstream_port=self.upstream_port, filters=filters)
                proc, port, _ = self.start_gateway(f"core_{name}", cfg, None, self.proxy_cpus)
                procs[name] = (proc, f"http://127.0.0.1:{port}/bench",
                               gcfg.AUTH_HEADERS if filters else None)
            port = free_port()
            proc = start_nginx(self.tools["nginx"], self.tmp / "core_nginx_proxy", "core_nginx_proxy", port,
                               upstream_port=self.upstream_port, cpus=self.proxy_cpus)
            procs["nginx_proxy"] = (proc, f"http://127.0.0.1:{port}/bench", None)
            duration = max(5.0, self.args.duration / 2)
            cpu, _ = self.rounds(procs, CORE_ROUNDS, duration)
        med = {v: statistics.median(c) for v, c in cpu.items()}
        ratio = lambda a, b: round(med[a] / med[b], 3)   # noqa: E731
        self.core = {
            "cpu_us_per_req_rounds": cpu, "cpu_us_per_req_median": med,
            "chain_vs_baseline": ratio("gateway_chain", "baseline_aiohttp"),
            "chain_vs_plain": ratio("gateway_chain", "gateway_plain"),
            "plain_vs_nginx": ratio("gateway_plain", "nginx_proxy"),
            "method": f"baseline_aiohttp, gateway_plain, gateway_chain and nginx_proxy running at once "
                      f"(pinned as their scenarios), wrk {duration:g} s against each in turn, "
                      f"{CORE_ROUNDS} rounds, order rotated; median CPU µs/req per proxy",
        }
        log(f"  paired medians: baseline {med['baseline_aiohttp']:.1f}, plain {med['gateway_plain']:.1f}, "
            f"chain {med['gateway_chain']:.1f}, nginx {med['nginx_proxy']:.1f} µs/req; chain ÷ baseline "
            f"{self.core['chain_vs_baseline']}, chain ÷ plain {self.core['chain_vs_plain']}, "
            f"plain ÷ nginx {self.core['plain_vs_nginx']}")

    def sc_worker_rounds(self) -> None:
        """What the second worker of gateway_chain_2w costs, and why: the chain with one worker on
        the proxy core (as gateway_chain), one worker on the load core (where the second worker
        of two runs, beside wrk and the upstream nginx) and two workers on both (as
        gateway_chain_2w), running at once, wrk against each in turn, WORKER_ROUNDS rounds with
        the order rotated; per gateway the median CPU µs/req. Two workers ÷ the mean of the two
        single workers is what two workers cost beyond the cores they run on: the gateway-wide
        shared store and both cores busy at once."""
        if not self.pin:
            raise Skip("needs the pinning (without --no-pin): it compares the two cores")
        self.need_chain()
        procs: dict[str, tuple[Proc, str, dict | None]] = {}
        with stopped_after(procs):
            for name, workers, cpus in (("gateway_chain", None, self.proxy_cpus),
                                        ("gateway_chain_load_core", None, self.load_cpus),
                                        ("gateway_chain_2w", 2, self.proxy_cpus_2w)):
                cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(),
                                          upstream_port=self.upstream_port, filters=gcfg.CHAIN_FILTERS)
                proc, port, _ = self.start_gateway(f"workers_{name}", cfg, workers, cpus)
                procs[name] = (proc, f"http://127.0.0.1:{port}/bench", gcfg.AUTH_HEADERS)
            duration = max(5.0, self.args.duration / 2)
            cpu, _ = self.rounds(procs, WORKER_ROUNDS, duration)
        med = {v: statistics.median(c) for v, c in cpu.items()}
        one, there, two = med["gateway_chain"], med["gateway_chain_load_core"], med["gateway_chain_2w"]
        self.workers = {
            "cpu_us_per_req_rounds": cpu, "cpu_us_per_req_median": med,
            "chain_2w_vs_chain": round(two / one, 3),
            "load_core_vs_chain": round(there / one, 3),
            "chain_2w_vs_both_cores": round(two / ((one + there) / 2), 3),
            "method": f"gateway_chain with one worker on the proxy core, one worker on the load core "
                      f"(wrk and the upstream's core) and two workers on both, running at once, wrk "
                      f"{duration:g} s against each in turn, {WORKER_ROUNDS} rounds, order rotated; "
                      f"median CPU µs/req per gateway; both_cores = the mean of the two single workers",
        }
        log(f"  paired medians: 1 worker {one:.1f}, 1 worker on the load core {there:.1f}, 2 workers "
            f"{two:.1f} µs/req; 2 workers ÷ 1 {self.workers['chain_2w_vs_chain']}, load core ÷ proxy core "
            f"{self.workers['load_core_vs_chain']}, 2 workers ÷ the two single workers' mean "
            f"{self.workers['chain_2w_vs_both_cores']}")

    def sc_gateway_chain_redis(self) -> None:
        """gateway_chain with `ratelimit` on `backend: redis`: one script run per request
        against a local redis-server (pinned with the load generator, not the proxy)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise Skip("redis-server not installed (./dev bench installs it)")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp)]
        redis = Proc("redis", (["taskset", "-c", self.load_cpus] if self.load_cpus else []) + argv,
                     cwd=self.tmp, log_path=self.tmp / "redis.log")
        self.helpers.append(redis)
        try:
            _wait_redis(port, redis)
            self.gateway_scenario("gateway_chain_redis", gcfg.CHAIN_REDIS_FILTERS, None,
                                  self.proxy_cpus, redis=redis, redis_port=port)
        finally:
            self.helpers.remove(redis)
            redis.stop()

    def sc_gateway_chain_2w(self) -> None:
        self.gateway_scenario("gateway_chain_2w", gcfg.CHAIN_FILTERS, 2, self.proxy_cpus_2w)

    def sc_nginx_proxy(self) -> None:
        port = free_port()
        proc = start_nginx(self.tools["nginx"], self.tmp / "nginx_proxy", "nginx_proxy", port,
                           upstream_port=self.upstream_port, cpus=self.proxy_cpus)
        try:
            self.measure("nginx_proxy", proc, f"http://127.0.0.1:{port}/bench", None,
                         self.proxy_cpus)
        finally:
            proc.stop()

    def sc_gateway_tls(self) -> None:
        self.gateway_scenario("gateway_tls", None, None, self.proxy_cpus, tls=True)

    def sc_gateway_tls_handshake(self) -> None:
        self.gateway_scenario("gateway_tls_handshake", None, None, self.proxy_cpus, tls=True)

    def sc_nginx_tls(self, name: str = "nginx_tls") -> None:
        from gateway.tls import DEFAULT_CIPHERS
        port = free_port()
        proc = start_nginx(self.tools["nginx"], self.tmp / name, name, port, upstream_port=self.upstream_port,
                           cpus=self.proxy_cpus, tls=(*self.certificate(), DEFAULT_CIPHERS))
        try:
            self.measure(name, proc, f"https://127.0.0.1:{port}/bench", None, self.proxy_cpus)
        finally:
            proc.stop()

    def sc_nginx_tls_handshake(self) -> None:
        self.sc_nginx_tls("nginx_tls_handshake")

    def sc_gateway_h2(self, name: str = "gateway_h2", tls: bool = True) -> None:
        """gateway_plain's config over HTTP/2, several streams per connection: with TLS (ALPN h2,
        gateway_tls's certificate), or h2c with prior knowledge."""
        self.gateway_available()
        cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(), upstream_port=self.upstream_port,
                                  tls=self.certificate() if tls else None)
        proc, port, _ = self.start_gateway(name, cfg, None, self.proxy_cpus)
        try:
            self.measure(name, proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}/bench", None,
                         self.proxy_cpus, loader=self.h2load)
        except Failed as e:
            raise Failed(f"{e}\n--- {name} log tail ({proc.log_path}):\n{proc.log_tail()}")
        finally:
            proc.stop()

    def sc_gateway_h2c(self) -> None:
        self.sc_gateway_h2("gateway_h2c", tls=False)

    def sc_nginx_h2(self, name: str = "nginx_h2", tls: bool = True) -> None:
        from gateway.tls import DEFAULT_CIPHERS
        port = free_port()
        proc = start_nginx(self.tools["nginx"], self.tmp / name, name, port, upstream_port=self.upstream_port,
                           cpus=self.proxy_cpus, http2=True,
                           tls=(*self.certificate(), DEFAULT_CIPHERS) if tls else None)
        try:
            url = f"https://127.0.0.1:{port}/bench" if tls else f"http://127.0.0.1:{proc.h2c_port}/bench"
            self.measure(name, proc, url, None, self.proxy_cpus, loader=self.h2load,
                         check_url=f"{'https' if tls else 'http'}://127.0.0.1:{port}/bench")
        finally:
            proc.stop()

    def sc_nginx_h2c(self) -> None:
        self.sc_nginx_h2("nginx_h2c", tls=False)

    def sc_chain_half_rate(self) -> None:
        pass  # runs inside gateway_chain, against the same process, right after its peak run

    def sc_crossing(self) -> None:
        if not (ROOT / "bench" / "crossing.py").exists():
            self.crossing["note"] = "skipped: bench/crossing.py not present yet"
            raise Skip("bench/crossing.py not present yet")
        code = ("import json, bench.crossing as c; "
                "print('CROSSING ' + json.dumps(c.measure()))")
        r = subprocess.run(self.py("-c", code, cpus=self.proxy_cpus), cwd=ROOT, env=self.env(),
                           capture_output=True, text=True, timeout=300)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("CROSSING ")), None)
        if r.returncode != 0 or line is None:
            self.crossing["note"] = "failed: bench.crossing.measure() raised"
            raise Failed(f"crossing: bench.crossing.measure() failed:\n{r.stderr[-2000:]}")
        d = json.loads(line[len("CROSSING "):])
        self.crossing.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()})
        log(f"  crossing: guest call {self.crossing['guest_call_us']} µs, "
            f"host call {self.crossing['host_call_us']} µs")

    def sc_chain_profile(self) -> None:
        """The three bench filters in one process, no sockets (bench/chain_profile.py)."""
        if gcfg.missing_wasm():
            raise Skip(f"filters not built: {', '.join(gcfg.missing_wasm())}")
        code = "import json, bench.chain_profile as c; print('PROFILE ' + json.dumps(c.measure()))"
        r = subprocess.run(self.py("-c", code, cpus=self.proxy_cpus), cwd=ROOT, env=self.env(),
                           capture_output=True, text=True, timeout=300)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROFILE ")), None)
        if r.returncode != 0 or line is None:
            raise Failed(f"chain_profile: bench.chain_profile.measure() failed:\n{r.stderr[-2000:]}")
        self.chain_profile = {k: round(v, 1) for k, v in json.loads(line[len("PROFILE "):]).items()}
        log(f"  chain_profile: the filters add {self.chain_profile['filters_add_us']} µs/request in process")

    def sc_cold_start(self) -> None:
        self.need_chain()
        runs: list[float] = []
        n = 1 if self.args.quick else 3
        for i in range(n + 1):   # run 0 warms the compiled-module cache, not counted
            cfg = gcfg.gateway_config(port=free_port(), admin_port=free_port(),
                                      upstream_port=self.upstream_port, filters=gcfg.COLD_FILTERS)
            proc, port, secs = self.start_gateway(f"cold_start_{i}", cfg, None, self.proxy_cpus)
            try:
                if i == 0:
                    status, _, body = http_get(f"http://127.0.0.1:{port}/bench", gcfg.AUTH_HEADERS)
                    if status != 200:
                        raise Failed(f"cold_start: the 5-filter route answered {status}: {body[:200]!r}")
                else:
                    runs.append(secs)
            finally:
                proc.stop()
        self.cold_start = {"seconds": round(statistics.median(runs), 3),
                           "runs_s": [round(x, 3) for x in runs],
                           "filters": len(gcfg.COLD_FILTERS),
                           "method": "process start (Popen) → first 200 from admin /ready, "
                                     "polled every 5 ms; one unmeasured run first warms the "
                                     "compiled-module cache; median of the measured runs"}
        log(f"  cold_start: {self.cold_start['seconds']:.3f} s (runs {self.cold_start['runs_s']})")

    def sc_rebuild_stall(self) -> None:
        """/other under fixed open-loop load, alone and while /slow's filter keeps rebuilding
        (its on_configure computes for 1 s): see bench/rebuild_stall.py."""
        self.gateway_available()
        cfg = rebuild_stall.config(port=free_port(), admin_port=free_port(),
                                   upstream_port=self.upstream_port)
        proc, port, _ = self.start_gateway("rebuild_stall", cfg, None, self.proxy_cpus)
        base = f"http://127.0.0.1:{port}"
        rate, conns = rebuild_stall.RATE, rebuild_stall.CONNECTIONS
        try:
            for path in ("/slow/check", "/other/check"):
                status, _, body = http_get(base + path)
                if status != 200:
                    raise Failed(f"rebuild_stall: {path} answered {status}: {body[:200]!r}")
            log(f"  rebuild_stall: /other at {rate:,} req/s, alone")
            alone = self.paced("rebuild_stall", base + "/other/x", rate, conns, proc)
            log(f"  rebuild_stall: /other at {rate:,} req/s while /slow keeps rebuilding")
            trapper = rebuild_stall.Trapper(base)
            trapper.start()
            try:
                during = self.paced("rebuild_stall", base + "/other/x", rate, conns, proc)
            finally:
                trapper.stop()
            if trapper.errors:
                raise Failed(f"rebuild_stall: {trapper.errors[0]}")
            if not trapper.rebuilds:
                raise Failed("rebuild_stall: the slow filter never came back from a rebuild")
        except Failed as e:
            raise Failed(f"{e}\n--- rebuild_stall log tail ({proc.log_path}):\n{proc.log_tail()}")
        finally:
            proc.stop()
        keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "achieved_rps", "lag_p99_ms",
                "foreign_cpu_share")
        self.rebuild_stall = {
            "alone": {k: alone.get(k) for k in keys},
            "rebuilding": {k: during.get(k) for k in keys},
            "p99_vs_alone": round(during["p99_ms"] / alone["p99_ms"], 3) if alone["p99_ms"] else None,
            "rebuilds": trapper.rebuilds,
            "rebuild_in_flight_share": trapper.rebuilding_share(),
            "configure_ms": rebuild_stall.CONFIGURE_MS, "rate": rate, "connections": conns,
            "method": "one gateway process; /other (no filter) under bench/paced.py, first alone, "
                      "then while a trapper keeps /slow's filter rebuilding (trap, poll /slow "
                      "every 10 ms until it answers 200, trap again); on_configure computes 1 s",
        }
        log(f"  rebuild_stall: /other p50 {alone['p50_ms']:.2f} → {during['p50_ms']:.2f} ms, "
            f"p99 {alone['p99_ms']:.2f} → {during['p99_ms']:.2f} ms "
            f"({trapper.rebuilds} rebuilds, one in flight {trapper.rebuilding_share():.0%} of "
            f"the time)")

    # ---------------------------------------------------------------- driver
    def run(self) -> int:
        self.selected = self.select()
        log(f"bench: scratch dir {self.tmp}")
        self.tools = ensure_tools(log)
        self.machine = machine_info(self.tools)
        self.upstream_port = free_port()
        load = loadavg()
        self.machine["loadavg_at_start"] = load
        if load > 0.5:
            msg = (f"load average {load:.2f} at start: other work is running on this machine; "
                   f"numbers will be noisy (see details.*.foreign_cpu_share)")
            self.notes.append(msg)
            log(f"bench: WARNING {msg}")
        upstream = self.upstream = start_nginx(self.tools["nginx"], self.tmp / "upstream",
                                               "upstream", self.upstream_port, cpus=self.load_cpus)
        try:
            for name in ALL:
                if name not in self.selected or name in ("chain_half_rate", "chain_redis_half_rate"):
                    continue
                log(f"== {name}")
                self.wait_quiet()
                try:
                    getattr(self, f"sc_{name}")()
                except Skip as e:
                    self.skipped[name] = str(e)
                    log(f"  {name}: skipped: {e}")
                except (Failed, Exception) as e:   # noqa: BLE001 - report, go on
                    msg = str(e) if isinstance(e, Failed) else traceback.format_exc()
                    self.failed[name] = msg
                    log(f"  {name}: FAILED: {msg}")
                if not upstream.alive():
                    raise RuntimeError("upstream nginx died:\n" + upstream.log_tail())
            if "chain_half_rate" in self.selected and self.half_rate is None \
                    and "chain_half_rate" not in self.failed:
                why = self.failed.get("gateway_chain") or self.skipped.get("gateway_chain") \
                    or "did not run"
                (self.failed if "gateway_chain" in self.failed else self.skipped)[
                    "chain_half_rate"] = f"gateway_chain: {why}"
        finally:
            upstream.stop()
            stop_all()
        result = self.result()
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        self.print_table(result)
        log(f"\nwrote {out}" + ("  (PARTIAL run)" if result["partial"] else "")
            + ("  (NOISY: other work ran on the machine, see notes)" if result["noisy"] else ""))
        return 1 if self.failed else 0

    def cleanup(self) -> None:
        if self.args.keep or self.failed:
            log(f"kept scratch dir {self.tmp} (configs, process logs)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def select(self) -> list[str]:
        if not self.args.only:
            return list(ALL)
        names = [n.strip() for n in self.args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in ALL]
        if bad:
            raise SystemExit(f"unknown scenario(s) {bad}; choose from {', '.join(ALL)}")
        if "chain_half_rate" in names and "gateway_chain" not in names:
            names.append("gateway_chain")   # the half rate is half of its measured peak
        if "chain_redis_half_rate" in names and "gateway_chain_redis" not in names:
            names.append("gateway_chain_redis")
        return names

    def ratios(self) -> dict:
        sc = self.scenarios
        base = sc.get("baseline_aiohttp")
        vs = {}
        if base:
            for name, s in sc.items():
                vs[name] = {
                    "rps": round(s["rps"] / base["rps"], 3),
                    "cpu_us_per_req": round(s["cpu_us_per_req"] / base["cpu_us_per_req"], 3),
                }
        chain, chain2 = sc.get("gateway_chain"), sc.get("gateway_chain_2w")
        values = {
            "redis_cpu_added_us": (self.redis or {}).get("cpu_added_us"),
            "redis_p99_added_at_half_peak_ms": (self.redis or {}).get("p99_added_ms"),
            "chain_cpu_vs_baseline": vs.get("gateway_chain", {}).get("cpu_us_per_req"),
            "chain_cpu_vs_plain": _cpu_ratio(sc, "gateway_chain", "gateway_plain"),
            "chain_2w_cpu_vs_chain": _cpu_ratio(sc, "gateway_chain_2w", "gateway_chain"),
            "plain_cpu_vs_nginx": _cpu_ratio(sc, "gateway_plain", "nginx_proxy"),
            "chain_profile_us": (self.chain_profile or {}).get("filters_add_us"),
            "chain_2w_rps_vs_chain": round(chain2["rps"] / chain["rps"], 3)
            if chain and chain2 else None,
            "chain_p99_at_half_peak_ms": self.half_rate["p99_ms"] if self.half_rate else None,
            "cold_start_5_filters_s": self.cold_start["seconds"] if self.cold_start else None,
            "guest_call_us": self.crossing.get("guest_call_us"),
            "host_call_us": self.crossing.get("host_call_us"),
            "tls_cpu_vs_plain": _cpu_ratio(sc, "gateway_tls", "gateway_plain"),
            "rebuild_other_route_p99_ms":
                self.rebuild_stall["rebuilding"]["p99_ms"] if self.rebuild_stall else None,
            "trace_cpu_vs_logged": (self.tracing or {}).get("traced_vs_logged"),
            "otlp_cpu_vs_chain": (self.tracing or {}).get("otlp_vs_chain"),
            "paired_chain_cpu_vs_baseline": (self.core or {}).get("chain_vs_baseline"),
            "paired_chain_cpu_vs_plain": (self.core or {}).get("chain_vs_plain"),
            "paired_plain_cpu_vs_nginx": (self.core or {}).get("plain_vs_nginx"),
            "paired_chain_2w_cpu_vs_chain": (self.workers or {}).get("chain_2w_vs_chain"),
        }
        targets = {}
        for key, desc, op, bar in TARGETS:
            v = values[key]
            met = None if v is None else (v <= bar if op == "<=" else v >= bar)
            targets[key] = {"value": v, "target": f"{op} {bar}", "met": met, "what": desc}
        vs_plain = {"gateway_tls": _cpu_ratio(sc, "gateway_tls", "gateway_plain"),
                    "nginx_tls": _cpu_ratio(sc, "nginx_tls", "nginx_proxy")}
        h2 = {name: {"vs_gateway_plain": _cpu_ratio(sc, name, "gateway_plain"),
                     "vs_same_proxy_http1": _cpu_ratio(sc, name, peer)}
              for name, peer in (("gateway_h2", "gateway_tls"), ("nginx_h2", "nginx_tls"),
                                 ("gateway_h2c", "gateway_plain"), ("nginx_h2c", "nginx_proxy"))}
        return {"vs_baseline": vs, "tls_cpu_vs_plain": vs_plain, "h2_cpu_vs": h2, "targets": targets}

    def handshakes(self) -> dict:
        """Full TLS handshakes per second one core can do: new connection + handshake + one
        request + close, from the CPU µs per request of the Connection: close scenarios."""
        out = {}
        for name, who in HANDSHAKE_SCENARIOS.items():
            s = self.scenarios.get(name)
            if s and s["cpu_us_per_req"]:
                out[who] = {"cpu_us_per_connection": s["cpu_us_per_req"],
                            "connections_per_core_s": round(1e6 / s["cpu_us_per_req"])}
        return out

    def result(self) -> dict:
        scenarios = {}
        for name in SCENARIOS:
            if name in self.selected:
                scenarios[name] = self.scenarios.get(
                    name, {"rps": None, "p50_ms": None, "p99_ms": None, "cpu_us_per_req": None})
        partial = bool(self.skipped or self.failed or self.args.only or self.args.quick)
        return {
            "scenarios": scenarios,
            "crossing": self.crossing,
            "chain_profile": self.chain_profile,
            "machine": self.machine,
            "partial": partial,
            # other work used > 5 % of the machine during some measured run: don't commit this
            "noisy": bool(self.notes),
            "skipped": self.skipped,
            "failed": {k: v[-1000:] for k, v in self.failed.items()},
            "cold_start": self.cold_start,
            "chain_half_rate": self.half_rate,
            "chain_redis_half_rate": self.half_rate_redis,
            "redis": self.redis,
            "tracing": self.tracing,
            "core_rounds": self.core,
            "worker_rounds": self.workers,
            "tls_handshake": self.handshakes(),
            "rebuild_stall": self.rebuild_stall,
            "ratios": self.ratios(),
            "details": self.details,
            "notes": self.notes,
            "settings": {
                "duration_s": self.args.duration, "warmup_s": self.args.warmup,
                "connections": self.args.connections, "wrk_threads": 1,
                "pinning": ({"proxy": self.proxy_cpus, "proxy_2_workers": self.proxy_cpus_2w,
                             "wrk_paced_client_upstream": self.load_cpus} if self.pin else None),
                "quick": self.args.quick, "only": self.args.only,
                "cpu_per_req": "Δ(utime+stime+cutime+cstime) of the proxy process and all its "
                               "descendants over the measured wrk run ÷ requests completed",
            },
        }

    def print_table(self, r: dict) -> None:
        vs = r["ratios"]["vs_baseline"]
        log("\n{:<18} {:>10} {:>9} {:>9} {:>12} {:>9}  {}".format(
            "scenario", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "CPU/base", "status"))
        for name in SCENARIOS:
            if name not in self.selected:
                continue
            s = r["scenarios"][name]
            if s["rps"] is None:
                st = ("skipped: " + self.skipped[name]) if name in self.skipped else \
                     ("FAILED: " + self.failed.get(name, "?").splitlines()[0][:70])
                log(f"{name:<18} {'-':>10} {'-':>9} {'-':>9} {'-':>12} {'-':>9}  {st}")
                continue
            ratio = vs.get(name, {}).get("cpu_us_per_req")
            log("{:<18} {:>10,.0f} {:>9.2f} {:>9.2f} {:>12.1f} {:>9}  ok".format(
                name, s["rps"], s["p50_ms"], s["p99_ms"], s["cpu_us_per_req"],
                f"{ratio:.2f}" if ratio is not None else "-"))
        for name, v in r["ratios"].get("h2_cpu_vs", {}).items():
            if v["vs_gateway_plain"] is not None:
                log(f"{name} CPU/req: {v['vs_gateway_plain']:.2f}× gateway_plain's, "
                    f"{v['vs_same_proxy_http1'] or float('nan'):.2f}× the same proxy's over HTTP/1.1")
        for key, label in (("chain_half_rate", "gateway_chain"), ("chain_redis_half_rate", "gateway_chain_redis")):
            h = r[key]
            if h:
                log(f"{label} @ half peak ({h['target_rps']:,.0f} req/s): p50 {h['p50_ms']:.2f} ms,"
                    f" p99 {h['p99_ms']:.2f} ms")
        rd = r["redis"]
        if rd:
            log(f"redis-server CPU (not in the proxy's): {rd['server_cpu_us_per_req']} µs/req")
            if "cpu_added_us" in rd:
                log(f"backend: redis vs local in one process: +{rd['cpu_added_us']} µs CPU/req "
                    f"(pairs {rd['paired_cpu_us_local_redis']}), p99 at half peak "
                    f"{rd['half_peak_p99_ms']['local']:.2f} → {rd['half_peak_p99_ms']['redis']:.2f} ms")
        c = r["crossing"]
        log(f"crossing: guest call {c.get('guest_call_us')} µs, host call {c.get('host_call_us')} µs"
            + (f"  ({c['note']})" if c.get("note") else ""))
        if r["chain_profile"]:
            log(f"chain_profile (in process): the filters add {r['chain_profile']['filters_add_us']} µs/request")
        if r["cold_start"]:
            log(f"cold start (5 filters, warm cache): {r['cold_start']['seconds']:.3f} s")
        rs = r["rebuild_stall"]
        if rs:
            log(f"another route while a filter rebuilds (1 s start): p99 "
                f"{rs['alone']['p99_ms']:.2f} ms alone → {rs['rebuilding']['p99_ms']:.2f} ms "
                f"({rs['p99_vs_alone']}×, {rs['rebuilds']} rebuilds)")
        tls = r["ratios"]["tls_cpu_vs_plain"]
        if any(v is not None for v in tls.values()):
            log(f"TLS keep-alive CPU/req vs plain: gateway {tls['gateway_tls']}, nginx {tls['nginx_tls']}")
        for who, h in r["tls_handshake"].items():
            log(f"full TLS handshake ({who}): {h['connections_per_core_s']:,} new connections/s per core "
                f"({h['cpu_us_per_connection']:.0f} µs each, incl. one request)")
        log("\ntargets:")
        for key, t in r["ratios"]["targets"].items():
            met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            v = "-" if t["value"] is None else f"{t['value']}"
            log(f"  {t['what']:<52} {v:>10}  (target {t['target']})  {met}")
        for name, why in {**self.skipped}.items():
            if name not in SCENARIOS:
                log(f"skipped {name}: {why}")
        for n in self.notes:
            log(f"note: {n}")
        for name in self.failed:
            if name not in SCENARIOS:
                log(f"FAILED {name}: {self.failed[name].splitlines()[0][:200]}")


def _cpu_ratio(sc: dict, name: str, base: str) -> float | None:
    a, b = sc.get(name), sc.get(base)
    return round(a["cpu_us_per_req"] / b["cpu_us_per_req"], 3) if a and b else None


def _wait_redis(port: int, proc: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if not proc.alive() or time.monotonic() > deadline:
            raise Failed(f"redis-server did not start:\n{proc.log_tail()}")
        time.sleep(0.02)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of each measured run (default 20; 2 with --quick)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of wrk warm-up before each measured run (default 3; 1 with --quick)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(ALL))
    ap.add_argument("--quick", action="store_true", help="~30 s smoke run (short runs)")
    ap.add_argument("--no-pin", action="store_true",
                    help="don't pin processes to CPUs with taskset")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each scenario wait up to S s for the machine to be idle "
                         "(< 10%% busy); default 0 = don't wait")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (configs, logs)")
    a = ap.parse_args(argv)
    if a.duration is None:
        a.duration = 2.0 if a.quick else 20.0
    if a.warmup is None:
        a.warmup = 1.0 if a.quick else 3.0
    if (os.cpu_count() or 1) < 2 and not a.no_pin:
        a.no_pin = True
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    bench = Bench(args)
    try:
        return bench.run()
    except KeyboardInterrupt:
        log("\nbench: interrupted — stopping everything it started")
        return 130
    finally:
        stop_all()
        bench.cleanup()
