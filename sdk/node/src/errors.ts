// Errors of the SDK: what a call to chime answered (one class per gRPC status that
// matters), and `HandlerError`, what an item handler throws to choose a retry delay.

import { status as Status, type ServiceError } from "@grpc/grpc-js";

/**
 * chime names the refused field of an INVALID_ARGUMENT in this metadata key (and in
 * the message): `items[3].payload`, `subscribe.credit`, …
 */
export const FIELD_METADATA = "chime-field";

/** A call to chime failed: `code` is the gRPC status, `details` its message. */
export class ChimeError extends Error {
  /** The gRPC status code (`@grpc/grpc-js`'s `status`). */
  readonly code: Status;
  /** The status message. */
  readonly details: string;
  /** The refused field (`items[0].handler`) for INVALID_ARGUMENT, else undefined. */
  readonly field: string | undefined;

  /** Usually made by `fromServiceError`. */
  constructor(code: Status, details: string, field?: string) {
    super(details ? `${Status[code]}: ${details}` : Status[code]);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.field = field;
  }
}

/** The request was refused as a whole (nothing stored); `field` names why. */
export class InvalidArgumentError extends ChimeError {}

/** The token is missing or wrong (UNAUTHENTICATED). */
export class AuthError extends ChimeError {}

/** No such thing (NOT_FOUND). The queue client answers `undefined` / `not_found` instead where the proto has an outcome. */
export class NotFoundError extends ChimeError {}

/** chime or its store is unreachable now (UNAVAILABLE); retrying is safe. */
export class UnavailableError extends ChimeError {}

/** Maps a failed gRPC call to the SDK's error class of its status. */
export function fromServiceError(e: ServiceError): ChimeError {
  const v = e.metadata?.get(FIELD_METADATA)?.[0];
  const field = v === undefined ? undefined : typeof v === "string" ? v : v.toString("utf8");
  const details = e.details ?? e.message;
  switch (e.code) {
    case Status.INVALID_ARGUMENT:
      return new InvalidArgumentError(e.code, details, field ?? fieldFromMessage(details));
    case Status.UNAUTHENTICATED:
      return new AuthError(e.code, details, field);
    case Status.NOT_FOUND:
      return new NotFoundError(e.code, details, field);
    case Status.UNAVAILABLE:
      return new UnavailableError(e.code, details, field);
    default:
      return new ChimeError(e.code, details, field);
  }
}

/** The field an INVALID_ARGUMENT message starts with (`items[0].handler: …`), if any. */
function fieldFromMessage(details: string): string | undefined {
  const m = /^([A-Za-z_][\w.]*(?:\[\d+\][\w.]*)*):/.exec(details);
  return m ? m[1] : undefined;
}

/**
 * Thrown by an item handler: the delivery fails with this message (kept as the
 * items' last error) and is retried — after `retryAfterMs` when given, else the
 * chime worker's exponential backoff — or dead-lettered when out of attempts. Any
 * other error fails the delivery too, with its message; throw this one to choose
 * the retry delay.
 */
export class HandlerError extends Error {
  /** Delay before the next attempt, ms (0..86,400,000); undefined: the worker's backoff. */
  readonly retryAfterMs: number | undefined;

  /** `message` becomes the items' last error. */
  constructor(message: string, options: { retryAfterMs?: number } = {}) {
    super(message);
    this.name = "HandlerError";
    const r = options.retryAfterMs;
    if (r !== undefined && !(Number.isInteger(r) && r >= 0 && r <= 86_400_000)) {
      throw new RangeError(`retryAfterMs ${r}: must be an integer 0..86400000`);
    }
    this.retryAfterMs = r;
  }
}

/** True when `e` is a gRPC ServiceError (has a numeric `code`). */
export function isServiceError(e: unknown): e is ServiceError {
  return typeof e === "object" && e !== null && typeof (e as { code?: unknown }).code === "number";
}
