// The logging hook: the `Logger` shape the SDK writes to, and its defaults.

/**
 * Where the SDK's log lines go: any object with these four methods (`console`,
 * pino, winston and bunyan loggers all fit). Each call gets one message string.
 */
export interface Logger {
  /** Detail for debugging (every reconnect attempt, …). */
  debug(message: string): void;
  /** Normal life: registered, subscribed, draining, … */
  info(message: string): void;
  /** Something went wrong and the SDK recovers (a broken stream, a failed handler). */
  warn(message: string): void;
  /** Something needs a human (a refused token, a refused subscription). */
  error(message: string): void;
}

/** A logger that drops everything. */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
};

/**
 * The default logger: warnings and errors to `console.error` (stderr) prefixed with
 * `chime:`, debug and info dropped — what `@grpc/grpc-js` does by default.
 */
export const defaultLogger: Logger = {
  debug() {},
  info() {},
  warn(message: string) {
    console.error(`chime: WARN ${message}`);
  },
  error(message: string) {
    console.error(`chime: ERROR ${message}`);
  },
};

/**
 * A logger that writes every level at or above `level` to stderr with a timestamp
 * (what the conformance agent uses).
 */
export function consoleLogger(level: "debug" | "info" | "warn" | "error" = "info"): Logger {
  const order = ["debug", "info", "warn", "error"];
  const min = order.indexOf(level);
  const out =
    (lvl: string) =>
    (message: string): void => {
      if (order.indexOf(lvl) >= min) {
        process.stderr.write(`${new Date().toISOString()} ${lvl.toUpperCase()} chime: ${message}\n`);
      }
    };
  return { debug: out("debug"), info: out("info"), warn: out("warn"), error: out("error") };
}
