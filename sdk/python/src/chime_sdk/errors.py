"""Exceptions of the SDK: what a call to chime answered, and what a handler raises."""

from __future__ import annotations

from typing import Any, Optional

import grpc

__all__ = [
    "ChimeError",
    "InvalidArgumentError",
    "UnauthenticatedError",
    "UnavailableError",
    "HandlerError",
]

# chime names the refused field of an INVALID_ARGUMENT in this metadata key (and in
# the message): `items[3].payload`, `subscribe.credit`, …
FIELD_METADATA = "chime-field"


class ChimeError(Exception):
    """A call to chime failed: `code` is the gRPC status, `details` its message.

    `field` is the refused field (`items[0].handler`) for INVALID_ARGUMENT, else
    None."""

    def __init__(self, code: grpc.StatusCode, details: str, field: Optional[str] = None):
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.field = field


class InvalidArgumentError(ChimeError):
    """The request was refused as a whole (nothing stored); `field` names why."""


class UnauthenticatedError(ChimeError):
    """The token is missing or wrong (UNAUTHENTICATED)."""


class UnavailableError(ChimeError):
    """chime or its store is unreachable now (UNAVAILABLE); retrying is safe."""


_CLASSES = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def _metadata_value(md: Any, key: str) -> Optional[str]:
    if not md:
        return None
    for k, v in md:
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def field_of(initial: Any, trailing: Any) -> Optional[str]:
    """The `chime-field` metadata value: in the trailers, or in the headers of a
    trailers-only answer."""
    return _metadata_value(trailing, FIELD_METADATA) or _metadata_value(initial, FIELD_METADATA)


def from_rpc_error(e: grpc.RpcError) -> ChimeError:
    """Maps a failed synchronous call (a `grpc.Call` that is also an `RpcError`)."""
    call: Any = e
    code: grpc.StatusCode = call.code()
    field = field_of(call.initial_metadata(), call.trailing_metadata())
    return _CLASSES.get(code, ChimeError)(code, call.details() or "", field)


class HandlerError(Exception):
    """Raised by an item handler: the delivery fails with this message (kept as the
    items' last error) and is retried — after `retry_after_ms` when given, else the
    chime worker's exponential backoff — or dead-lettered when out of attempts.

    Any other exception fails the delivery too, with `str(exc)` (or its type name)
    as the error; raise this one to choose the retry delay."""

    def __init__(self, message: str, *, retry_after_ms: Optional[int] = None):
        super().__init__(message)
        if retry_after_ms is not None and not 0 <= retry_after_ms <= 86_400_000:
            raise ValueError(f"retry_after_ms {retry_after_ms}: must be 0..86400000")
        self.message = message
        self.retry_after_ms = retry_after_ms
