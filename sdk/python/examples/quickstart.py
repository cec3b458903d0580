#!/usr/bin/env python3
"""Quickstart: schedule three reminders through the coordinator, receive them through
a chime worker's delivery service, print them, and exit.

    cargo run -p chime -- dev          # in another terminal
    python examples/quickstart.py

Against `chime dev` the defaults fit (coordinator 127.0.0.1:7070, delivery service
127.0.0.1:7071, no token); elsewhere pass --coordinator, --deliveries and the
token files. Exits 0 once it received every reminder, 1 if they did not all arrive
within --timeout-s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Set

try:
    import chime_sdk  # noqa: F401
except ImportError:  # run from a checkout without installing the SDK
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chime_sdk import ItemContext, NewItem, QueueClient, Worker


def clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


async def main(coordinator: str, deliveries: str, token_file: Optional[str], producer_token_file: Optional[str],
               timeout_s: float) -> int:
    run = uuid.uuid4().hex[:8]  # fresh ids on every run (an existing id is a duplicate)
    expected: Set[str] = set()
    all_seen = asyncio.Event()

    worker = Worker(deliveries=deliveries, token_file=token_file, credit=16)

    @worker.item("quickstart.remind")
    async def remind(ctx: ItemContext) -> None:
        now = int(time.time() * 1000)
        for item in ctx.items:
            lag = now - item.due_at_ms
            when = f"{lag} ms after due" if lag >= 0 else f"{-lag} ms early: merged, it fires with the earliest"
            print(f"[{clock(now)}] got {item.id} for {item.key}: {item.text!r} (attempt {item.attempt}, {when})")
            expected.discard(item.id)
        if ctx.merged:
            print(f"           ^ {len(ctx.items)} reminders of one user merged into one delivery")
        if not expected:
            all_seen.set()

    async with worker:  # subscribes now; drains when the block ends
        async with QueueClient(coordinator, token_file=producer_token_file) as q:
            items = [
                NewItem(f"hello-{run}-1", "quickstart.remind", key="user-42", in_ms=1_000, payload="coupon 7 opens soon"),
                # Same key and merge key, due within the merge window: one delivery.
                NewItem(f"hello-{run}-2", "quickstart.remind", key="user-7", merge_key="coupons", in_ms=2_000,
                        payload="coupon 8 opens soon"),
                NewItem(f"hello-{run}-3", "quickstart.remind", key="user-7", merge_key="coupons", in_ms=2_300,
                        payload="coupon 9 opens soon"),
            ]
            expected.update(i.id for i in items)
            outcomes = await q.enqueue(items)
            print(f"[{clock(int(time.time() * 1000))}] enqueued {len(items)} reminders: "
                  f"{', '.join(o.value for o in outcomes)}")
        try:
            await asyncio.wait_for(all_seen.wait(), timeout_s)
        except asyncio.TimeoutError:
            print(f"not delivered within {timeout_s} s: {sorted(expected)}", file=sys.stderr)
            return 1
    print("every reminder arrived; bye")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="chime Python SDK quickstart")
    ap.add_argument("--coordinator", default="http://127.0.0.1:7070")
    ap.add_argument("--deliveries", default="http://127.0.0.1:7071")
    ap.add_argument("--token-file", help="token of the delivery service (a worker token)")
    ap.add_argument("--producer-token-file", help="token of the coordinator's queue (a producer token)")
    ap.add_argument("--timeout-s", type=float, default=30.0)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.coordinator, a.deliveries, a.token_file, a.producer_token_file, a.timeout_s)))
