// The job handler type: a lambda run for each shard.
package dev.chime.sdk;

/**
 * Runs one shard of a job run. Return the output (null: empty) to succeed; throw to
 * fail (the message is the error; the coordinator retries when the job allows). When
 * the shard is cancelled (kill, timeout, overlap policy, drain timeout) the context
 * says so, its cancellation future completes and the handler's thread is interrupted:
 * let the {@link InterruptedException} (or any exception) propagate and the shard is
 * reported cancelled.
 */
@FunctionalInterface
public interface JobHandler {
    /**
     * Runs the shard.
     *
     * @param ctx the shard, its parameters, run log and cancellation
     * @return the output, kept in the run history (cut to 64 KiB)
     * @throws Exception to fail the shard (or, once cancelled, to end it cancelled)
     */
    String handle(JobContext ctx) throws Exception;
}
