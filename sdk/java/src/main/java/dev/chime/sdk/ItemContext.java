// One delivery handed to an ItemHandler: its items, extend, and cancellation.
package dev.chime.sdk;

import dev.chime.proto.v1.Delivery;
import java.util.AbstractList;
import java.util.List;
import java.util.concurrent.CompletableFuture;

/**
 * One delivery: a handler call for one item, or several merged items (same routing
 * key, handler and merge key, due within the merge window). Return from the handler
 * to ack it; throw to fail it.
 */
public final class ItemContext {
    private final Delivery d;
    private final Subscriber.Stream stream;
    private final List<Item> items;
    private final CompletableFuture<Void> cancelled = new CompletableFuture<>();
    private volatile boolean isCancelled;
    private Thread runner; // guarded by this
    boolean started; // guarded by this

    ItemContext(Delivery d, Subscriber.Stream stream) {
        this.d = d;
        this.stream = stream;
        this.items = new AbstractList<Item>() {
            @Override
            public Item get(int i) {
                return new Item(d.getItems(i));
            }

            @Override
            public int size() {
                return d.getItemsCount();
            }
        };
    }

    /** Names the delivery on its stream. */
    public long deliveryId() {
        return d.getDeliveryId();
    }

    /** The handler it is for. */
    public String handler() {
        return d.getHandler();
    }

    /** Queue the items came from. */
    public int queue() {
        return d.getQueue();
    }

    /** The items, earliest due first (more than one when merged). */
    public List<Item> items() {
        return items;
    }

    /** The first (earliest) item. */
    public Item item() {
        return items.get(0);
    }

    /** This delivery's attempt (of its first item), 1-based. */
    public int attempt() {
        return d.getItems(0).getAttempt();
    }

    /** More than one item was merged into this delivery. */
    public boolean merged() {
        return d.getItemsCount() > 1;
    }

    /** Settle or {@link #extend} by this instant (the chime worker's clock, Unix ms). */
    public long settleDeadlineMs() {
        return d.getSettleDeadlineMs();
    }

    /** W3C trace context of the chime worker's span of this delivery (empty: none). */
    public String traceparent() {
        return d.getTraceparent();
    }

    /** Id of the chime worker that delivered it. */
    public String workerId() {
        return stream.workerId;
    }

    /** The underlying protobuf delivery (no copy). */
    public Delivery proto() {
        return d;
    }

    /**
     * True once the SDK gave up on this handler (a drain ran out of time, or the stream
     * to the chime worker broke); its thread is interrupted at the same time.
     */
    public boolean isCancelled() {
        return isCancelled;
    }

    /**
     * Completes when the handler is given up on (see {@link #isCancelled()}), on a pool
     * thread, so its dependents never run on the SDK's threads.
     */
    public CompletableFuture<Void> cancellation() {
        return cancelled;
    }

    /**
     * Asks for {@code ms} more milliseconds (1–3,600,000 from now; 0: the subscription's
     * settle timeout) before this delivery counts as a failed attempt. False when the
     * delivery is no longer held (settled, or its stream is gone).
     */
    public boolean extend(int ms) {
        if (ms < 0 || ms > 3_600_000) {
            throw new IllegalArgumentException("extend: " + ms + " ms is not within 0..3600000");
        }
        return stream.extend(this, ms);
    }

    /** Requests cancellation; true when the handler had not started (the caller releases). */
    boolean cancel() {
        boolean first = !isCancelled;
        isCancelled = true;
        boolean notStarted;
        synchronized (this) {
            if (runner != null && first) {
                runner.interrupt();
            }
            notStarted = !started;
        }
        if (first) {
            cancelled.completeAsync(() -> null);
        }
        return notStarted;
    }

    /** Binds the running thread; false when cancelled before it started. */
    synchronized boolean begin(Thread t) {
        started = true;
        if (isCancelled) {
            return false;
        }
        runner = t;
        return true;
    }

    synchronized void end() {
        runner = null;
    }
}
