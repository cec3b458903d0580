// Job handlers: the worker's session with the coordinator (`chime.v1.WorkerGateway`,
// proto/chime/v1/worker.proto), ported from the Python SDK's `jobs.py`:
//
// * register (worker id, group, handlers, capacity, labels, and the shards still
//   running from a previous session), then heartbeat at the interval `Registered`
//   gives, listing the running shards;
// * a follower answers `NotLeader` with the leader's bare `host:port`, dialed with the
//   scheme of the endpoint that answered; otherwise the endpoints are tried in turn
//   with a backoff (100 ms doubling to 1 s);
// * each `Assign` runs its handler: `RunStarted`, `RunLog` lines, and exactly one
//   `RunResult` per (run, shard, attempt). Shards outlive the stream: after a
//   reconnect the worker registers with them and re-sends the results of the last
//   minute (duplicates are ignored by the coordinator);
// * a worker that went three heartbeat intervals without a heartbeat (frozen,
//   starved) starts no `Assign` it reads afterwards on that session and registers
//   again; an `Assign` read after its `start_by_session_ms` is dropped unstarted;
// * `Cancel` aborts the shard's `ctx.signal`; the result is CANCELLED when the
//   handler rejects (or after a 2 s grace if it ignores the signal);
// * drain: `Draining`, shards finish within the drain timeout, the rest are
//   cancelled, their results reported, then the stream closes.

import { status as Status, type ChannelCredentials, type ClientDuplexStream, type ServiceError } from "@grpc/grpc-js";
import { EventEmitter } from "node:events";

import {
  Backoff,
  CHANNEL_OPTIONS,
  channelCredentials,
  cutUtf8,
  endpointUrl,
  monoMs,
  nowMs,
  redirectTarget,
  type Endpoint,
  type Token,
} from "./conn.js";
import type { Logger } from "./logger.js";
import {
  RunStatus,
  SessionEndReason,
  WorkerGatewayClient,
  type Assign,
  type CoordinatorMessage,
  type RunRef,
  type WorkerMessage,
} from "./gen/chime/v1/worker.js";

/** Results are sent again to every coordinator registered with within this window. */
const RESEND_WINDOW_MS = 60_000;
/** At most this many results are kept for re-sending. */
const RESEND_MAX = 10_000;
/** How long a cancelled handler may take to settle before its shard is reported cancelled without it. */
export const CANCEL_GRACE_MS = 2_000;
/** A silent coordinator's answer to `Register` is given up on after this (a follower holds it up to 6 s). */
const REGISTER_TIMEOUT_MS = 10_000;
/** A run log line is cut to 4 KiB by the coordinator. */
const MAX_LOG_BYTES = 4096;
/** Output is cut to 64 KiB. */
const MAX_OUTPUT_BYTES = 64 * 1024;

/** One shard of a run to execute, handed to a job handler. */
export class JobContext {
  /** Run id. */
  readonly runId: string;
  /** The fire: `<job>@<scheduled instant ms>` for scheduled fires. */
  readonly fireId: string;
  /** Job name. */
  readonly job: string;
  /** Handler name. */
  readonly handler: string;
  /** Job parameters (text, often JSON). */
  readonly params: string;
  /** This shard's parameters (fixed sharding with per-shard params). */
  readonly shardParams: string;
  /** This shard's index, 0-based. */
  readonly shardIndex: number;
  /** Number of shards of the run. */
  readonly shardTotal: number;
  /** Attempt number, 1-based. */
  readonly attempt: number;
  /** The instant the fire was scheduled for, Unix ms. */
  readonly scheduledAtMs: number;
  /** When the coordinator cancels the shard (its clock, Unix ms; 0: never). */
  readonly deadlineMs: number;
  /** W3C trace context of the run's fire span (empty when not traced): make the shard's span its child. */
  readonly traceparent: string;
  /**
   * Aborted when the shard must stop (kill, timeout, overlap policy, drain timeout).
   * Pass it to what you await (`fetch`, `setTimeout` of `node:timers/promises`, …)
   * and let the rejection propagate: the shard is then reported CANCELLED.
   */
  readonly signal: AbortSignal;
  private readonly logLine: (line: string) => void;
  /** @internal */
  readonly controller: AbortController;
  /** @internal */
  reason: string | undefined;

  /** @internal Made by the session for each `Assign`. */
  constructor(a: Assign, logLine: (line: string) => void) {
    this.runId = a.run?.runId ?? "";
    this.fireId = a.fireId;
    this.job = a.job;
    this.handler = a.handler;
    this.params = a.params;
    this.shardParams = a.shardParams;
    this.shardIndex = a.shardIndex;
    this.shardTotal = a.shardTotal;
    this.attempt = a.run?.attempt ?? 0;
    this.scheduledAtMs = a.scheduledAtMs;
    this.deadlineMs = a.deadlineMs;
    this.traceparent = a.traceparent;
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.logLine = logLine;
  }

  /** Why the shard was cancelled (kill, timeout, drain timeout, …); undefined while it was not. */
  get cancelReason(): string | undefined {
    return this.reason;
  }

  /** Sends a line to the run history (the coordinator keeps the tail per shard; cut to 4 KiB). */
  log(line: string): void {
    this.logLine(line);
  }
}

/**
 * A job handler: resolves with the shard's output (a string; undefined is empty) or
 * rejects (the shard fails with the error's message; the coordinator retries it when
 * the job allows). After `ctx.signal` aborts, a rejection reports it CANCELLED.
 */
export type JobHandler = (ctx: JobContext) => Promise<string | void | undefined> | string | void | undefined;

/** How the job side connects (see `WorkerOptions` for the meaning of each). */
export interface SessionOptions {
  endpoints: Endpoint[];
  group: string;
  workerId: string;
  token: Token;
  capacity: number;
  labels: Record<string, string>;
  drainTimeoutMs: number;
  credentials?: ChannelCredentials | undefined;
  logger: Logger;
}

type Key = string;

function keyOf(r: RunRef): Key {
  return `${r.runId}\u0000${r.shardIndex}\u0000${r.attempt}`;
}

class Shard {
  startedMs = 0;
  reported = false;
  constructor(
    readonly ref: RunRef,
    readonly ctx: JobContext,
  ) {}
}

interface Kept {
  msg: WorkerMessage;
  /** Monotonic ms when a connection first took it; undefined while none has. */
  sentAt: number | undefined;
}

type Outcome = { kind: "drained" } | { kind: "retry" } | { kind: "redirect"; to: Endpoint };

type Call = ClientDuplexStream<WorkerMessage, CoordinatorMessage>;

/** The job session (see the file's comment). One per worker process. */
export class Session {
  private readonly handlers: Map<string, JobHandler>;
  private readonly running = new Map<Key, Shard>();
  private readonly results: Kept[] = [];
  private readonly clients = new Map<string, WorkerGatewayClient>();
  private readonly ev = new EventEmitter();
  private readonly log: Logger;
  /** The current registered call, while it is writable. */
  private call: Call | undefined;
  private lastBeat = 0;
  private stallLimit = Infinity;
  private sessionClock = 0;
  private stopping = false;
  private drainDeadline: number | undefined;
  private drainTimer: NodeJS.Timeout | undefined;

  /** `handlers` by name; `opts` how to connect. */
  constructor(
    handlers: Map<string, JobHandler>,
    private readonly opts: SessionOptions,
  ) {
    if (handlers.size === 0) throw new Error("no job handlers to register");
    if (opts.endpoints.length === 0) throw new Error("no coordinator endpoint");
    if (!(opts.capacity >= 1)) throw new Error(`capacity ${opts.capacity}: must be at least 1`);
    this.handlers = new Map(handlers);
    this.log = opts.logger;
    this.ev.setMaxListeners(0);
  }

  /** Starts the drain (see `run`). */
  stop(): void {
    if (this.stopping) return;
    this.stopping = true;
    this.drainDeadline = monoMs() + this.opts.drainTimeoutMs;
    this.drainTimer = setTimeout(() => this.drainTimeout(), this.opts.drainTimeoutMs);
    this.changed();
  }

  private changed(): void {
    this.ev.emit("change");
  }

  /** Resolves when `cond()` holds (checked at every change), or false after `ms`. */
  private waitFor(cond: () => boolean, ms: number): Promise<boolean> {
    if (cond()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const check = (): void => {
        if (cond()) {
          clearTimeout(t);
          this.ev.off("change", check);
          resolve(true);
        }
      };
      const t = setTimeout(() => {
        this.ev.off("change", check);
        resolve(false);
      }, ms);
      this.ev.on("change", check);
    });
  }

  private stoppedIdle(): boolean {
    return this.stopping && this.running.size === 0;
  }

  // --- shards -------------------------------------------------------------------

  private emit(m: WorkerMessage): void {
    const c = this.call;
    if (c !== undefined) c.write(m);
  }

  private start(a: Assign): void {
    const ref: RunRef = a.run ?? { runId: "", shardIndex: 0, attempt: 0 };
    const k = keyOf(ref);
    if (this.running.has(k)) return; // sent again after a reconnect: already running
    const ctx = new JobContext(a, (line) =>
      this.emit({ kind: { $case: "runLog", value: { run: ref, line: cutUtf8(line, MAX_LOG_BYTES), atMs: nowMs() } } }),
    );
    const shard = new Shard(ref, ctx);
    this.running.set(k, shard);
    void this.runShard(k, shard);
  }

  private async runShard(k: Key, shard: Shard): Promise<void> {
    const ctx = shard.ctx;
    shard.startedMs = nowMs();
    this.emit({ kind: { $case: "runStarted", value: { run: shard.ref, startedAtMs: shard.startedMs } } });
    let status = RunStatus.RUN_STATUS_SUCCEEDED;
    let output = "";
    let error = "";
    const handler = this.handlers.get(ctx.handler);
    try {
      if (handler === undefined) throw new Error(`no job handler ${JSON.stringify(ctx.handler)} on this worker`);
      const out = await handler(ctx);
      output = out === undefined || out === null ? "" : String(out);
    } catch (e) {
      if (ctx.signal.aborted) {
        status = RunStatus.RUN_STATUS_CANCELLED;
        error = ctx.reason ?? "cancelled";
      } else {
        status = RunStatus.RUN_STATUS_FAILED;
        error = e instanceof Error ? e.message || e.name : String(e);
        this.log.warn(
          `job handler ${ctx.handler} failed (run ${ctx.runId} shard ${ctx.shardIndex}): ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`,
        );
      }
    }
    this.report(k, shard, status, cutUtf8(output, MAX_OUTPUT_BYTES), error);
  }

  private report(k: Key, shard: Shard, status: RunStatus, output: string, error: string): void {
    if (shard.reported) return;
    shard.reported = true;
    this.running.delete(k);
    const msg: WorkerMessage = {
      kind: {
        $case: "runResult",
        value: { run: shard.ref, status, output, error, startedAtMs: shard.startedMs, finishedAtMs: nowMs() },
      },
    };
    while (this.results.length >= RESEND_MAX) this.results.shift();
    const kept: Kept = { msg, sentAt: undefined };
    this.results.push(kept);
    if (this.call !== undefined) {
      kept.sentAt = monoMs();
      this.call.write(msg);
    }
    this.changed();
  }

  private cancel(k: Key, reason: string): void {
    const shard = this.running.get(k);
    if (shard === undefined || shard.ctx.signal.aborted) return;
    this.log.info(`cancelling run ${shard.ref.runId} shard ${shard.ref.shardIndex} (${reason})`);
    shard.ctx.reason = reason;
    shard.ctx.controller.abort(new DOMException(reason, "AbortError"));
    // A handler that ignores its signal: report it cancelled anyway, so the
    // coordinator (and a drain) does not wait for it forever.
    setTimeout(() => {
      if (!shard.reported) {
        this.log.warn(
          `run ${shard.ref.runId} shard ${shard.ref.shardIndex} did not stop within ${CANCEL_GRACE_MS} ms of its cancellation`,
        );
        this.report(k, shard, RunStatus.RUN_STATUS_CANCELLED, "", "did not stop after its cancellation");
      }
    }, CANCEL_GRACE_MS).unref();
  }

  private drainTimeout(): void {
    if (this.running.size === 0) return;
    this.log.warn(`drain timeout: cancelling ${this.running.size} running shards`);
    for (const k of [...this.running.keys()]) this.cancel(k, "drain timeout");
  }

  private unsent(): number {
    let n = 0;
    for (const r of this.results) if (r.sentAt === undefined) n++;
    return n;
  }

  private pastDrain(extraMs: number): boolean {
    const d = this.drainDeadline;
    return d !== undefined && monoMs() > d + CANCEL_GRACE_MS + extraMs;
  }

  // --- connections ----------------------------------------------------------------

  /** Connects and serves until `stop()`, then drains and resolves. */
  async run(): Promise<void> {
    const endpoints = this.opts.endpoints;
    const backoff = new Backoff();
    let nxt = 0;
    let redirect: Endpoint | undefined;
    let redirects = 0; // followed in a row without a registration
    try {
      for (;;) {
        let endpoint: Endpoint;
        if (redirect !== undefined) {
          endpoint = redirect;
          redirect = undefined;
        } else {
          endpoint = endpoints[nxt % endpoints.length] as Endpoint;
          nxt++;
        }
        const r = await this.connect(endpoint, backoff);
        if (r.kind === "drained") return;
        if (r.kind === "redirect") {
          redirect = r.to;
          redirects++;
          if (r.to.target !== endpoint.target && redirects <= endpoints.length + 1) {
            this.log.info(`coordinator ${endpointUrl(endpoint)} is not the leader; following to ${endpointUrl(r.to)}`);
            continue;
          }
          // A coordinator naming itself (restarted, its old key not yet expired) or
          // a ring of stale answers: the election is not settled, so wait.
          this.log.debug(`coordinator ${endpointUrl(endpoint)} names ${endpointUrl(r.to)} as the leader; waiting`);
        } else {
          redirects = 0;
        }
        if (this.stopping) {
          if (this.running.size === 0 && this.unsent() === 0) return; // nothing left to report
          if (this.pastDrain(5_000)) {
            this.log.warn(`stopping with ${this.unsent()} results no coordinator received`);
            return;
          }
        }
        await this.waitFor(() => this.stoppedIdle() && this.unsent() === 0, backoff.next());
      }
    } finally {
      if (this.drainTimer !== undefined) clearTimeout(this.drainTimer);
      for (const s of this.running.values()) s.ctx.controller.abort(new DOMException("worker stopped", "AbortError"));
      for (const c of this.clients.values()) c.close();
      this.clients.clear();
    }
  }

  private client(e: Endpoint): WorkerGatewayClient {
    let c = this.clients.get(e.target);
    if (c === undefined) {
      c = new WorkerGatewayClient(e.target, channelCredentials(e, this.opts.credentials), CHANNEL_OPTIONS);
      this.clients.set(e.target, c);
    }
    return c;
  }

  private stalled(): boolean {
    const silent = monoMs() - this.lastBeat;
    if (silent <= this.stallLimit) return false;
    this.log.warn(
      `this worker could not heartbeat for ${Math.round(silent)} ms (frozen or starved); the coordinator ` +
        "has taken it for dead, so it starts nothing more on this session and registers again",
    );
    return true;
  }

  /** How many ms past its `startBySessionMs` an Assign read now is; undefined when in time. */
  private pastStartBy(a: Assign): number | undefined {
    if (a.startBySessionMs <= 0) return undefined;
    const now = Math.floor(monoMs() - this.sessionClock);
    return now > a.startBySessionMs ? now - a.startBySessionMs : undefined;
  }

  /** One connection, from Register to its end. */
  private connect(endpoint: Endpoint, backoff: Backoff): Promise<Outcome> {
    const o = this.opts;
    const url = endpointUrl(endpoint);
    let md;
    try {
      md = o.token.metadata();
    } catch (e) {
      this.log.error(`cannot read the worker token: ${e instanceof Error ? e.message : String(e)}`);
      return Promise.resolve({ kind: "retry" });
    }
    const call: Call = this.client(endpoint).session(md);
    return new Promise<Outcome>((resolve) => {
      let registered = false;
      let finished = false;
      let drainSent = false;
      let drainDone = false; // every shard reported and our side closed
      let beat: NodeJS.Timeout | undefined;
      let regTimer: NodeJS.Timeout | undefined;
      let endTimer: NodeJS.Timeout | undefined;
      let writable = true;

      const finish = (out: Outcome): void => {
        if (finished) return;
        finished = true;
        writable = false;
        if (this.call === call) this.call = undefined;
        if (beat !== undefined) clearTimeout(beat);
        if (regTimer !== undefined) clearTimeout(regTimer);
        if (endTimer !== undefined) clearTimeout(endTimer);
        this.ev.off("change", onChange);
        call.cancel();
        resolve(out);
      };

      const write = (m: WorkerMessage): void => {
        if (writable) call.write(m);
      };

      // Stop / shard-finished notifications.
      const onChange = (): void => {
        if (finished) return;
        if (!registered) {
          // Stopped while waiting for the answer, with nothing to report.
          if (this.stoppedIdle() && this.unsent() === 0) finish({ kind: "retry" });
          return;
        }
        if (this.stopping && !drainSent) {
          drainSent = true;
          this.log.info(`draining: no new shards, ${this.running.size} running`);
          write({ kind: { $case: "draining", value: {} } });
        }
        if (drainSent && !drainDone && this.running.size === 0) {
          // Every shard reported: close our side, then wait for the coordinator to
          // end the stream (cancelling at once would reset it before it read the
          // last results); a peer gone silent gets 5 s.
          drainDone = true;
          writable = false;
          this.call = undefined;
          call.end();
          endTimer = setTimeout(() => {
            this.log.info("drained: every shard reported");
            finish({ kind: "drained" });
          }, 5_000);
        }
      };
      this.ev.on("change", onChange);

      const first = (m: CoordinatorMessage): void => {
        const k = m.kind;
        if (k?.$case === "notLeader") {
          if (!k.value.leader) {
            setTimeout(() => finish({ kind: "retry" }), 200); // an election is under way
            return;
          }
          finish({ kind: "redirect", to: redirectTarget(endpoint, k.value.leader) });
          return;
        }
        if (k?.$case !== "registered") {
          this.log.warn(`coordinator ${url} answered ${k?.$case ?? "nothing"} to Register`);
          finish({ kind: "retry" });
          return;
        }
        const reg = k.value;
        if (regTimer !== undefined) clearTimeout(regTimer);
        // The session clock `Assign.startBySessionMs` counts on.
        this.sessionClock = monoMs();
        registered = true;
        backoff.reset();
        this.log.info(`registered with coordinator ${reg.coordinator || url} as ${reg.workerId} in group ${o.group}`);
        // Results of the last minute, and those that ended while away, go first.
        const now = monoMs();
        while (this.results.length > 0 && ((this.results[0] as Kept).sentAt ?? now) < now - RESEND_WINDOW_MS) {
          this.results.shift();
        }
        for (const r of this.results) {
          if (r.sentAt === undefined) r.sentAt = now;
          write(r.msg);
        }
        this.call = call;
        const interval = Math.max(100, reg.heartbeatIntervalMs);
        this.stallLimit = 3 * interval;
        this.lastBeat = monoMs();
        const heartbeat = (): void => {
          if (this.stalled()) {
            finish({ kind: "retry" });
            return;
          }
          this.lastBeat = monoMs();
          write({ kind: { $case: "heartbeat", value: { running: [...this.running.values()].map((s) => s.ref) } } });
          beat = setTimeout(heartbeat, interval);
        };
        beat = setTimeout(heartbeat, interval);
        onChange(); // a stop that came while registering
      };

      call.on("data", (m: CoordinatorMessage) => {
        if (finished) return;
        if (!registered) {
          first(m);
          return;
        }
        const k = m.kind;
        switch (k?.$case) {
          case "assign": {
            if (drainDone) return;
            if (this.stalled()) {
              finish({ kind: "retry" });
              return;
            }
            const late = this.pastStartBy(k.value);
            if (late !== undefined) {
              // Read too late: the coordinator may have given it to another worker
              // already. Left unstarted (and out of our heartbeats), it is taken as
              // lost and runs elsewhere.
              this.log.warn(
                `assignment ${k.value.run?.runId} shard ${k.value.shardIndex} arrived ${late} ms after its ` +
                  "start-by time (the stream was stalled); not starting it",
              );
              return;
            }
            this.start(k.value);
            return;
          }
          case "cancel": {
            const r = k.value.run;
            if (r !== undefined) this.cancel(keyOf(r), k.value.reason || "cancelled");
            return;
          }
          case "sessionEnded": {
            const reason = SessionEndReason[k.value.reason] ?? String(k.value.reason);
            const line = `coordinator ${url} ended the session: ${reason} ${k.value.detail}`;
            if (k.value.reason === SessionEndReason.SESSION_END_REASON_DRAINED) this.log.info(line);
            else this.log.warn(line);
            return;
          }
          default:
            return;
        }
      });
      call.on("error", (e: ServiceError) => {
        if (finished) return;
        if (drainDone) {
          this.log.info("drained: every shard reported");
          finish({ kind: "drained" });
          return;
        }
        if (e.code === Status.UNAUTHENTICATED) {
          this.log.error(`coordinator ${url} refused the worker token: UNAUTHENTICATED: ${e.details}`);
        } else if (registered) {
          this.log.warn(`session with coordinator ${url} broke (${Status[e.code]}: ${e.details}); reconnecting`);
        } else if (e.code === Status.UNAVAILABLE) {
          this.log.debug(`cannot reach coordinator ${url}: ${e.details}`);
        } else {
          this.log.warn(`session with coordinator ${url} failed: ${Status[e.code]} ${e.details}`);
        }
        finish({ kind: "retry" });
      });
      call.on("end", () => {
        if (finished) return;
        if (drainDone) {
          this.log.info("drained: every shard reported");
          finish({ kind: "drained" });
          return;
        }
        if (!registered) this.log.warn(`coordinator ${url} closed the session without answering`);
        else this.log.warn(`session with coordinator ${url} ended; reconnecting`);
        finish({ kind: "retry" });
      });

      write({
        kind: {
          $case: "register",
          value: {
            workerId: o.workerId,
            group: o.group,
            handlers: [...this.handlers.keys()].sort(),
            capacity: o.capacity,
            labels: o.labels,
            running: [...this.running.values()].map((s) => s.ref),
          },
        },
      });
      regTimer = setTimeout(() => {
        // Waiting for a drain's results to be reported: keep waiting once more.
        this.log.warn(`coordinator ${url} did not answer Register within ${REGISTER_TIMEOUT_MS} ms`);
        finish({ kind: "retry" });
      }, REGISTER_TIMEOUT_MS);
      onChange();
    });
  }
}
