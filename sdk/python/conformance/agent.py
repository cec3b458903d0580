#!/usr/bin/env python3
"""The Python SDK's conformance agent (contract: sdk/conformance/README.md).

    agent.py run     --record FILE [--coordinator URLS] [--group G] [--worker-id ID]
                     [--deliveries URL] [--items H1,H2] [--credit N]
                     [--token-file FILE] [--drain-timeout-ms MS]
    agent.py produce --record FILE --coordinator URL [--token-file FILE]
    agent.py bench   --deliveries URL --record FILE [--token-file F] [--credit N]
                     [--handler H]

It uses the SDK from this checkout (../src) when `chime_sdk` is not installed; its
dependencies (grpcio, protobuf) must be, e.g. in the venv scripts/ci.sh makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional

try:
    import chime_sdk  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chime_sdk import (
    HandlerError,
    InvalidArgumentError,
    ItemContext,
    JobContext,
    NewItem,
    QueueClient,
    Worker,
)


def now_ms() -> int:
    return int(time.time() * 1000)


class Records:
    """JSON lines appended to the record file, one `write` each, so a reader sees
    whole records and a `kill -9` loses at most the one being written."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "at_ms": now_ms(), **fields}) + "\n"
        os.write(self._fd, line.encode())


# --- run ---------------------------------------------------------------------------


def job_handlers(rec: Records, worker_id: str) -> Dict[str, Callable[[JobContext], Awaitable[Optional[str]]]]:
    async def shard(ctx: JobContext) -> str:
        rec.write(
            "shard",
            run_id=ctx.run_id,
            job=ctx.job,
            shard_index=ctx.shard_index,
            shard_total=ctx.shard_total,
            attempt=ctx.attempt,
            params=ctx.params,
            shard_params=ctx.shard_params,
            worker_id=worker_id,
        )
        line = f"shard {ctx.shard_index}/{ctx.shard_total}"
        ctx.log(line)
        return line

    async def block(ctx: JobContext) -> str:
        which = {"run_id": ctx.run_id, "shard_index": ctx.shard_index, "attempt": ctx.attempt}
        rec.write("block_start", **which)
        ms = None
        try:
            p = json.loads(ctx.params)
            if isinstance(p, dict) and isinstance(p.get("ms"), int):
                ms = p["ms"]
        except ValueError:
            pass  # not JSON: block until cancelled
        try:
            if ms is None:
                await asyncio.get_running_loop().create_future()  # never done
            else:
                await asyncio.sleep(ms / 1000.0)
        except asyncio.CancelledError:  # the SDK cancels the task on Cancel and drain
            rec.write("cancelled", **which)
            raise
        rec.write("block_done", **which)
        return "done"

    async def fail(ctx: JobContext) -> str:
        raise RuntimeError("planned failure")

    return {"conf.shard": shard, "conf.block": block, "conf.fail": fail}


def item_handler(rec: Records) -> Callable[[ItemContext], Awaitable[None]]:
    async def handle(ctx: ItemContext) -> None:
        payload = ctx.items[0].payload.decode("utf-8", "replace")
        ids = [i.id for i in ctx.items]
        attempts = [i.attempt for i in ctx.items]
        if payload == "hold" or (payload == "hold-once" and ctx.attempt == 1):
            rec.write("held", handler=ctx.handler, ids=ids, attempts=attempts)
            await asyncio.Event().wait()  # until a drain gives up on it (then released)
        if payload.startswith("sleep:"):
            rec.write("sleeping", handler=ctx.handler, ids=ids)
            await asyncio.sleep(int(payload[len("sleep:") :]) / 1000.0)
        fails = payload == "fail" or payload.startswith("fail-after:")
        rec.write(
            "item",
            handler=ctx.handler,
            ids=ids,
            keys=[i.key for i in ctx.items],
            attempts=attempts,
            payloads=[i.payload.decode("utf-8", "replace") for i in ctx.items],
            merged=ctx.merged,
            outcome="fail" if fails else "ack",
        )
        if payload == "fail":
            raise HandlerError("planned failure")
        if payload.startswith("fail-after:"):
            raise HandlerError("planned failure", retry_after_ms=int(payload[len("fail-after:") :]))

    return handle


def cmd_run(a: argparse.Namespace) -> int:
    if not a.coordinator and not a.deliveries:
        print("run: give --coordinator, --deliveries, or both", file=sys.stderr)
        return 2
    rec = Records(a.record)
    worker_id = a.worker_id or socket.gethostname()
    worker = Worker(
        coordinator=a.coordinator,
        group=a.group,
        worker_id=worker_id,
        deliveries=a.deliveries,
        credit=a.credit,
        token_file=a.token_file,
        drain_timeout_ms=a.drain_timeout_ms,
    )
    if a.coordinator:
        for name, fn in job_handlers(rec, worker_id).items():
            worker.add_job_handler(name, fn)
    if a.deliveries:
        handle = item_handler(rec)
        for name in [n.strip() for n in a.items.split(",") if n.strip()]:
            worker.add_item_handler(name, handle)
    rec.write("started", worker_id=worker_id)
    try:
        worker.run_forever()
    except Exception as e:  # noqa: BLE001 — reported, exit code says it
        print(f"agent: {e}", file=sys.stderr)
        return 1
    rec.write("drained")
    return 0


# --- produce -----------------------------------------------------------------------


async def produce(rec: Records, q: QueueClient) -> None:
    def step(name: str, outcome: Any) -> None:
        rec.write("produced", step=name, outcome=outcome)

    def values(xs: List[Any]) -> List[str]:
        return [x.value for x in xs]

    in_1h = 3_600_000
    step(
        "enqueue",
        values(
            await q.enqueue(
                [
                    NewItem("p-1", "conf.item", key="user-p", payload="one"),
                    NewItem("p-2", "conf.item", key="user-p", in_ms=in_1h, payload="two"),
                    NewItem("p-3", "conf.item", in_ms=in_1h, payload="three"),
                ]
            )
        ),
    )
    step("enqueue-again", values(await q.enqueue([NewItem("p-1", "conf.item", key="user-p", payload="one")])))
    got = await q.get(("p-2", "user-p"))
    step("get", got.state.value if got is not None else "not_found")
    step("reschedule", (await q.reschedule(("p-2", "user-p"), now_ms())).value)
    step("cancel", (await q.cancel("p-3")).value)
    step("cancel-again", (await q.cancel("p-3")).value)
    missing = await q.get("nope")
    step("get-missing", missing.state.value if missing is not None else "not_found")
    try:
        await q.enqueue([NewItem("p-bad", "bad handler!")])
        step("bad-input", "accepted")
    except InvalidArgumentError as e:
        step("bad-input", e.field)


def cmd_produce(a: argparse.Namespace) -> int:
    rec = Records(a.record)

    async def main() -> None:
        async with QueueClient(a.coordinator, token_file=a.token_file) as q:
            await produce(rec, q)

    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 — an unexpected failure of a call
        print(f"agent produce: {e}", file=sys.stderr)
        return 1
    return 0


# --- bench -------------------------------------------------------------------------


def cmd_bench(a: argparse.Namespace) -> int:
    fd = os.open(a.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lines: List[str] = []

    def flush() -> None:
        if lines:
            data = "".join(lines).encode()
            lines.clear()
            while data:
                data = data[os.write(fd, data) :]

    worker = Worker(deliveries=a.deliveries, credit=a.credit, token_file=a.token_file)

    @worker.item(a.handler)
    async def bench(ctx: ItemContext) -> None:
        start = int(time.time() * 1000)
        for i in ctx.items:
            lines.append(f"{i.id} {i.due_at_ms} {start} {i.attempt}\n")

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.05)  # the contract asks for at least every 100 ms
            flush()

    async def main() -> None:
        f = asyncio.get_running_loop().create_task(flusher())
        try:
            await worker.main()
        finally:
            f.cancel()

    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001
        print(f"agent bench: {e}", file=sys.stderr)
        return 1
    finally:
        flush()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="agent.py", description="chime SDK conformance agent (Python)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--record", required=True)
    r.add_argument("--coordinator")
    r.add_argument("--group", default="conformance")
    r.add_argument("--worker-id")
    r.add_argument("--deliveries")
    r.add_argument("--items", default="conf.item")
    r.add_argument("--credit", type=int, default=64)
    r.add_argument("--token-file")
    r.add_argument("--drain-timeout-ms", type=int, default=10_000)
    pr = sub.add_parser("produce")
    pr.add_argument("--record", required=True)
    pr.add_argument("--coordinator", required=True)
    pr.add_argument("--token-file")
    b = sub.add_parser("bench")
    b.add_argument("--deliveries", required=True)
    b.add_argument("--record", required=True)
    b.add_argument("--token-file")
    b.add_argument("--credit", type=int, default=64)
    b.add_argument("--handler", default="bench")
    a = p.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "produce":
        return cmd_produce(a)
    return cmd_bench(a)


if __name__ == "__main__":
    sys.exit(main())
