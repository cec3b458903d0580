// An item to enqueue (producer side).
package dev.chime.sdk;

import com.google.protobuf.ByteString;
import java.nio.charset.StandardCharsets;

/**
 * An item to deliver at {@link #dueAtMs(long)}, or {@link #inMs(long)} after the
 * store's clock; with neither, it is due now. The key routes it (the user, say) and
 * picks its merge group; keep it: finding the item later takes the key and the id.
 */
public final class NewItem {
    final dev.chime.proto.v1.NewItem.Builder b = dev.chime.proto.v1.NewItem.newBuilder();

    private NewItem(String id, String handler) {
        b.setId(id).setHandler(handler);
    }

    /** An item with this id (1–512 bytes) for this handler. */
    public static NewItem of(String id, String handler) {
        return new NewItem(id, handler);
    }

    /** Routing key (empty: the id). */
    public NewItem key(String key) {
        b.setKey(key);
        return this;
    }

    /** Due time, Unix ms. */
    public NewItem dueAtMs(long ms) {
        b.setDueAtMs(ms);
        return this;
    }

    /** Due this many ms after the store's clock. */
    public NewItem inMs(long ms) {
        b.setInMs(ms);
        return this;
    }

    /** Payload (at most 64 KiB). */
    public NewItem payload(byte[] payload) {
        b.setPayload(ByteString.copyFrom(payload));
        return this;
    }

    /** Payload as UTF-8 text. */
    public NewItem payload(String payload) {
        b.setPayload(ByteString.copyFrom(payload, StandardCharsets.UTF_8));
        return this;
    }

    /** Attempts before dead-lettering (1–100; 0: the default, 3). */
    public NewItem maxAttempts(int n) {
        b.setMaxAttempts(n);
        return this;
    }

    /** Merge key: same key, handler and merge key within the merge window are delivered together. */
    public NewItem mergeKey(String mergeKey) {
        b.setMergeKey(mergeKey);
        return this;
    }

    /** W3C trace context the handler's span joins (empty: none). */
    public NewItem traceparent(String traceparent) {
        b.setTraceparent(traceparent);
        return this;
    }

    /** The protobuf message. */
    public dev.chime.proto.v1.NewItem toProto() {
        return b.build();
    }
}
