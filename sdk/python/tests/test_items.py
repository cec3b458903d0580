"""Item handlers over a fake delivery service: subscribe, settle, batch, drain,
reconnect — the wire conversation of delivery.proto, message by message."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable, Dict, List

import grpc
import pytest

from chime_sdk import HandlerError, ItemContext, Worker
from chime_sdk._proto import delivery_pb2 as pb
from chime_sdk.items import _Settler

from fakes import FakeServer, deliver, deliveries_server, delivery, drained, eventually, run, subscribed

Handler = Callable[[ItemContext], Awaitable[None]]


def settled(stream: Any) -> Dict[str, List[Any]]:
    """Every settlement the fake received so far, by kind."""
    out: Dict[str, List[Any]] = {"acks": [], "failures": [], "releases": []}
    for s in stream.of_kind("settle"):
        out["acks"] += list(s.acks)
        out["failures"] += list(s.failures)
        out["releases"] += list(s.releases)
    return out


async def start(handlers: Dict[str, Handler], **kw: Any) -> "tuple[FakeServer, Worker, asyncio.Task[None]]":
    srv = await deliveries_server()
    w = Worker(deliveries=srv.url, **kw)
    for name, fn in handlers.items():
        w.add_item_handler(name, fn)
    task = asyncio.ensure_future(w.run())
    return srv, w, task


def test_subscribe_ack_fail_and_context() -> None:
    seen: List[ItemContext] = []

    async def h(ctx: ItemContext) -> None:
        seen.append(ctx)
        p = ctx.item.text
        if p == "boom":
            raise ValueError("exploded")
        if p == "later":
            raise HandlerError("try later", retry_after_ms=250)

    async def scenario() -> None:
        srv, w, task = await start({"h": h, "other.name": h}, credit=100, settle_timeout_ms=5_000)
        s = await srv.stream()
        sub = await s.next("subscribe")
        assert list(sub.handlers) == ["h", "other.name"]
        assert sub.credit == 100 and sub.settle_timeout_ms == 5_000
        assert sub.subscriber  # host/pid
        s.send(subscribed())
        s.send(deliver(delivery(1, "ok"), delivery(2, "boom"), delivery(3, "later"), delivery(4, "a", "b", key="u")))
        await eventually("four settlements", lambda: sum(len(v) for v in settled(s).values()) == 4)
        got = settled(s)
        assert sorted(got["acks"]) == [1, 4]
        fails = {f.delivery_id: f for f in got["failures"]}
        assert fails[2].error == "ValueError: exploded" and not fails[2].HasField("retry_after_ms")
        assert fails[3].error == "try later" and fails[3].retry_after_ms == 250
        merged = next(c for c in seen if c.delivery_id == 4)
        assert merged.merged and [i.id for i in merged.items] == ["i4.0", "i4.1"]
        assert merged.queue == 3 and merged.settle_deadline_ms == 123 and merged.worker_id == "cw-1"
        assert merged.attempt == 1 and merged.item.key == "u" and merged.items[1].payload == b"b"
        assert merged.items[0].merge_key == "mk" and merged.items[0].max_attempts == 3
        w.stop()
        await s.next("drain")
        s.send(drained())
        await eventually("the half-close", s.ended.is_set)
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_settlements_are_batched() -> None:
    async def h(ctx: ItemContext) -> None:
        return None

    async def scenario() -> None:
        # credit 400: at most 100 settlements wait before a Settle goes out.
        srv, w, task = await start({"h": h}, credit=400)
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed(400))
        s.send(deliver(*[delivery(i, "x") for i in range(1, 251)]))
        await eventually("250 acks", lambda: len(settled(s)["acks"]) == 250)
        sizes = [len(x.acks) for x in s.of_kind("settle")]
        assert sizes[:2] == [100, 100] and sum(sizes) == 250, sizes
        # A lone settlement waits for the flush interval, then goes alone.
        s.send(deliver(delivery(999, "x")))
        await eventually("the lone ack", lambda: 999 in settled(s)["acks"])
        w.stop()
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_blocking_handlers_run_concurrently_each_in_its_own_task() -> None:
    """Handlers that wait are not serialised behind each other, and each sees its own
    current task (so asyncio.timeout and task groups are safe in handlers)."""
    release = None
    tasks: List[Any] = []

    async def h(ctx: ItemContext) -> None:
        tasks.append(asyncio.current_task())
        assert release is not None
        await release.wait()

    async def scenario() -> None:
        nonlocal release
        release = asyncio.Event()
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed())
        s.send(deliver(*[delivery(i, "x") for i in range(1, 21)]))
        await eventually("20 handlers waiting at once", lambda: len(tasks) == 20)
        assert len({id(t) for t in tasks}) == 20
        assert settled(s)["acks"] == []
        release.set()
        await eventually("20 acks", lambda: len(settled(s)["acks"]) == 20)
        w.stop()
        s.end()
        await task
        await srv.stop()

    run(scenario())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
def test_asyncio_timeout_in_a_handler_cancels_only_that_handler() -> None:
    async def h(ctx: ItemContext) -> None:
        if ctx.item.text == "slow":
            async with asyncio.timeout(0.05):  # type: ignore[attr-defined]
                await asyncio.sleep(10)
        else:
            await asyncio.sleep(0.2)

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed())
        s.send(deliver(delivery(1, "slow"), delivery(2, "fine")))
        await eventually("both settled", lambda: sum(len(v) for v in settled(s).values()) == 2)
        got = settled(s)
        assert got["acks"] == [2]
        assert got["failures"][0].delivery_id == 1 and got["failures"][0].error == "TimeoutError"
        w.stop()
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_drain_finishes_running_handlers_then_releases_the_rest() -> None:
    async def h(ctx: ItemContext) -> None:
        if ctx.item.text == "quick":
            await asyncio.sleep(0.1)
            return
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            assert ctx.cancelled.is_set()
            raise

    async def scenario() -> None:
        srv, w, task = await start({"h": h}, drain_timeout_ms=500)
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed())
        s.send(deliver(delivery(1, "quick"), delivery(2, "stuck")))
        await asyncio.sleep(0.02)
        w.stop()
        await s.next("drain")
        s.send(drained())
        await eventually("the stuck one released", lambda: settled(s)["releases"] == [2], timeout_s=3)
        assert settled(s)["acks"] == [1]
        await eventually("the half-close after the settlements", s.ended.is_set)
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_reconnects_after_a_break_and_cancels_what_the_old_stream_held() -> None:
    cancelled: List[int] = []

    async def h(ctx: ItemContext) -> None:
        if ctx.item.text == "stuck":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(ctx.delivery_id)
                raise

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s1 = await srv.stream()
        await s1.next("subscribe")
        s1.send(subscribed())
        s1.send(deliver(delivery(1, "stuck")))
        await asyncio.sleep(0.05)
        s1.end(grpc.StatusCode.UNAVAILABLE, "worker going away")
        s2 = await srv.stream()
        await s2.next("subscribe")
        assert cancelled == [1]  # its retry is someone else's now
        s2.send(subscribed())
        s2.send(deliver(delivery(1, "ok")))  # ids are per stream: 1 again is a new delivery
        await eventually("the ack on the new stream", lambda: settled(s2)["acks"] == [1])
        assert settled(s1) == {"acks": [], "failures": [], "releases": []}
        w.stop()
        s2.end()
        await task
        await srv.stop()

    run(scenario())


def test_bad_subscription_raises_with_the_field(caplog: pytest.LogCaptureFixture) -> None:
    async def h(ctx: ItemContext) -> None:
        return None

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")
        s.end(grpc.StatusCode.INVALID_ARGUMENT, "subscribe.credit: too large", (("chime-field", "subscribe.credit"),))
        with pytest.raises(Exception) as e:
            await task
        assert getattr(e.value, "field", None) == "subscribe.credit"
        await srv.stop()

    run(scenario())


def test_refused_token_is_logged_as_unauthenticated_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    async def h(ctx: ItemContext) -> None:
        return None

    async def scenario() -> None:
        srv = await deliveries_server()
        srv.token = "right-token-0123456789"
        w = Worker(deliveries=srv.url, token="wrong-token-0123456789")
        w.add_item_handler("h", h)
        task = asyncio.ensure_future(w.run())
        await eventually("two refusals logged", lambda: caplog.text.count("UNAUTHENTICATED") >= 2)
        w.stop()
        await task
        await srv.stop()

    run(scenario())


def test_extend_sends_extend_for_a_held_delivery() -> None:
    answers: List[bool] = []

    async def h(ctx: ItemContext) -> None:
        answers.append(ctx.extend(60_000))
        await asyncio.sleep(0.05)

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed())
        s.send(deliver(delivery(7, "x")))
        ext = await s.next("extend")
        assert list(ext.delivery_ids) == [7] and ext.extend_ms == 60_000
        await eventually("the ack", lambda: settled(s)["acks"] == [7])
        assert answers == [True]
        w.stop()
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_settler_threshold_interval_and_error_cut() -> None:
    sent: List[pb.SubscribeRequest] = []

    async def scenario() -> None:
        st = _Settler(sent.append, interval_s=0.02, threshold=3)
        st.ack(1)
        st.release(2)
        assert sent == []  # below the threshold: waits for the interval
        await eventually("the timed flush", lambda: len(sent) == 1)
        assert list(sent[0].settle.acks) == [1] and list(sent[0].settle.releases) == [2]
        st.fail(3, "é" * 5000, 10)
        st.ack(4)
        st.ack(5)  # the third: flushed at once
        assert len(sent) == 2
        f = sent[1].settle.failures[0]
        assert len(f.error.encode()) <= 4096 and f.retry_after_ms == 10
        st.ack(6)
        st.discard()
        await asyncio.sleep(0.05)
        assert len(sent) == 2  # discarded, and its timer with it

    run(scenario())


def test_options_are_checked_before_connecting() -> None:
    with pytest.raises(ValueError, match="credit"):
        Worker(deliveries="http://127.0.0.1:1", credit=0)
    with pytest.raises(ValueError, match="settle_timeout_ms"):
        Worker(deliveries="http://127.0.0.1:1", settle_timeout_ms=10)
    w = Worker(deliveries="http://127.0.0.1:1")

    async def h(ctx: ItemContext) -> None:
        return None

    w.add_item_handler("bad name!", h)
    with pytest.raises(ValueError, match="bad name!"):
        run(w.run())


def test_stop_before_the_subscription_is_answered_returns_at_once() -> None:
    async def h(ctx: ItemContext) -> None:
        return None

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")  # and never answered
        w.stop()
        await asyncio.wait_for(task, 1.0)
        await srv.stop()

    run(scenario())


def test_deliveries_in_transit_when_draining_are_run_before_closing() -> None:
    """The chime worker may have sent deliveries before it read our Drain: they are
    run and settled before our side closes (`Drained` marks their end)."""

    async def h(ctx: ItemContext) -> None:
        await asyncio.sleep(0.02)

    async def scenario() -> None:
        srv, w, task = await start({"h": h})
        s = await srv.stream()
        await s.next("subscribe")
        s.send(subscribed())
        await asyncio.sleep(0.05)
        w.stop()
        await s.next("drain")
        s.send(deliver(delivery(5, "late")))
        s.send(drained())
        await eventually("the half-close", s.ended.is_set)
        assert settled(s)["acks"] == [5]
        s.end()
        await task
        await srv.stop()

    run(scenario())


def test_async_with_stops_even_when_the_block_ends_at_once() -> None:
    async def h(ctx: ItemContext) -> None:
        return None

    async def scenario() -> None:
        srv = await deliveries_server()
        w = Worker(deliveries=srv.url)
        w.add_item_handler("h", h)
        async with w:
            pass  # stop() before run() even started
        await srv.stop()

    run(scenario())
