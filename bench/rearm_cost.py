"""What a deadline re-arm adds to a top-level guest call (not a test).

    python -m bench.rearm_cost                    # this tree: ns a re-arm adds to a call
    python -m bench.rearm_cost --against TREE     # this tree and TREE (e.g. /work/main), each
                                                  # in its own process, rounds interleaved

A store re-arms its CPU deadline when its last arm is older than REARM_S (abi/engine/store.py,
_crossing.c "deadline re-arm"); live, about every other request of each filter does. Each
round times N calls of an exported add with the arm made stale before every call, and N with
it left fresh; the difference per call is what one re-arm costs. The median of the rounds is
reported (paired: both halves of a round run back to back in one process). With --against,
the two trees alternate round by round (one process each, started once), so machine load
falls on both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

WAT = b'(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'


def serve(n: int) -> None:
    """Child: a line on stdin runs one round; prints its ns per re-arm."""
    from abi.engine import Engine, Instance
    eng = Engine(cache_dir=tempfile.mkdtemp(prefix="rearm-cost-"))
    inst = Instance(eng, eng.compile(WAT), {}, memory_limit_bytes=1 << 20, deadline_ms=100)
    add, st = inst.export_func("add"), inst._st

    def timed(stale: bool) -> float:
        armed = -1e9 if stale else None
        t = time.perf_counter_ns()
        for i in range(n):
            st.armed_at = st.armed_at if armed is None else armed
            add(i, 1)
        return (time.perf_counter_ns() - t) / n

    print(f"{type(add).__name__} native_arm={getattr(st, 'native_arm', False)}", flush=True)
    for _ in sys.stdin:
        print(f"{timed(True) - timed(False):.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000, help="calls per half-round")
    p.add_argument("-r", "--rounds", type=int, default=9)
    p.add_argument("--against", metavar="TREE", help="another tree, its rounds interleaved")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.n)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", here)] + ([("against", os.path.abspath(args.against))] if args.against else [])
    procs = []
    for label, tree in trees:
        env = dict(os.environ, PYTHONPATH=tree)
        # This file, run with the tree's abi/ first on the path (TREE need not have this file).
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "-n", str(args.n)],
                                cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append((label, tree, proc, proc.stdout.readline().strip(), []))
    try:
        for _ in range(args.rounds):
            for _label, _tree, proc, _kind, out in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                out.append(float(proc.stdout.readline()))
    finally:
        for *_, proc, _kind, _out in procs:
            proc.stdin.close()
            proc.wait(30)
    for label, tree, _proc, kind, out in procs:
        print(f"{label:>9} ({tree}, {kind}): a re-arm adds {statistics.median(out):.0f} ns/call "
              f"(median of {len(out)}; all {' '.join(f'{x:.0f}' for x in out)})")
    if len(procs) == 2:
        a, b = procs[0][4], procs[1][4]
        print(f"this tree / against: ratio of medians {statistics.median(a) / statistics.median(b):.2f}")


if __name__ == "__main__":
    main()
