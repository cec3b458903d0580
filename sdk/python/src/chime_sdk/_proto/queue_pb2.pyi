from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnqueueOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENQUEUE_OUTCOME_UNSPECIFIED: _ClassVar[EnqueueOutcome]
    ENQUEUE_OUTCOME_CREATED: _ClassVar[EnqueueOutcome]
    ENQUEUE_OUTCOME_DUPLICATE: _ClassVar[EnqueueOutcome]

class ItemState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATE_UNSPECIFIED: _ClassVar[ItemState]
    ITEM_STATE_PENDING: _ClassVar[ItemState]
    ITEM_STATE_IN_FLIGHT: _ClassVar[ItemState]
    ITEM_STATE_DEAD: _ClassVar[ItemState]
    ITEM_STATE_WAITING: _ClassVar[ItemState]

class CancelOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANCEL_OUTCOME_UNSPECIFIED: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_CANCELLED: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_IN_FLIGHT: _ClassVar[CancelOutcome]
    CANCEL_OUTCOME_NOT_FOUND: _ClassVar[CancelOutcome]

class RescheduleOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESCHEDULE_OUTCOME_UNSPECIFIED: _ClassVar[RescheduleOutcome]
    RESCHEDULE_OUTCOME_RESCHEDULED: _ClassVar[RescheduleOutcome]
    RESCHEDULE_OUTCOME_IN_FLIGHT: _ClassVar[RescheduleOutcome]
    RESCHEDULE_OUTCOME_DEAD: _ClassVar[RescheduleOutcome]
    RESCHEDULE_OUTCOME_NOT_FOUND: _ClassVar[RescheduleOutcome]
ENQUEUE_OUTCOME_UNSPECIFIED: EnqueueOutcome
ENQUEUE_OUTCOME_CREATED: EnqueueOutcome
ENQUEUE_OUTCOME_DUPLICATE: EnqueueOutcome
ITEM_STATE_UNSPECIFIED: ItemState
ITEM_STATE_PENDING: ItemState
ITEM_STATE_IN_FLIGHT: ItemState
ITEM_STATE_DEAD: ItemState
ITEM_STATE_WAITING: ItemState
CANCEL_OUTCOME_UNSPECIFIED: CancelOutcome
CANCEL_OUTCOME_CANCELLED: CancelOutcome
CANCEL_OUTCOME_IN_FLIGHT: CancelOutcome
CANCEL_OUTCOME_NOT_FOUND: CancelOutcome
RESCHEDULE_OUTCOME_UNSPECIFIED: RescheduleOutcome
RESCHEDULE_OUTCOME_RESCHEDULED: RescheduleOutcome
RESCHEDULE_OUTCOME_IN_FLIGHT: RescheduleOutcome
RESCHEDULE_OUTCOME_DEAD: RescheduleOutcome
RESCHEDULE_OUTCOME_NOT_FOUND: RescheduleOutcome

class NewItem(_message.Message):
    __slots__ = ("id", "key", "handler", "due_at_ms", "in_ms", "payload", "max_attempts", "merge_key", "traceparent")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    IN_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    key: str
    handler: str
    due_at_ms: int
    in_ms: int
    payload: bytes
    max_attempts: int
    merge_key: str
    traceparent: str
    def __init__(self, id: _Optional[str] = ..., key: _Optional[str] = ..., handler: _Optional[str] = ..., due_at_ms: _Optional[int] = ..., in_ms: _Optional[int] = ..., payload: _Optional[bytes] = ..., max_attempts: _Optional[int] = ..., merge_key: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class EnqueueRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[NewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[NewItem, _Mapping]]] = ...) -> None: ...

class EnqueueResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedScalarFieldContainer[EnqueueOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[EnqueueOutcome, str]]] = ...) -> None: ...

class ItemRef(_message.Message):
    __slots__ = ("key", "id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    id: str
    def __init__(self, key: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class ItemView(_message.Message):
    __slots__ = ("id", "key", "handler", "due_at_ms", "payload", "max_attempts", "merge_key", "attempts", "queue", "state", "due_score_ms", "deadline_ms", "cancelled", "since_ms", "last_error")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DUE_SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
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
    deadline_ms: int
    cancelled: bool
    since_ms: int
    last_error: str
    def __init__(self, id: _Optional[str] = ..., key: _Optional[str] = ..., handler: _Optional[str] = ..., due_at_ms: _Optional[int] = ..., payload: _Optional[bytes] = ..., max_attempts: _Optional[int] = ..., merge_key: _Optional[str] = ..., attempts: _Optional[int] = ..., queue: _Optional[int] = ..., state: _Optional[_Union[ItemState, str]] = ..., due_score_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., cancelled: bool = ..., since_ms: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class CancelItemResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: CancelOutcome
    def __init__(self, outcome: _Optional[_Union[CancelOutcome, str]] = ...) -> None: ...

class RescheduleItemRequest(_message.Message):
    __slots__ = ("item", "due_at_ms")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DUE_AT_MS_FIELD_NUMBER: _ClassVar[int]
    item: ItemRef
    due_at_ms: int
    def __init__(self, item: _Optional[_Union[ItemRef, _Mapping]] = ..., due_at_ms: _Optional[int] = ...) -> None: ...

class RescheduleItemResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: RescheduleOutcome
    def __init__(self, outcome: _Optional[_Union[RescheduleOutcome, str]] = ...) -> None: ...

class QueueStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueCounts(_message.Message):
    __slots__ = ("queue", "pending", "due_now", "due_soon", "in_flight", "dead", "next_due_ms", "moving", "waiting")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DUE_NOW_FIELD_NUMBER: _ClassVar[int]
    DUE_SOON_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    NEXT_DUE_MS_FIELD_NUMBER: _ClassVar[int]
    MOVING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    queue: int
    pending: int
    due_now: int
    due_soon: int
    in_flight: int
    dead: int
    next_due_ms: int
    moving: int
    waiting: int
    def __init__(self, queue: _Optional[int] = ..., pending: _Optional[int] = ..., due_now: _Optional[int] = ..., due_soon: _Optional[int] = ..., in_flight: _Optional[int] = ..., dead: _Optional[int] = ..., next_due_ms: _Optional[int] = ..., moving: _Optional[int] = ..., waiting: _Optional[int] = ...) -> None: ...

class QueueStatsResponse(_message.Message):
    __slots__ = ("now_ms", "count", "queues", "waiting_by_handler")
    class WaitingByHandlerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    WAITING_BY_HANDLER_FIELD_NUMBER: _ClassVar[int]
    now_ms: int
    count: int
    queues: _containers.RepeatedCompositeFieldContainer[QueueCounts]
    waiting_by_handler: _containers.ScalarMap[str, int]
    def __init__(self, now_ms: _Optional[int] = ..., count: _Optional[int] = ..., queues: _Optional[_Iterable[_Union[QueueCounts, _Mapping]]] = ..., waiting_by_handler: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemView]
    def __init__(self, items: _Optional[_Iterable[_Union[ItemView, _Mapping]]] = ...) -> None: ...

class RequeueDeadLettersRequest(_message.Message):
    __slots__ = ("items", "all")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemRef]
    all: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ItemRef, _Mapping]]] = ..., all: bool = ...) -> None: ...

class RequeueDeadLettersResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: int
    def __init__(self, requeued: _Optional[int] = ...) -> None: ...
