"""Job handlers: the worker's session with the coordinator (`chime.v1.WorkerGateway`).

The conversation is worker.proto's; the reference implementation is the Rust
worker's `session.rs`, which this module follows:

* register (worker id, group, handlers, capacity, labels, and the shards still
  running from a previous session), then heartbeat at the interval `Registered`
  gives, listing the running shards;
* a follower answers `NotLeader` with the leader's bare `host:port`, dialed with
  the scheme of the endpoint that answered; otherwise the endpoints are tried in
  turn, with a backoff (100 ms doubling to 1 s: a new leader gives the shards of
  workers that did not come back to others after a grace of a few seconds);
* each `Assign` runs its handler in its own task: `RunStarted`, `RunLog` lines, and
  exactly one `RunResult` per (run, shard, attempt). Shards outlive the stream:
  after a reconnect the worker registers with them, and re-sends the results of the
  last minute (a new leader may have adopted a shard from a record older than its
  end; duplicates are ignored);
* a worker that went three heartbeat intervals without a heartbeat (the process was
  frozen or starved) starts no `Assign` it reads afterwards on that session: the
  coordinator has taken it for dead and given those shards to others; it
  registers again;
* `Cancel` sets the shard's `cancelled` event and cancels its task (the handler
  sees `asyncio.CancelledError` at its current `await`); the result is CANCELLED;
* drain: `Draining`, shards finish within the drain timeout, the rest are
  cancelled, their results reported, then the stream closes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import grpc
import grpc.aio

from ._conn import EOF, Backoff, Endpoint, Token, open_channel, redirect_target
from ._proto import worker_pb2 as pb

__all__ = ["JobContext", "JobHandler"]

log = logging.getLogger("chime_sdk.jobs")

SESSION = "/chime.v1.WorkerGateway/Session"

# Results are sent again to every coordinator registered with within this window.
RESEND_WINDOW_S = 60.0
# At most this many results are kept for re-sending.
RESEND_MAX = 10_000
# How long a cancelled handler may take to unwind at the end of a drain before its
# shard is reported cancelled without it.
CANCEL_GRACE_S = 2.0
# The coordinator answers `Register` at once (a follower during an election holds
# it until a leader exists, up to 6 s); a silent one is given up on.
REGISTER_TIMEOUT_S = 10.0
# A run log line is cut to 4 KiB by the coordinator.
_MAX_LOG_BYTES = 4096

Key = Tuple[str, int, int]


def now_ms() -> int:
    return int(time.time() * 1000)


class JobContext:
    """One shard of a run to execute.

    The handler returns its output (a `str`; None is empty) or raises (the shard
    fails with `str(exc)`; the coordinator retries it when the job allows).
    When the shard must stop (kill, timeout, overlap policy, drain) `cancelled` is
    set and the handler's task is cancelled; it should let the
    `asyncio.CancelledError` propagate (after any cleanup)."""

    __slots__ = (
        "run_id",
        "fire_id",
        "job",
        "handler",
        "params",
        "shard_params",
        "shard_index",
        "shard_total",
        "attempt",
        "scheduled_at_ms",
        "deadline_ms",
        "traceparent",
        "cancelled",
        "cancel_reason",
        "_log",
    )

    def __init__(self, a: pb.Assign, log_line: Callable[[str], None]):
        self.run_id: str = a.run.run_id
        """Run id."""
        self.fire_id: str = a.fire_id
        """The fire: `<job>@<scheduled instant ms>` for scheduled fires."""
        self.job: str = a.job
        """Job name."""
        self.handler: str = a.handler
        """Handler name."""
        self.params: str = a.params
        """Job parameters (text, often JSON)."""
        self.shard_params: str = a.shard_params
        """This shard's parameters (fixed sharding with per-shard params)."""
        self.shard_index: int = a.shard_index
        """This shard's index, 0-based."""
        self.shard_total: int = a.shard_total
        """Number of shards of the run."""
        self.attempt: int = a.run.attempt
        """Attempt number, 1-based."""
        self.scheduled_at_ms: int = a.scheduled_at_ms
        """The instant the fire was scheduled for, Unix ms."""
        self.deadline_ms: int = a.deadline_ms
        """When the coordinator cancels the shard (its clock, Unix ms; 0: never)."""
        self.traceparent: str = a.traceparent
        """W3C trace context of the run's fire span: make the shard's span its child.
        Empty when the coordinator exports no traces."""
        self.cancelled = asyncio.Event()
        """Set when the shard must stop."""
        self.cancel_reason: Optional[str] = None
        """Why it was cancelled (kill, timeout, drain, …)."""
        self._log = log_line

    def log(self, line: str) -> None:
        """Sends a line to the run history (the coordinator keeps the tail per shard)."""
        self._log(line)


JobHandler = Callable[[JobContext], Awaitable[Optional[str]]]
"""A job handler: `async def run(ctx: JobContext) -> str | None`."""


class SessionOptions:
    """How the job side connects (see `Worker` for the meaning of each)."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        group: str,
        worker_id: str,
        token: Token,
        capacity: int = 16,
        labels: Optional[Mapping[str, str]] = None,
        drain_timeout_ms: int = 10_000,
        credentials: Optional[grpc.ChannelCredentials] = None,
    ):
        if not endpoints:
            raise ValueError("no coordinator endpoint")
        if capacity < 1:
            raise ValueError(f"capacity {capacity}: must be at least 1")
        self.endpoints = list(endpoints)
        self.group = group
        self.worker_id = worker_id
        self.token = token
        self.capacity = capacity
        self.labels = dict(labels or {})
        self.drain_timeout_ms = drain_timeout_ms
        self.credentials = credentials


class _Shard:
    __slots__ = ("ctx", "task", "started_ms", "reported")

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.task: Optional["asyncio.Task[None]"] = None
        self.started_ms = 0
        self.reported = False


class _Result:
    """A result kept for re-sending; `sent_at` (monotonic) is when a connection
    first took it, None while no coordinator has."""

    __slots__ = ("msg", "sent_at")

    def __init__(self, msg: pb.WorkerMessage):
        self.msg = msg
        self.sent_at: Optional[float] = None


class _Redirect(Exception):
    def __init__(self, to: Endpoint):
        self.to = to


def _ref(k: Key) -> pb.RunRef:
    return pb.RunRef(run_id=k[0], shard_index=k[1], attempt=k[2])


def _cut(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "replace")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


class Session:
    """The job session (see the module doc)."""

    def __init__(self, handlers: Mapping[str, JobHandler], opts: SessionOptions):
        if not handlers:
            raise ValueError("no job handlers to register")
        self._handlers = dict(handlers)
        self._opts = opts
        self._running: Dict[Key, _Shard] = {}
        # The current connection's writer queue; None while disconnected (progress
        # is then dropped, and results wait in `_results`).
        self._outbox: Optional[asyncio.Queue[Optional[pb.WorkerMessage]]] = None
        # Monotonic time of the session's last heartbeat, and how long without one
        # means the coordinator has taken this worker for dead (three intervals).
        self._last_beat = 0.0
        self._stall_limit = float("inf")
        # Monotonic time the current session's `Registered` was read.
        self._session_clock = 0.0
        self._results: Deque[_Result] = collections.deque()
        self._stopping = asyncio.Event()
        self._drain_deadline: Optional[float] = None
        self._channels: Dict[Endpoint, grpc.aio.Channel] = {}
        self._idle = asyncio.Event()  # set while no shard runs
        self._idle.set()

    def stop(self) -> None:
        """Starts the drain (see `run`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        loop = asyncio.get_running_loop()
        timeout = self._opts.drain_timeout_ms / 1000.0
        self._drain_deadline = loop.time() + timeout
        loop.call_later(timeout, self._drain_timeout)

    # --- shards -----------------------------------------------------------------

    def _emit(self, m: pb.WorkerMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(m)

    def _start(self, a: pb.Assign) -> None:
        k: Key = (a.run.run_id, a.run.shard_index, a.run.attempt)
        if k in self._running:
            return  # an assignment we already run (sent again after a reconnect)
        ref = _ref(k)

        def log_line(line: str) -> None:
            self._emit(pb.WorkerMessage(run_log=pb.RunLog(run=ref, line=_cut(line, _MAX_LOG_BYTES), at_ms=now_ms())))

        shard = _Shard(JobContext(a, log_line))
        self._running[k] = shard
        self._idle.clear()
        shard.task = asyncio.get_running_loop().create_task(self._run_shard(k, shard))

    async def _run_shard(self, k: Key, shard: _Shard) -> None:
        ctx = shard.ctx
        shard.started_ms = now_ms()
        self._emit(pb.WorkerMessage(run_started=pb.RunStarted(run=_ref(k), started_at_ms=shard.started_ms)))
        status, output, error = pb.RUN_STATUS_SUCCEEDED, "", ""
        handler = self._handlers.get(ctx.handler)
        try:
            if handler is None:
                raise LookupError(f"no job handler {ctx.handler!r} on this worker")
            out = await handler(ctx)
            output = "" if out is None else str(out)
        except asyncio.CancelledError:
            status, error = pb.RUN_STATUS_CANCELLED, ctx.cancel_reason or "cancelled"
        except Exception as e:  # noqa: BLE001 — any handler error fails the shard
            if ctx.cancelled.is_set():
                # The handler turned its cancellation into an error of its own.
                status, error = pb.RUN_STATUS_CANCELLED, ctx.cancel_reason or "cancelled"
            else:
                status, error = pb.RUN_STATUS_FAILED, str(e) or type(e).__name__
                log.warning(
                    "job handler %s failed (run %s shard %d)", ctx.handler, ctx.run_id, ctx.shard_index,
                    exc_info=True,
                )
        self._report(k, shard, status, _cut(output, 64 * 1024), error)

    def _report(self, k: Key, shard: _Shard, status: pb.RunStatus, output: str, error: str) -> None:
        if shard.reported:
            return
        shard.reported = True
        self._running.pop(k, None)
        if not self._running:
            self._idle.set()
        r = _Result(
            pb.WorkerMessage(
                run_result=pb.RunResult(
                    run=_ref(k),
                    status=status,
                    output=output,
                    error=error,
                    started_at_ms=shard.started_ms,
                    finished_at_ms=now_ms(),
                )
            )
        )
        while len(self._results) >= RESEND_MAX:
            self._results.popleft()
        self._results.append(r)
        if self._outbox is not None:
            r.sent_at = time.monotonic()
            self._outbox.put_nowait(r.msg)

    def _cancel(self, k: Key, reason: str) -> None:
        shard = self._running.get(k)
        if shard is None or shard.ctx.cancelled.is_set():
            return
        log.info("cancelling run %s shard %d (%s)", k[0], k[1], reason)
        shard.ctx.cancel_reason = reason
        shard.ctx.cancelled.set()
        if shard.task is not None:
            shard.task.cancel()

    def _drain_timeout(self) -> None:
        if not self._running:
            return
        log.warning("drain timeout: cancelling %d running shards", len(self._running))
        for k in list(self._running):
            self._cancel(k, "drain timeout")
        asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._give_up)

    def _give_up(self) -> None:
        # Handlers that swallowed their cancellation: report them cancelled anyway, so
        # the drain ends and the coordinator hands the shards to another worker.
        for k, shard in list(self._running.items()):
            log.warning("run %s shard %d did not stop within %.0f s of its cancellation", k[0], k[1], CANCEL_GRACE_S)
            self._report(k, shard, pb.RUN_STATUS_CANCELLED, "", "did not stop after its cancellation")

    # --- connections --------------------------------------------------------------

    async def run(self) -> None:
        """Connects and serves until `stop()`, then drains and returns."""
        endpoints = self._opts.endpoints
        backoff = Backoff()
        nxt = 0
        redirect: Optional[Endpoint] = None
        redirects = 0  # followed in a row without a registration
        try:
            while True:
                if redirect is not None:
                    endpoint, redirect = redirect, None
                else:
                    endpoint = endpoints[nxt % len(endpoints)]
                    nxt += 1
                try:
                    if await self._connect(endpoint, backoff):
                        return
                except _Redirect as r:
                    redirect = r.to
                    redirects += 1
                    if r.to != endpoint and redirects <= len(endpoints) + 1:
                        log.info("coordinator %s is not the leader; following to %s", endpoint.url, r.to.url)
                        continue
                    # A coordinator that names itself (restarted, the old leader's key
                    # not yet expired) or a ring of stale answers: the election is not
                    # settled, so wait like after a failure instead of spinning.
                    log.debug("coordinator %s names %s as the leader; waiting", endpoint.url, r.to.url)
                else:
                    redirects = 0
                if self._stopping.is_set():
                    if not self._running and self._unsent() == 0:
                        return  # nothing left to report to anyone
                    if self._past_drain(5.0):
                        log.warning("stopping with %d results no coordinator received", self._unsent())
                        return
                await self._pause(backoff.next())
        finally:
            for s in self._running.values():
                if s.task is not None:
                    s.task.cancel()
            for ch in self._channels.values():
                await ch.close(None)

    def _unsent(self) -> int:
        return sum(1 for r in self._results if r.sent_at is None)

    def _past_drain(self, extra_s: float) -> bool:
        d = self._drain_deadline
        return d is not None and asyncio.get_running_loop().time() > d + CANCEL_GRACE_S + extra_s

    async def _stopped_idle(self) -> None:
        """Returns once stopping with no shard running: nothing left to tell anyone
        (results not sent yet are the exception; callers check `_unsent`)."""
        await self._stopping.wait()
        await self._idle.wait()

    async def _pause(self, seconds: float) -> None:
        """The reconnect backoff; a stop with nothing running ends it at once."""
        try:
            await asyncio.wait_for(self._stopped_idle(), seconds)
        except asyncio.TimeoutError:
            pass

    def _channel(self, e: Endpoint) -> grpc.aio.Channel:
        ch = self._channels.get(e)
        if ch is None:
            ch = self._channels[e] = open_channel(e, self._opts.credentials)
        return ch

    async def _connect(self, endpoint: Endpoint, backoff: Backoff) -> bool:
        """One connection; True when the drain finished on it."""
        o = self._opts
        try:
            md = o.token.metadata()
        except (OSError, ValueError) as e:
            log.error("cannot read the worker token: %s", e)
            return False
        call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage] = self._channel(
            endpoint
        ).stream_stream(
            SESSION,
            request_serializer=pb.WorkerMessage.SerializeToString,
            response_deserializer=pb.CoordinatorMessage.FromString,
        )(None, metadata=md)
        tasks: List["asyncio.Task[None]"] = []
        beat: Optional[asyncio.TimerHandle] = None
        registered = False
        try:
            await call.write(
                pb.WorkerMessage(
                    register=pb.Register(
                        worker_id=o.worker_id,
                        group=o.group,
                        handlers=sorted(self._handlers),
                        capacity=o.capacity,
                        labels=o.labels,
                        running=[_ref(k) for k in self._running],
                    )
                )
            )
            first = await self._answer(call)
            if first is None:
                return False  # stopped while waiting, with nothing to report
            if first is EOF:
                log.warning("coordinator %s closed the session without answering", endpoint.url)
                return False
            assert isinstance(first, pb.CoordinatorMessage)
            kind = first.WhichOneof("kind")
            if kind == "not_leader":
                if not first.not_leader.leader:
                    await asyncio.sleep(0.2)  # an election is under way
                    return False
                raise _Redirect(redirect_target(endpoint, first.not_leader.leader))
            if kind != "registered":
                log.warning("coordinator %s answered %s to Register", endpoint.url, kind)
                return False
            reg = first.registered
            # The session clock `Assign.start_by_session_ms` counts on (see _read).
            self._session_clock = time.monotonic()
            registered = True
            backoff.reset()
            log.info(
                "registered with coordinator %s as %s in group %s",
                reg.coordinator or endpoint.url, reg.worker_id, o.group,
            )
            outbox: asyncio.Queue[Optional[pb.WorkerMessage]] = asyncio.Queue()
            # Results of the last minute, and those that ended while away, go first.
            now = time.monotonic()
            while self._results and (self._results[0].sent_at or now) < now - RESEND_WINDOW_S:
                self._results.popleft()
            for r in self._results:
                if r.sent_at is None:
                    r.sent_at = now
                outbox.put_nowait(r.msg)
            self._outbox = outbox
            loop = asyncio.get_running_loop()
            interval = max(100, reg.heartbeat_interval_ms) / 1000.0

            # The coordinator takes a worker that missed three heartbeats for dead and
            # gives its shards to others. A worker that could not beat for that long
            # (frozen, starved) must assume so: an Assign it reads afterwards may run
            # elsewhere already, so it starts nothing more on this session and
            # registers again.
            self._stall_limit = 3 * interval
            self._last_beat = time.monotonic()
            stalled = asyncio.Event()

            def heartbeat() -> None:
                nonlocal beat
                if self._stalled():
                    stalled.set()
                    return
                self._last_beat = time.monotonic()
                outbox.put_nowait(pb.WorkerMessage(heartbeat=pb.Heartbeat(running=[_ref(k) for k in self._running])))
                beat = loop.call_later(interval, heartbeat)

            beat = loop.call_later(interval, heartbeat)
            reader = loop.create_task(self._read(call))
            writer = loop.create_task(self._write(call, outbox))
            drainer = loop.create_task(self._drained())
            async def until_stalled() -> None:
                await stalled.wait()

            tasks = [reader, writer, drainer, loop.create_task(until_stalled())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if drainer.done():
                # Every shard reported: the writer sends what is queued, then closes
                # our side of the stream.
                outbox.put_nowait(None)
                # Then wait for the coordinator to end the stream (`SessionEnded`
                # DRAINED): cancelling the call at once resets the stream, and the
                # coordinator loses the last results it has not read yet. A peer
                # that went silent gets 5 s.
                await asyncio.wait([writer, reader], timeout=5.0)
                log.info("drained: every shard reported")
                return True
            for t in (reader, writer):
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            log.warning("session with coordinator %s ended; reconnecting", endpoint.url)
            return False
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error("coordinator %s refused the worker token: UNAUTHENTICATED: %s", endpoint.url, e.details())
            elif registered:
                log.warning("session with coordinator %s broke (%s); reconnecting", endpoint.url, e.code().name)
            elif e.code() == grpc.StatusCode.UNAVAILABLE:
                log.debug("cannot reach coordinator %s: %s", endpoint.url, e.details())
            else:
                log.warning("session with coordinator %s failed: %s %s", endpoint.url, e.code().name, e.details())
            return False
        except asyncio.TimeoutError:
            log.warning("coordinator %s did not answer Register within %.0f s", endpoint.url, REGISTER_TIMEOUT_S)
            return False
        finally:
            self._outbox = None
            if beat is not None:
                beat.cancel()
            for t in tasks:
                t.cancel()
            call.cancel()

    def _stalled(self) -> bool:
        """True (and says so) when this session went three heartbeat intervals
        without a heartbeat: the coordinator has taken the worker for dead."""
        silent = time.monotonic() - self._last_beat
        if silent <= self._stall_limit:
            return False
        log.warning(
            "this worker could not heartbeat for %.0f ms (frozen or starved); the coordinator "
            "has taken it for dead, so it starts nothing more on this session and registers again",
            silent * 1000,
        )
        return True

    async def _answer(
        self, call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage]
    ) -> Optional[object]:
        """The answer to `Register` (raises TimeoutError after REGISTER_TIMEOUT_S);
        None when the worker stopped meanwhile with nothing to report."""
        read = asyncio.ensure_future(call.read())
        idle = asyncio.ensure_future(self._stopped_idle())
        try:
            done, _ = await asyncio.wait([read, idle], timeout=REGISTER_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                return read.result()
            if idle in done and self._unsent() == 0:
                return None
            if idle in done:
                return await asyncio.wait_for(read, REGISTER_TIMEOUT_S)
            raise asyncio.TimeoutError()
        finally:
            idle.cancel()
            if not read.done():
                read.cancel()

    def _past_start_by(self, a: pb.Assign) -> Optional[int]:
        """How many ms past its `start_by_session_ms` an Assign read now is, on the
        session clock started as `Registered` was read; None when in time."""
        if a.start_by_session_ms <= 0:
            return None
        now_ms = int((time.monotonic() - self._session_clock) * 1000)
        return now_ms - a.start_by_session_ms if now_ms > a.start_by_session_ms else None

    async def _read(self, call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage]) -> None:
        while True:
            m = await call.read()
            if m is EOF:
                return
            assert isinstance(m, pb.CoordinatorMessage)
            kind = m.WhichOneof("kind")
            if kind == "assign":
                if self._stalled():
                    return
                late_ms = self._past_start_by(m.assign)
                if late_ms is not None:
                    # Read too late: the coordinator may have given it to another
                    # worker already. Left unstarted (and out of our heartbeats),
                    # it is taken as lost and runs elsewhere.
                    log.warning(
                        "assignment %s shard %d arrived %d ms after its start-by time "
                        "(the stream was stalled); not starting it",
                        m.assign.run.run_id, m.assign.shard_index, late_ms,
                    )
                    continue
                self._start(m.assign)
            elif kind == "cancel":
                r = m.cancel.run
                self._cancel((r.run_id, r.shard_index, r.attempt), m.cancel.reason or "cancelled")

    @staticmethod
    async def _write(
        call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.CoordinatorMessage],
        outbox: asyncio.Queue[Optional[pb.WorkerMessage]],
    ) -> None:
        try:
            while True:
                m = await outbox.get()
                if m is None:
                    await call.done_writing()
                    return
                await call.write(m)
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the call is over; the reader reports how it ended

    async def _drained(self) -> None:
        """Ends when the drain is over on this connection: `Draining` sent, every
        shard finished and reported."""
        await self._stopping.wait()
        log.info("draining: no new shards, %d running", len(self._running))
        self._emit(pb.WorkerMessage(draining=pb.Draining()))
        await self._idle.wait()
