// Quickstart: schedules three reminders through the coordinator, receives them
// through a chime worker's delivery service, prints them, and exits 0 (1 when they
// did not all arrive within --timeout-s). Runs a job handler too (trigger it with
// `chime jobs` while it waits). Needs `npm ci && npm run build` in sdk/node first.
//
//   cargo run -p chime -- dev &            # coordinator :7070, delivery service :7071
//   node sdk/node/examples/quickstart.mjs [--coordinator URL] [--deliveries URL]
//        [--token-file F] [--producer-token-file F] [--timeout-s N]

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

import { QueueClient, Worker } from "@chime-scheduler/sdk";

const { values: opt } = parseArgs({
  options: {
    coordinator: { type: "string", default: "http://127.0.0.1:7070" },
    deliveries: { type: "string", default: "http://127.0.0.1:7071" },
    "token-file": { type: "string" },
    "producer-token-file": { type: "string" },
    "timeout-s": { type: "string", default: "30" },
  },
});

const clock = (ms) => new Date(ms).toISOString().slice(11, 23);
const run = randomUUID().slice(0, 8); // fresh ids on every run (an existing id is a duplicate)
const expected = new Set();
let allSeen;
const seen = new Promise((resolve) => (allSeen = resolve));

const worker = new Worker({
  coordinator: opt.coordinator,
  group: "quickstart",
  deliveries: opt.deliveries,
  tokenFile: opt["token-file"],
  credit: 16,
});

// A job handler: resolves with the shard's output; ctx.signal aborts on kill/timeout.
worker.job("quickstart.report", async (ctx) => {
  ctx.log(`shard ${ctx.shardIndex}/${ctx.shardTotal}`);
  return "done";
});

// An item handler: resolving acks the delivery, throwing fails it (retried later).
worker.item("quickstart.remind", async (ctx) => {
  const now = Date.now();
  ctx.items.forEach((item, i) => {
    const lag = now - item.dueAtMs;
    const when = lag >= 0 ? `${lag} ms after due` : `${-lag} ms early: merged, it fires with the earliest`;
    console.log(`[${clock(now)}] got ${item.id} for ${item.key}: ${JSON.stringify(ctx.text(i))} (attempt ${item.attempt}, ${when})`);
    expected.delete(item.id);
  });
  if (ctx.merged) console.log(`           ^ ${ctx.items.length} reminders of one user merged into one delivery`);
  if (expected.size === 0) allSeen();
});

const done = worker.start(); // registers and subscribes; `await worker.stop()` drains

const q = new QueueClient(opt.coordinator, { tokenFile: opt["producer-token-file"] });
const items = [
  { id: `hello-${run}-1`, handler: "quickstart.remind", key: "user-42", inMs: 1_000, payload: "coupon 7 opens soon" },
  // Same key and merge key, due within the merge window: one delivery.
  { id: `hello-${run}-2`, handler: "quickstart.remind", key: "user-7", mergeKey: "coupons", inMs: 2_000, payload: "coupon 8 opens soon" },
  { id: `hello-${run}-3`, handler: "quickstart.remind", key: "user-7", mergeKey: "coupons", inMs: 2_300, payload: "coupon 9 opens soon" },
];
for (const i of items) expected.add(i.id);
const outcomes = await q.enqueue(items);
console.log(`[${clock(Date.now())}] enqueued ${items.length} reminders: ${outcomes.join(", ")}`);
q.close();

let timer;
const ok = await Promise.race([
  seen.then(() => true),
  new Promise((resolve) => (timer = setTimeout(() => resolve(false), Number(opt["timeout-s"]) * 1000))),
]);
clearTimeout(timer);
await worker.stop();
await done;
if (!ok) {
  console.error(`not delivered within ${opt["timeout-s"]} s: ${[...expected].sort().join(", ")}`);
  process.exit(1);
}
console.log("every reminder arrived; bye");
