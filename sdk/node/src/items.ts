// Item handlers: the delayed items a `chime worker` hands over its delivery service
// (`chime.v1.Deliveries/Subscribe`, proto/chime/v1/delivery.proto), ported from the
// Python SDK's `items.py`. Opens the stream, runs the handler of each delivery and
// settles it: an ack when the handler resolves, a failure when it rejects
// (`HandlerError` chooses the retry delay), a release when a drain runs out of time.
//
// Throughput: a delivery costs one handler call and one small context object (its
// AbortController is made only when the handler reads `ctx.signal`); settlements are
// batched — one `Settle` per 5 ms, or at once when a quarter of the credit (at most
// 512) is waiting. The credit bounds what is held.

import { status as Status, type ChannelCredentials, type ClientDuplexStream, type ServiceError } from "@grpc/grpc-js";
import { EventEmitter } from "node:events";

import { Backoff, CHANNEL_OPTIONS, channelCredentials, cutUtf8, endpointUrl, sleep, type Endpoint, type Token } from "./conn.js";
import { HandlerError, fromServiceError } from "./errors.js";
import type { Logger } from "./logger.js";
import {
  DeliveriesClient,
  type DeliveredItem,
  type Delivery,
  type Failure,
  type SubscribeRequest,
  type SubscribeResponse,
} from "./gen/chime/v1/delivery.js";

/** Settlements wait at most this long to go out together in one `Settle`… */
const SETTLE_FLUSH_MS = 5;
/** …or go at once when a quarter of the credit, capped at this, is waiting. */
const SETTLE_MAX_BATCH = 512;
/** How long handlers cancelled at the drain timeout may take to settle. */
const CANCEL_GRACE_MS = 2_000;
/** A Failure's error is cut to 4 KiB. */
const MAX_ERROR_BYTES = 4096;
/** Handler names the delivery service accepts. */
export const HANDLER_NAME = /^[A-Za-z0-9._:-]{1,128}$/;

/** One delayed item of a delivery (read-only). */
export interface Item {
  /** Item id. */
  readonly id: string;
  /** Routing key (the id when it was enqueued without one). */
  readonly key: string;
  /** When it was due, Unix ms. */
  readonly dueAtMs: number;
  /** The payload as the producer gave it. */
  readonly payload: Uint8Array;
  /** This attempt, 1-based. */
  readonly attempt: number;
  /** Attempts before it is dead-lettered. */
  readonly maxAttempts: number;
  /** Merge key (empty: none). */
  readonly mergeKey: string;
}

/**
 * One delivery: a handler call for one item, or several merged items (same routing
 * key, handler and merge key, due within the merge window). Resolve to ack it;
 * reject to fail it (`HandlerError` sets the retry delay). When a drain runs out of
 * time (or the stream breaks) `signal` aborts; a handler that then rejects has its
 * items handed back to the queue unprocessed (released).
 */
export class ItemContext {
  /** @internal */
  controller: AbortController | undefined;
  /** @internal */
  cancelRequested = false;

  /** @internal Made by the subscriber for each delivery. */
  constructor(
    /** Names the delivery on its stream. */
    readonly deliveryId: number,
    /** The handler it is for. */
    readonly handler: string,
    /** Queue the items came from. */
    readonly queue: number,
    /** The items, earliest due first (more than one when merged). */
    readonly items: readonly Item[],
    /** Settle or `extend` by this instant (the chime worker's clock, Unix ms). */
    readonly settleDeadlineMs: number,
    /** W3C trace context of the chime worker's span of this delivery (empty: not traced). */
    readonly traceparent: string,
    /** @internal */
    readonly stream: DeliveryStream | undefined,
  ) {}

  /** The first (earliest) item. */
  get item(): Item {
    return this.items[0] as Item;
  }

  /** This delivery's attempt (of its first item), 1-based. */
  get attempt(): number {
    return this.item.attempt;
  }

  /** More than one item was merged into this delivery. */
  get merged(): boolean {
    return this.items.length > 1;
  }

  /** The payload of item `index` (default the first) decoded as UTF-8. */
  text(index = 0): string {
    const it = this.items[index];
    return it === undefined ? "" : Buffer.from(it.payload.buffer, it.payload.byteOffset, it.payload.byteLength).toString("utf8");
  }

  /** Id of the chime worker that delivered it. */
  get workerId(): string {
    return this.stream?.workerId ?? "";
  }

  /** Aborted when the SDK gives up on this handler (a drain ran out of time, or the stream broke). */
  get signal(): AbortSignal {
    if (this.controller === undefined) {
      this.controller = new AbortController();
      if (this.cancelRequested) this.controller.abort(new DOMException("delivery given up", "AbortError"));
    }
    return this.controller.signal;
  }

  /**
   * Asks for `ms` more milliseconds (1–3,600,000 from now; 0: the subscription's
   * settle timeout) before this delivery counts as a failed attempt. Answers false
   * when the delivery is no longer held (settled, or its stream is gone).
   */
  extend(ms = 0): boolean {
    if (!(Number.isInteger(ms) && ms >= 0 && ms <= 3_600_000)) {
      throw new RangeError(`extend: ${ms} ms is not within 0..3600000`);
    }
    const s = this.stream;
    if (s === undefined || s.closed || !s.held.has(this.deliveryId)) return false;
    s.send({ kind: { $case: "extend", value: { deliveryIds: [this.deliveryId], extendMs: ms } } });
    return true;
  }

  /** @internal */
  requestCancel(): void {
    this.cancelRequested = true;
    this.controller?.abort(new DOMException("delivery given up", "AbortError"));
  }
}

/** An item handler: `async (ctx) => { … }`; resolving acks, rejecting fails. */
export type ItemHandler = (ctx: ItemContext) => Promise<void> | void;

/** How the item side subscribes (see `WorkerOptions` for the meaning of each). */
export interface SubscriberOptions {
  endpoint: Endpoint;
  token: Token;
  /** Names this process in the chime worker's logs. */
  subscriber: string;
  credit: number;
  settleTimeoutMs: number;
  drainTimeoutMs: number;
  credentials?: ChannelCredentials | undefined;
  logger: Logger;
}

type Call = ClientDuplexStream<SubscribeRequest, SubscribeResponse>;

/** One `Subscribe` stream: what it holds, its batched settlements. @internal */
export class DeliveryStream {
  workerId = "";
  readonly held = new Map<number, ItemContext>();
  closed = false;
  subscribed = false;
  draining = false;
  drained = false;
  readonly ev = new EventEmitter();
  private acks: number[] = [];
  private failures: Failure[] = [];
  private releases: number[] = [];
  private timer: NodeJS.Timeout | undefined;
  private ended = false;
  private readonly threshold: number;

  constructor(
    readonly call: Call,
    credit: number,
  ) {
    this.threshold = Math.max(1, Math.min(SETTLE_MAX_BATCH, Math.floor(credit / 4)));
    this.ev.setMaxListeners(0);
  }

  send(m: SubscribeRequest): void {
    if (!this.closed && !this.ended) this.call.write(m);
  }

  private pending(): number {
    return this.acks.length + this.failures.length + this.releases.length;
  }

  private added(): void {
    if (this.pending() >= this.threshold) this.flush();
    else if (this.timer === undefined) this.timer = setTimeout(() => this.flush(), SETTLE_FLUSH_MS);
  }

  /** Sends the waiting settlements now. */
  flush(): void {
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (this.pending() === 0) return;
    const value = { acks: this.acks, failures: this.failures, releases: this.releases };
    this.acks = [];
    this.failures = [];
    this.releases = [];
    this.send({ kind: { $case: "settle", value } });
  }

  /** Flushes and half-closes the stream. */
  finishWriting(): void {
    this.flush();
    if (!this.closed && !this.ended) {
      this.ended = true;
      this.call.end();
    }
  }

  private settled(ctx: ItemContext): boolean {
    if (!this.held.delete(ctx.deliveryId)) return false;
    if (this.draining) this.ev.emit("change");
    return true;
  }

  ack(ctx: ItemContext): void {
    if (this.settled(ctx)) {
      this.acks.push(ctx.deliveryId);
      this.added();
    }
  }

  fail(ctx: ItemContext, error: string, retryAfterMs: number | undefined): void {
    if (this.settled(ctx)) {
      this.failures.push({ deliveryId: ctx.deliveryId, error: cutUtf8(error, MAX_ERROR_BYTES), retryAfterMs });
      this.added();
    }
  }

  release(ctx: ItemContext): void {
    if (this.settled(ctx)) {
      this.releases.push(ctx.deliveryId);
      this.added();
    }
  }

  /**
   * The stream is over: its unsettled deliveries already count as failed (or were
   * handed back) on the chime worker's side, so their handlers are told to stop.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.acks = [];
    this.failures = [];
    this.releases = [];
    const held = [...this.held.values()];
    this.held.clear();
    for (const ctx of held) ctx.requestCancel();
    this.call.cancel();
    this.ev.emit("change");
    this.ev.emit("closed");
  }
}

function describe(e: unknown): string {
  if (e instanceof Error) return e.message ? `${e.name}: ${e.message}` : e.name;
  return String(e);
}

/** Resolves when `cond()` holds (checked at each `change` of `ev`), or false after `ms`. */
function waitFor(ev: EventEmitter, cond: () => boolean, ms: number): Promise<boolean> {
  if (cond()) return Promise.resolve(true);
  return new Promise((resolve) => {
    const check = (): void => {
      if (cond()) {
        clearTimeout(t);
        ev.off("change", check);
        resolve(true);
      }
    };
    const t = setTimeout(() => {
      ev.off("change", check);
      resolve(false);
    }, ms);
    ev.on("change", check);
  });
}

/** Runs item handlers over one delivery stream, reconnecting until stopped. */
export class Subscriber {
  private readonly handlers: Map<string, ItemHandler>;
  private readonly log: Logger;
  private readonly stopCtl = new AbortController();
  private fatal: Error | undefined;

  /** `handlers` by name; `opts` how to subscribe. */
  constructor(
    handlers: Map<string, ItemHandler>,
    private readonly opts: SubscriberOptions,
  ) {
    if (handlers.size === 0) throw new Error("no item handlers to subscribe");
    if (handlers.size > 64) throw new Error("at most 64 item handlers per subscription");
    for (const name of handlers.keys()) {
      if (!HANDLER_NAME.test(name)) {
        throw new Error(`item handler name ${JSON.stringify(name)}: 1-128 characters of [A-Za-z0-9._:-]`);
      }
    }
    if (!(Number.isInteger(opts.credit) && opts.credit >= 1 && opts.credit <= 10_000)) {
      throw new Error(`credit ${opts.credit}: must be 1..10000`);
    }
    if (opts.settleTimeoutMs !== 0 && !(opts.settleTimeoutMs >= 1_000 && opts.settleTimeoutMs <= 3_600_000)) {
      throw new Error(`settleTimeoutMs ${opts.settleTimeoutMs}: must be 0 or 1000..3600000`);
    }
    this.handlers = new Map(handlers);
    this.log = opts.logger;
  }

  /** Starts the drain (see `run`). */
  stop(): void {
    this.stopCtl.abort();
  }

  /**
   * Subscribes and runs handlers until `stop()`, then drains: sends `Drain`, lets
   * running handlers finish for up to the drain timeout, releases the rest, and
   * closes the stream. Reconnects with backoff when a stream breaks; a refused token
   * is logged (with `UNAUTHENTICATED`) and retried, since the token file may be
   * fixed. A refused subscription (INVALID_ARGUMENT) rejects.
   */
  async run(): Promise<void> {
    const backoff = new Backoff();
    const o = this.opts;
    const client = new DeliveriesClient(o.endpoint.target, channelCredentials(o.endpoint, o.credentials), CHANNEL_OPTIONS);
    try {
      while (!this.stopCtl.signal.aborted) {
        const ok = await this.oneStream(client);
        if (this.fatal !== undefined) throw this.fatal;
        if (this.stopCtl.signal.aborted) break;
        if (ok) backoff.reset();
        await sleep(backoff.next(), this.stopCtl.signal);
      }
    } finally {
      client.close();
    }
  }

  /** One stream from subscribe to its end; true when it was subscribed. */
  private oneStream(client: DeliveriesClient): Promise<boolean> {
    const o = this.opts;
    const url = endpointUrl(o.endpoint);
    let md;
    try {
      md = o.token.metadata();
    } catch (e) {
      this.log.error(`cannot read the delivery token: ${e instanceof Error ? e.message : String(e)}`);
      return Promise.resolve(false);
    }
    const call: Call = client.subscribe(md);
    const stream = new DeliveryStream(call, o.credit);
    return new Promise<boolean>((resolve) => {
      let done = false;
      const end = (): void => {
        if (done) return;
        done = true;
        this.stopCtl.signal.removeEventListener("abort", onStop);
        stream.close();
        resolve(stream.subscribed);
      };
      const onStop = (): void => void this.drainOnStop(stream);
      call.on("data", (m: SubscribeResponse) => {
        const k = m.kind;
        switch (k?.$case) {
          case "deliver":
            this.dispatch(stream, k.value.deliveries);
            return;
          case "subscribed": {
            const s = k.value;
            stream.subscribed = true;
            stream.workerId = s.workerId;
            this.log.info(
              `subscribed to ${url} (chime worker ${s.workerId}, family ${s.family}, credit ${s.credit}, ` +
                `settle timeout ${s.settleTimeoutMs} ms): ${[...this.handlers.keys()].sort().join(", ")}`,
            );
            return;
          }
          case "drained":
            stream.drained = true;
            stream.ev.emit("change");
            return;
          case "refused":
            this.log.warn(`chime worker refused settling ${k.value.deliveryIds.length} deliveries: ${k.value.reason}`);
            return;
          case "closing":
            this.log.info(
              `chime worker ${stream.workerId} is closing (${k.value.reason}); settlements accepted for ` +
                `${Math.max(0, k.value.deadlineMs - Date.now())} ms`,
            );
            return;
          default:
            return;
        }
      });
      call.on("error", (e: ServiceError) => {
        if (e.code === Status.UNAUTHENTICATED) {
          this.log.error(`the delivery service at ${url} refused the token: UNAUTHENTICATED: ${e.details}`);
        } else if (e.code === Status.INVALID_ARGUMENT) {
          this.fatal = fromServiceError(e);
          this.log.error(`the delivery service at ${url} refused the subscription: ${this.fatal.message}`);
        } else if (e.code === Status.CANCELLED && stream.closed) {
          // we cancelled it: the drain is over
        } else {
          this.log.warn(`delivery stream to ${url} broke: ${Status[e.code]}: ${e.details}`);
        }
        end();
      });
      call.on("end", () => {
        if (!stream.draining) this.log.info(`delivery stream to ${url} ended`);
        end();
      });
      stream.ev.once("closed", end);
      this.stopCtl.signal.addEventListener("abort", onStop, { once: true });
      stream.send({
        kind: {
          $case: "subscribe",
          value: {
            handlers: [...this.handlers.keys()].sort(),
            credit: o.credit,
            subscriber: o.subscriber.slice(0, 253),
            settleTimeoutMs: o.settleTimeoutMs,
          },
        },
      });
      if (this.stopCtl.signal.aborted) onStop();
    });
  }

  private async drainOnStop(stream: DeliveryStream): Promise<void> {
    if (stream.closed) return;
    if (!stream.subscribed) {
      stream.close(); // nothing held, nothing to settle
      return;
    }
    stream.draining = true;
    stream.send({ kind: { $case: "drain", value: {} } });
    const deadline = performance.now() + this.opts.drainTimeoutMs;
    if (stream.held.size > 0) this.log.info(`draining: ${stream.held.size} deliveries running`);
    // Deliveries the chime worker sent before it read our Drain may still be on the
    // way; its `Drained` answer comes after the last of them. Run them too, and close
    // once everything is settled and `Drained` has arrived.
    const ok = await waitFor(
      stream.ev,
      () => stream.closed || (stream.drained && stream.held.size === 0),
      Math.max(0, deadline - performance.now()),
    );
    if (stream.closed) return;
    if (!ok && stream.held.size > 0) await this.giveUp(stream);
    stream.finishWriting();
    // The chime worker ends the stream once it has our settlements; do not wait for
    // a peer that went silent.
    const ended = await waitFor(stream.ev, () => stream.closed, 5_000);
    if (!ended) {
      this.log.warn("delivery stream did not end 5 s after the drain; closing it");
      stream.close();
    }
  }

  /** The drain timeout passed: tells running handlers to stop (they release as they reject), then releases the rest. */
  private async giveUp(stream: DeliveryStream): Promise<void> {
    this.log.warn(`drain timeout: releasing ${stream.held.size} deliveries`);
    for (const ctx of [...stream.held.values()]) ctx.requestCancel();
    const ok = await waitFor(stream.ev, () => stream.closed || stream.held.size === 0, CANCEL_GRACE_MS);
    if (!ok) for (const ctx of [...stream.held.values()]) stream.release(ctx); // handlers that ignore the signal
  }

  private dispatch(stream: DeliveryStream, deliveries: Delivery[]): void {
    for (const d of deliveries) {
      const ctx = new ItemContext(
        d.deliveryId,
        d.handler,
        d.queue,
        d.items as DeliveredItem[],
        d.settleDeadlineMs,
        d.traceparent,
        stream,
      );
      stream.held.set(d.deliveryId, ctx);
      this.runOne(stream, ctx);
    }
    if (stream.draining) stream.ev.emit("change");
  }

  private runOne(stream: DeliveryStream, ctx: ItemContext): void {
    const handler = this.handlers.get(ctx.handler);
    if (handler === undefined) {
      stream.fail(ctx, `no item handler ${JSON.stringify(ctx.handler)} in this subscriber`, undefined);
      return;
    }
    let r: Promise<void> | void;
    try {
      r = handler(ctx);
    } catch (e) {
      this.failed(stream, ctx, e);
      return;
    }
    if (r !== undefined && typeof (r as Promise<void>).then === "function") {
      (r as Promise<void>).then(
        () => stream.ack(ctx),
        (e: unknown) => this.failed(stream, ctx, e),
      );
    } else {
      stream.ack(ctx);
    }
  }

  private failed(stream: DeliveryStream, ctx: ItemContext, e: unknown): void {
    if (ctx.cancelRequested) {
      stream.release(ctx);
    } else if (e instanceof HandlerError) {
      stream.fail(ctx, e.message, e.retryAfterMs);
    } else {
      this.log.warn(`item handler ${ctx.handler} failed (delivery ${ctx.deliveryId}): ${describe(e)}`);
      stream.fail(ctx, describe(e), undefined);
    }
  }
}
