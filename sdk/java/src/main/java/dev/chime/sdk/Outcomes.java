// The producer's answer enums: enqueue, cancel, reschedule outcomes and item states.
package dev.chime.sdk;

/** Holder of the outcome enums of {@link QueueClient}. */
public final class Outcomes {
    private Outcomes() {}

    /** What enqueue did with one item. */
    public enum Enqueue {
        /** Stored; it will fire. */
        CREATED,
        /** An item with this id exists (pending, in flight or dead); nothing changed. */
        DUPLICATE;

        /** Lower-case name ({@code created}). */
        public String value() {
            return name().toLowerCase();
        }
    }

    /** What cancel did. */
    public enum Cancel {
        /** Removed before it fired (or from the dead letters). */
        CANCELLED,
        /** Already handed to a worker: it may be running; it will not be retried. */
        IN_FLIGHT,
        /** No such item. */
        NOT_FOUND;

        /** Lower-case name ({@code not_found}). */
        public String value() {
            return name().toLowerCase();
        }
    }

    /** What reschedule did. */
    public enum Reschedule {
        /** The item now fires at the new time. */
        RESCHEDULED,
        /** Already handed to a worker; unchanged. */
        IN_FLIGHT,
        /** Dead-lettered; requeue it instead. */
        DEAD,
        /** No such item. */
        NOT_FOUND;

        /** Lower-case name. */
        public String value() {
            return name().toLowerCase();
        }
    }

    /** Where an item is in its life. */
    public enum State {
        /** Waiting in its queue until its due score. */
        PENDING,
        /** Handed to a worker; due again at its deadline unless settled. */
        IN_FLIGHT,
        /** Out of attempts, in the dead letters. */
        DEAD,
        /** Due, but no subscriber for its handler: parked, the attempt not counted. */
        WAITING;

        /** Lower-case name. */
        public String value() {
            return name().toLowerCase();
        }
    }

    static <E extends Enum<E>> E map(Class<E> cls, String protoName, String prefix) {
        try {
            return Enum.valueOf(cls, protoName.substring(prefix.length()));
        } catch (RuntimeException e) {
            throw new ChimeException(io.grpc.Status.Code.UNKNOWN, "unexpected " + protoName + " in the answer", null, e);
        }
    }
}
