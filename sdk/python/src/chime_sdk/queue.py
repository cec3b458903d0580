"""The producer client for `chime.v1.Queue` (proto/chime/v1/queue.proto).

Any coordinator replica answers (items live in Redis, not in the coordinator), so
point the client at a Kubernetes Service or any replica. `QueueClient` is for
asyncio code, `SyncQueueClient` for everything else; both have the same methods.

Calls answer plain Python values (dataclasses and `str` enums). Errors raise
`ChimeError` (or a subclass) carrying the gRPC code and, for INVALID_ARGUMENT, the
refused field (`items[3].payload`). UNAVAILABLE is retried by gRPC itself a few
times (every call here is safe to retry: enqueue is idempotent on the item id).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import grpc
import grpc.aio

from ._conn import CHANNEL_OPTIONS, Token, parse_endpoint
from ._proto import queue_pb2 as pb
from .errors import ChimeError, from_rpc_error

__all__ = [
    "NewItem",
    "ItemRef",
    "ItemView",
    "ItemState",
    "EnqueueOutcome",
    "CancelOutcome",
    "RescheduleOutcome",
    "QueueCounts",
    "QueueStats",
    "QueueClient",
    "SyncQueueClient",
]

_SERVICE = "chime.v1.Queue"

# gRPC retries UNAVAILABLE transparently; every Queue call is safe to repeat.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class EnqueueOutcome(str, enum.Enum):
    """What enqueue did with one item."""

    CREATED = "created"
    """Stored; it will fire."""
    DUPLICATE = "duplicate"
    """An item with this id exists (pending, in flight or dead); nothing changed."""


class ItemState(str, enum.Enum):
    """Where an item is in its life."""

    PENDING = "pending"
    """Waiting in its queue until `due_score_ms`."""
    IN_FLIGHT = "in_flight"
    """Handed to a worker; due again at `deadline_ms` unless settled."""
    DEAD = "dead"
    """Out of attempts, in the dead letters since `since_ms`."""
    WAITING = "waiting"
    """Due, but no worker that popped it has a subscriber for its handler: parked
    (the attempt not counted) until one does."""


class CancelOutcome(str, enum.Enum):
    """What cancel did."""

    CANCELLED = "cancelled"
    """Removed before it fired (or removed from the dead letters)."""
    IN_FLIGHT = "in_flight"
    """Already handed to a worker: it may be running; it will not be retried."""
    NOT_FOUND = "not_found"
    """No such item (never enqueued, already fired, or already cancelled)."""


class RescheduleOutcome(str, enum.Enum):
    """What reschedule did."""

    RESCHEDULED = "rescheduled"
    IN_FLIGHT = "in_flight"
    DEAD = "dead"
    NOT_FOUND = "not_found"


E = TypeVar("E", bound=enum.Enum)


def _enum(cls: Type[E], proto_value: int, prefix: str, proto_enum: Any) -> E:
    """The Python enum member of a proto enum value (`CANCEL_OUTCOME_IN_FLIGHT` ->
    `CancelOutcome.IN_FLIGHT`)."""
    name: str = proto_enum.Name(proto_value)
    try:
        return cls(name[len(prefix) :].lower())
    except ValueError:
        raise ChimeError(grpc.StatusCode.UNKNOWN, f"unexpected {name} in the answer") from None


@dataclass
class NewItem:
    """An item to deliver at `due_at_ms`, or `in_ms` after the store's clock.

    With neither, it is due now. `key` routes it (the user, say) and picks its merge
    group; keep it: finding the item later takes the key and the id."""

    id: str
    handler: str
    key: str = ""
    due_at_ms: int = 0
    in_ms: int = 0
    payload: Union[bytes, str] = b""
    max_attempts: int = 0
    merge_key: str = ""
    traceparent: str = ""
    """W3C trace context (the producer's current span) the handler's span joins;
    empty: none. Malformed is refused naming `items[i].traceparent`."""

    def _to_proto(self) -> pb.NewItem:
        payload = self.payload.encode("utf-8") if isinstance(self.payload, str) else self.payload
        return pb.NewItem(
            id=self.id,
            key=self.key,
            handler=self.handler,
            due_at_ms=self.due_at_ms,
            in_ms=self.in_ms,
            payload=payload,
            max_attempts=self.max_attempts,
            merge_key=self.merge_key,
            traceparent=self.traceparent,
        )


@dataclass(frozen=True)
class ItemRef:
    """Finds an item: its id and the routing key it was enqueued with (empty: the id)."""

    id: str
    key: str = ""

    def _to_proto(self) -> pb.ItemRef:
        return pb.ItemRef(key=self.key, id=self.id)


@dataclass
class ItemView:
    """A stored item and its state."""

    id: str
    key: str
    handler: str
    due_at_ms: int
    payload: bytes
    max_attempts: int
    merge_key: str
    attempts: int
    queue: int
    state: ItemState
    due_score_ms: int
    """Pending: when it becomes due (a retry's backoff included), Unix ms."""
    deadline_ms: int
    """In flight: visibility deadline, Unix ms."""
    cancelled: bool
    """In flight: cancelled meanwhile, so it will not be retried or redelivered."""
    since_ms: int
    """Dead: since when, Unix ms."""
    last_error: str

    @property
    def ref(self) -> ItemRef:
        return ItemRef(self.id, self.key)

    @classmethod
    def _from_proto(cls, v: pb.ItemView) -> "ItemView":
        return cls(
            id=v.id,
            key=v.key,
            handler=v.handler,
            due_at_ms=v.due_at_ms,
            payload=v.payload,
            max_attempts=v.max_attempts,
            merge_key=v.merge_key,
            attempts=v.attempts,
            queue=v.queue,
            state=_enum(ItemState, v.state, "ITEM_STATE_", pb.ItemState),
            due_score_ms=v.due_score_ms,
            deadline_ms=v.deadline_ms,
            cancelled=v.cancelled,
            since_ms=v.since_ms,
            last_error=v.last_error,
        )


@dataclass
class QueueCounts:
    """Counts of one queue."""

    queue: int
    pending: int
    due_now: int
    due_soon: int
    in_flight: int
    dead: int
    next_due_ms: int
    moving: int
    waiting: int
    """Items waiting for a handler (no subscriber on the worker that popped them)."""


@dataclass
class QueueStats:
    """Every queue of the current layout and of layouts still draining."""

    now_ms: int
    """The store's clock, Unix ms."""
    count: int
    """Queue count of the current layout."""
    queues: List[QueueCounts] = field(default_factory=list)
    waiting_by_handler: Dict[str, int] = field(default_factory=dict)
    """Items waiting for a handler, per handler name, over all queues."""

    @property
    def pending(self) -> int:
        return sum(q.pending for q in self.queues)

    @property
    def in_flight(self) -> int:
        return sum(q.in_flight for q in self.queues)

    @property
    def dead(self) -> int:
        return sum(q.dead for q in self.queues)

    @property
    def waiting(self) -> int:
        return sum(q.waiting for q in self.queues)


RefLike = Union[ItemRef, str, Tuple[str, str]]
"""An `ItemRef`, a bare id (enqueued without a key), or `(id, key)`."""


def _ref(r: RefLike) -> pb.ItemRef:
    if isinstance(r, ItemRef):
        return r._to_proto()
    if isinstance(r, str):
        return pb.ItemRef(id=r)
    return pb.ItemRef(id=r[0], key=r[1])


def _stats(r: pb.QueueStatsResponse) -> QueueStats:
    return QueueStats(
        now_ms=r.now_ms,
        count=r.count,
        queues=[
            QueueCounts(
                queue=q.queue,
                pending=q.pending,
                due_now=q.due_now,
                due_soon=q.due_soon,
                in_flight=q.in_flight,
                dead=q.dead,
                next_due_ms=q.next_due_ms,
                moving=q.moving,
                waiting=q.waiting,
            )
            for q in r.queues
        ],
        waiting_by_handler=dict(r.waiting_by_handler),
    )


class _Methods:
    """The Queue methods on a channel (asyncio or not: both have the same factory)."""

    def __init__(self, channel: Any):
        def m(name: str, req: Any, resp: Any) -> Any:
            return channel.unary_unary(
                f"/{_SERVICE}/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

        self.enqueue = m("Enqueue", pb.EnqueueRequest, pb.EnqueueResponse)
        self.get = m("GetItem", pb.ItemRef, pb.ItemView)
        self.cancel = m("CancelItem", pb.ItemRef, pb.CancelItemResponse)
        self.reschedule = m("RescheduleItem", pb.RescheduleItemRequest, pb.RescheduleItemResponse)
        self.stats = m("QueueStats", pb.QueueStatsRequest, pb.QueueStatsResponse)
        self.dead = m("ListDeadLetters", pb.ListDeadLettersRequest, pb.ListDeadLettersResponse)
        self.requeue = m("RequeueDeadLetters", pb.RequeueDeadLettersRequest, pb.RequeueDeadLettersResponse)


def _enqueue_request(items: Iterable[NewItem]) -> pb.EnqueueRequest:
    req = pb.EnqueueRequest(items=[i._to_proto() for i in items])
    if not req.items:
        raise ValueError("enqueue: no items")
    return req


def _outcomes(r: pb.EnqueueResponse) -> List[EnqueueOutcome]:
    return [_enum(EnqueueOutcome, o, "ENQUEUE_OUTCOME_", pb.EnqueueOutcome) for o in r.outcomes]


def _channel_args(
    url: str, credentials: Optional[grpc.ChannelCredentials]
) -> Tuple[str, Optional[grpc.ChannelCredentials], Sequence[Tuple[str, Any]]]:
    e = parse_endpoint(url)
    options = (*CHANNEL_OPTIONS, ("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1))
    creds = (credentials or grpc.ssl_channel_credentials()) if e.secure else None
    return e.target, creds, options


class _Base:
    def __init__(
        self,
        url: str,
        token: Optional[str],
        token_file: Optional[Union[str, Path]],
        timeout_ms: Optional[int],
    ):
        self._token = Token(token, token_file)
        self._timeout = timeout_ms / 1000.0 if timeout_ms else None
        self.url = url


class QueueClient(_Base):
    """The delay queue, for asyncio code.

        async with QueueClient("http://127.0.0.1:7070", token_file="producer.token") as q:
            await q.enqueue([NewItem("coupon:7:user:42", "coupon.remind", key="user:42", in_ms=60_000)])

    `url` is `http://host:port` (or `https://…`, with `credentials` or the system's
    roots); `token`/`token_file` the producer (or admin) token; `timeout_ms` the
    deadline of each call (None: none)."""

    def __init__(
        self,
        url: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[Union[str, Path]] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        timeout_ms: Optional[int] = 30_000,
    ):
        super().__init__(url, token, token_file, timeout_ms)
        target, creds, options = _channel_args(url, credentials)
        self._channel = (
            grpc.aio.secure_channel(target, creds, options=options)
            if creds is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._m = _Methods(self._channel)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._token.metadata())
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def enqueue(self, items: Iterable[NewItem]) -> List[EnqueueOutcome]:
        """Stores a batch (1–100,000 items) in one call; one outcome per item, in
        order. One bad item refuses the whole batch (`InvalidArgumentError`)."""
        return _outcomes(await self._call(self._m.enqueue, _enqueue_request(items)))

    async def get(self, ref: RefLike) -> Optional[ItemView]:
        """The item and its state, or None when there is no such item."""
        try:
            return ItemView._from_proto(await self._call(self._m.get, _ref(ref)))
        except ChimeError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def cancel(self, ref: RefLike) -> CancelOutcome:
        """Removes a pending or dead item (an in-flight one is not retried)."""
        r = await self._call(self._m.cancel, _ref(ref))
        return _enum(CancelOutcome, r.outcome, "CANCEL_OUTCOME_", pb.CancelOutcome)

    async def reschedule(self, ref: RefLike, due_at_ms: int) -> RescheduleOutcome:
        """Moves a pending item to `due_at_ms` (Unix ms)."""
        r = await self._call(self._m.reschedule, pb.RescheduleItemRequest(item=_ref(ref), due_at_ms=due_at_ms))
        return _enum(RescheduleOutcome, r.outcome, "RESCHEDULE_OUTCOME_", pb.RescheduleOutcome)

    async def stats(self) -> QueueStats:
        """Depth, due, in-flight and dead counts per queue."""
        return _stats(await self._call(self._m.stats, pb.QueueStatsRequest()))

    async def dead_letters(self, limit: int = 100) -> List[ItemView]:
        """Up to `limit` (at most 1,000) dead letters across all queues."""
        r = await self._call(self._m.dead, pb.ListDeadLettersRequest(limit=limit))
        return [ItemView._from_proto(v) for v in r.items]

    async def requeue(self, refs: Iterable[RefLike]) -> int:
        """Puts these dead letters back, due now, with fresh attempts; answers how many."""
        r = await self._call(self._m.requeue, pb.RequeueDeadLettersRequest(items=[_ref(x) for x in refs]))
        return int(r.requeued)

    async def requeue_all(self) -> int:
        """Puts every dead letter back (at most 100,000 per call); answers how many."""
        r = await self._call(self._m.requeue, pb.RequeueDeadLettersRequest(all=True))
        return int(r.requeued)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> "QueueClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()


class SyncQueueClient(_Base):
    """The delay queue, blocking (for code without an event loop); see `QueueClient`."""

    def __init__(
        self,
        url: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[Union[str, Path]] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        timeout_ms: Optional[int] = 30_000,
    ):
        super().__init__(url, token, token_file, timeout_ms)
        target, creds, options = _channel_args(url, credentials)
        self._channel = (
            grpc.secure_channel(target, creds, options=options)
            if creds is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._m = _Methods(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._token.metadata())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def enqueue(self, items: Iterable[NewItem]) -> List[EnqueueOutcome]:
        """See `QueueClient.enqueue`."""
        return _outcomes(self._call(self._m.enqueue, _enqueue_request(items)))

    def get(self, ref: RefLike) -> Optional[ItemView]:
        """See `QueueClient.get`."""
        try:
            return ItemView._from_proto(self._call(self._m.get, _ref(ref)))
        except ChimeError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def cancel(self, ref: RefLike) -> CancelOutcome:
        """See `QueueClient.cancel`."""
        r = self._call(self._m.cancel, _ref(ref))
        return _enum(CancelOutcome, r.outcome, "CANCEL_OUTCOME_", pb.CancelOutcome)

    def reschedule(self, ref: RefLike, due_at_ms: int) -> RescheduleOutcome:
        """See `QueueClient.reschedule`."""
        r = self._call(self._m.reschedule, pb.RescheduleItemRequest(item=_ref(ref), due_at_ms=due_at_ms))
        return _enum(RescheduleOutcome, r.outcome, "RESCHEDULE_OUTCOME_", pb.RescheduleOutcome)

    def stats(self) -> QueueStats:
        """See `QueueClient.stats`."""
        return _stats(self._call(self._m.stats, pb.QueueStatsRequest()))

    def dead_letters(self, limit: int = 100) -> List[ItemView]:
        """See `QueueClient.dead_letters`."""
        r = self._call(self._m.dead, pb.ListDeadLettersRequest(limit=limit))
        return [ItemView._from_proto(v) for v in r.items]

    def requeue(self, refs: Iterable[RefLike]) -> int:
        """See `QueueClient.requeue`."""
        r = self._call(self._m.requeue, pb.RequeueDeadLettersRequest(items=[_ref(x) for x in refs]))
        return int(r.requeued)

    def requeue_all(self) -> int:
        """See `QueueClient.requeue_all`."""
        r = self._call(self._m.requeue, pb.RequeueDeadLettersRequest(all=True))
        return int(r.requeued)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SyncQueueClient":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
