// Endpoints, channels, the bearer token and the reconnect backoff, shared by every
// client of the SDK (the job session, the delivery subscriber, the queue client).

import { readFileSync } from "node:fs";
import { ChannelCredentials, Metadata, type ChannelOptions } from "@grpc/grpc-js";

/**
 * Channel options of every SDK channel. Keep-alives short enough that a frozen peer
 * is noticed within 5 s (worker.proto asks it: a new leader hands the shards of
 * workers that did not come back after that plus 2 s), and allowed on idle streams
 * (a delivery stream may carry nothing for minutes). gRPC's own reconnect backoff
 * grows to 2 minutes; a coordinator back after a restart must be reached within a
 * second. Messages are at most 4 MiB each way; leave room for framing.
 */
export const CHANNEL_OPTIONS: ChannelOptions = {
  "grpc.keepalive_time_ms": 2_000,
  "grpc.keepalive_timeout_ms": 3_000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.http2.max_pings_without_data": 0,
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 1_000,
  "grpc.max_receive_message_length": 8 * 1024 * 1024,
};

/** A parsed `http://host:port`, `https://host:port` or bare `host:port`. */
export interface Endpoint {
  /** `host:port`, what gRPC dials. */
  readonly target: string;
  /** TLS (`https://`). */
  readonly secure: boolean;
}

/** The URL form of an endpoint, for logs. */
export function endpointUrl(e: Endpoint): string {
  return `${e.secure ? "https" : "http"}://${e.target}`;
}

/** Parses an endpoint URL; a bare `host:port` is plaintext. Throws on anything else. */
export function parseEndpoint(url: string): Endpoint {
  let u = url.trim();
  let secure = false;
  if (u.startsWith("https://")) {
    secure = true;
    u = u.slice("https://".length);
  } else if (u.startsWith("http://")) {
    u = u.slice("http://".length);
  } else if (u.includes("://")) {
    throw new Error(`endpoint ${JSON.stringify(url)}: only http:// and https:// are supported`);
  }
  u = u.replace(/\/+$/, "");
  if (!u || u.includes("/")) {
    throw new Error(`endpoint ${JSON.stringify(url)}: expected scheme://host:port`);
  }
  return { target: u, secure };
}

/**
 * The endpoint a `NotLeader` names: a bare `host:port` is dialed the way the current
 * endpoint was (same scheme), a URL as given.
 */
export function redirectTarget(current: Endpoint, leader: string): Endpoint {
  if (leader.includes("://")) return parseEndpoint(leader);
  return { target: leader.trim().replace(/\/+$/, ""), secure: current.secure };
}

/**
 * Where the bearer token comes from: a fixed value, a file, or nothing. A file is
 * read at every (re)connection, so a token fixed or rotated on disk is picked up
 * without a restart. Its first line that is neither blank nor a `#` comment holds
 * the token, as its first field: a line of a coordinator's token file
 * (`<token> <name> role=…`) works as it is.
 */
export class Token {
  private readonly value: string | undefined;
  private readonly file: string | undefined;

  /** Give `value` or `file` (not both); neither sends no `authorization` header. */
  constructor(value?: string, file?: string) {
    if (value !== undefined && file !== undefined && file !== "") {
      throw new Error("give a token or a token file, not both");
    }
    this.value = value?.trim() || undefined;
    // An empty path means "no file" (as in a `${VAR:-}` expansion of a pod spec).
    this.file = file ? file : undefined;
    if (this.file !== undefined) this.get(); // fail now on a missing or empty file
  }

  /** The token now (undefined: send none). Throws when the file has no token. */
  get(): string | undefined {
    if (this.file === undefined) return this.value;
    for (const line of readFileSync(this.file, "utf8").split(/\r?\n/)) {
      const first = line.trim().split(/\s+/)[0];
      if (first && !first.startsWith("#")) return first;
    }
    throw new Error(`token file ${this.file} has no token`);
  }

  /** Call metadata carrying the token, `authorization: Bearer <token>`. */
  metadata(): Metadata {
    const md = new Metadata();
    const t = this.get();
    if (t) md.set("authorization", `Bearer ${t}`);
    return md;
  }
}

/** The credentials of a channel to `e`: TLS (given, or the system's roots) or plaintext. */
export function channelCredentials(e: Endpoint, tls?: ChannelCredentials): ChannelCredentials {
  if (e.secure) return tls ?? ChannelCredentials.createSsl();
  return ChannelCredentials.createInsecure();
}

/**
 * Exponential reconnect delay with ±20 % jitter (so many workers that lost the same
 * server do not come back in lockstep): 100 ms doubling to 1 s by default.
 */
export class Backoff {
  private nextMs: number;

  /** First delay and cap, in ms. */
  constructor(
    private readonly firstMs = 100,
    private readonly maxMs = 1_000,
  ) {
    this.nextMs = firstMs;
  }

  /** Back to the first delay (after a success). */
  reset(): void {
    this.nextMs = this.firstMs;
  }

  /** The next delay, ms. */
  next(): number {
    const d = this.nextMs;
    this.nextMs = Math.min(this.nextMs * 2, this.maxMs);
    return d * (0.8 + Math.random() * 0.4);
  }
}

/** Unix ms now. */
export function nowMs(): number {
  return Date.now();
}

/** Monotonic ms (for intervals, never compared across processes). */
export function monoMs(): number {
  return performance.now();
}

/** Cuts `text` to at most `limit` UTF-8 bytes, on a character boundary. */
export function cutUtf8(text: string, limit: number): string {
  if (text.length * 3 <= limit) return text;
  const raw = Buffer.from(text, "utf8");
  if (raw.length <= limit) return text;
  let end = limit;
  // Step back over continuation bytes so no character is split.
  while (end > 0 && ((raw[end] ?? 0) & 0xc0) === 0x80) end--;
  return raw.subarray(0, end).toString("utf8");
}

/** A promise resolved after `ms`, or at once when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
