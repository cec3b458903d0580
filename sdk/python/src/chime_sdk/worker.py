"""`Worker`: one object that runs job handlers and item handlers together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import grpc

from ._conn import Token, parse_endpoint
from .items import ItemHandler, Subscriber, SubscriberOptions
from .jobs import JobHandler, Session, SessionOptions

__all__ = ["Worker"]

log = logging.getLogger("chime_sdk")

JH = TypeVar("JH", bound=JobHandler)
IH = TypeVar("IH", bound=ItemHandler)


class Worker:
    """Runs job handlers (a session with the coordinator) and item handlers (a
    subscription to a chime worker's delivery service), or either alone.

        worker = Worker(coordinator="http://127.0.0.1:7070", group="push",
                        deliveries="http://127.0.0.1:7071", token_file="worker.token")

        @worker.job("push.daily")
        async def daily(ctx: JobContext) -> str:
            ctx.log(f"shard {ctx.shard_index}/{ctx.shard_total}")
            return "done"

        @worker.item("coupon.remind")
        async def remind(ctx: ItemContext) -> None:
            for item in ctx.items:
                ...

        worker.run_forever()    # until SIGTERM/SIGINT, then drains

    Job side: `coordinator` is one `http://host:port` endpoint, several (a list or a
    comma-separated string; a follower redirects to the leader), or None for no job
    session. `group` is the worker group jobs name, `worker_id` a stable id unique
    among live workers (default: the host name, a pod's name), `capacity` the most
    shards it runs at once (a routing hint), `labels` free-form.

    Item side: `deliveries` is the delivery service of a chime worker
    (`http://127.0.0.1:7071` for a sidecar), or None. Unset, it is read from the
    environment variable `CHIME_DELIVERIES` (what the Helm chart's sidecar app pod
    sets), and `token_file` from `CHIME_DELIVERIES_TOKEN_FILE`. `credit` is the most
    deliveries held at once (1–10,000: the concurrency of item handlers),
    `settle_timeout_ms` how long one may run before it counts as failed unless the
    handler calls `ctx.extend()` (0: the chime worker's default, 30 s).

    `token`/`token_file`: the bearer token of both sides (a token file is re-read
    at each reconnection). `credentials`: TLS for `https://` endpoints (default: the
    system's roots). `drain_timeout_ms`: on stop, how long running handlers may
    finish before they are cancelled (job shards, reported CANCELLED) or released
    (item deliveries, handed back unprocessed).

    Logs go to the standard `logging` loggers `chime_sdk.jobs` and
    `chime_sdk.items`; the SDK installs no handler."""

    def __init__(
        self,
        *,
        coordinator: Union[str, Sequence[str], None] = None,
        group: str = "default",
        worker_id: Optional[str] = None,
        capacity: int = 16,
        labels: Optional[Mapping[str, str]] = None,
        deliveries: Optional[str] = None,
        credit: int = 64,
        settle_timeout_ms: int = 0,
        token: Optional[str] = None,
        token_file: Optional[Union[str, Path]] = None,
        drain_timeout_ms: int = 10_000,
        credentials: Optional[grpc.ChannelCredentials] = None,
    ):
        if deliveries is None:
            deliveries = os.environ.get("CHIME_DELIVERIES") or None
            if deliveries and token is None and token_file is None:
                token_file = os.environ.get("CHIME_DELIVERIES_TOKEN_FILE") or None
        if isinstance(coordinator, str):
            coordinator = [c for c in coordinator.split(",") if c.strip()]
        self._endpoints = [parse_endpoint(c) for c in coordinator or []]
        self._deliveries = parse_endpoint(deliveries) if deliveries else None
        if not self._endpoints and self._deliveries is None:
            raise ValueError("give a coordinator (job handlers), deliveries (item handlers), or both")
        self._token = Token(token, token_file)
        self.worker_id = worker_id or socket.gethostname()
        self._session_opts = (
            SessionOptions(
                self._endpoints,
                group,
                self.worker_id,
                self._token,
                capacity=capacity,
                labels=labels,
                drain_timeout_ms=drain_timeout_ms,
                credentials=credentials,
            )
            if self._endpoints
            else None
        )
        self._subscriber_opts = (
            SubscriberOptions(
                self._deliveries,
                self._token,
                f"{self.worker_id}/{os.getpid()}",
                credit=credit,
                settle_timeout_ms=settle_timeout_ms,
                drain_timeout_ms=drain_timeout_ms,
                credentials=credentials,
            )
            if self._deliveries is not None
            else None
        )
        self._jobs: Dict[str, JobHandler] = {}
        self._items: Dict[str, ItemHandler] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._parts: List[Union[Session, Subscriber]] = []
        self._stop_requested = False
        self._task: Optional["asyncio.Task[None]"] = None

    # --- registration -------------------------------------------------------------

    def job(self, name: str) -> Callable[[JH], JH]:
        """Decorator: registers an async job handler under `name`."""

        def register(fn: JH) -> JH:
            self.add_job_handler(name, fn)
            return fn

        return register

    def item(self, name: str) -> Callable[[IH], IH]:
        """Decorator: registers an async item handler under `name`."""

        def register(fn: IH) -> IH:
            self.add_item_handler(name, fn)
            return fn

        return register

    def add_job_handler(self, name: str, fn: JobHandler) -> None:
        if self._session_opts is None:
            raise ValueError(f"job handler {name!r}: this worker has no coordinator")
        if name in self._jobs:
            raise ValueError(f"job handler {name!r} registered twice")
        self._jobs[name] = fn

    def add_item_handler(self, name: str, fn: ItemHandler) -> None:
        if self._subscriber_opts is None:
            raise ValueError(f"item handler {name!r}: this worker has no deliveries endpoint")
        if name in self._items:
            raise ValueError(f"item handler {name!r} registered twice")
        self._items[name] = fn

    # --- running ------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until `stop()`, then drains every side and returns. Raises when a
        side cannot go on (a subscription the chime worker refuses as invalid)."""
        if self._loop is not None:
            raise RuntimeError("this worker is already running")
        self._loop = asyncio.get_running_loop()
        if self._session_opts is not None:
            if not self._jobs:
                raise ValueError("a coordinator is set but no job handler is registered")
            self._parts.append(Session(self._jobs, self._session_opts))
        if self._subscriber_opts is not None:
            if not self._items:
                raise ValueError("a deliveries endpoint is set but no item handler is registered")
            self._parts.append(Subscriber(self._items, self._subscriber_opts))
        if self._stop_requested:
            self._stop_parts()
        tasks = [asyncio.ensure_future(p.run()) for p in self._parts]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                self._stop_parts()  # the other side drains before the error surfaces
                await asyncio.wait(tasks)
                raise failed[0].exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()

    def stop(self) -> None:
        """Starts the drain; `run()` returns when it is over. Safe from any thread
        and from signal handlers."""
        loop = self._loop
        if loop is None:
            self._stop_requested = True
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stop_parts()
        else:
            loop.call_soon_threadsafe(self._stop_parts)

    def _stop_parts(self) -> None:
        self._stop_requested = True
        for p in self._parts:
            p.stop()

    async def __aenter__(self) -> "Worker":
        self._task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        assert self._task is not None
        self.stop()
        await self._task

    def run_forever(self) -> None:
        """`asyncio.run(worker.main())`: the whole program's entry point."""
        asyncio.run(self.main())

    async def main(self) -> None:
        """Runs until SIGTERM or SIGINT, then drains and returns. A second signal
        stops at once without waiting for the drain, raising KeyboardInterrupt.
        (Signal handlers need the main thread; elsewhere it is `run()`.)"""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.run())
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("%s: draining (send it again to stop at once)", sig.name)
                self.stop()
            else:
                log.warning("%s again: stopping without waiting for the drain", sig.name)
                task.cancel()

        installed = threading.current_thread() is threading.main_thread()
        if installed:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
        try:
            await task
        except asyncio.CancelledError:
            if signals < 2:
                raise
            raise KeyboardInterrupt from None
        finally:
            if installed:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
