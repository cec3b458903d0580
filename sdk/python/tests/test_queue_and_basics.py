"""The producer client against a fake `chime.v1.Queue`, endpoints, tokens, and the
stub drift check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from chime_sdk import (
    EnqueueOutcome,
    InvalidArgumentError,
    ItemState,
    NewItem,
    QueueClient,
    SyncQueueClient,
)
from chime_sdk._conn import Endpoint, Token, parse_endpoint, redirect_target

from fakes import queue_server, run

SDK = Path(__file__).resolve().parents[1]


def test_async_client_maps_requests_answers_and_errors() -> None:
    async def scenario() -> None:
        srv, q = await queue_server()
        async with QueueClient(srv.url, token="producer-token-0123456789") as c:
            out = await c.enqueue([NewItem("a", "h", key="u", in_ms=5, payload="é", merge_key="m", max_attempts=2),
                                   NewItem("dup", "h", due_at_ms=7, payload=b"\x01")])
            assert out == [EnqueueOutcome.CREATED, EnqueueOutcome.DUPLICATE] and out[0] == "created"
            sent = q.requests[0].items
            assert (sent[0].id, sent[0].key, sent[0].handler, sent[0].in_ms, sent[0].payload, sent[0].merge_key,
                    sent[0].max_attempts) == ("a", "u", "h", 5, "é".encode(), "m", 2)
            assert sent[1].due_at_ms == 7 and sent[1].payload == b"\x01"
            with pytest.raises(InvalidArgumentError) as e:
                await c.enqueue([NewItem("ok", "h"), NewItem("bad", "bad handler!")])
            assert e.value.field == "items[1].handler" and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            v = await c.get(("a", "u"))
            assert v is not None and v.state is ItemState.WAITING and v.payload == b"\x00x" and v.ref.key == "u"
            assert await c.get("nope") is None
            st = await c.stats()
            assert (st.count, st.pending, st.dead, st.waiting, st.waiting_by_handler) == (2, 7, 2, 1, {"h": 1})
            with pytest.raises(ValueError):
                await c.enqueue([])
        await srv.stop()

    run(scenario())


def test_sync_client_and_unimplemented_call() -> None:
    async def scenario() -> None:
        srv, _ = await queue_server()

        def blocking() -> None:
            with SyncQueueClient(srv.url) as c:
                assert c.enqueue([NewItem("x", "h")]) == [EnqueueOutcome.CREATED]
                with pytest.raises(InvalidArgumentError) as e:
                    c.enqueue([NewItem("y", "no good")])
                assert e.value.field == "items[0].handler"
                with pytest.raises(Exception) as e2:
                    c.cancel("x")  # the fake does not serve it
                assert getattr(e2.value, "code", None) == grpc.StatusCode.UNIMPLEMENTED

        await asyncio.get_running_loop().run_in_executor(None, blocking)
        await srv.stop()

    run(scenario())


def test_endpoints() -> None:
    assert parse_endpoint("http://h:1") == Endpoint("h:1", False)
    assert parse_endpoint("https://h:1/") == Endpoint("h:1", True)
    assert parse_endpoint("h:1") == Endpoint("h:1", False)
    with pytest.raises(ValueError):
        parse_endpoint("grpc://h:1")
    with pytest.raises(ValueError):
        parse_endpoint("http://h:1/path")
    # A leader named host:port is dialed the way the answering endpoint was.
    assert redirect_target(Endpoint("a:1", True), "b:2") == Endpoint("b:2", True)
    assert redirect_target(Endpoint("a:1", False), "b:2") == Endpoint("b:2", False)
    assert redirect_target(Endpoint("a:1", False), "https://b:2") == Endpoint("b:2", True)


def test_token_file_is_read_at_each_use(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("\n  first-token-0123456789 \nsecond\n")
    t = Token(file=f)
    assert t.metadata() == (("authorization", "Bearer first-token-0123456789"),)
    f.write_text("rotated-token-0123456789\n")
    assert t.get() == "rotated-token-0123456789"
    # A coordinator's token file works as it is: comments skipped, the first field.
    f.write_text("# ci\n\nnamed-token-0123456789 ci-deployer role=operator\n")
    assert t.get() == "named-token-0123456789"
    assert Token().metadata() == ()
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no token"):
        t.get()
    with pytest.raises(ValueError):
        Token("a", file=f)


def test_drift_check_passes_and_names_a_changed_file(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, str(SDK / "scripts" / "check_proto_drift.py")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    sys.path.insert(0, str(SDK / "scripts"))
    try:
        import check_proto_drift
        import gen_proto
    finally:
        sys.path.pop(0)
    copy = tmp_path / "_proto"
    gen_proto.generate(copy)
    assert check_proto_drift.drift(copy) == []
    (copy / "queue_pb2.pyi").write_text((copy / "queue_pb2.pyi").read_text() + "# edited by hand\n")
    (copy / "stray_pb2.py").write_text("")
    (copy / "worker_pb2.py").unlink()
    problems = "\n".join(check_proto_drift.drift(copy))
    assert "queue_pb2.pyi: differs" in problems
    assert "stray_pb2.py: not generated" in problems
    assert "worker_pb2.py: missing" in problems
