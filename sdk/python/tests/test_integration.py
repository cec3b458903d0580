"""The SDK against real processes: redis-server, etcd, `chime coordinator` and
`chime worker` (delivery service), with the conformance agent as a separate
process — the scenarios of sdk/conformance/README.md as the Python side sees them.

A missing binary fails these tests with what to install; they are never skipped.
`CHIME_BIN` picks the chime binary (see tests/cluster.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from chime_sdk import NewItem, SyncQueueClient

from cluster import Agent, Cluster, Proc, python_agent, wait_until

LONG = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_coordinator()
        c.start_worker("cw1")
        yield c
    finally:
        c.stop()


def jobs_agent(c: Cluster, name: str, group: str, *extra: str) -> Agent:
    return Agent(c, name, ["--coordinator", ",".join(c.coordinators), "--group", group, "--worker-id", name,
                           "--token-file", str(c.tokens["worker"]), *extra])


def items_agent(c: Cluster, name: str, handler: str, *extra: str) -> Agent:
    return Agent(c, name, ["--deliveries", c.workers[0].deliveries, "--items", handler, "--token-file",
                           str(c.tokens["worker"]), *extra])


def queue(c: Cluster) -> SyncQueueClient:
    return SyncQueueClient(c.coordinators[0], token_file=c.tokens["producer"])


def wait_workers(c: Cluster, group: str, n: int, at: Any = None) -> None:
    def ok() -> bool:
        ws = c.cli_json("workers", at=at)["workers"]
        return len([w for w in ws if w["group"] == group]) == n

    wait_until(f"{n} workers in {group}", LONG, ok)


def run_in(c: Cluster, run_id: str, state: str, at: Any = None) -> Dict[str, Any]:
    last: Dict[str, Any] = {}

    def ok() -> bool:
        nonlocal last
        last = c.cli_json("runs", "get", run_id, at=at)
        return bool(last["state"] == state)

    try:
        wait_until(f"run {run_id} {state}", LONG, ok)
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {last}") from None
    return last


def trigger(c: Cluster, job: str, params: str = "", at: Any = None) -> str:
    return str(c.cli_json("job", "trigger", job, "--params", params, at=at)["run_id"])


def acked(*agents: Agent) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for a in agents:
        for r in a.all("item"):
            if r["outcome"] == "ack":
                for i in r["ids"]:
                    out[i] = out.get(i, 0) + 1
    return out


def exits(a: Agent) -> int:
    return a.proc.wait(LONG)


# --- jobs ----------------------------------------------------------------------------


def test_job_shards_over_two_agents(cluster: Cluster) -> None:
    c = cluster
    a1, a2 = jobs_agent(c, "js1", "g-shards"), jobs_agent(c, "js2", "g-shards")
    wait_workers(c, "g-shards", 2)
    c.cli("job", "create", "--name", "j-shards", "--group", "g-shards", "--manual", "--handler", "conf.shard",
          "--routing", "sharding-broadcast", "--shards", "4")
    rid = trigger(c, "j-shards", '{"p":1}')
    run = run_in(c, rid, "succeeded")
    shards = [r for r in a1.all("shard") + a2.all("shard") if r["run_id"] == rid]
    assert sorted(r["shard_index"] for r in shards) == [0, 1, 2, 3], shards
    assert all(r["shard_total"] == 4 and r["params"] == '{"p":1}' for r in shards)
    assert {r["worker_id"] for r in shards} == {"js1", "js2"}
    for s in run["shards"]:
        want = f"shard {s['index']}/4"
        assert s["output"] == want and want in s["log_tail"], s


def test_job_kill_and_timeout_reach_the_handler(cluster: Cluster) -> None:
    c = cluster
    a = jobs_agent(c, "jk1", "g-kill")
    wait_workers(c, "g-kill", 1)
    c.cli("job", "create", "--name", "j-kill", "--group", "g-kill", "--manual", "--handler", "conf.block")
    rid = trigger(c, "j-kill")
    wait_until("the block to start", LONG, lambda: a.all("block_start"))
    c.cli("runs", "kill", rid)
    wait_until("the handler to see the kill", LONG, lambda: a.all("cancelled"))
    run_in(c, rid, "cancelled")
    c.cli("job", "create", "--name", "j-timeout", "--group", "g-kill", "--manual", "--handler", "conf.block",
          "--timeout-ms", "1000")
    rid = trigger(c, "j-timeout")
    wait_until("the handler to see the timeout", LONG, lambda: len(a.all("cancelled")) == 2)
    run_in(c, rid, "timed_out")
    assert a.all("block_done") == []


def test_job_drain_finishes_the_shard_and_exits_0(cluster: Cluster) -> None:
    c = cluster
    a = jobs_agent(c, "jd1", "g-drain")
    wait_workers(c, "g-drain", 1)
    c.cli("job", "create", "--name", "j-drain", "--group", "g-drain", "--manual", "--handler", "conf.block")
    rid = trigger(c, "j-drain", '{"ms":2000}')
    wait_until("the block to start", LONG, lambda: a.all("block_start"))
    a.proc.signal(signal.SIGTERM)
    assert exits(a) == 0, a.proc.log()
    assert len(a.all("block_done")) == 1 and len(a.all("drained")) == 1
    run_in(c, rid, "succeeded")


# --- items ---------------------------------------------------------------------------


def store_now(q: SyncQueueClient) -> int:
    return q.stats().now_ms


def test_items_acked_once_never_early(cluster: Cluster) -> None:
    c = cluster
    a = items_agent(c, "ia1", "t.ack")
    with queue(c) as q:
        now = store_now(q)
        due = {f"i{i}": now + 1_000 if i % 3 == 0 else now for i in range(300)}
        q.enqueue([NewItem(i, "t.ack", key=f"user-{i}", due_at_ms=d, payload=f"p{i[1:]}") for i, d in due.items()])
        wait_until("300 items acked", LONG, lambda: len(acked(a)) == 300)
        assert set(acked(a).values()) == {1}
        for r in a.all("item"):
            for k, i in enumerate(r["ids"]):
                assert r["at_ms"] >= due[i] and r["attempts"][k] == 1 and r["payloads"][k] == f"p{i[1:]}", r
        wait_until("every item deleted", LONG, lambda: all(q.get(i) is None for i in due))


def test_item_retry_then_dead_letter(cluster: Cluster) -> None:
    c = cluster
    a = items_agent(c, "ir1", "t.retry")
    with queue(c) as q:
        q.enqueue([NewItem("f-1", "t.retry", payload="fail-after:300", max_attempts=2)])
        wait_until("the dead letter", LONG, lambda: [d for d in q.dead_letters() if d.id == "f-1"])
        dead = next(d for d in q.dead_letters() if d.id == "f-1")
        assert dead.last_error == "planned failure" and dead.attempts == 2
    fails = [r for r in a.all("item") if r["outcome"] == "fail"]
    assert [r["attempts"][0] for r in fails] == [1, 2]
    assert fails[1]["at_ms"] - fails[0]["at_ms"] >= 300


def test_item_merge(cluster: Cluster) -> None:
    c = cluster
    a = items_agent(c, "im1", "t.merge")
    with queue(c) as q:
        now = store_now(q)
        q.enqueue([NewItem(f"m{i}", "t.merge", key="user-m", merge_key="coupon", due_at_ms=now + 500 + 100 * i)
                   for i in range(3)])
    r = wait_until("the merged delivery", LONG, lambda: a.all("item"))
    assert len(r) == 1 and r[0]["ids"] == ["m0", "m1", "m2"] and r[0]["merged"] is True


def test_killed_subscriber_holdings_go_to_a_fresh_one(cluster: Cluster) -> None:
    c = cluster
    a1 = items_agent(c, "ik1", "t.kill")
    with queue(c) as q:
        q.enqueue([NewItem(f"h{i}", "t.kill", payload="hold-once") for i in range(10)]
                  + [NewItem(f"n{i}", "t.kill") for i in range(10)])
    wait_until("10 held", LONG, lambda: len(a1.all("held")) == 10)
    wait_until("10 acked", LONG, lambda: len(acked(a1)) == 10)
    a1.proc.kill9()
    a2 = items_agent(c, "ik2", "t.kill")
    wait_until("all 20 acked", LONG, lambda: len(acked(a1, a2)) == 20)
    assert set(acked(a1, a2).values()) == {1}
    for r in a2.all("item"):
        assert all(i.startswith("h") for i in r["ids"]) and r["attempts"][0] == 2, r


def test_items_wait_for_a_subscriber(cluster: Cluster) -> None:
    c = cluster
    other = items_agent(c, "iw0", "t.other")
    wait_until("the other agent subscribed", LONG, lambda: "subscribed to" in other.proc.log())
    with queue(c) as q:
        q.enqueue([NewItem(f"w{i}", "t.wait") for i in range(10)])
        wait_until("10 waiting", LONG, lambda: q.stats().waiting_by_handler.get("t.wait") == 10)
        a = items_agent(c, "iw1", "t.wait")
        wait_until("10 acked", LONG, lambda: len(acked(a)) == 10)
    assert all(r["attempts"] == [1] for r in a.all("item"))


def test_item_drain_acks_running_deliveries_then_exits_0(cluster: Cluster) -> None:
    c = cluster
    a = items_agent(c, "id1", "t.drain")
    # Subscribed first: items popped for a handler nobody subscribes are parked (and
    # briefly in flight while the chime worker parks them).
    wait_until("the agent subscribed", LONG, lambda: "subscribed to" in a.proc.log())
    with queue(c) as q:
        q.enqueue([NewItem(f"s{i}", "t.drain", payload="sleep:1500") for i in range(10)])
        ids = [f"s{i}" for i in range(10)]

        # In flight at the chime worker is not enough: a delivery still queued in the
        # worker's hub when the drain starts is handed back, not run. Wait until the
        # agent's handler holds all ten.
        def all_in_handler() -> bool:
            return sorted(i for r in a.all("sleeping") for i in r["ids"]) == sorted(ids)

        wait_until("10 in the handler", LONG, all_in_handler)
        a.proc.signal(signal.SIGTERM)
        assert exits(a) == 0, a.proc.log()
        assert acked(a) == {f"s{i}": 1 for i in range(10)} and len(a.all("drained")) == 1
        wait_until("the acks stored", LONG, lambda: all(q.get(i) is None for i in ids))


def test_refused_token_is_visible_and_nothing_runs(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    a = Agent(c, "intruder", ["--worker-id", "intruder", "--coordinator", c.coordinators[0], "--deliveries",
                              c.workers[0].deliveries, "--items", "t.auth"])
    with queue(c) as q:
        q.enqueue([NewItem("x", "t.auth")])
        wait_until("UNAUTHENTICATED in the agent's output", LONG,
                   lambda: a.proc.log().count("UNAUTHENTICATED") >= 2)
        assert all(w["worker_id"] != "intruder" for w in c.cli_json("workers")["workers"])
        assert a.all("item") == []
        assert q.get("x") is not None  # still there, not delivered
    a.proc.signal(signal.SIGTERM)
    assert exits(a) == 0


def test_producer_script(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    rec = tmp_path / "produce.jsonl"
    p = python_agent(tmp_path, "produce", ["produce", "--record", str(rec), "--coordinator", c.coordinators[0],
                                           "--token-file", str(c.tokens["producer"])])
    assert p.wait(LONG) == 0, p.log()
    steps = {r["step"]: r["outcome"] for r in map(json.loads, rec.read_text().splitlines())}
    assert steps == {
        "enqueue": ["created", "created", "created"],
        "enqueue-again": ["duplicate"],
        "get": "pending",
        "reschedule": "rescheduled",
        "cancel": "cancelled",
        "cancel-again": "not_found",
        "get-missing": "not_found",
        "bad-input": "items[0].handler",
    }, steps


# --- leader failover (its own cluster: it kills a coordinator) -------------------------


def test_job_follows_a_new_leader(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        procs = [c.start_coordinator("coord-a"), c.start_coordinator("coord-b")]
        a = jobs_agent(c, "jl1", "g-leader")
        wait_workers(c, "g-leader", 1)
        c.cli("job", "create", "--name", "j-leader", "--group", "g-leader", "--manual", "--handler", "conf.block")
        rid = trigger(c, "j-leader", '{"ms":4000}')
        wait_until("the block to start", LONG, lambda: a.all("block_start"))
        leader = c.cli_json("workers")["leader"]
        i = next(n for n, u in enumerate(c.coordinators) if u.endswith(leader))
        procs[i].kill9()
        survivor = c.coordinators[1 - i]
        run = run_in(c, rid, "succeeded", at=survivor)
        assert len(a.all("block_done")) == 1 and len(a.all("block_start")) == 1
        assert run["shards"][0]["output"] == "done"
    finally:
        c.stop()


# --- the examples --------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_example(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    p = Proc("quickstart", [sys.executable, str(EXAMPLES / "quickstart.py"), "--coordinator", c.coordinators[0],
                            "--deliveries", c.workers[0].deliveries, "--token-file", str(c.tokens["worker"]),
                            "--producer-token-file", str(c.tokens["producer"])], tmp_path)
    assert p.wait(LONG) == 0, p.log()
    out = p.log()
    assert out.count(" got hello-") == 3 and "merged into one delivery" in out, out


def test_report_job_example(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    p = Proc("report", [sys.executable, str(EXAMPLES / "report_job.py"), "--coordinator", c.coordinators[0],
                        "--group", "g-report", "--token-file", str(c.tokens["worker"])], tmp_path)
    c.procs.append(p)
    wait_workers(c, "g-report", 1)
    c.cli("job", "create", "--name", "j-report", "--group", "g-report", "--manual", "--handler", "demo.report",
          "--routing", "sharding-broadcast", "--shards", "2")
    run = run_in(c, trigger(c, "j-report", '{"batch": 20000}'), "succeeded")
    assert sorted(s["output"] for s in run["shards"]) == ["50000 users", "50000 users"], run
    p.signal(signal.SIGTERM)
    assert p.wait(LONG) == 0, p.log()


class FakeProvider:
    """A push provider on a thread: `POST` with `{"messages", "users"}`, 20 ms latency,
    every `fail_every`-th request answered 503; records what it accepted."""

    def __init__(self, fail_every: int = 7):
        self.accepted: List[Dict[str, Any]] = []
        self.answered_503 = 0
        self.requests = 0
        self._fail_every = fail_every
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    if not await reader.readline():
                        return
                    length = 0
                    while True:
                        h = await reader.readline()
                        if h in (b"\r\n", b""):
                            break
                        k, _, v = h.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v)
                    body = json.loads(await reader.readexactly(length))
                    self.requests += 1
                    await asyncio.sleep(0.02)
                    if self.requests % self._fail_every == 0:
                        self.answered_503 += 1
                        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    else:
                        self.accepted.append(body)
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        async def serve() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            await server.serve_forever()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True)
        self._thread.start()
        started.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/push"


def test_coupon_reminder_example_pushes_each_reminder_once(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    provider = FakeProvider()
    p = Proc("coupon", [sys.executable, str(EXAMPLES / "coupon_reminder.py"), provider.url, "--deliveries",
                        c.workers[0].deliveries, "--token-file", str(c.tokens["worker"])], tmp_path)
    c.procs.append(p)
    wait_until("the example subscribed", LONG, lambda: "subscribed to" in p.log())
    with queue(c) as q:
        now = store_now(q)
        # 400 users with one reminder, 100 with two close together (merged into one push).
        items = [NewItem(f"c1:u{u}", "coupon.remind", key=f"u{u}", merge_key=f"u{u}", due_at_ms=now + 200)
                 for u in range(500)]
        items += [NewItem(f"c2:u{u}", "coupon.remind", key=f"u{u}", merge_key=f"u{u}", due_at_ms=now + 300)
                  for u in range(100)]
        q.enqueue(items)
    wait_until("every reminder pushed", LONG,
               lambda: sum(len(b["messages"]) for b in provider.accepted) >= 600)
    pushed: Dict[str, int] = {}
    for b in provider.accepted:
        for m in b["messages"]:
            pushed[m] = pushed.get(m, 0) + 1
            assert b["users"] == [int(m.split(":u")[1])], b
    assert len(pushed) == 600 and set(pushed.values()) == {1}
    assert sum(1 for b in provider.accepted if len(b["messages"]) == 2) == 100
    assert provider.answered_503 > 0  # and they were retried: every reminder got through
    p.signal(signal.SIGTERM)
    assert p.wait(LONG) == 0, p.log()
