// The Node SDK's conformance agent (contract: sdk/conformance/README.md), built by
// `conformance/agent build` into target/sdk-node/ and run by `conformance/agent`.
//
//   agent run     --record FILE [--coordinator URLS] [--group G] [--worker-id ID]
//                 [--deliveries URL] [--items H1,H2] [--credit N]
//                 [--token-file FILE] [--drain-timeout-ms MS]
//   agent produce --record FILE --coordinator URL [--token-file FILE]
//   agent bench   --deliveries URL --record FILE [--token-file F] [--credit N] [--handler H]

import { closeSync, openSync, writeSync } from "node:fs";
import { hostname } from "node:os";
import { parseArgs } from "node:util";

import {
  HandlerError,
  InvalidArgumentError,
  QueueClient,
  Worker,
  consoleLogger,
  type ItemContext,
  type JobContext,
} from "../src/index.js";

/** JSON lines appended to the record file, one `write` each (a reader sees whole records). */
class Records {
  private readonly fd: number;
  constructor(path: string) {
    this.fd = openSync(path, "a", 0o644);
  }
  write(kind: string, fields: Record<string, unknown> = {}): void {
    writeAll(this.fd, Buffer.from(JSON.stringify({ kind, at_ms: Date.now(), ...fields }) + "\n"));
  }
}

function writeAll(fd: number, data: Buffer): void {
  let off = 0;
  while (off < data.length) off += writeSync(fd, data, off);
}

const logger = consoleLogger("info");

// --- run ---------------------------------------------------------------------------

/** Resolves after `ms` (never when undefined), or rejects when `signal` aborts. */
function wait(ms: number | undefined, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      if (t !== undefined) clearTimeout(t);
      reject(signal.reason instanceof Error ? signal.reason : new Error("aborted"));
    };
    const t =
      ms === undefined
        ? undefined
        : setTimeout(() => {
            signal.removeEventListener("abort", onAbort);
            resolve();
          }, ms);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

function jobHandlers(rec: Records, workerId: string): Record<string, (ctx: JobContext) => Promise<string>> {
  return {
    "conf.shard": async (ctx) => {
      rec.write("shard", {
        run_id: ctx.runId,
        job: ctx.job,
        shard_index: ctx.shardIndex,
        shard_total: ctx.shardTotal,
        attempt: ctx.attempt,
        params: ctx.params,
        shard_params: ctx.shardParams,
        worker_id: workerId,
      });
      const line = `shard ${ctx.shardIndex}/${ctx.shardTotal}`;
      ctx.log(line);
      return line;
    },
    "conf.block": async (ctx) => {
      const which = { run_id: ctx.runId, shard_index: ctx.shardIndex, attempt: ctx.attempt };
      rec.write("block_start", which);
      let ms: number | undefined;
      try {
        const p: unknown = JSON.parse(ctx.params);
        if (typeof p === "object" && p !== null && Number.isInteger((p as { ms?: unknown }).ms)) {
          ms = (p as { ms: number }).ms;
        }
      } catch {
        // not JSON: block until cancelled
      }
      try {
        await wait(ms, ctx.signal);
      } catch (e) {
        rec.write("cancelled", which);
        throw e;
      }
      rec.write("block_done", which);
      return "done";
    },
    "conf.fail": async () => {
      throw new Error("planned failure");
    },
  };
}

function itemHandler(rec: Records): (ctx: ItemContext) => Promise<void> {
  return async (ctx) => {
    const payload = ctx.text(0);
    const ids = ctx.items.map((i) => i.id);
    const attempts = ctx.items.map((i) => i.attempt);
    if (payload === "hold" || (payload === "hold-once" && ctx.attempt === 1)) {
      rec.write("held", { handler: ctx.handler, ids, attempts });
      await wait(undefined, ctx.signal); // until a drain gives up on it (then released)
    }
    if (payload.startsWith("sleep:")) {
      rec.write("sleeping", { handler: ctx.handler, ids });
      await new Promise((r) => setTimeout(r, Number(payload.slice("sleep:".length))));
    }
    const fails = payload === "fail" || payload.startsWith("fail-after:");
    rec.write("item", {
      handler: ctx.handler,
      ids,
      keys: ctx.items.map((i) => i.key),
      attempts,
      payloads: ctx.items.map((_, n) => ctx.text(n)),
      merged: ctx.merged,
      outcome: fails ? "fail" : "ack",
    });
    if (payload === "fail") throw new HandlerError("planned failure");
    if (payload.startsWith("fail-after:")) {
      throw new HandlerError("planned failure", { retryAfterMs: Number(payload.slice("fail-after:".length)) });
    }
  };
}

type Args = Record<string, string | undefined>;

async function cmdRun(a: Args): Promise<number> {
  if (!a["coordinator"] && !a["deliveries"]) {
    process.stderr.write("run: give --coordinator, --deliveries, or both\n");
    return 2;
  }
  const rec = new Records(a["record"] as string);
  const workerId = a["worker-id"] || hostname();
  const worker = new Worker({
    coordinator: a["coordinator"],
    group: a["group"] ?? "conformance",
    workerId,
    deliveries: a["deliveries"],
    credit: Number(a["credit"] ?? 64),
    tokenFile: a["token-file"],
    drainTimeoutMs: Number(a["drain-timeout-ms"] ?? 10_000),
    logger,
  });
  if (a["coordinator"]) {
    for (const [name, fn] of Object.entries(jobHandlers(rec, workerId))) worker.job(name, fn);
  }
  if (a["deliveries"]) {
    const handle = itemHandler(rec);
    for (const name of (a["items"] ?? "conf.item").split(",").map((s) => s.trim()).filter(Boolean)) {
      worker.item(name, handle);
    }
  }
  rec.write("started", { worker_id: workerId });
  await worker.runUntilSignal();
  rec.write("drained");
  return 0;
}

// --- produce -----------------------------------------------------------------------

async function cmdProduce(a: Args): Promise<number> {
  const rec = new Records(a["record"] as string);
  const q = new QueueClient(a["coordinator"] as string, { tokenFile: a["token-file"] });
  const step = (name: string, outcome: unknown): void => rec.write("produced", { step: name, outcome });
  try {
    const in1h = 3_600_000;
    step(
      "enqueue",
      await q.enqueue([
        { id: "p-1", handler: "conf.item", key: "user-p", payload: "one" },
        { id: "p-2", handler: "conf.item", key: "user-p", inMs: in1h, payload: "two" },
        { id: "p-3", handler: "conf.item", inMs: in1h, payload: "three" },
      ]),
    );
    step("enqueue-again", await q.enqueue([{ id: "p-1", handler: "conf.item", key: "user-p", payload: "one" }]));
    const got = await q.get({ id: "p-2", key: "user-p" });
    step("get", got?.state ?? "not_found");
    step("reschedule", await q.reschedule({ id: "p-2", key: "user-p" }, Date.now()));
    step("cancel", await q.cancel("p-3"));
    step("cancel-again", await q.cancel("p-3"));
    const missing = await q.get("nope");
    step("get-missing", missing?.state ?? "not_found");
    try {
      await q.enqueue([{ id: "p-bad", handler: "bad handler!" }]);
      step("bad-input", "accepted");
    } catch (e) {
      if (!(e instanceof InvalidArgumentError)) throw e;
      step("bad-input", e.field);
    }
  } finally {
    q.close();
  }
  return 0;
}

// --- bench -------------------------------------------------------------------------

async function cmdBench(a: Args): Promise<number> {
  const fd = openSync(a["record"] as string, "a", 0o644);
  let lines: string[] = [];
  const flush = (): void => {
    if (lines.length === 0) return;
    const data = Buffer.from(lines.join(""));
    lines = [];
    writeAll(fd, data);
  };
  const worker = new Worker({
    deliveries: a["deliveries"],
    credit: Number(a["credit"] ?? 64),
    tokenFile: a["token-file"],
    logger,
  });
  worker.item(a["handler"] ?? "bench", (ctx) => {
    const start = Date.now();
    for (const i of ctx.items) lines.push(`${i.id} ${i.dueAtMs} ${start} ${i.attempt}\n`);
  });
  const timer = setInterval(flush, 50); // the contract asks for at least every 100 ms
  try {
    await worker.runUntilSignal();
  } finally {
    clearInterval(timer);
    flush();
    closeSync(fd);
  }
  return 0;
}

async function main(): Promise<number> {
  const [cmd, ...rest] = process.argv.slice(2);
  const { values } = parseArgs({
    args: rest,
    strict: true,
    options: {
      record: { type: "string" },
      coordinator: { type: "string" },
      group: { type: "string" },
      "worker-id": { type: "string" },
      deliveries: { type: "string" },
      items: { type: "string" },
      credit: { type: "string" },
      "token-file": { type: "string" },
      "drain-timeout-ms": { type: "string" },
      handler: { type: "string" },
    },
  });
  const a = values as Args;
  if (!a["record"]) {
    process.stderr.write("agent: --record is required\n");
    return 2;
  }
  switch (cmd) {
    case "run":
      return cmdRun(a);
    case "produce":
      if (!a["coordinator"]) {
        process.stderr.write("agent produce: --coordinator is required\n");
        return 2;
      }
      return cmdProduce(a);
    case "bench":
      if (!a["deliveries"]) {
        process.stderr.write("agent bench: --deliveries is required\n");
        return 2;
      }
      return cmdBench(a);
    default:
      process.stderr.write("usage: agent run|produce|bench --record FILE …\n");
      return 2;
  }
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`agent ${process.argv[2] ?? ""}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exit(1);
  },
);
