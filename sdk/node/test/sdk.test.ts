// Unit tests of the Node SDK (node --test, offline): the pure helpers, and each
// client against an in-process fake server that plays chime's side of the protocol
// message by message (queue, deliveries, the job session with a leader redirect).

import { Metadata, Server, ServerCredentials, status, type ServerDuplexStream, type ServerUnaryCall, type sendUnaryData } from "@grpc/grpc-js";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { Backoff, cutUtf8, parseEndpoint, redirectTarget } from "../src/conn.js";
import { DeliveriesService, type SubscribeRequest, type SubscribeResponse } from "../src/gen/chime/v1/delivery.js";
import { EnqueueOutcome, ItemState, ItemView, QueueService, type EnqueueRequest, type ItemRef } from "../src/gen/chime/v1/queue.js";
import {
  RunStatus,
  SessionEndReason,
  WorkerGatewayService,
  type CoordinatorMessage,
  type WorkerMessage,
} from "../src/gen/chime/v1/worker.js";
import {
  AuthError,
  HandlerError,
  InvalidArgumentError,
  QueueClient,
  Token,
  Worker,
  silentLogger,
} from "../src/index.js";

async function serve(add: (s: Server) => void): Promise<{ server: Server; url: string }> {
  const server = new Server();
  add(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  return { server, url: `http://127.0.0.1:${port}` };
}

function until<T>(what: string, f: () => T | undefined, ms = 5_000): Promise<T> {
  const end = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      const v = f();
      if (v !== undefined && v !== false) return resolve(v);
      if (Date.now() > end) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

// --- helpers ------------------------------------------------------------------------

test("endpoints parse and redirect", () => {
  assert.deepEqual(parseEndpoint("http://h:1/"), { target: "h:1", secure: false });
  assert.deepEqual(parseEndpoint("https://h:1"), { target: "h:1", secure: true });
  assert.deepEqual(parseEndpoint("h:1"), { target: "h:1", secure: false });
  assert.throws(() => parseEndpoint("ftp://h:1"));
  assert.throws(() => parseEndpoint("http://h:1/x"));
  assert.deepEqual(redirectTarget({ target: "a:1", secure: true }, "b:2"), { target: "b:2", secure: true });
  assert.deepEqual(redirectTarget({ target: "a:1", secure: true }, "http://b:2"), { target: "b:2", secure: false });
});

test("token file: first non-empty line, bearer metadata; empty file refused", () => {
  const dir = mkdtempSync(join(tmpdir(), "chime-node-test-"));
  const f = join(dir, "t");
  writeFileSync(f, "\n  secret-token-123 \nother\n");
  assert.deepEqual(new Token(undefined, f).metadata().get("authorization"), ["Bearer secret-token-123"]);
  assert.deepEqual(new Token().metadata().get("authorization"), []);
  // A coordinator's token file works as it is: comments skipped, the first field.
  writeFileSync(f, "# ci\n\nnamed-token-0123456789 ci-deployer role=operator\n");
  assert.equal(new Token(undefined, f).get(), "named-token-0123456789");
  writeFileSync(f, "\n\n");
  assert.throws(() => new Token(undefined, f), /no token/);
});

test("cutUtf8 keeps whole characters; backoff stays within jittered bounds", () => {
  assert.equal(cutUtf8("abc", 10), "abc");
  assert.equal(cutUtf8("é".repeat(10), 5), "éé");
  const b = new Backoff(100, 1_000);
  const ds = Array.from({ length: 8 }, () => b.next());
  assert.ok(ds[0]! >= 80 && ds[0]! <= 120);
  assert.ok(ds.every((d) => d <= 1_200));
  b.reset();
  assert.ok(b.next() <= 120);
});

test("HandlerError checks its retry delay", () => {
  assert.equal(new HandlerError("x", { retryAfterMs: 5 }).retryAfterMs, 5);
  assert.throws(() => new HandlerError("x", { retryAfterMs: -1 }), RangeError);
});

test("the CommonJS build loads through the package name", () => {
  const require = createRequire(__filename);
  let sdk: Record<string, unknown>;
  try {
    sdk = require("@chime-scheduler/sdk") as Record<string, unknown>;
  } catch {
    return; // dist/ not built (npm run build): the type-checked sources are tested above
  }
  assert.equal(typeof sdk["Worker"], "function");
  assert.equal(typeof sdk["QueueClient"], "function");
});

// --- queue --------------------------------------------------------------------------

test("queue client: outcomes, not found, the refused field, the token", async () => {
  const auth: string[] = [];
  const { server, url } = await serve((s) =>
    s.addService(QueueService, {
      enqueue(call: ServerUnaryCall<EnqueueRequest, unknown>, cb: sendUnaryData<unknown>) {
        auth.push(String(call.metadata.get("authorization")[0]));
        const bad = call.request.items.findIndex((i) => i.handler.includes(" "));
        if (bad >= 0) {
          const md = new Metadata();
          md.set("chime-field", `items[${bad}].handler`);
          return cb({ code: status.INVALID_ARGUMENT, details: `items[${bad}].handler: bad name`, metadata: md });
        }
        if (call.request.items.some((i) => i.id === "deny")) return cb({ code: status.UNAUTHENTICATED, details: "no" });
        assert.equal(call.request.items[0]?.payload.toString(), "one");
        cb(null, { outcomes: call.request.items.map((i) => (i.id === "dup" ? EnqueueOutcome.ENQUEUE_OUTCOME_DUPLICATE : EnqueueOutcome.ENQUEUE_OUTCOME_CREATED)) });
      },
      getItem(call: ServerUnaryCall<ItemRef, unknown>, cb: sendUnaryData<unknown>) {
        if (call.request.id !== "p-2") return cb({ code: status.NOT_FOUND, details: "no such item" });
        cb(null, ItemView.fromPartial({ id: "p-2", key: call.request.key, handler: "h", state: ItemState.ITEM_STATE_PENDING, payload: Buffer.from("two") }));
      },
      cancelItem(_c: unknown, cb: sendUnaryData<unknown>) {
        cb(null, { outcome: 3 });
      },
      rescheduleItem(_c: unknown, cb: sendUnaryData<unknown>) {
        cb(null, { outcome: 1 });
      },
      queueStats(_c: unknown, cb: sendUnaryData<unknown>) {
        cb(null, { nowMs: 5, count: 8, queues: [], waitingByHandler: { h: 2 } });
      },
      listDeadLetters(_c: unknown, cb: sendUnaryData<unknown>) {
        cb(null, { items: [] });
      },
      requeueDeadLetters(_c: unknown, cb: sendUnaryData<unknown>) {
        cb(null, { requeued: 7 });
      },
    }),
  );
  const q = new QueueClient(url, { token: "tok-123456789012345" });
  try {
    assert.deepEqual(
      await q.enqueue([
        { id: "a", handler: "h", payload: "one" },
        { id: "dup", handler: "h" },
      ]),
      ["created", "duplicate"],
    );
    assert.equal(auth[0], "Bearer tok-123456789012345");
    const v = await q.get({ id: "p-2", key: "k" });
    assert.equal(v?.state, "pending");
    assert.equal(v?.key, "k");
    assert.equal(await q.get("nope"), undefined);
    assert.equal(await q.cancel("x"), "not_found");
    assert.equal(await q.reschedule("x", 1), "rescheduled");
    assert.deepEqual((await q.stats()).waitingByHandler, { h: 2 });
    assert.equal(await q.requeueDeadLetters("all"), 7);
    await assert.rejects(q.enqueue([{ id: "b", handler: "bad handler!" }]), (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError);
      assert.equal(e.field, "items[0].handler");
      return true;
    });
    await assert.rejects(q.enqueue([{ id: "deny", handler: "h" }]), AuthError);
  } finally {
    q.close();
    server.forceShutdown();
  }
});

// --- items --------------------------------------------------------------------------

test("items: ack, fail with a retry delay, release on the drain timeout, drain", async (t) => {
  const got: SubscribeRequest[] = [];
  const { server, url } = await serve((s) =>
    s.addService(DeliveriesService, {
      subscribe(call: ServerDuplexStream<SubscribeRequest, SubscribeResponse>) {
        call.on("data", (m: SubscribeRequest) => {
          got.push(m);
          if (m.kind?.$case === "subscribe") {
            call.write({ kind: { $case: "subscribed", value: { workerId: "w", family: "f", credit: m.kind.value.credit, settleTimeoutMs: 30_000 } } });
            const item = (id: string, payload: string) => ({ id, key: "k", dueAtMs: 1, payload: Buffer.from(payload), attempt: 1, maxAttempts: 3, mergeKey: "" });
            call.write({
              kind: {
                $case: "deliver",
                value: {
                  deliveries: [
                    { deliveryId: 1, handler: "h", queue: 0, settleDeadlineMs: 0, traceparent: "", items: [item("a", "ok"), item("b", "ok")] },
                    { deliveryId: 2, handler: "h", queue: 0, settleDeadlineMs: 0, traceparent: "", items: [item("c", "fail")] },
                    { deliveryId: 3, handler: "h", queue: 0, settleDeadlineMs: 0, traceparent: "", items: [item("d", "hold")] },
                  ],
                },
              },
            });
          } else if (m.kind?.$case === "drain") {
            call.write({ kind: { $case: "drained", value: {} } });
          }
        });
        call.on("end", () => call.end());
      },
    }),
  );
  const seen: string[] = [];
  const worker = new Worker({ deliveries: url, token: "tok-123456789012345", drainTimeoutMs: 300, logger: silentLogger });
  worker.item("h", async (ctx) => {
    seen.push(ctx.items.map((i) => i.id).join("+"));
    const p = ctx.text();
    if (p === "fail") throw new HandlerError("planned", { retryAfterMs: 250 });
    if (p === "hold") {
      await new Promise((_r, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)));
    }
  });
  const done = worker.start();
  t.after(() => worker.stop());
  const settled = (): { acks: number[]; failures: { deliveryId: number; error: string; retryAfterMs?: number | undefined }[]; releases: number[] } => {
    const out = { acks: [] as number[], failures: [] as { deliveryId: number; error: string; retryAfterMs?: number | undefined }[], releases: [] as number[] };
    for (const m of got) {
      if (m.kind?.$case === "settle") {
        out.acks.push(...m.kind.value.acks);
        out.failures.push(...m.kind.value.failures);
        out.releases.push(...m.kind.value.releases);
      }
    }
    return out;
  };
  await until("ack and fail", () => (settled().acks.length === 1 && settled().failures.length === 1 ? true : undefined));
  assert.deepEqual(seen.sort(), ["a+b", "c", "d"]);
  assert.deepEqual(settled().acks, [1]);
  assert.deepEqual(settled().failures, [{ deliveryId: 2, error: "planned", retryAfterMs: 250 }]);
  const sub = got[0]?.kind;
  assert.equal(sub?.$case, "subscribe");
  await worker.stop();
  await done;
  assert.deepEqual(settled().releases, [3]);
  assert.ok(got.some((m) => m.kind?.$case === "drain"));
  server.forceShutdown();
});

// --- jobs ---------------------------------------------------------------------------

test("jobs: NotLeader redirect, run, log, result, cancel, heartbeat, drain", async (t) => {
  const got: WorkerMessage[] = [];
  let calls: ServerDuplexStream<WorkerMessage, CoordinatorMessage>[] = [];
  const leader = await serve((s) =>
    s.addService(WorkerGatewayService, {
      session(call: ServerDuplexStream<WorkerMessage, CoordinatorMessage>) {
        calls.push(call);
        call.on("data", (m: WorkerMessage) => {
          got.push(m);
          const k = m.kind;
          if (k?.$case === "register") {
            assert.deepEqual(k.value.handlers, ["block", "echo"]);
            call.write({ kind: { $case: "registered", value: { workerId: k.value.workerId, heartbeatIntervalMs: 100, coordinator: "" } } });
            const assign = (runId: string, handler: string) => ({
              kind: {
                $case: "assign" as const,
                value: {
                  run: { runId, shardIndex: 1, attempt: 1 },
                  fireId: "f",
                  job: "j",
                  handler,
                  params: "p",
                  shardParams: "",
                  shardIndex: 1,
                  shardTotal: 2,
                  deadlineMs: 0,
                  scheduledAtMs: 0,
                  startBySessionMs: 60_000,
                  traceparent: "",
                },
              },
            });
            call.write(assign("r1", "echo"));
            call.write(assign("r2", "block"));
            // Read late: never started.
            setTimeout(() => call.write({ kind: { $case: "assign", value: { ...assign("r3", "echo").kind.value, startBySessionMs: 1 } } }), 50);
          } else if (k?.$case === "runStarted" && k.value.run?.runId === "r2") {
            call.write({ kind: { $case: "cancel", value: { run: k.value.run, reason: "killed" } } });
          } else if (k?.$case === "draining") {
            call.write({ kind: { $case: "sessionEnded", value: { reason: SessionEndReason.SESSION_END_REASON_DRAINED, detail: "" } } });
            call.end();
          }
        });
      },
    }),
  );
  const follower = await serve((s) =>
    s.addService(WorkerGatewayService, {
      session(call: ServerDuplexStream<WorkerMessage, CoordinatorMessage>) {
        call.once("data", () => {
          call.write({ kind: { $case: "notLeader", value: { leader: leader.url.slice("http://".length) } } });
          call.end();
        });
      },
    }),
  );
  const worker = new Worker({ coordinator: follower.url, group: "g", workerId: "w1", logger: silentLogger });
  worker.job("echo", async (ctx) => {
    ctx.log(`hello ${ctx.shardIndex}/${ctx.shardTotal}`);
    return `out ${ctx.params}`;
  });
  worker.job("block", (ctx) => new Promise((_r, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason))));
  const done = worker.start();
  t.after(() => worker.stop());
  const results = (): Map<string, { status: RunStatus; output: string; error: string }> => {
    const m = new Map<string, { status: RunStatus; output: string; error: string }>();
    for (const w of got) if (w.kind?.$case === "runResult") m.set(w.kind.value.run?.runId ?? "", w.kind.value);
    return m;
  };
  await until("both results", () => (results().size >= 2 ? true : undefined));
  await new Promise((r) => setTimeout(r, 150)); // r3 arrives late and must not start
  await until("a heartbeat", () => got.some((m) => m.kind?.$case === "heartbeat") || undefined);
  const r = results();
  assert.equal(r.get("r1")?.status, RunStatus.RUN_STATUS_SUCCEEDED);
  assert.equal(r.get("r1")?.output, "out p");
  assert.equal(r.get("r2")?.status, RunStatus.RUN_STATUS_CANCELLED);
  assert.equal(r.get("r2")?.error, "killed");
  assert.ok(!r.has("r3"));
  assert.ok(!got.some((m) => m.kind?.$case === "runStarted" && m.kind.value.run?.runId === "r3"));
  assert.ok(got.some((m) => m.kind?.$case === "runLog" && m.kind.value.line === "hello 1/2"));
  await worker.stop();
  await done;
  assert.ok(got.some((m) => m.kind?.$case === "draining"));
  calls = [];
  leader.server.forceShutdown();
  follower.server.forceShutdown();
});
