"""Endpoints, channels and the bearer token, shared by every client of the SDK."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

Metadata = Tuple[Tuple[str, str], ...]

# What `read()` of a grpc.aio stream answers at its end (missing from grpc-stubs).
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

# Keep-alives short enough that a frozen peer is noticed within 5 s, as the
# session contract in worker.proto asks (a new leader hands the shards of workers
# that have not come back after that plus 2 s), and allowed on idle streams: a
# delivery stream may carry nothing for minutes and must still notice a dead
# chime worker.
CHANNEL_OPTIONS: Sequence[Tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC's own reconnect backoff grows to 2 minutes; a coordinator back after a
    # restart (or a new leader) must be reached within a second, because a new
    # leader hands the shards of workers that did not come back to others after a
    # short grace.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Messages are at most 4 MiB each way (delivery.proto); the default receive
    # limit is exactly 4 MiB, so leave room for framing.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


@dataclass(frozen=True)
class Endpoint:
    """A parsed `http://host:port`, `https://host:port` or bare `host:port`."""

    target: str
    secure: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.target}"


def parse_endpoint(url: str) -> Endpoint:
    """Parses an endpoint URL; a bare `host:port` is plaintext."""
    u = url.strip()
    secure = False
    if u.startswith("https://"):
        secure, u = True, u[len("https://") :]
    elif u.startswith("http://"):
        u = u[len("http://") :]
    elif "://" in u:
        raise ValueError(f"endpoint {url!r}: only http:// and https:// are supported")
    u = u.rstrip("/")
    if not u or "/" in u:
        raise ValueError(f"endpoint {url!r}: expected scheme://host:port")
    return Endpoint(u, secure)


def redirect_target(current: Endpoint, leader: str) -> Endpoint:
    """The endpoint a `NotLeader` names: a bare `host:port` is dialed the way the
    current endpoint was (same scheme), a URL as given."""
    if "://" in leader:
        return parse_endpoint(leader)
    return Endpoint(leader.strip().rstrip("/"), current.secure)


class Token:
    """Where the bearer token comes from: a fixed value, a file, or nothing.

    A file is read at every (re)connection, so a token fixed or rotated on disk is
    picked up without a restart. Its first line that is neither blank nor a `#`
    comment holds the token, as its first field: a line of a coordinator's token
    file (`<token> <name> role=…`) works as it is."""

    def __init__(self, value: Optional[str] = None, file: Optional[Union[str, Path]] = None):
        if value is not None and file is not None:
            raise ValueError("give a token or a token file, not both")
        self._value = value.strip() if value is not None else None
        # An empty path means "no file" (as in a `${VAR:-}` expansion of a pod spec).
        self._file = Path(file) if file is not None and str(file) != "" else None
        if self._file is not None:
            self.get()  # fail now, at construction, on a missing or empty file

    def get(self) -> Optional[str]:
        """The token now (None: send no `authorization` header)."""
        if self._file is None:
            return self._value or None
        for line in self._file.read_text().splitlines():
            fields = line.split()
            if fields and not fields[0].startswith("#"):
                return fields[0]
        raise ValueError(f"token file {self._file} has no token")

    def metadata(self) -> Metadata:
        """Call metadata carrying the token, `authorization: Bearer <token>`."""
        t = self.get()
        return (("authorization", f"Bearer {t}"),) if t else ()


def open_channel(
    endpoint: Endpoint,
    credentials: Optional[grpc.ChannelCredentials] = None,
    options: Sequence[Tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.aio.Channel:
    """An asyncio channel to `endpoint` (TLS with `credentials`, or the system's
    roots, for `https://`)."""
    if endpoint.secure:
        creds = credentials or grpc.ssl_channel_credentials()
        return grpc.aio.secure_channel(endpoint.target, creds, options=options)
    return grpc.aio.insecure_channel(endpoint.target, options=options)


class Backoff:
    """Exponential reconnect delay with ±20 % jitter (so many subscribers that lost
    the same server do not come back in lockstep)."""

    def __init__(self, first_s: float = 0.1, max_s: float = 1.0):
        self._first = first_s
        self._max = max_s
        self._next = first_s

    def reset(self) -> None:
        self._next = self._first

    def next(self) -> float:
        d = self._next
        self._next = min(self._next * 2, self._max)
        return d * random.uniform(0.8, 1.2)
