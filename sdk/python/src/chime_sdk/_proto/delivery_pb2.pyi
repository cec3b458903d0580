from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("subscribe", "settle", "extend", "credit", "drain")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    SETTLE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    subscribe: Subscribe
    settle: Settle
    extend: Extend
    credit: Credit
    drain: Drain
    def __init__(self, subscribe: _Optional[_Union[Subscribe, _Mapping]] = ..., settle: _Optional[_Union[Settle, _Mapping]] = ..., extend: _Optional[_Union[Extend, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...

class Subscribe(_message.Message):
    __slots__ = ("handlers", "credit", "subscriber", "settle_timeout_ms")
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    SETTLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    handlers: _containers.RepeatedScalarFieldContainer[str]
    credit: int
    subscriber: str
    settle_timeout_ms: int
    def __init__(self, handlers: _Optional[_Iterable[str]] = ..., credit: _Optional[int] = ..., subscriber: _Optional[str] = ..., settle_timeout_ms: _Optional[int] = ...) -> None: ...

class Settle(_message.Message):
    __slots__ = ("acks", "failures", "releases")
    ACKS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedScalarFieldContainer[int]
    failures: _containers.RepeatedCompositeFieldContainer[Failure]
    releases: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, acks: _Optional[_Iterable[int]] = ..., failures: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., releases: _Optional[_Iterable[int]] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("delivery_id", "error", "retry_after_ms")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    error: str
    retry_after_ms: int
    def __init__(self, delivery_id: _Optional[int] = ..., error: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class Extend(_message.Message):
    __slots__ = ("delivery_ids", "extend_ms")
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTEND_MS_FIELD_NUMBER: _ClassVar[int]
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    extend_ms: int
    def __init__(self, delivery_ids: _Optional[_Iterable[int]] = ..., extend_ms: _Optional[int] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ("credit",)
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    credit: int
    def __init__(self, credit: _Optional[int] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("subscribed", "deliver", "refused", "closing", "drained")
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    DELIVER_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    CLOSING_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    subscribed: Subscribed
    deliver: Deliver
    refused: Refused
    closing: Closing
    drained: Drained
    def __init__(self, subscribed: _Optional[_Union[Subscribed, _Mapping]] = ..., deliver: _Optional[_Union[Deliver, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., closing: _Optional[_Union[Closing, _Mapping]] = ..., drained: _Optional[_Union[Drained, _Mapping]] = ...) -> None: ...

class Subscribed(_message.Message):
    __slots__ = ("worker_id", "family", "credit", "settle_timeout_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    SETTLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    family: str
    credit: int
    settle_timeout_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., family: _Optional[str] = ..., credit: _Optional[int] = ..., settle_timeout_ms: _Optional[int] = ...) -> None: ...

class Deliver(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("delivery_id", "handler", "items", "queue", "settle_deadline_ms", "traceparent")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    SETTLE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    delivery_id: int
    handler: str
    items: _containers.RepeatedCompositeFieldContainer[DeliveredItem]
    queue: int
    settle_deadline_ms: int
    traceparent: str
    def __init__(self, delivery_id: _Optional[int] = ..., handler: _Optional[str] = ..., items: _Optional[_Iterable[_Union[DeliveredItem, _Mapping]]] = ..., queue: _Optional[int] = ..., settle_deadline_ms: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class DeliveredItem(_message.Message):
    __slots__ = ("id", "key", "due_at_ms", "payload", "attempt", "max_attempts", "merge_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    key: str
    due_at_ms: int
    payload: bytes
    attempt: int
    max_attempts: int
    merge_key: str
    def __init__(self, id: _Optional[str] = ..., key: _Optional[str] = ..., due_at_ms: _Optional[int] = ..., payload: _Optional[bytes] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., merge_key: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("delivery_ids", "reason")
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, delivery_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class Drained(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Closing(_message.Message):
    __slots__ = ("reason", "deadline_ms")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    deadline_ms: int
    def __init__(self, reason: _Optional[str] = ..., deadline_ms: _Optional[int] = ...) -> None: ...
