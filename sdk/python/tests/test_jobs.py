"""Job handlers over a fake coordinator: the worker.proto conversation message by
message (register, heartbeat, assign, logs, results, cancel, redirect, reconnect,
drain)."""

from __future__ import annotations

import asyncio
from typing import Any, List

import grpc

from chime_sdk import JobContext, Worker
from chime_sdk._proto import worker_pb2 as pb

from fakes import assign, cancel, eventually, gateway_server, registered, run


def results(stream: Any) -> List[Any]:
    return stream.of_kind("run_result")


def test_register_heartbeat_run_log_result() -> None:
    seen: List[JobContext] = []

    async def shard(ctx: JobContext) -> str:
        seen.append(ctx)
        ctx.log(f"shard {ctx.shard_index}/{ctx.shard_total}")
        return f"out {ctx.params}"

    async def fail(ctx: JobContext) -> None:
        raise RuntimeError("planned failure")

    async def scenario() -> None:
        srv = await gateway_server()
        w = Worker(coordinator=srv.url, group="g", worker_id="w-1", capacity=4, labels={"zone": "a"},
                   token="tok-0123456789abcdef")
        w.add_job_handler("shard", shard)
        w.add_job_handler("fail", fail)
        task = asyncio.ensure_future(w.run())
        s = await srv.stream()
        assert s.metadata["authorization"] == "Bearer tok-0123456789abcdef"
        reg = await s.next("register")
        assert (reg.worker_id, reg.group, list(reg.handlers), reg.capacity) == ("w-1", "g", ["fail", "shard"], 4)
        assert dict(reg.labels) == {"zone": "a"} and list(reg.running) == []
        s.send(registered(interval_ms=100))
        await s.next("heartbeat")
        await s.next("heartbeat")  # every interval
        s.send(assign("r1", "shard", shard=2, total=4, params="p"))
        s.send(assign("r2", "fail"))
        s.send(assign("r3", "missing"))
        await eventually("three results", lambda: len(results(s)) == 3)
        by = {r.run.run_id: r for r in results(s)}
        assert by["r1"].status == pb.RUN_STATUS_SUCCEEDED and by["r1"].output == "out p"
        assert by["r1"].run.shard_index == 2 and by["r1"].started_at_ms <= by["r1"].finished_at_ms
        assert by["r2"].status == pb.RUN_STATUS_FAILED and by["r2"].error == "planned failure"
        assert by["r3"].status == pb.RUN_STATUS_FAILED and "no job handler 'missing'" in by["r3"].error
        assert sorted(x.run.run_id for x in s.of_kind("run_started")) == ["r1", "r2", "r3"]
        assert [x.line for x in s.of_kind("run_log")] == ["shard 2/4"]
        c = seen[0]
        assert (c.run_id, c.fire_id, c.job, c.handler, c.shard_params, c.attempt, c.scheduled_at_ms, c.deadline_ms) \
            == ("r1", "r1-fire", "job", "shard", "sp", 1, 42, 99)
        w.stop()
        await s.next("draining")
        await eventually("the half-close", s.ended.is_set)
        await task
        await srv.stop()

    run(scenario())


def test_cancel_reaches_the_handler_and_reports_cancelled() -> None:
    events: List[str] = []

    async def block(ctx: JobContext) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append(f"cancelled: {ctx.cancel_reason} {ctx.cancelled.is_set()}")
            raise
        return "done"

    async def scenario() -> None:
        srv = await gateway_server()
        w = Worker(coordinator=srv.url, worker_id="w-1")
        w.add_job_handler("block", block)
        task = asyncio.ensure_future(w.run())
        s = await srv.stream()
        await s.next("register")
        s.send(registered())
        s.send(assign("r1", "block"))
        await s.next("run_started")
        hb = await s.next("heartbeat")
        while not hb.running:
            hb = await s.next("heartbeat")
        assert [(r.run_id, r.shard_index, r.attempt) for r in hb.running] == [("r1", 0, 1)]
        s.send(cancel("r1", reason="killed"))
        await eventually("the result", lambda: results(s))
        r = results(s)[0]
        assert r.status == pb.RUN_STATUS_CANCELLED and r.error == "killed"
        assert events == ["cancelled: killed True"]
        w.stop()
        await task
        await srv.stop()

    run(scenario())


def test_an_assign_read_after_its_start_by_time_is_not_started(caplog: Any) -> None:
    ran: List[str] = []

    async def h(ctx: JobContext) -> str:
        ran.append(ctx.run_id)
        return "x"

    async def scenario() -> None:
        srv = await gateway_server()
        w = Worker(coordinator=srv.url, worker_id="w-1")
        w.add_job_handler("h", h)
        task = asyncio.ensure_future(w.run())
        s = await srv.stream()
        await s.next("register")
        s.send(registered(interval_ms=10_000))
        await asyncio.sleep(0.05)
        # Held by a stalled stream past its start-by time (50 ms into the session):
        # the coordinator may run it elsewhere already.
        s.send(assign("late", "h", start_by_session_ms=20))
        s.send(assign("in-time", "h", start_by_session_ms=60_000))
        s.send(assign("no-limit", "h"))
        await eventually("two results", lambda: len(results(s)) == 2)
        assert sorted(r.run.run_id for r in results(s)) == ["in-time", "no-limit"]
        assert [r.run.run_id for r in s.of_kind("run_started")] == ["in-time", "no-limit"]
        assert sorted(ran) == ["in-time", "no-limit"]
        assert "late shard 0 arrived" in caplog.text and "not starting it" in caplog.text
        w.stop()
        await task

    run(scenario())


def test_follows_not_leader_with_the_scheme_of_the_endpoint() -> None:
    async def h(ctx: JobContext) -> str:
        return "x"

    async def scenario() -> None:
        follower, leader = await gateway_server(), await gateway_server()
        w = Worker(coordinator=[follower.url], worker_id="w-1")
        w.add_job_handler("h", h)
        task = asyncio.ensure_future(w.run())
        f = await follower.stream()
        await f.next("register")
        f.send(pb.CoordinatorMessage(not_leader=pb.NotLeader(leader=leader.target)))  # bare host:port
        f.end()
        ls = await leader.stream()
        await ls.next("register")
        ls.send(registered())
        await ls.next("heartbeat")
        w.stop()
        await task
        await follower.stop()
        await leader.stop()

    run(scenario())


def test_a_coordinator_naming_itself_is_not_hammered() -> None:
    async def h(ctx: JobContext) -> str:
        return "x"

    async def scenario() -> None:
        srv = await gateway_server()
        w = Worker(coordinator=srv.url, worker_id="w-1")
        w.add_job_handler("h", h)
        task = asyncio.ensure_future(w.run())
        for _ in range(4):
            s = await srv.stream()
            await s.next("register")
            s.send(pb.CoordinatorMessage(not_leader=pb.NotLeader(leader=srv.target)))
            s.end()
        await asyncio.sleep(0.3)
        # Following at once would have made hundreds of streams by now.
        assert len(srv.all) < 10, len(srv.all)
        w.stop()
        await task
        await srv.stop()

    run(scenario())


def test_reconnect_lists_running_shards_and_resends_results() -> None:
    gate: List[asyncio.Event] = []

    async def slow(ctx: JobContext) -> str:
        await gate[0].wait()
        return "finished"

    async def quick(ctx: JobContext) -> str:
        return "q"

    async def scenario() -> None:
        gate.append(asyncio.Event())
        a, b = await gateway_server(), await gateway_server()
        w = Worker(coordinator=[a.url, b.url], worker_id="w-1")
        w.add_job_handler("slow", slow)
        w.add_job_handler("quick", quick)
        task = asyncio.ensure_future(w.run())
        s1 = await a.stream()
        await s1.next("register")
        s1.send(registered())
        s1.send(assign("r-quick", "quick"))
        s1.send(assign("r-slow", "slow", shard=1, attempt=2))
        await eventually("the quick result", lambda: results(s1))
        s1.end(grpc.StatusCode.UNAVAILABLE, "leader gone")
        # The shard finishes while no coordinator listens.
        gate[0].set()
        s2 = await b.stream()  # the next endpoint
        reg = await s2.next("register")
        running = [(r.run_id, r.shard_index, r.attempt) for r in reg.running]
        assert running in ([("r-slow", 1, 2)], [])  # listed unless it ended before the Register
        s2.send(registered())
        await eventually("both results re-sent", lambda: len(results(s2)) == 2)
        assert {r.run.run_id: r.output for r in results(s2)} == {"r-quick": "q", "r-slow": "finished"}
        w.stop()
        await task
        await a.stop()
        await b.stop()

    run(scenario())


def test_drain_waits_for_shards_then_cancels_at_the_timeout() -> None:
    async def sleepy(ctx: JobContext) -> str:
        await asyncio.sleep(float(ctx.params))
        return "slept"

    async def scenario() -> None:
        srv = await gateway_server()
        w = Worker(coordinator=srv.url, worker_id="w-1", drain_timeout_ms=400)
        w.add_job_handler("sleepy", sleepy)
        task = asyncio.ensure_future(w.run())
        s = await srv.stream()
        await s.next("register")
        s.send(registered())
        s.send(assign("short", "sleepy", params="0.1"))
        s.send(assign("long", "sleepy", params="60"))
        await eventually("both started", lambda: len(s.of_kind("run_started")) == 2)
        w.stop()
        await s.next("draining")
        s.send(assign("late", "sleepy", params="0"))  # raced with our Draining: still run
        await task  # returns once every shard reported
        # A result written is not yet a result the server read: its half-close comes
        # after every message on the stream.
        await eventually("the half-close", s.ended.is_set)
        by = {r.run.run_id: r for r in results(s)}
        assert by["short"].status == pb.RUN_STATUS_SUCCEEDED
        assert by["late"].status == pb.RUN_STATUS_SUCCEEDED
        assert by["long"].status == pb.RUN_STATUS_CANCELLED and by["long"].error == "drain timeout"
        await srv.stop()

    run(scenario())


def test_refused_token_is_logged_as_unauthenticated(caplog: Any) -> None:
    async def h(ctx: JobContext) -> str:
        return "x"

    async def scenario() -> None:
        srv = await gateway_server()
        srv.token = "right-token-0123456789"
        w = Worker(coordinator=srv.url, worker_id="w-1")  # no token at all
        w.add_job_handler("h", h)
        task = asyncio.ensure_future(w.run())
        await eventually("refusals logged", lambda: caplog.text.count("UNAUTHENTICATED") >= 2)
        assert srv.all == []
        w.stop()
        await task
        await srv.stop()

    run(scenario())
