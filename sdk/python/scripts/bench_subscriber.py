#!/usr/bin/env python3
"""Throughput of Python item subscribers: N items due at one instant T0, drained by S
conformance agents in `bench` mode, each subscribed to its own `chime worker`.

    python scripts/bench_subscriber.py --items 200000 --subscribers 2

Starts redis-server, etcd, a coordinator (to enqueue through `chime.v1.Queue`), S
chime workers and S agents on free loopback ports (`$CHIME_BIN` or the workspace's
target/{release,debug}/chime), waits until every item was handled, and prints one JSON
line: drain rate (items / (last handler start - T0)), lag after T0, duplicates and
missing ids, and the CPU seconds each kind of process used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SDK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SDK / "tests"))
sys.path.insert(0, str(SDK / "src"))

from cluster import Cluster, Proc, python_agent, wait_until  # noqa: E402

from chime_sdk import NewItem, QueueClient  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: List[int], p: float) -> int:
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else 0


async def enqueue(url: str, token: Path, n: int, due_at_ms: int) -> float:
    t0 = time.monotonic()
    async with QueueClient(url, token_file=token, timeout_ms=120_000) as q:
        batch = 10_000
        for start in range(0, n, batch):
            await q.enqueue(
                [NewItem(f"b-{i}", "bench", due_at_ms=due_at_ms) for i in range(start, min(n, start + batch))]
            )
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--subscribers", type=int, default=2)
    ap.add_argument("--credit", type=int, default=1024)
    ap.add_argument("--lead-ms", type=int, default=0, help="T0 - start of the enqueue (0: sized to N)")
    ap.add_argument("--worker-flag", action="append", default=[], help="extra `chime worker` flag (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the directory with logs and records")
    a = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="chime-pybench-"))
    c = Cluster(d)
    agents: List[Proc] = []
    try:
        c.start_coordinator()
        workers = [c.start_worker(f"cw{i}", a.worker_flag) for i in range(a.subscribers)]
        records = [d / f"bench{i}.rec" for i in range(a.subscribers)]
        for i, w in enumerate(workers):
            agents.append(python_agent(d, f"agent{i}", ["bench", "--deliveries", w.deliveries, "--record",
                                                         str(records[i]), "--token-file", str(c.tokens["worker"]),
                                                         "--credit", str(a.credit)]))
        wait_until("the agents subscribed", 20,
                   lambda: all("subscribed to" in p.log() for p in agents))
        lead = a.lead_ms or max(2_000, a.items // 20)
        t0 = int(time.time() * 1000) + lead
        took = asyncio.run(enqueue(c.coordinators[0], c.tokens["producer"], a.items, t0))
        if time.time() * 1000 > t0:
            raise SystemExit(f"enqueue took {took:.1f} s, past T0; raise --lead-ms")
        cpu0: Dict[str, float] = {}
        procs = {"agents": [p.p.pid for p in agents], "chime workers": [w.proc.p.pid for w in workers],
                 "redis": [c.procs[0].p.pid]}
        for k, pids in procs.items():
            cpu0[k] = sum(cpu_s(p) for p in pids)

        def lines() -> int:
            return sum(r.read_bytes().count(b"\n") for r in records if r.exists())

        wait_until(f"{a.items} items handled", 60 + a.items / 2_000, lambda: lines() >= a.items, every_s=0.2)
        time.sleep(0.3)  # a duplicate would show up now
        cpu = {k: round(sum(cpu_s(p) for p in pids) - cpu0[k], 2) for k, pids in procs.items()}
        seen: Dict[str, int] = {}
        lags: List[int] = []
        last = 0
        for r in records:
            for line in r.read_text().splitlines():
                item, due, start, _attempt = line.split(" ")
                seen[item] = seen.get(item, 0) + 1
                lags.append(int(start) - t0)
                last = max(last, int(start))
        lags.sort()
        elapsed = (last - t0) / 1000.0
        print(json.dumps({
            "items": a.items,
            "subscribers": a.subscribers,
            "credit": a.credit,
            "enqueue_s": round(took, 2),
            "drain_items_per_s": round(a.items / elapsed) if elapsed > 0 else None,
            "lag_ms": {"p50": pct(lags, 0.5), "p99": pct(lags, 0.99), "max": lags[-1] if lags else 0},
            "early": sum(1 for x in lags if x < 0),
            "duplicates": sum(v - 1 for v in seen.values()),
            "missing": a.items - len(seen),
            "cpu_s": cpu,
            "dir": str(d) if a.keep else None,
        }))
        return 0
    finally:
        for p in agents:
            p.stop()
        c.stop()
        if not a.keep:
            import shutil

            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
