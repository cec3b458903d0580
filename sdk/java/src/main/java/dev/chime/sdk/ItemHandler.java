// The item handler type: a lambda run for each delivery.
package dev.chime.sdk;

/**
 * Runs one delivery (one item, or several merged ones). Return to ack it; throw to
 * fail it ({@link HandlerException} chooses the retry delay). A handler cancelled by a
 * drain that ran out of time (its thread interrupted, {@link ItemContext#isCancelled()}
 * true) has its items handed back to the queue unprocessed.
 */
@FunctionalInterface
public interface ItemHandler {
    /**
     * Handles the delivery.
     *
     * @param ctx the delivery and its items
     * @throws Exception to fail the delivery
     */
    void handle(ItemContext ctx) throws Exception;
}
