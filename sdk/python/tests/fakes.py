"""In-process gRPC servers standing in for chime in unit tests: the test plays the
server's side of a conversation message by message and sees everything the SDK
sends. No process, no port beyond an ephemeral loopback one."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional, Tuple, TypeVar

import grpc
import grpc.aio

from chime_sdk._proto import delivery_pb2 as dpb
from chime_sdk._proto import queue_pb2 as qpb
from chime_sdk._proto import worker_pb2 as wpb

T = TypeVar("T")

# Every FakeServer a scenario started; `run` stops them whatever the scenario did. A
# server left running (a test that failed before its `stop`) keeps gRPC's threads
# alive and the pytest process from exiting: CI then hangs instead of failing.
_live: List["FakeServer"] = []


def run(coro: Awaitable[T], timeout_s: float = 30.0) -> T:
    """Runs one scenario on a fresh event loop, failing it after `timeout_s`, and
    stops every fake server it started before the loop closes."""

    async def main() -> T:
        try:
            return await asyncio.wait_for(coro, timeout_s)
        finally:
            while _live:
                await _live.pop().stop()

    return asyncio.run(main())


async def eventually(what: str, cond: Callable[[], Optional[T]], timeout_s: float = 5.0) -> T:
    """Waits until `cond()` answers something truthy; fails naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


class Stream:
    """The server side of one bidirectional stream."""

    def __init__(self, context: Any):
        self.context = context
        self.received: List[Any] = []
        self.metadata = dict(context.invocation_metadata() or ())
        self._out: "asyncio.Queue[Any]" = asyncio.Queue()
        self.ended = asyncio.Event()  # the client half-closed or went away

    def send(self, m: Any) -> None:
        self._out.put_nowait(m)

    def end(self, code: Optional[grpc.StatusCode] = None, details: str = "",
            trailing: Tuple[Tuple[str, str], ...] = ()) -> None:
        """Ends the stream OK (no code) or with a status."""
        self._out.put_nowait(("end", code, details, trailing))

    async def next(self, kind: str, timeout_s: float = 5.0) -> Any:
        """The first received message of `kind` not taken yet (waits for it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for i, m in enumerate(self.received):
                if m.WhichOneof("kind") == kind:
                    del self.received[i]
                    return getattr(m, kind)
            if loop.time() > deadline:
                got = [m.WhichOneof("kind") for m in self.received]
                raise AssertionError(f"no {kind} within {timeout_s} s (received: {got})")
            await asyncio.sleep(0.005)

    def of_kind(self, kind: str) -> List[Any]:
        return [getattr(m, kind) for m in self.received if m.WhichOneof("kind") == kind]

    async def serve(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async def pump() -> None:
            try:
                async for r in requests:
                    self.received.append(r)
            finally:
                self.ended.set()
                # Like chime after a drain: once the client half-closed, the server
                # ends the stream too (after whatever the test queued before).
                self.end()

        reader = asyncio.ensure_future(pump())
        try:
            while True:
                m = await self._out.get()
                if isinstance(m, tuple) and m and m[0] == "end":
                    _, code, details, trailing = m
                    if trailing:
                        self.context.set_trailing_metadata(trailing)
                    if code is not None:
                        await self.context.abort(code, details)
                    return
                yield m
        finally:
            reader.cancel()


class FakeServer:
    """One gRPC server on a free loopback port; each new stream is queued in
    `streams` for the test to play."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.streams: "asyncio.Queue[Stream]" = asyncio.Queue()
        self.all: List[Stream] = []
        self.port = 0
        self.token: Optional[str] = None  # when set, calls without it are refused
        self._stopped = False
        _live.append(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _bidi(self, req: Any, resp: Any) -> Any:
        async def handler(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            s = Stream(context)
            if self.token is not None and s.metadata.get("authorization") != f"Bearer {self.token}":
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")
            self.all.append(s)
            self.streams.put_nowait(s)
            async for m in s.serve(requests):
                yield m

        return grpc.stream_stream_rpc_method_handler(
            handler, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    async def start(self, *handlers: grpc.GenericRpcHandler) -> "FakeServer":
        self.server.add_generic_rpc_handlers(handlers)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stream(self, timeout_s: float = 5.0) -> Stream:
        return await asyncio.wait_for(self.streams.get(), timeout_s)

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.server.stop(0)


async def deliveries_server() -> FakeServer:
    s = FakeServer()
    h = grpc.method_handlers_generic_handler(
        "chime.v1.Deliveries", {"Subscribe": s._bidi(dpb.SubscribeRequest, dpb.SubscribeResponse)}
    )
    return await s.start(h)


async def gateway_server() -> FakeServer:
    s = FakeServer()
    h = grpc.method_handlers_generic_handler(
        "chime.v1.WorkerGateway", {"Session": s._bidi(wpb.WorkerMessage, wpb.CoordinatorMessage)}
    )
    return await s.start(h)


def delivery(delivery_id: int, *payloads: str, handler: str = "h", key: str = "k", attempt: int = 1) -> dpb.Delivery:
    return dpb.Delivery(
        delivery_id=delivery_id,
        handler=handler,
        queue=3,
        settle_deadline_ms=123,
        items=[
            dpb.DeliveredItem(id=f"i{delivery_id}.{n}", key=key, due_at_ms=1000 + n, payload=p.encode(),
                              attempt=attempt, max_attempts=3, merge_key="mk" if len(payloads) > 1 else "")
            for n, p in enumerate(payloads)
        ],
    )


def deliver(*ds: dpb.Delivery) -> dpb.SubscribeResponse:
    return dpb.SubscribeResponse(deliver=dpb.Deliver(deliveries=list(ds)))


def drained() -> Any:
    """The chime worker's answer to a `Drain`."""
    return dpb.SubscribeResponse(drained=dpb.Drained())


def subscribed(credit: int = 64) -> dpb.SubscribeResponse:
    return dpb.SubscribeResponse(
        subscribed=dpb.Subscribed(worker_id="cw-1", family="default", credit=credit, settle_timeout_ms=30_000)
    )


def registered(interval_ms: int = 100) -> wpb.CoordinatorMessage:
    return wpb.CoordinatorMessage(
        registered=wpb.Registered(worker_id="w", heartbeat_interval_ms=interval_ms, coordinator="c")
    )


def assign(run_id: str, handler: str, shard: int = 0, total: int = 1, attempt: int = 1,
           params: str = "", start_by_session_ms: int = 0) -> wpb.CoordinatorMessage:
    return wpb.CoordinatorMessage(
        assign=wpb.Assign(
            run=wpb.RunRef(run_id=run_id, shard_index=shard, attempt=attempt),
            fire_id=f"{run_id}-fire", job="job", handler=handler, params=params, shard_params="sp",
            shard_index=shard, shard_total=total, deadline_ms=99, scheduled_at_ms=42,
            start_by_session_ms=start_by_session_ms,
        )
    )


def cancel(run_id: str, shard: int = 0, attempt: int = 1, reason: str = "killed") -> wpb.CoordinatorMessage:
    return wpb.CoordinatorMessage(
        cancel=wpb.Cancel(run=wpb.RunRef(run_id=run_id, shard_index=shard, attempt=attempt), reason=reason)
    )


class QueueServicer:
    """`chime.v1.Queue` answering from a table the test fills."""

    def __init__(self) -> None:
        self.requests: List[Any] = []

    def handler(self) -> grpc.GenericRpcHandler:
        async def enqueue(req: qpb.EnqueueRequest, context: Any) -> qpb.EnqueueResponse:
            self.requests.append(req)
            for n, it in enumerate(req.items):
                if " " in it.handler:
                    context.set_trailing_metadata((("chime-field", f"items[{n}].handler"),))
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"items[{n}].handler: bad name")
            return qpb.EnqueueResponse(
                outcomes=[qpb.ENQUEUE_OUTCOME_DUPLICATE if i.id == "dup" else qpb.ENQUEUE_OUTCOME_CREATED
                          for i in req.items]
            )

        async def get(req: qpb.ItemRef, context: Any) -> qpb.ItemView:
            self.requests.append(req)
            if req.id == "nope":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
            return qpb.ItemView(id=req.id, key=req.key or req.id, handler="h", state=qpb.ITEM_STATE_WAITING,
                                payload=b"\x00x", attempts=1, max_attempts=3)

        async def stats(req: qpb.QueueStatsRequest, context: Any) -> qpb.QueueStatsResponse:
            return qpb.QueueStatsResponse(
                now_ms=5, count=2,
                queues=[qpb.QueueCounts(queue=0, pending=3, waiting=1), qpb.QueueCounts(queue=1, pending=4, dead=2)],
                waiting_by_handler={"h": 1},
            )

        def unary(fn: Any, req: Any, resp: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            "chime.v1.Queue",
            {
                "Enqueue": unary(enqueue, qpb.EnqueueRequest, qpb.EnqueueResponse),
                "GetItem": unary(get, qpb.ItemRef, qpb.ItemView),
                "QueueStats": unary(stats, qpb.QueueStatsRequest, qpb.QueueStatsResponse),
            },
        )


async def queue_server() -> Tuple[FakeServer, QueueServicer]:
    s = FakeServer()
    q = QueueServicer()
    return await s.start(q.handler()), q
