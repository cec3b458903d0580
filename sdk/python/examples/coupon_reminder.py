#!/usr/bin/env python3
"""Coupon reminders in Python: the item handler `coupon.remind` pushes each reminder
to a push provider over HTTP.

    python examples/coupon_reminder.py http://127.0.0.1:9000/push \\
        --deliveries http://127.0.0.1:7071 --token-file worker.token

Items are enqueued with the user as routing key (`u<user>`) and merge key, so two
reminders of one user due close together arrive as one delivery: one push naming
both coupons, `{"messages": [item ids], "users": [user]}`. A provider answering 503
(or failing) is retried 100-300 ms later by failing the delivery with
`retry_after_ms`; the chime worker does the retrying and dead-lettering.

Stdlib only: a small HTTP/1.1 client on asyncio keeps one persistent connection
per request in flight (64 by default), which keeps up with a provider at 20 ms
latency (3,200 pushes/s) without a thread per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import ssl
import sys
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

try:
    import chime_sdk  # noqa: F401
except ImportError:  # run from a checkout without installing the SDK
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chime_sdk import HandlerError, ItemContext, Worker

HANDLER = "coupon.remind"


class HttpError(Exception):
    pass


class JsonPoster:
    """POSTs JSON bodies to one URL over a pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{url}: expected http(s)://host[:port]/path")
        self._host = u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._head = (
            f"POST {self._path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self._idle: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._timeout = timeout_s

    async def post(self, body: bytes) -> int:
        """Sends one request; answers the status code."""
        conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        reader, writer = conn
        try:
            writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
            status, keep = await asyncio.wait_for(self._response(reader), self._timeout)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
        return status

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> Tuple[int, bool]:
        line = await reader.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        keep = parts[0] == b"HTTP/1.1"
        length: Optional[int] = None
        chunked = False
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection":
                keep = value == b"keep-alive" or (keep and value != b"close")
        if chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)  # the chunk and its CRLF
                if size == 0:
                    break
        elif length is not None:
            await reader.readexactly(length)
        else:
            await reader.read()  # the body runs to the end of the connection
            keep = False
        return status, keep


async def amain(a: argparse.Namespace) -> None:
    poster = JsonPoster(a.url)
    slots = asyncio.Semaphore(a.concurrency)
    # Twice as many deliveries held as pushes in flight: while a push's delivery is
    # being settled and replaced, another one already waits for its slot, so the
    # provider always has `concurrency` requests.
    worker = Worker(deliveries=a.deliveries, token_file=a.token_file, credit=2 * a.concurrency)

    @worker.item(HANDLER)
    async def remind(ctx: ItemContext) -> None:
        key = ctx.item.key
        if not (key.startswith("u") and key[1:].isdigit()):
            raise HandlerError(f"key {key!r} is not u<user>")  # retrying will not help
        body = json.dumps({"messages": [i.id for i in ctx.items], "users": [int(key[1:])]}).encode()
        try:
            async with slots:
                status = await poster.post(body)
        except (OSError, asyncio.TimeoutError, HttpError) as e:
            raise HandlerError(f"push failed: {e!r}", retry_after_ms=random.randint(100, 300)) from None
        if status != 200:
            raise HandlerError(f"push answered {status}", retry_after_ms=random.randint(100, 300))

    await worker.main()  # until SIGTERM/SIGINT, then drains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the push provider's URL, e.g. http://127.0.0.1:9000/push")
    ap.add_argument("--deliveries", default="http://127.0.0.1:7071", help="the chime worker's delivery service")
    ap.add_argument("--token-file", help="bearer token of the delivery service")
    ap.add_argument("--concurrency", type=int, default=64, help="pushes in flight at most")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(amain(a))


if __name__ == "__main__":
    main()
