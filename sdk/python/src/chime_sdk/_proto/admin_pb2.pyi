from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Routing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTING_UNSPECIFIED: _ClassVar[Routing]
    ROUTING_SHARDING_BROADCAST: _ClassVar[Routing]
    ROUTING_ROUND_ROBIN: _ClassVar[Routing]
    ROUTING_RANDOM: _ClassVar[Routing]
    ROUTING_CONSISTENT_HASH: _ClassVar[Routing]
    ROUTING_LEAST_RECENTLY_USED: _ClassVar[Routing]
    ROUTING_LEAST_LOADED: _ClassVar[Routing]
    ROUTING_FAILOVER: _ClassVar[Routing]
    ROUTING_BUSY_OVER: _ClassVar[Routing]
    ROUTING_FIRST: _ClassVar[Routing]
    ROUTING_LAST: _ClassVar[Routing]

class Overlap(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERLAP_UNSPECIFIED: _ClassVar[Overlap]
    OVERLAP_ALLOW: _ClassVar[Overlap]
    OVERLAP_SKIP: _ClassVar[Overlap]
    OVERLAP_BUFFER_ONE: _ClassVar[Overlap]
    OVERLAP_CANCEL_RUNNING: _ClassVar[Overlap]

class Misfire(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISFIRE_UNSPECIFIED: _ClassVar[Misfire]
    MISFIRE_SKIP: _ClassVar[Misfire]
    MISFIRE_FIRE_ONCE: _ClassVar[Misfire]
    MISFIRE_FIRE_ALL: _ClassVar[Misfire]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]
    RUN_STATE_TIMED_OUT: _ClassVar[RunState]
    RUN_STATE_SKIPPED: _ClassVar[RunState]
ROUTING_UNSPECIFIED: Routing
ROUTING_SHARDING_BROADCAST: Routing
ROUTING_ROUND_ROBIN: Routing
ROUTING_RANDOM: Routing
ROUTING_CONSISTENT_HASH: Routing
ROUTING_LEAST_RECENTLY_USED: Routing
ROUTING_LEAST_LOADED: Routing
ROUTING_FAILOVER: Routing
ROUTING_BUSY_OVER: Routing
ROUTING_FIRST: Routing
ROUTING_LAST: Routing
OVERLAP_UNSPECIFIED: Overlap
OVERLAP_ALLOW: Overlap
OVERLAP_SKIP: Overlap
OVERLAP_BUFFER_ONE: Overlap
OVERLAP_CANCEL_RUNNING: Overlap
MISFIRE_UNSPECIFIED: Misfire
MISFIRE_SKIP: Misfire
MISFIRE_FIRE_ONCE: Misfire
MISFIRE_FIRE_ALL: Misfire
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_CANCELLED: RunState
RUN_STATE_TIMED_OUT: RunState
RUN_STATE_SKIPPED: RunState

class JobRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("cron", "fixed_rate", "fixed_delay", "once", "manual")
    CRON_FIELD_NUMBER: _ClassVar[int]
    FIXED_RATE_FIELD_NUMBER: _ClassVar[int]
    FIXED_DELAY_FIELD_NUMBER: _ClassVar[int]
    ONCE_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    cron: CronSchedule
    fixed_rate: FixedRate
    fixed_delay: FixedDelay
    once: Once
    manual: Manual
    def __init__(self, cron: _Optional[_Union[CronSchedule, _Mapping]] = ..., fixed_rate: _Optional[_Union[FixedRate, _Mapping]] = ..., fixed_delay: _Optional[_Union[FixedDelay, _Mapping]] = ..., once: _Optional[_Union[Once, _Mapping]] = ..., manual: _Optional[_Union[Manual, _Mapping]] = ...) -> None: ...

class CronSchedule(_message.Message):
    __slots__ = ("expr", "time_zone")
    EXPR_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    expr: str
    time_zone: str
    def __init__(self, expr: _Optional[str] = ..., time_zone: _Optional[str] = ...) -> None: ...

class FixedRate(_message.Message):
    __slots__ = ("every_ms",)
    EVERY_MS_FIELD_NUMBER: _ClassVar[int]
    every_ms: int
    def __init__(self, every_ms: _Optional[int] = ...) -> None: ...

class FixedDelay(_message.Message):
    __slots__ = ("delay_ms",)
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    delay_ms: int
    def __init__(self, delay_ms: _Optional[int] = ...) -> None: ...

class Once(_message.Message):
    __slots__ = ("at_ms",)
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    at_ms: int
    def __init__(self, at_ms: _Optional[int] = ...) -> None: ...

class Manual(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "group", "handler", "schedule", "routing", "shard_count", "shard_params", "hash_param", "params", "overlap", "misfire", "catch_up_window_ms", "timeout_ms", "retries", "retry_backoff_ms", "children", "paused", "start_at_ms", "end_at_ms", "jitter_ms", "next_fire_ms", "last_fire_ms", "version", "created_at_ms", "workflow_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    HASH_PARAM_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MISFIRE_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_BACKOFF_MS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    START_AT_MS_FIELD_NUMBER: _ClassVar[int]
    END_AT_MS_FIELD_NUMBER: _ClassVar[int]
    JITTER_MS_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIRE_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRE_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    group: str
    handler: str
    schedule: Schedule
    routing: Routing
    shard_count: int
    shard_params: _containers.RepeatedScalarFieldContainer[str]
    hash_param: str
    params: str
    overlap: Overlap
    misfire: Misfire
    catch_up_window_ms: int
    timeout_ms: int
    retries: int
    retry_backoff_ms: int
    children: _containers.RepeatedScalarFieldContainer[str]
    paused: bool
    start_at_ms: int
    end_at_ms: int
    jitter_ms: int
    next_fire_ms: int
    last_fire_ms: int
    version: int
    created_at_ms: int
    workflow_json: str
    def __init__(self, name: _Optional[str] = ..., group: _Optional[str] = ..., handler: _Optional[str] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., routing: _Optional[_Union[Routing, str]] = ..., shard_count: _Optional[int] = ..., shard_params: _Optional[_Iterable[str]] = ..., hash_param: _Optional[str] = ..., params: _Optional[str] = ..., overlap: _Optional[_Union[Overlap, str]] = ..., misfire: _Optional[_Union[Misfire, str]] = ..., catch_up_window_ms: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., retries: _Optional[int] = ..., retry_backoff_ms: _Optional[int] = ..., children: _Optional[_Iterable[str]] = ..., paused: bool = ..., start_at_ms: _Optional[int] = ..., end_at_ms: _Optional[int] = ..., jitter_ms: _Optional[int] = ..., next_fire_ms: _Optional[int] = ..., last_fire_ms: _Optional[int] = ..., version: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., workflow_json: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CreateJobsRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CreateJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class UpdateJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("group", "namespace")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    group: str
    namespace: str
    def __init__(self, group: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class TriggerJobRequest(_message.Message):
    __slots__ = ("name", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: str
    def __init__(self, name: _Optional[str] = ..., params: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("job", "limit", "namespace")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    job: str
    limit: int
    namespace: str
    def __init__(self, job: _Optional[str] = ..., limit: _Optional[int] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class RunId(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "fire_id", "job", "cause", "scheduled_at_ms", "fired_at_ms", "finished_at_ms", "state", "params", "shards", "parent_run_id", "note", "fence", "nodes_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FIRED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    NODES_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    fire_id: str
    job: str
    cause: str
    scheduled_at_ms: int
    fired_at_ms: int
    finished_at_ms: int
    state: RunState
    params: str
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    parent_run_id: str
    note: str
    fence: int
    nodes_json: str
    def __init__(self, run_id: _Optional[str] = ..., fire_id: _Optional[str] = ..., job: _Optional[str] = ..., cause: _Optional[str] = ..., scheduled_at_ms: _Optional[int] = ..., fired_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., params: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., parent_run_id: _Optional[str] = ..., note: _Optional[str] = ..., fence: _Optional[int] = ..., nodes_json: _Optional[str] = ...) -> None: ...

class RerunRequest(_message.Message):
    __slots__ = ("run_id", "node")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node: str
    def __init__(self, run_id: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("index", "total", "worker_id", "attempt", "state", "started_at_ms", "finished_at_ms", "output", "error", "log_tail", "shard_params", "failures")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    SHARD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    index: int
    total: int
    worker_id: str
    attempt: int
    state: RunState
    started_at_ms: int
    finished_at_ms: int
    output: str
    error: str
    log_tail: _containers.RepeatedScalarFieldContainer[str]
    shard_params: str
    failures: int
    def __init__(self, index: _Optional[int] = ..., total: _Optional[int] = ..., worker_id: _Optional[str] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., started_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., output: _Optional[str] = ..., error: _Optional[str] = ..., log_tail: _Optional[_Iterable[str]] = ..., shard_params: _Optional[str] = ..., failures: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("group", "namespace")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    group: str
    namespace: str
    def __init__(self, group: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "leader")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    leader: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., leader: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "group", "handlers", "capacity", "running", "labels", "connected_at_ms", "last_heartbeat_ms", "draining")
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
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    group: str
    handlers: _containers.RepeatedScalarFieldContainer[str]
    capacity: int
    running: int
    labels: _containers.ScalarMap[str, str]
    connected_at_ms: int
    last_heartbeat_ms: int
    draining: bool
    def __init__(self, worker_id: _Optional[str] = ..., group: _Optional[str] = ..., handlers: _Optional[_Iterable[str]] = ..., capacity: _Optional[int] = ..., running: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., connected_at_ms: _Optional[int] = ..., last_heartbeat_ms: _Optional[int] = ..., draining: bool = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit", "before")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before: str
    def __init__(self, limit: _Optional[int] = ..., before: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at_ms", "who", "action", "target", "before_json", "after_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    at_ms: int
    who: str
    action: str
    target: str
    before_json: str
    after_json: str
    def __init__(self, id: _Optional[str] = ..., at_ms: _Optional[int] = ..., who: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ...) -> None: ...
