// A stored item and its state, as GetItem and ListDeadLetters answer.
package dev.chime.sdk;

/** A stored item and its state. */
public final class ItemView {
    private final dev.chime.proto.v1.ItemView v;

    ItemView(dev.chime.proto.v1.ItemView v) {
        this.v = v;
    }

    /** Item id. */
    public String id() { return v.getId(); }

    /** Routing key. */
    public String key() { return v.getKey(); }

    /** Handler. */
    public String handler() { return v.getHandler(); }

    /** Scheduled due time (the latest asked for), Unix ms. */
    public long dueAtMs() { return v.getDueAtMs(); }

    /** Payload. */
    public byte[] payload() { return v.getPayload().toByteArray(); }

    /** Attempts before dead-lettering. */
    public int maxAttempts() { return v.getMaxAttempts(); }

    /** Merge key (empty: none). */
    public String mergeKey() { return v.getMergeKey(); }

    /** Delivery attempts made so far. */
    public int attempts() { return v.getAttempts(); }

    /** Queue index it lives in. */
    public int queue() { return v.getQueue(); }

    /** State. */
    public Outcomes.State state() {
        return Outcomes.map(Outcomes.State.class, v.getState().name(), "ITEM_STATE_");
    }

    /** Pending: when it becomes due (backoff included); waiting: its due time. Unix ms. */
    public long dueScoreMs() { return v.getDueScoreMs(); }

    /** In flight: visibility deadline, Unix ms. */
    public long deadlineMs() { return v.getDeadlineMs(); }

    /** In flight: cancelled meanwhile (not retried). */
    public boolean cancelled() { return v.getCancelled(); }

    /** Dead: since when, Unix ms. */
    public long sinceMs() { return v.getSinceMs(); }

    /** The error of its last failed attempt (empty: none). */
    public String lastError() { return v.getLastError(); }

    /** Its reference (id and key). */
    public ItemRef ref() { return new ItemRef(id(), key()); }

    /** The protobuf message. */
    public dev.chime.proto.v1.ItemView proto() { return v; }
}
