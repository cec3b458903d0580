// Names a stored item: id and routing key.
package dev.chime.sdk;

/**
 * Finds an item: its id and the routing key it was enqueued with (empty: the id).
 *
 * @param id item id
 * @param key routing key ("" when enqueued without one)
 */
public record ItemRef(String id, String key) {
    /** An item enqueued without a key. */
    public static ItemRef of(String id) {
        return new ItemRef(id, "");
    }

    /** An item enqueued with {@code key}. */
    public static ItemRef of(String id, String key) {
        return new ItemRef(id, key);
    }

    dev.chime.proto.v1.ItemRef toProto() {
        return dev.chime.proto.v1.ItemRef.newBuilder().setId(id).setKey(key == null ? "" : key).build();
    }
}
