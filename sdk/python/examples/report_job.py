#!/usr/bin/env python3
"""A sharded job handler: each worker of the group scans only its slice of the users
(`user_id % shard_total == shard_index`), logs progress to the run history, and
stops cleanly when the shard is cancelled (kill, timeout, drain).

    cargo run -p chime -- dev                 # in another terminal: job demo-report
    python examples/report_job.py             # joins group "demo" as a third worker

`chime dev` fires `demo-report` every 5 s in 4 shards spread over its workers; this
process registers the same handler (`demo.report`) in the same group, so some
shards come here. Against a real cluster:

    chime job create --name nightly-report --group reports --handler demo.report \\
        --cron "0 0 2 * * *" --routing sharding-broadcast --shards 8 --timeout-ms 600000
    python examples/report_job.py --coordinator http://coordinator:7070 --group reports \\
        --token-file worker.token

SIGTERM or Ctrl-C drains: running shards finish (or are cancelled after
--drain-timeout-ms) and report before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

try:
    import chime_sdk  # noqa: F401
except ImportError:  # run from a checkout without installing the SDK
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chime_sdk import JobContext, Worker

USERS = 100_000  # the table this demo "scans"


def main() -> None:
    ap = argparse.ArgumentParser(description="sharded job handler example")
    ap.add_argument("--coordinator", default="http://127.0.0.1:7070", help="endpoint(s), comma-separated")
    ap.add_argument("--group", default="demo")
    ap.add_argument("--worker-id", default="python-reporter")
    ap.add_argument("--token-file")
    ap.add_argument("--drain-timeout-ms", type=int, default=10_000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    worker = Worker(coordinator=a.coordinator, group=a.group, worker_id=a.worker_id, token_file=a.token_file,
                    drain_timeout_ms=a.drain_timeout_ms)

    @worker.job("demo.report")
    async def report(ctx: JobContext) -> str:
        params = json.loads(ctx.params) if ctx.params.strip().startswith("{") else {}
        batch = int(params.get("batch", 10_000))
        mine = range(ctx.shard_index, USERS, ctx.shard_total)  # this shard's slice
        ctx.log(f"shard {ctx.shard_index}/{ctx.shard_total}: {len(mine)} users, batch {batch}")
        done = 0
        try:
            for start in range(0, len(mine), batch):
                await asyncio.sleep(0.05)  # stands for one query + push of a batch
                done += len(mine[start:start + batch])
            ctx.log(f"{done} users done")
        except asyncio.CancelledError:
            # Kill, timeout or drain: the shard ends as cancelled; say how far it got.
            ctx.log(f"cancelled ({ctx.cancel_reason}) after {done} users")
            raise
        print(f"{ctx.job} shard {ctx.shard_index}/{ctx.shard_total}: {done} users (fire {ctx.fire_id})", flush=True)
        return f"{done} users"

    worker.run_forever()


if __name__ == "__main__":
    main()
