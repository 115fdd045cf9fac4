"""Render bench/results/latest.json as Markdown (the README's Performance table):

    python -m bench.report [path/to/result.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.run import SCENARIOS
from bench.tools import ROOT


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render(r: dict) -> str:
    m = r.get("machine", {})
    vs = r.get("ratios", {}).get("vs_baseline", {})
    out = []
    if r.get("partial"):
        out.append("**Partial run** (skipped: %s; failed: %s).\n" % (
            ", ".join(r.get("skipped", {})) or "none", ", ".join(r.get("failed", {})) or "none"))
    if r.get("noisy"):
        out.append("**Noisy run**: other work used the machine during measured runs (notes below).\n")
    out.append(f"{m.get('date')} · {m.get('cpu_model')} × {m.get('cores')} · Python {m.get('python')}"
               f" · wasmtime {m.get('wasmtime')} · {m.get('nginx')} · commit {m.get('git_commit')}\n")
    out.append("| scenario | req/s | p50 ms | p99 ms | CPU µs/req | CPU vs baseline |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in SCENARIOS:
        s = r["scenarios"].get(name)
        if s is None:
            continue
        ratio = vs.get(name, {}).get("cpu_us_per_req")
        out.append(f"| `{name}` | {_f(s['rps'], ',.0f')} | {_f(s['p50_ms'], '.2f')} | "
                   f"{_f(s['p99_ms'], '.2f')} | {_f(s['cpu_us_per_req'], '.1f')} | "
                   f"{_f(ratio, '.2f')} |")
    out.append("")
    for name, v in r.get("ratios", {}).get("h2_cpu_vs", {}).items():
        if v["vs_gateway_plain"] is not None:
            out.append(f"- `{name}` CPU/req: {v['vs_gateway_plain']:.2f}× `gateway_plain`'s, "
                       f"{_f(v['vs_same_proxy_http1'], '.2f')}× the same proxy's over HTTP/1.1")
    h, c, cs = r.get("chain_half_rate"), r.get("crossing", {}), r.get("cold_start")
    if h:
        out.append(f"- `gateway_chain` at half its peak ({h['target_rps']:,.0f} req/s, open loop): "
                   f"p50 {h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms"
                   + (f" (the proxy waited {h['proxy_wait_ms_per_s']:.0f} ms/s for a CPU)"
                      if h.get("proxy_wait_ms_per_s") is not None else ""))
    out.append(f"- crossing: guest callback {c.get('guest_call_us')} µs, host call "
               f"{c.get('host_call_us')} µs")
    if cs:
        out.append(f"- cold start, {cs['filters']} filters, warm module cache: {cs['seconds']:.3f} s")
    w = r.get("worker_rounds")
    if w:
        m = w["cpu_us_per_req_median"]
        out.append(f"- two workers, paired: one worker {m['gateway_chain']:.1f}, one worker on the load core "
                   f"{m['gateway_chain_load_core']:.1f}, two workers {m['gateway_chain_2w']:.1f} µs/req; "
                   f"two ÷ one {w['chain_2w_vs_chain']}, the load core ÷ the proxy core "
                   f"{w['load_core_vs_chain']}, two ÷ the two single workers' mean {w['chain_2w_vs_both_cores']}")
    tls = r.get("ratios", {}).get("tls_cpu_vs_plain", {})
    if any(v is not None for v in tls.values()):
        out.append(f"- TLS keep-alive CPU/req ÷ plain: `gateway_tls`/`gateway_plain` {_f(tls.get('gateway_tls'), '')},"
                   f" `nginx_tls`/`nginx_proxy` {_f(tls.get('nginx_tls'), '')}")
    for who, h in (r.get("tls_handshake") or {}).items():
        out.append(f"- full TLS handshake, {who}: {h['connections_per_core_s']:,} new connections/s per core "
                   f"({h['cpu_us_per_connection']:.0f} µs CPU each, incl. one request)")
    rs = r.get("rebuild_stall")
    if rs:
        a, d = rs["alone"], rs["rebuilding"]
        out.append(f"- another route at {rs['rate']:,} req/s while a filter keeps rebuilding "
                   f"({rs['configure_ms']} ms on_configure, {rs['rebuilds']} rebuilds): p50 "
                   f"{a['p50_ms']:.2f} → {d['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} → "
                   f"{d['p99_ms']:.2f} ms ({rs['p99_vs_alone']}× alone)")
    out.append("")
    out.append("| target | value | bar | |")
    out.append("| --- | ---: | ---: | --- |")
    for t in r.get("ratios", {}).get("targets", {}).values():
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        out.append(f"| {t['what']} | {_f(t['value'], '')} | {t['target']} | {met} |")
    if r.get("notes"):
        out.append("\nNotes from the run:\n")
        out += [f"- {n}" for n in r["notes"]]
    return "\n".join(out) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "latest.json"
    sys.stdout.write(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
