// The producer client of `chime.v1.Queue` (proto/chime/v1/queue.proto): enqueue
// delayed items, then get, cancel, reschedule them, read queue stats, and list or
// requeue dead letters. Any coordinator replica answers (items live in Redis), so
// point it at a Service or any replica. Calls answer plain objects and string
// outcomes; failures reject with `ChimeError` subclasses (`InvalidArgumentError`
// names the refused field). UNAVAILABLE is retried by gRPC itself a few times
// (every call here is safe to repeat: enqueue is idempotent on the item id).

import type { ChannelCredentials, Metadata, ServiceError } from "@grpc/grpc-js";
import { status as Status } from "@grpc/grpc-js";

import { CHANNEL_OPTIONS, Token, channelCredentials, parseEndpoint } from "./conn.js";
import { ChimeError, fromServiceError } from "./errors.js";
import {
  CancelOutcome as PbCancel,
  EnqueueOutcome as PbEnqueue,
  ItemState as PbState,
  QueueClient as PbQueueClient,
  RescheduleOutcome as PbReschedule,
  type ItemRef as PbItemRef,
  type ItemView as PbItemView,
  type NewItem as PbNewItem,
} from "./gen/chime/v1/queue.js";

/** What enqueue did with one item: stored (`created`) or an item with this id exists (`duplicate`). */
export type EnqueueOutcome = "created" | "duplicate";
/** Where an item is in its life. */
export type ItemState = "pending" | "in_flight" | "dead" | "waiting";
/** What cancel did: removed, already handed to a worker (it will not be retried), or no such item. */
export type CancelOutcome = "cancelled" | "in_flight" | "not_found";
/** What reschedule did. */
export type RescheduleOutcome = "rescheduled" | "in_flight" | "dead" | "not_found";

/**
 * An item to deliver at `dueAtMs` (Unix ms), or `inMs` after the store's clock; with
 * neither it is due now. `key` routes it (the user, say) and picks its merge group;
 * keep it: finding the item later takes the key and the id.
 */
export interface NewItem {
  /** Caller-chosen id (1–512 bytes); enqueue is idempotent on it while the item exists. */
  id: string;
  /** Handler that runs it (1–128 bytes of `[A-Za-z0-9._:-]`). */
  handler: string;
  /** Routing key (empty: the id). */
  key?: string;
  /** Due time, Unix ms (0: use `inMs`). */
  dueAtMs?: number;
  /** Due this many ms after the store's clock when `dueAtMs` is 0. */
  inMs?: number;
  /** Opaque payload (a string is sent as UTF-8), at most 64 KiB. */
  payload?: Uint8Array | string;
  /** Delivery attempts before dead-lettering (1–100; 0: the default, 3). */
  maxAttempts?: number;
  /** Items with the same key, handler and merge key due within the merge window are delivered together. */
  mergeKey?: string;
  /** W3C trace context the handler's span joins (empty: none). */
  traceparent?: string;
}

/** Finds an item: its id (a string) or its id and routing key. */
export type ItemRef = string | { id: string; key?: string };

/** A stored item and its state. */
export interface ItemView {
  id: string;
  key: string;
  handler: string;
  /** Scheduled due time (the latest asked for), Unix ms. */
  dueAtMs: number;
  payload: Uint8Array;
  maxAttempts: number;
  mergeKey: string;
  /** Delivery attempts made so far. */
  attempts: number;
  /** Queue index it lives in. */
  queue: number;
  state: ItemState;
  /** Pending: when it becomes due (a retry's backoff included); waiting: its due time. Unix ms. */
  dueScoreMs: number;
  /** In flight: visibility deadline, Unix ms. */
  deadlineMs: number;
  /** In flight: cancelled meanwhile, so it will not be retried. */
  cancelled: boolean;
  /** Dead: since when, Unix ms. */
  sinceMs: number;
  /** The error of its last failed attempt (empty: none). */
  lastError: string;
}

/** Counts of one queue. */
export interface QueueCounts {
  queue: number;
  pending: number;
  dueNow: number;
  dueSoon: number;
  inFlight: number;
  dead: number;
  nextDueMs: number;
  moving: number;
  waiting: number;
}

/** Every queue's counts. */
export interface QueueStats {
  /** The store's clock, Unix ms. */
  nowMs: number;
  /** Queue count of the current layout. */
  count: number;
  queues: QueueCounts[];
  /** Items waiting for a handler, per handler name. */
  waitingByHandler: Record<string, number>;
}

/** Options of a `QueueClient`. */
export interface QueueClientOptions {
  /** The producer (or admin) token. */
  token?: string;
  /** A token file: the first field of its first line that is neither blank nor a `#` comment (re-read at every call). */
  tokenFile?: string;
  /** TLS credentials for `https://` (default: the system's roots). */
  credentials?: ChannelCredentials;
  /** Deadline of each call, ms (default 30,000). */
  timeoutMs?: number;
}

// gRPC retries UNAVAILABLE transparently; every Queue call is safe to repeat.
const SERVICE_CONFIG = JSON.stringify({
  methodConfig: [
    {
      name: [{ service: "chime.v1.Queue" }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.1s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
});

function lower(name: string | undefined, prefix: string): string {
  if (name === undefined || !name.startsWith(prefix)) {
    throw new ChimeError(Status.UNKNOWN, `unexpected ${String(name)} in the answer`);
  }
  return name.slice(prefix.length).toLowerCase();
}

function toRef(r: ItemRef): PbItemRef {
  return typeof r === "string" ? { key: "", id: r } : { key: r.key ?? "", id: r.id };
}

function toNewItem(i: NewItem): PbNewItem {
  const p = i.payload ?? new Uint8Array(0);
  return {
    id: i.id,
    key: i.key ?? "",
    handler: i.handler,
    dueAtMs: i.dueAtMs ?? 0,
    inMs: i.inMs ?? 0,
    payload: typeof p === "string" ? Buffer.from(p, "utf8") : Buffer.from(p.buffer, p.byteOffset, p.byteLength),
    maxAttempts: i.maxAttempts ?? 0,
    mergeKey: i.mergeKey ?? "",
    traceparent: i.traceparent ?? "",
  };
}

function toView(v: PbItemView): ItemView {
  return {
    id: v.id,
    key: v.key,
    handler: v.handler,
    dueAtMs: v.dueAtMs,
    payload: v.payload,
    maxAttempts: v.maxAttempts,
    mergeKey: v.mergeKey,
    attempts: v.attempts,
    queue: v.queue,
    state: lower(PbState[v.state], "ITEM_STATE_") as ItemState,
    dueScoreMs: v.dueScoreMs,
    deadlineMs: v.deadlineMs,
    cancelled: v.cancelled,
    sinceMs: v.sinceMs,
    lastError: v.lastError,
  };
}

type Unary<Req, Res> = (
  req: Req,
  md: Metadata,
  opts: { deadline: Date },
  cb: (e: ServiceError | null, r: Res) => void,
) => unknown;

/**
 * The producer client. `new QueueClient("http://coordinator:7070", { tokenFile })`;
 * `close()` when done.
 */
export class QueueClient {
  private readonly client: PbQueueClient;
  private readonly token: Token;
  private readonly timeoutMs: number;

  /** `endpoint`: any coordinator, `http://host:port` (or `https://`). */
  constructor(endpoint: string, options: QueueClientOptions = {}) {
    const e = parseEndpoint(endpoint);
    this.token = new Token(options.token, options.tokenFile);
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.client = new PbQueueClient(e.target, channelCredentials(e, options.credentials), {
      ...CHANNEL_OPTIONS,
      "grpc.service_config": SERVICE_CONFIG,
    });
  }

  private call<Req, Res>(method: Unary<Req, Res>, req: Req): Promise<Res> {
    return new Promise((resolve, reject) => {
      let md: Metadata;
      try {
        md = this.token.metadata();
      } catch (e) {
        reject(e instanceof Error ? e : new Error(String(e)));
        return;
      }
      method.call(this.client, req, md, { deadline: new Date(Date.now() + this.timeoutMs) }, (err, res) => {
        if (err) reject(fromServiceError(err));
        else resolve(res);
      });
    });
  }

  /**
   * Stores a batch (1–100,000 items); answers one outcome per item, in order. One bad
   * item refuses the whole batch with `InvalidArgumentError` (its `field` names it,
   * e.g. `items[3].payload`) and nothing is stored.
   */
  async enqueue(items: NewItem[]): Promise<EnqueueOutcome[]> {
    const res = await this.call(this.client.enqueue as Unary<unknown, { outcomes: PbEnqueue[] }>, {
      items: items.map(toNewItem),
    });
    return res.outcomes.map((o) => lower(PbEnqueue[o], "ENQUEUE_OUTCOME_") as EnqueueOutcome);
  }

  /** The item with its state; undefined when there is no such item. */
  async get(ref: ItemRef): Promise<ItemView | undefined> {
    try {
      return toView(await this.call(this.client.getItem as Unary<PbItemRef, PbItemView>, toRef(ref)));
    } catch (e) {
      if (e instanceof ChimeError && e.code === Status.NOT_FOUND) return undefined;
      throw e;
    }
  }

  /** Removes a pending or dead item; an in-flight one is not retried or redelivered. */
  async cancel(ref: ItemRef): Promise<CancelOutcome> {
    const r = await this.call(this.client.cancelItem as Unary<PbItemRef, { outcome: PbCancel }>, toRef(ref));
    return lower(PbCancel[r.outcome], "CANCEL_OUTCOME_") as CancelOutcome;
  }

  /** Moves a pending item to `dueAtMs` (Unix ms). */
  async reschedule(ref: ItemRef, dueAtMs: number): Promise<RescheduleOutcome> {
    const r = await this.call(this.client.rescheduleItem as Unary<unknown, { outcome: PbReschedule }>, {
      item: toRef(ref),
      dueAtMs,
    });
    return lower(PbReschedule[r.outcome], "RESCHEDULE_OUTCOME_") as RescheduleOutcome;
  }

  /** Depth, due, in-flight, dead and waiting counts per queue. */
  async stats(): Promise<QueueStats> {
    type Res = Omit<QueueStats, "waitingByHandler"> & { waitingByHandler: { [k: string]: number } };
    const r = await this.call(this.client.queueStats as Unary<unknown, Res>, {});
    return { nowMs: r.nowMs, count: r.count, queues: r.queues, waitingByHandler: { ...r.waitingByHandler } };
  }

  /** Up to `limit` dead letters (0: 100; at most 1,000). */
  async deadLetters(limit = 0): Promise<ItemView[]> {
    const r = await this.call(this.client.listDeadLetters as Unary<unknown, { items: PbItemView[] }>, { limit });
    return r.items.map(toView);
  }

  /** Puts dead letters back, due now with fresh attempts: the given ones, or every one with `"all"`. Answers how many. */
  async requeueDeadLetters(refs: ItemRef[] | "all"): Promise<number> {
    const req = refs === "all" ? { items: [], all: true } : { items: refs.map(toRef), all: false };
    const r = await this.call(this.client.requeueDeadLetters as Unary<unknown, { requeued: number }>, req);
    return r.requeued;
  }

  /** Closes the channel. */
  close(): void {
    this.client.close();
  }
}
