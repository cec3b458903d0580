"""chime SDK for Python: job handlers, delayed-item handlers and a producer client.

* `Worker` runs job handlers (a session with the coordinator) and item handlers
  (a subscription to a chime worker's delivery service).
* `QueueClient` / `SyncQueueClient` enqueue, find, cancel, reschedule and requeue
  delayed items through any coordinator.

See sdk/python/README.md for a tour.
"""

from .errors import (
    ChimeError,
    HandlerError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnavailableError,
)
from .items import Item, ItemContext, ItemHandler
from .jobs import JobContext, JobHandler
from .queue import (
    CancelOutcome,
    EnqueueOutcome,
    ItemRef,
    ItemState,
    ItemView,
    NewItem,
    QueueClient,
    QueueCounts,
    QueueStats,
    RescheduleOutcome,
    SyncQueueClient,
)
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Worker",
    "JobContext",
    "JobHandler",
    "Item",
    "ItemContext",
    "ItemHandler",
    "HandlerError",
    "ChimeError",
    "InvalidArgumentError",
    "UnauthenticatedError",
    "UnavailableError",
    "QueueClient",
    "SyncQueueClient",
    "NewItem",
    "ItemRef",
    "ItemView",
    "ItemState",
    "EnqueueOutcome",
    "CancelOutcome",
    "RescheduleOutcome",
    "QueueCounts",
    "QueueStats",
]
