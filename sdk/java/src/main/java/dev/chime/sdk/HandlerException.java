// What an item handler throws to fail a delivery with a chosen retry delay.
package dev.chime.sdk;

/**
 * Thrown by an item handler: the delivery fails with this message (kept as the items'
 * last error) and is retried after {@link #retryAfterMs()} when given, else after the
 * chime worker's backoff, or dead-lettered when out of attempts. Any other exception
 * fails the delivery too, with its message; throw this one to choose the delay.
 */
public class HandlerException extends Exception {
    private static final long serialVersionUID = 1L;
    private final Long retryAfterMs;

    /** Fails with {@code message} and the worker's backoff. */
    public HandlerException(String message) {
        super(message);
        this.retryAfterMs = null;
    }

    /** Fails with {@code message}, retried after {@code retryAfterMs} (0–86,400,000). */
    public HandlerException(String message, long retryAfterMs) {
        super(message);
        if (retryAfterMs < 0 || retryAfterMs > 86_400_000L) {
            throw new IllegalArgumentException("retryAfterMs " + retryAfterMs + ": must be 0..86400000");
        }
        this.retryAfterMs = retryAfterMs;
    }

    /** The retry delay asked for, or null for the worker's backoff. */
    public Long retryAfterMs() {
        return retryAfterMs;
    }
}
