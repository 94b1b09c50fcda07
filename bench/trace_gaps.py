"""Where a training step's GPU waits: read a Chrome trace (from `bench/train_throughput.py CASE:prof=trace`) and
print the step's wall time, the time the GPU was busy, the largest idle gaps with the CPU operators that were
running when each gap ended, every host synchronisation with its enclosing operators, and the kernels by total time.

usage: python bench/trace_gaps.py TRACE.json[.gz] [--gaps N] [--kernels N]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data["traceEvents"] if e.get("ph") == "X"]


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def enclosing(ops: list[dict], starts: list[float], t: float, depth: int = 4) -> str:
    """Names of the CPU operators (one thread's, sorted by start) running at time t, outermost first."""
    names = []
    for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
        e = ops[i]
        if e["ts"] <= t <= e["ts"] + e["dur"]:
            names.append(e["name"][:60])
        if t - ops[i]["ts"] > 5e6:
            break
    return " > ".join(reversed(names[:depth])) or "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gaps", type=int, default=15)
    ap.add_argument("--kernels", type=int, default=20)
    a = ap.parse_args()
    events = load(a.trace)
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
    main_tid = max({e["tid"] for e in cpu}, key=lambda t: sum(e["dur"] for e in cpu if e["tid"] == t))
    ops = sorted((e for e in cpu if e["tid"] == main_tid), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    busy_us = sum(b - a for a, b in busy)
    print(f"wall {(t1 - t0) / 1e3:.1f} ms; GPU busy {busy_us / 1e3:.1f} ms ({busy_us / (t1 - t0):.0%}); "
          f"{len(gpu)} GPU events, {len(runtime)} runtime calls")
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)
    idle_small = sum(g for g, *_ in gaps if g < 50)
    print(f"idle in gaps < 50 us: {idle_small / 1e3:.1f} ms over {sum(1 for g in gaps if g[0] < 50)} gaps; "
          f"gaps >= 50 us: {sum(g for g, *_ in gaps if g >= 50) / 1e3:.1f} ms over {sum(1 for g in gaps if g[0] >= 50)}")
    print(f"largest {a.gaps} idle gaps (ms, at ms from start, CPU operators when the gap ended):")
    for g, start, end in gaps[:a.gaps]:
        print(f"  {g / 1e3:7.2f} at {(start - t0) / 1e3:8.1f}  {enclosing(ops, starts, end)}")
    syncs = [e for e in runtime if e["name"] in SYNCS or (e["name"].startswith("cudaMemcpy") and e["dur"] > 100)]
    print(f"host waits ({len(syncs)}; total {sum(e['dur'] for e in syncs) / 1e3:.1f} ms):")
    by_site: dict[str, list[float]] = defaultdict(list)
    for e in syncs:
        by_site[f"{e['name']} in {enclosing(ops, starts, e['ts'])}"].append(e["dur"])
    for site, durs in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:15]:
        print(f"  {len(durs):4d} x, {sum(durs) / 1e3:7.1f} ms  {site}")
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in gpu:
        total[e["name"][:90]] += e["dur"]
        count[e["name"][:90]] += 1
    print(f"kernels by total time (top {a.kernels}):")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:a.kernels]:
        print(f"  {us / 1e3:8.2f} ms {count[name]:6d} x  {name}")
    top_cpu: dict[str, float] = defaultdict(float)
    for e in ops:
        top_cpu[e["name"][:70]] += e["dur"]
    print("CPU operators by inclusive time (top 15):")
    for name, us in sorted(top_cpu.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {us / 1e3:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
