// The public surface of `@chime-scheduler/sdk`: the worker (job and item handlers),
// the producer client, errors and the logging hook.

export { Worker, type WorkerOptions } from "./worker.js";
export { JobContext, type JobHandler } from "./jobs.js";
export { ItemContext, type Item, type ItemHandler } from "./items.js";
export {
  QueueClient,
  type QueueClientOptions,
  type NewItem,
  type ItemRef,
  type ItemView,
  type ItemState,
  type EnqueueOutcome,
  type CancelOutcome,
  type RescheduleOutcome,
  type QueueCounts,
  type QueueStats,
} from "./queue.js";
export {
  ChimeError,
  InvalidArgumentError,
  AuthError,
  NotFoundError,
  UnavailableError,
  HandlerError,
  FIELD_METADATA,
} from "./errors.js";
export { type Logger, defaultLogger, silentLogger, consoleLogger } from "./logger.js";
export { parseEndpoint, Token, type Endpoint } from "./conn.js";
