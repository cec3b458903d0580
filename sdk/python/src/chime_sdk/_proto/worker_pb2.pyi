from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_SUCCEEDED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]

class SessionEndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_END_REASON_UNSPECIFIED: _ClassVar[SessionEndReason]
    SESSION_END_REASON_DECLARED_DEAD: _ClassVar[SessionEndReason]
    SESSION_END_REASON_REPLACED: _ClassVar[SessionEndReason]
    SESSION_END_REASON_DRAINED: _ClassVar[SessionEndReason]
    SESSION_END_REASON_LEADERSHIP_ENDED: _ClassVar[SessionEndReason]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_SUCCEEDED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
SESSION_END_REASON_UNSPECIFIED: SessionEndReason
SESSION_END_REASON_DECLARED_DEAD: SessionEndReason
SESSION_END_REASON_REPLACED: SessionEndReason
SESSION_END_REASON_DRAINED: SessionEndReason
SESSION_END_REASON_LEADERSHIP_ENDED: SessionEndReason

class WorkerMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "run_started", "run_log", "run_result", "draining")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RUN_STARTED_FIELD_NUMBER: _ClassVar[int]
    RUN_LOG_FIELD_NUMBER: _ClassVar[int]
    RUN_RESULT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    run_started: RunStarted
    run_log: RunLog
    run_result: RunResult
    draining: Draining
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., run_started: _Optional[_Union[RunStarted, _Mapping]] = ..., run_log: _Optional[_Union[RunLog, _Mapping]] = ..., run_result: _Optional[_Union[RunResult, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("worker_id", "group", "handlers", "capacity", "labels", "running")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HANDLERS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    group: str
    handlers: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    labels: _containers.ScalarMap[str, str]
    running: _containers.RepeatedCompositeFieldContainer[RunRef]
    def __init__(self, worker_id: _Optional[str] = ..., group: _Optional[str] = ..., handlers: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., running: _Optional[_Iterable[_Union[RunRef, _Mapping]]] = ...) -> None: ...

class RunRef(_message.Message):
    __slots__ = ("run_id", "shard_index", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    shard_index: int
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: _containers.RepeatedCompositeFieldContainer[RunRef]
    def __init__(self, running: _Optional[_Iterable[_Union[RunRef, _Mapping]]] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("run", "started_at_ms")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    started_at_ms: int
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., started_at_ms: _Optional[int] = ...) -> None: ...

class RunLog(_message.Message):
    __slots__ = ("run", "line", "at_ms")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    line: str
    at_ms: int
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., line: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("run", "status", "output", "error", "started_at_ms", "finished_at_ms")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    status: RunStatus
    output: str
    error: str
    started_at_ms: int
    finished_at_ms: int
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., output: _Optional[str] = ..., error: _Optional[str] = ..., started_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("registered", "assign", "cancel", "not_leader", "session_ended")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    NOT_LEADER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ENDED_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assign: Assign
    cancel: Cancel
    not_leader: NotLeader
    session_ended: SessionEnded
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assign: _Optional[_Union[Assign, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., not_leader: _Optional[_Union[NotLeader, _Mapping]] = ..., session_ended: _Optional[_Union[SessionEnded, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_ms", "coordinator")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_ms: int
    coordinator: str
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., coordinator: _Optional[str] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("run", "fire_id", "job", "handler", "params", "shard_params", "shard_index", "shard_total", "deadline_ms", "scheduled_at_ms", "start_by_session_ms", "traceparent")
    RUN_FIELD_NUMBER: _ClassVar[int]
    FIRE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHARD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    START_BY_SESSION_MS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    fire_id: str
    job: str
    handler: str
    params: str
    shard_params: str
    shard_index: int
    shard_total: int
    deadline_ms: int
    scheduled_at_ms: int
    start_by_session_ms: int
    traceparent: str
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., fire_id: _Optional[str] = ..., job: _Optional[str] = ..., handler: _Optional[str] = ..., params: _Optional[str] = ..., shard_params: _Optional[str] = ..., shard_index: _Optional[int] = ..., shard_total: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., scheduled_at_ms: _Optional[int] = ..., start_by_session_ms: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("run", "reason")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    reason: str
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class NotLeader(_message.Message):
    __slots__ = ("leader",)
    LEADER_FIELD_NUMBER: _ClassVar[int]
    leader: str
    def __init__(self, leader: _Optional[str] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("reason", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: SessionEndReason
    detail: str
    def __init__(self, reason: _Optional[_Union[SessionEndReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...
