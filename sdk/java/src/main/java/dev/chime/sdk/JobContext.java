// One shard to execute: its assignment, run log and cancellation.
package dev.chime.sdk;

import dev.chime.proto.v1.Assign;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;

/**
 * One shard of a run to execute, handed to a {@link JobHandler}. Cancellation is
 * visible three ways: {@link #isCancelled()}, the {@link #cancellation()} future
 * (completes with the reason), and an interrupt of the handler's thread.
 */
public final class JobContext {
    private final Assign a;
    private final Consumer<String> logLine;
    private final CompletableFuture<String> cancelled = new CompletableFuture<>();
    private volatile String cancelReason;
    private volatile boolean isCancelled;
    private Thread runner; // guarded by this

    JobContext(Assign a, Consumer<String> logLine) {
        this.a = a;
        this.logLine = logLine;
    }

    /** Run id. */
    public String runId() {
        return a.getRun().getRunId();
    }

    /** The fire: {@code <job>@<scheduled instant ms>} for scheduled fires. */
    public String fireId() {
        return a.getFireId();
    }

    /** Job name. */
    public String job() {
        return a.getJob();
    }

    /** Handler name. */
    public String handler() {
        return a.getHandler();
    }

    /** Job parameters (text, often JSON). */
    public String params() {
        return a.getParams();
    }

    /** This shard's parameters (fixed sharding with per-shard params). */
    public String shardParams() {
        return a.getShardParams();
    }

    /** This shard's index, 0-based. */
    public int shardIndex() {
        return a.getShardIndex();
    }

    /** Number of shards of the run. */
    public int shardTotal() {
        return a.getShardTotal();
    }

    /** Attempt number, 1-based. */
    public int attempt() {
        return a.getRun().getAttempt();
    }

    /** The instant the fire was scheduled for, Unix ms. */
    public long scheduledAtMs() {
        return a.getScheduledAtMs();
    }

    /** When the coordinator cancels the shard (its clock, Unix ms; 0: never). */
    public long deadlineMs() {
        return a.getDeadlineMs();
    }

    /** W3C trace context of the run's fire span (empty: none): make the shard's span its child. */
    public String traceparent() {
        return a.getTraceparent();
    }

    /** Sends a line to the run history (cut to 4 KiB; the coordinator keeps the tail). */
    public void log(String line) {
        logLine.accept(line);
    }

    /** True once the shard must stop. */
    public boolean isCancelled() {
        return isCancelled;
    }

    /** Why it was cancelled (kill, timeout, drain timeout, …), or null. */
    public String cancelReason() {
        return cancelReason;
    }

    /**
     * Completes with the reason when the shard must stop (never exceptionally). It
     * completes on a pool thread ({@link CompletableFuture#completeAsync}), so its
     * dependents never run on the SDK's session thread.
     */
    public CompletableFuture<String> cancellation() {
        return cancelled;
    }

    /** Runs {@code listener} with the reason when the shard is cancelled (at once if it is). */
    public void onCancel(Consumer<String> listener) {
        cancelled.thenAccept(listener);
    }

    /**
     * Waits up to {@code timeout} for the cancellation; true when cancelled. Handy in
     * handlers that poll or sleep between steps.
     */
    public boolean awaitCancellation(long timeout, TimeUnit unit) throws InterruptedException {
        try {
            cancelled.get(timeout, unit);
            return true;
        } catch (java.util.concurrent.TimeoutException e) {
            return false;
        } catch (java.util.concurrent.ExecutionException e) {
            return true;
        }
    }

    void cancel(String reason) {
        if (isCancelled) {
            return;
        }
        cancelReason = reason;
        isCancelled = true;
        synchronized (this) {
            if (runner != null) {
                runner.interrupt();
            }
        }
        cancelled.completeAsync(() -> reason);
    }

    synchronized void bind(Thread t) {
        runner = t;
        if (t != null && isCancelled) {
            t.interrupt();
        }
    }
}
