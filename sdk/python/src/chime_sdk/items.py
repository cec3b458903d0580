"""Item handlers: the delayed items a `chime worker` hands over its delivery service.

The chime worker (a sidecar or a pool) does all the queue work; this module opens
`chime.v1.Deliveries/Subscribe` (see proto/chime/v1/delivery.proto), runs the
handler of each delivery, and settles it: an ack when the handler returns, a
failure when it raises (`HandlerError` chooses the retry delay), a release when a
drain runs out of time.

Throughput is the point of the design:

* Handlers run on a pool of long-lived runner tasks rather than one task per
  delivery (a task costs ~13 µs on CPython 3.11, a direct await ~1 µs). A runner
  takes deliveries from a shared queue and awaits each handler in turn; when it
  takes one while more are waiting it wakes one more runner, so handlers that block
  (I/O) get a runner each while handlers that return at once are run back to back by
  one runner. Each handler runs inside its runner's task for its whole life, so
  `asyncio.current_task()`, `asyncio.timeout()` and task groups behave as in any task.
* Settlements are batched: one `Settle` per 5 ms, or at once when a quarter of the
  credit (at most 512) is waiting.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from typing import Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Set

import grpc
import grpc.aio

from ._conn import EOF, Backoff, Endpoint, Token, open_channel
from ._proto import delivery_pb2 as pb
from .errors import HandlerError, from_rpc_error

__all__ = ["Item", "ItemContext", "ItemHandler", "SubscriberOptions"]

log = logging.getLogger("chime_sdk.items")

SUBSCRIBE = "/chime.v1.Deliveries/Subscribe"
HANDLER_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Settlements wait at most this long to go out together in one `Settle`…
SETTLE_FLUSH_S = 0.005
# …or go at once when a quarter of the credit, capped at this, is waiting (a batch
# of failures with 4 KiB errors stays far below the 4 MiB message limit).
SETTLE_MAX_BATCH = 512

# How long handlers cancelled at the drain timeout may take to unwind.
CANCEL_GRACE_S = 2.0

# A Failure's error is kept cut to 4 KiB by the chime worker; it is cut here too,
# for the message limit.
_MAX_ERROR_BYTES = 4096


class Item:
    """One delayed item of a delivery."""

    __slots__ = ("id", "key", "due_at_ms", "payload", "attempt", "max_attempts", "merge_key")

    def __init__(
        self,
        id: str,
        key: str,
        due_at_ms: int,
        payload: bytes,
        attempt: int,
        max_attempts: int,
        merge_key: str,
    ):
        self.id = id
        """Item id."""
        self.key = key
        """Routing key (the id when it was enqueued without one)."""
        self.due_at_ms = due_at_ms
        """When it was due, Unix ms."""
        self.payload = payload
        """The payload as the producer gave it."""
        self.attempt = attempt
        """This attempt, 1-based."""
        self.max_attempts = max_attempts
        """Attempts before it is dead-lettered."""
        self.merge_key = merge_key
        """Merge key (empty: none)."""

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    def __repr__(self) -> str:
        return (
            f"Item(id={self.id!r}, key={self.key!r}, due_at_ms={self.due_at_ms}, "
            f"attempt={self.attempt}/{self.max_attempts}, payload={self.payload[:32]!r})"
        )


class ItemContext:
    """One delivery: a handler call for one item, or several merged items (same
    routing key, handler and merge key, due within the merge window).

    Return from the handler to ack it; raise to fail it (`HandlerError` sets the
    retry delay). A handler cancelled by a drain that ran out of time (an
    `asyncio.CancelledError` at its current `await`, and `cancelled` set) has its
    items handed back to the queue unprocessed."""

    __slots__ = (
        "delivery_id",
        "handler",
        "queue",
        "items",
        "settle_deadline_ms",
        "traceparent",
        "_stream",
        "_cancel_requested",
        "_cancelled",
        "_runner",
    )

    def __init__(
        self,
        delivery_id: int,
        handler: str,
        queue: int,
        items: List[Item],
        settle_deadline_ms: int,
        stream: Optional["_Stream"] = None,
        traceparent: str = "",
    ):
        self.delivery_id = delivery_id
        """Names the delivery on its stream."""
        self.handler = handler
        """The handler it is for."""
        self.queue = queue
        """Queue the items came from."""
        self.items = items
        """The items, earliest due first (more than one when merged)."""
        self.settle_deadline_ms = settle_deadline_ms
        """Settle or `extend` by this instant (the chime worker's clock, Unix ms)."""
        self.traceparent = traceparent
        """W3C trace context of the chime worker's span of this delivery (a child of
        the producer's): pass it to your tracer as the parent of the handler's span
        (OpenTelemetry: `TraceContextTextMapPropagator().extract({"traceparent":
        ctx.traceparent})`). Empty when the items carry no sampled trace context."""
        self._stream = stream
        self._cancel_requested = False
        self._cancelled: Optional[asyncio.Event] = None
        self._runner: Optional[_Runner] = None

    @property
    def item(self) -> Item:
        """The first (earliest) item."""
        return self.items[0]

    @property
    def attempt(self) -> int:
        """This delivery's attempt (of its first item), 1-based."""
        return self.items[0].attempt

    @property
    def merged(self) -> bool:
        """More than one item was merged into this delivery."""
        return len(self.items) > 1

    @property
    def worker_id(self) -> str:
        """Id of the chime worker that delivered it."""
        return self._stream.worker_id if self._stream is not None else ""

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the SDK gives up on this handler (a drain ran out of time, or the
        stream to the chime worker broke); the handler is cancelled at the same time."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
            if self._cancel_requested:
                self._cancelled.set()
        return self._cancelled

    def extend(self, ms: int = 0) -> bool:
        """Asks for `ms` more milliseconds (1–3,600,000 from now; 0: the subscription's
        settle timeout) before this delivery counts as a failed attempt. Answers False
        when the delivery is no longer held (settled, or its stream is gone)."""
        if not 0 <= ms <= 3_600_000:
            raise ValueError(f"extend: {ms} ms is not within 0..3600000")
        s = self._stream
        if s is None or s.closed or self.delivery_id not in s.held:
            return False
        s.send(pb.SubscribeRequest(extend=pb.Extend(delivery_ids=[self.delivery_id], extend_ms=ms)))
        return True

    def _request_cancel(self) -> None:
        self._cancel_requested = True
        if self._cancelled is not None:
            self._cancelled.set()


ItemHandler = Callable[[ItemContext], Awaitable[None]]
"""An item handler: `async def handle(ctx: ItemContext) -> None`."""


class SubscriberOptions:
    """How the item side subscribes (see `Worker` for the meaning of each);
    `subscriber` names this process in the chime worker's logs."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: Token,
        subscriber: str,
        credit: int = 64,
        settle_timeout_ms: int = 0,
        drain_timeout_ms: int = 10_000,
        credentials: Optional[grpc.ChannelCredentials] = None,
    ):
        if not 1 <= credit <= 10_000:
            raise ValueError(f"credit {credit}: must be 1..10000")
        if settle_timeout_ms != 0 and not 1_000 <= settle_timeout_ms <= 3_600_000:
            raise ValueError(f"settle_timeout_ms {settle_timeout_ms}: must be 0 or 1000..3600000")
        self.endpoint = endpoint
        self.token = token
        self.subscriber = subscriber[:253]
        self.credit = credit
        self.settle_timeout_ms = settle_timeout_ms
        self.drain_timeout_ms = drain_timeout_ms
        self.credentials = credentials


class _Settler:
    """Gathers settlements and sends them as few `Settle` messages: after
    `interval_s`, or at once when `threshold` are waiting."""

    def __init__(
        self,
        send: Callable[[pb.SubscribeRequest], None],
        interval_s: float,
        threshold: int,
    ):
        self._send = send
        self._interval = interval_s
        self._threshold = threshold
        self._acks: List[int] = []
        self._failures: List[pb.Failure] = []
        self._releases: List[int] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    @property
    def pending(self) -> int:
        return len(self._acks) + len(self._failures) + len(self._releases)

    def ack(self, delivery_id: int) -> None:
        self._acks.append(delivery_id)
        self._added()

    def fail(self, delivery_id: int, error: str, retry_after_ms: Optional[int]) -> None:
        raw = error.encode("utf-8", "replace")
        if len(raw) > _MAX_ERROR_BYTES:
            error = raw[:_MAX_ERROR_BYTES].decode("utf-8", "ignore")
        f = pb.Failure(delivery_id=delivery_id, error=error)
        if retry_after_ms is not None:
            f.retry_after_ms = retry_after_ms
        self._failures.append(f)
        self._added()

    def release(self, delivery_id: int) -> None:
        self._releases.append(delivery_id)
        self._added()

    def _added(self) -> None:
        if self.pending >= self._threshold:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Sends what is waiting now (nothing when nothing is)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending:
            return
        settle = pb.Settle(acks=self._acks, failures=self._failures, releases=self._releases)
        self._acks, self._failures, self._releases = [], [], []
        self._send(pb.SubscribeRequest(settle=settle))

    def discard(self) -> None:
        """Forgets what is waiting (its stream is gone: the ids mean nothing elsewhere)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._acks, self._failures, self._releases = [], [], []


class _Runner:
    __slots__ = ("task", "ctx", "doomed")

    def __init__(self, task: "asyncio.Task[None]"):
        self.task = task
        self.ctx: Optional[ItemContext] = None
        # Cancelled for the delivery it runs: it exits after that one rather than
        # carry a consumed cancellation into the next handler.
        self.doomed = False


class _Runners:
    """The pool of runner tasks (see the module doc)."""

    def __init__(self, run_one: Callable[[ItemContext], Awaitable[None]]):
        self._run_one = run_one
        self._queue: Deque[ItemContext] = collections.deque()
        self._idle: List["asyncio.Future[None]"] = []
        self._waking = 0  # runners woken or spawned that have not looked at the queue yet
        self._tasks: Set["asyncio.Task[None]"] = set()

    def submit(self, ctx: ItemContext) -> None:
        self._queue.append(ctx)
        if not self._waking:
            self._wake()

    def _wake(self) -> None:
        self._waking += 1
        while self._idle:
            f = self._idle.pop()
            if not f.done():
                f.set_result(None)
                return
        t = asyncio.get_running_loop().create_task(self._runner())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def cancel(self, ctx: ItemContext) -> None:
        """Cancels the handler running `ctx` (one not started yet is skipped by its
        runner, which sees `ctx._cancel_requested`)."""
        r = ctx._runner
        if r is not None and r.ctx is ctx and not r.doomed:
            r.doomed = True
            r.task.cancel()

    async def _runner(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        me = _Runner(task)
        loop = asyncio.get_running_loop()
        while True:
            self._waking -= 1
            q = self._queue
            while q:
                ctx = q.popleft()
                if q and not self._waking:
                    self._wake()  # more waiting: one more runner, in case this one blocks
                me.ctx = ctx
                ctx._runner = me
                await self._run_one(ctx)
                me.ctx = None
                if me.doomed:
                    if q and not self._waking:
                        self._wake()  # hand what waits to another runner
                    return
            f: "asyncio.Future[None]" = loop.create_future()
            self._idle.append(f)
            await f

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _Stream:
    """One `Subscribe` stream: what it holds, its settlements, its writer."""

    def __init__(self, call: "grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]", opts: SubscriberOptions):
        self.call = call
        self.worker_id = ""
        self.held: Dict[int, ItemContext] = {}
        self.closed = False
        self.subscribed = False
        self.draining = False
        self.emptied = asyncio.Event()  # set when a drain finds `held` empty
        self.arrived = asyncio.Event()  # set when deliveries arrive during a drain
        self.drained = asyncio.Event()  # set when the worker answers our Drain
        self._out: "asyncio.Queue[Optional[pb.SubscribeRequest]]" = asyncio.Queue()
        threshold = max(1, min(SETTLE_MAX_BATCH, opts.credit // 4))
        self.settler = _Settler(self.send, SETTLE_FLUSH_S, threshold)
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, m: pb.SubscribeRequest) -> None:
        if not self.closed:
            self._out.put_nowait(m)

    def finish_writing(self) -> None:
        """Flushes the settlements and half-closes the stream after them."""
        self.settler.flush()
        if not self.closed:
            self._out.put_nowait(None)

    async def _write(self) -> None:
        try:
            while True:
                m = await self._out.get()
                if m is None:
                    await self.call.done_writing()
                    return
                await self.call.write(m)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            # The read side sees the same failure and reports it.
            log.debug("delivery stream write failed: %s", e)

    def _settled(self, ctx: ItemContext) -> bool:
        """Drops `ctx` from the held set; False when it was not held (its stream is
        gone, or it was settled already)."""
        if self.held.pop(ctx.delivery_id, None) is None:
            return False
        if self.draining and not self.held:
            self.emptied.set()
        return True

    def ack(self, ctx: ItemContext) -> None:
        if self._settled(ctx):
            self.settler.ack(ctx.delivery_id)

    def fail(self, ctx: ItemContext, error: str, retry_after_ms: Optional[int]) -> None:
        if self._settled(ctx):
            self.settler.fail(ctx.delivery_id, error, retry_after_ms)

    def release(self, ctx: ItemContext) -> None:
        if self._settled(ctx):
            self.settler.release(ctx.delivery_id)

    def close(self, runners: _Runners) -> None:
        """The stream is over: its unsettled deliveries already count as failed (or
        were handed back) on the chime worker's side, so their handlers are
        cancelled — finishing them would only duplicate the retry's work."""
        if self.closed:
            return
        self.closed = True
        self.settler.discard()
        held, self.held = self.held, {}
        for ctx in held.values():
            ctx._request_cancel()
            runners.cancel(ctx)
        self.emptied.set()
        self.writer.cancel()
        self.call.cancel()


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Subscriber:
    """Runs item handlers over one delivery stream, reconnecting until stopped."""

    def __init__(self, handlers: Mapping[str, ItemHandler], opts: SubscriberOptions):
        if not handlers:
            raise ValueError("no item handlers to subscribe")
        if len(handlers) > 64:
            raise ValueError("at most 64 item handlers per subscription")
        for name in handlers:
            if not HANDLER_NAME.match(name):
                raise ValueError(f"item handler name {name!r}: 1-128 characters of [A-Za-z0-9._:-]")
        self._handlers = dict(handlers)
        self._opts = opts
        self._runners = _Runners(self._run_one)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Starts the drain (see `run`)."""
        self._stopping.set()

    async def run(self) -> None:
        """Subscribes and runs handlers until `stop()`, then drains: sends `Drain`,
        lets running handlers finish for up to the drain timeout, releases the rest,
        and closes the stream. Reconnects with backoff when a stream breaks; a
        refused token is logged (with `UNAUTHENTICATED`) and retried, since the token
        file may be fixed. A refused subscription (INVALID_ARGUMENT) raises."""
        backoff = Backoff()
        channel = open_channel(self._opts.endpoint, self._opts.credentials)
        try:
            while not self._stopping.is_set():
                ok = await self._one_stream(channel)
                if self._stopping.is_set():
                    break
                if ok:
                    backoff.reset()
                delay = backoff.next()
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._runners.close()
            await channel.close(None)

    async def _one_stream(self, channel: grpc.aio.Channel) -> bool:
        """One stream from subscribe to its end; True when it was subscribed."""
        o = self._opts
        try:
            md = o.token.metadata()
        except (OSError, ValueError) as e:
            log.error("cannot read the delivery token: %s", e)
            return False
        call: "grpc.aio.StreamStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]" = (
            channel.stream_stream(
                SUBSCRIBE,
                request_serializer=pb.SubscribeRequest.SerializeToString,
                response_deserializer=pb.SubscribeResponse.FromString,
            )(None, metadata=md)
        )
        stream = _Stream(call, o)
        stopper = asyncio.get_running_loop().create_task(self._drain_on_stop(stream))
        try:
            stream.send(
                pb.SubscribeRequest(
                    subscribe=pb.Subscribe(
                        handlers=sorted(self._handlers),
                        credit=o.credit,
                        subscriber=o.subscriber,
                        settle_timeout_ms=o.settle_timeout_ms,
                    )
                )
            )
            while True:
                m = await call.read()
                if m is EOF:
                    if not stream.draining:
                        log.info("delivery stream to %s ended", o.endpoint.url)
                    return stream.subscribed
                assert isinstance(m, pb.SubscribeResponse)
                kind = m.WhichOneof("kind")
                if kind == "deliver":
                    self._dispatch(stream, m.deliver.deliveries)
                elif kind == "subscribed":
                    s = m.subscribed
                    stream.subscribed = True
                    stream.worker_id = s.worker_id
                    log.info(
                        "subscribed to %s (chime worker %s, family %s, credit %d, settle timeout %d ms): %s",
                        o.endpoint.url, s.worker_id, s.family, s.credit, s.settle_timeout_ms,
                        ", ".join(sorted(self._handlers)),
                    )
                elif kind == "drained":
                    stream.drained.set()
                    stream.arrived.set()
                elif kind == "refused":
                    log.warning(
                        "chime worker refused settling %d deliveries: %s",
                        len(m.refused.delivery_ids), m.refused.reason,
                    )
                elif kind == "closing":
                    log.info(
                        "chime worker %s is closing (%s); settlements accepted for %d ms",
                        stream.worker_id, m.closing.reason,
                        max(0, m.closing.deadline_ms - int(time.time() * 1000)),
                    )
        except grpc.aio.AioRpcError as e:
            err = from_rpc_error(e)
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error("the delivery service at %s refused the token: UNAUTHENTICATED: %s", o.endpoint.url, e.details())
            elif e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise err from None
            elif e.code() == grpc.StatusCode.CANCELLED and stream.closed:
                pass  # we cancelled it: the drain is over
            else:
                log.warning("delivery stream to %s broke: %s", o.endpoint.url, err)
            return stream.subscribed
        except asyncio.CancelledError:
            if not stream.closed:
                raise
            return stream.subscribed  # we cancelled the call: the drain is over
        finally:
            stopper.cancel()
            stream.close(self._runners)

    async def _drain_on_stop(self, stream: _Stream) -> None:
        await self._stopping.wait()
        if not stream.subscribed:
            stream.close(self._runners)  # nothing held, nothing to settle
            return
        stream.draining = True
        stream.send(pb.SubscribeRequest(drain=pb.Drain()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._opts.drain_timeout_ms / 1000.0
        if stream.held:
            log.info("draining: %d deliveries running", len(stream.held))
        # Deliveries the chime worker sent before it read our Drain may still be on
        # the way; its `Drained` answer comes after the last of them. Run them too,
        # and close once everything is settled and `Drained` has arrived.
        while not (stream.drained.is_set() and not stream.held):
            left = max(0.0, deadline - loop.time())
            if stream.held:
                stream.emptied.clear()
                try:
                    await asyncio.wait_for(stream.emptied.wait(), left)
                except asyncio.TimeoutError:
                    await self._give_up(stream)
                    break
            else:
                stream.arrived.clear()
                try:
                    await asyncio.wait_for(stream.arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
        stream.finish_writing()
        # The chime worker ends the stream once it has our settlements; do not wait
        # for a peer that went silent.
        await asyncio.sleep(5.0)
        log.warning("delivery stream did not end 5 s after the drain; closing it")
        stream.close(self._runners)

    async def _give_up(self, stream: _Stream) -> None:
        """The drain timeout passed: cancels the handlers still running (they
        release their deliveries as they unwind) and releases the rest."""
        log.warning("drain timeout: releasing %d deliveries", len(stream.held))
        for ctx in list(stream.held.values()):
            ctx._request_cancel()
            self._runners.cancel(ctx)
            if ctx._runner is None:
                stream.release(ctx)  # never started; its runner will skip it
        if stream.held:
            stream.emptied.clear()
            try:
                await asyncio.wait_for(stream.emptied.wait(), CANCEL_GRACE_S)
            except asyncio.TimeoutError:
                for ctx in list(stream.held.values()):
                    stream.release(ctx)  # a handler that ignores its cancellation

    def _dispatch(self, stream: _Stream, deliveries: Sequence[pb.Delivery]) -> None:
        held = stream.held
        submit = self._runners.submit
        for d in deliveries:
            ctx = ItemContext(
                d.delivery_id,
                d.handler,
                d.queue,
                [
                    Item(i.id, i.key, i.due_at_ms, i.payload, i.attempt, i.max_attempts, i.merge_key)
                    for i in d.items
                ],
                d.settle_deadline_ms,
                stream,
                d.traceparent,
            )
            held[ctx.delivery_id] = ctx
            submit(ctx)
        if stream.draining:
            stream.arrived.set()

    async def _run_one(self, ctx: ItemContext) -> None:
        stream = ctx._stream
        assert stream is not None
        if ctx._cancel_requested:
            stream.release(ctx)  # given up before it started
            return
        handler = self._handlers.get(ctx.handler)
        if handler is None:
            stream.fail(ctx, f"no item handler {ctx.handler!r} in this subscriber", None)
            return
        try:
            await handler(ctx)
        except HandlerError as e:
            stream.fail(ctx, e.message, e.retry_after_ms)
        except asyncio.CancelledError:
            if not ctx._cancel_requested:
                raise  # the runner itself is being cancelled (shutdown)
            stream.release(ctx)
        except Exception as e:  # noqa: BLE001 — any handler error fails the delivery
            log.warning("item handler %s failed (delivery %d)", ctx.handler, ctx.delivery_id, exc_info=True)
            stream.fail(ctx, _describe(e), None)
        else:
            stream.ack(ctx)

