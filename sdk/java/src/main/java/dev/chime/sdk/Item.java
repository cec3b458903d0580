// One delayed item of a delivery.
package dev.chime.sdk;

import com.google.protobuf.ByteString;
import dev.chime.proto.v1.DeliveredItem;

/** One delayed item of a delivery. */
public final class Item {
    private final DeliveredItem p;

    Item(DeliveredItem p) {
        this.p = p;
    }

    /** Item id. */
    public String id() {
        return p.getId();
    }

    /** Routing key (the id when it was enqueued without one). */
    public String key() {
        return p.getKey();
    }

    /** When it was due, Unix ms. */
    public long dueAtMs() {
        return p.getDueAtMs();
    }

    /** The payload as the producer gave it. */
    public ByteString payload() {
        return p.getPayload();
    }

    /** The payload decoded as UTF-8. */
    public String text() {
        return p.getPayload().toStringUtf8();
    }

    /** This attempt, 1-based. */
    public int attempt() {
        return p.getAttempt();
    }

    /** Attempts before it is dead-lettered. */
    public int maxAttempts() {
        return p.getMaxAttempts();
    }

    /** Merge key (empty: none). */
    public String mergeKey() {
        return p.getMergeKey();
    }

    @Override
    public String toString() {
        return "Item{id=" + id() + ", key=" + key() + ", dueAtMs=" + dueAtMs() + ", attempt=" + attempt() + "/"
                + maxAttempts() + "}";
    }
}
