// `Worker`: one object that runs job handlers (a session with the coordinator) and
// item handlers (a subscription to a chime worker's delivery service), or either
// alone; its lifecycle (start, stop with a drain, opt-in SIGTERM/SIGINT handling).

import type { ChannelCredentials } from "@grpc/grpc-js";
import { hostname } from "node:os";

import { Token, parseEndpoint, type Endpoint } from "./conn.js";
import { Session, type JobHandler } from "./jobs.js";
import { Subscriber, type ItemHandler } from "./items.js";
import { defaultLogger, type Logger } from "./logger.js";

/** How a `Worker` connects. Give `coordinator`, `deliveries`, or both. */
export interface WorkerOptions {
  /**
   * Job side: one `http://host:port` coordinator endpoint, several (an array or a
   * comma-separated string; a follower redirects to the leader), or none for no
   * job session.
   */
  coordinator?: string | string[];
  /** The worker group jobs name (default `default`). */
  group?: string;
  /** Stable id unique among live workers (default: the host name, a pod's name). */
  workerId?: string;
  /** Most shards run at once (default 16). */
  capacity?: number;
  /** Free-form labels (zone, version, …). */
  labels?: Record<string, string>;
  /**
   * Item side: the delivery service of a chime worker (`http://127.0.0.1:7071` for a
   * sidecar). Unset, read from the environment variable `CHIME_DELIVERIES` (what the
   * Helm chart's sidecar sets), and `tokenFile` from `CHIME_DELIVERIES_TOKEN_FILE`.
   */
  deliveries?: string;
  /** Most deliveries held at once, 1–10,000: the concurrency of item handlers (default 64). */
  credit?: number;
  /** How long a delivery may run before it counts as failed unless extended, ms (0: the chime worker's default, 30 s). */
  settleTimeoutMs?: number;
  /** The bearer token of both sides. */
  token?: string;
  /** A token file: the first field of its first line that is neither blank nor a `#` comment, re-read at each reconnection. */
  tokenFile?: string;
  /**
   * On stop, how long running handlers may finish before they are cancelled (job
   * shards, reported CANCELLED) or released (item deliveries, handed back
   * unprocessed), ms (default 10,000).
   */
  drainTimeoutMs?: number;
  /** TLS credentials for `https://` endpoints (default: the system's roots). */
  credentials?: ChannelCredentials;
  /** Where the SDK logs (default: warnings and errors to stderr). */
  logger?: Logger;
}

/**
 * Runs job handlers and item handlers:
 *
 * ```ts
 * const worker = new Worker({ coordinator: "http://127.0.0.1:7070", group: "push" });
 * worker.job("push.daily", async (ctx) => `shard ${ctx.shardIndex}/${ctx.shardTotal}`);
 * await worker.runUntilSignal(); // SIGTERM/SIGINT drain it
 * ```
 */
export class Worker {
  /** The worker id this process registers with. */
  readonly workerId: string;
  private readonly endpoints: Endpoint[];
  private readonly deliveries: Endpoint | undefined;
  private readonly token: Token;
  private readonly opts: WorkerOptions;
  private readonly logger: Logger;
  private readonly jobs = new Map<string, JobHandler>();
  private readonly items = new Map<string, ItemHandler>();
  private parts: Array<Session | Subscriber> = [];
  private running: Promise<void> | undefined;
  private stopRequested = false;

  /** See `WorkerOptions`; throws on a bad endpoint or an unreadable token file. */
  constructor(options: WorkerOptions) {
    let deliveries = options.deliveries;
    let tokenFile = options.tokenFile;
    if (deliveries === undefined) {
      deliveries = process.env["CHIME_DELIVERIES"] || undefined;
      if (deliveries && options.token === undefined && tokenFile === undefined) {
        tokenFile = process.env["CHIME_DELIVERIES_TOKEN_FILE"] || undefined;
      }
    }
    const coord = options.coordinator;
    const list = coord === undefined ? [] : Array.isArray(coord) ? coord : coord.split(",");
    this.endpoints = list.filter((c) => c.trim()).map(parseEndpoint);
    this.deliveries = deliveries ? parseEndpoint(deliveries) : undefined;
    if (this.endpoints.length === 0 && this.deliveries === undefined) {
      throw new Error("give a coordinator (job handlers), deliveries (item handlers), or both");
    }
    this.token = new Token(options.token, tokenFile);
    this.workerId = options.workerId || hostname();
    this.opts = options;
    this.logger = options.logger ?? defaultLogger;
  }

  /** Registers an async job handler under `name`. Answers the worker, for chaining. */
  job(name: string, handler: JobHandler): this {
    if (this.endpoints.length === 0) throw new Error(`job handler ${JSON.stringify(name)}: this worker has no coordinator`);
    if (this.jobs.has(name)) throw new Error(`job handler ${JSON.stringify(name)} registered twice`);
    this.jobs.set(name, handler);
    return this;
  }

  /** Registers an async item handler under `name`. Answers the worker, for chaining. */
  item(name: string, handler: ItemHandler): this {
    if (this.deliveries === undefined) {
      throw new Error(`item handler ${JSON.stringify(name)}: this worker has no deliveries endpoint`);
    }
    if (this.items.has(name)) throw new Error(`item handler ${JSON.stringify(name)} registered twice`);
    this.items.set(name, handler);
    return this;
  }

  /**
   * Starts the sessions; answers a promise that settles when the worker has stopped
   * and drained (rejects when a side cannot go on, e.g. a subscription the chime
   * worker refuses as invalid). Call once.
   */
  start(): Promise<void> {
    if (this.running !== undefined) throw new Error("this worker is already running");
    const o = this.opts;
    const drainTimeoutMs = o.drainTimeoutMs ?? 10_000;
    if (this.endpoints.length > 0) {
      if (this.jobs.size === 0) throw new Error("a coordinator is set but no job handler is registered");
      this.parts.push(
        new Session(this.jobs, {
          endpoints: this.endpoints,
          group: o.group ?? "default",
          workerId: this.workerId,
          token: this.token,
          capacity: o.capacity ?? 16,
          labels: o.labels ?? {},
          drainTimeoutMs,
          credentials: o.credentials,
          logger: this.logger,
        }),
      );
    }
    if (this.deliveries !== undefined) {
      if (this.items.size === 0) throw new Error("a deliveries endpoint is set but no item handler is registered");
      this.parts.push(
        new Subscriber(this.items, {
          endpoint: this.deliveries,
          token: this.token,
          subscriber: `${this.workerId}/${process.pid}`,
          credit: o.credit ?? 64,
          settleTimeoutMs: o.settleTimeoutMs ?? 0,
          drainTimeoutMs,
          credentials: o.credentials,
          logger: this.logger,
        }),
      );
    }
    if (this.stopRequested) for (const p of this.parts) p.stop();
    const runs = this.parts.map((p) => p.run());
    // A side that fails stops the other (which drains) before the error surfaces.
    runs.forEach((r) => r.catch(() => this.stopParts()));
    this.running = Promise.all(runs).then(() => undefined);
    return this.running;
  }

  private stopParts(): void {
    this.stopRequested = true;
    for (const p of this.parts) p.stop();
  }

  /** Starts the drain; resolves when it is over (at once when the worker never started). */
  async stop(): Promise<void> {
    this.stopParts();
    if (this.running !== undefined) await this.running;
  }

  /**
   * Starts the worker and runs it until SIGTERM or SIGINT, then drains and resolves.
   * A second signal exits the process at once (code 130) without waiting for the
   * drain. The signal handlers are removed when it resolves.
   */
  async runUntilSignal(): Promise<void> {
    let signals = 0;
    const onSignal = (sig: NodeJS.Signals): void => {
      signals++;
      if (signals === 1) {
        this.logger.info(`${sig}: draining (send it again to stop at once)`);
        this.stopParts();
      } else {
        this.logger.warn(`${sig} again: stopping without waiting for the drain`);
        process.exit(130);
      }
    };
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
    try {
      await this.start();
    } finally {
      process.off("SIGTERM", onSignal);
      process.off("SIGINT", onSignal);
    }
  }
}
