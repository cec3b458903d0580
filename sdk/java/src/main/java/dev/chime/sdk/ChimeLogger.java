// The SDK's logging hook: every log line of the SDK goes through one ChimeLogger.
package dev.chime.sdk;

import java.io.PrintStream;
import java.time.Instant;

/**
 * Receives the SDK's log lines (connections, redirects, refusals, drains, handler
 * failures). Pass one to {@link Worker.Builder#logger} or {@link QueueClient.Builder#logger};
 * the default, {@link #system()}, forwards to {@link System.Logger} {@code dev.chime.sdk}
 * (java.util.logging unless an SLF4J/Log4j bridge is installed).
 */
@FunctionalInterface
public interface ChimeLogger {
    /** Severity of a line. */
    enum Level {
        /** Detail for debugging the SDK. */
        DEBUG,
        /** Normal life-cycle events (registered, subscribed, draining). */
        INFO,
        /** Something went wrong and the SDK recovers (reconnects, retries). */
        WARN,
        /** Something the operator must fix (a refused token, a refused subscription). */
        ERROR
    }

    /**
     * Logs one line.
     *
     * @param level severity
     * @param message the line, without a trailing newline
     * @param error the exception behind it, or null
     */
    void log(Level level, String message, Throwable error);

    /** Forwards to {@code System.getLogger("dev.chime.sdk")}. */
    static ChimeLogger system() {
        System.Logger l = System.getLogger("dev.chime.sdk");
        return (level, message, error) -> {
            System.Logger.Level lv;
            switch (level) {
                case DEBUG: lv = System.Logger.Level.DEBUG; break;
                case INFO: lv = System.Logger.Level.INFO; break;
                case WARN: lv = System.Logger.Level.WARNING; break;
                default: lv = System.Logger.Level.ERROR; break;
            }
            if (error == null) {
                l.log(lv, message);
            } else {
                l.log(lv, message, error);
            }
        };
    }

    /** Writes lines at {@code min} and above to standard error, one line each. */
    static ChimeLogger stderr(Level min) {
        PrintStream err = System.err;
        return (level, message, error) -> {
            if (level.ordinal() < min.ordinal()) {
                return;
            }
            String line = Instant.now() + " " + level + " chime: " + message
                    + (error == null ? "" : ": " + error);
            err.println(line);
        };
    }

    /** Drops every line. */
    static ChimeLogger quiet() {
        return (level, message, error) -> { };
    }
}
