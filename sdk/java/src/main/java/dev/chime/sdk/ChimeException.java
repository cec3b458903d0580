// The exception a failed call to chime raises: gRPC code, details, refused field.
package dev.chime.sdk;

import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;

/**
 * A call to chime failed: {@link #code()} is the gRPC status code, {@link #details()}
 * its message, and {@link #field()} the refused field ({@code items[0].handler}) of an
 * INVALID_ARGUMENT, else null.
 */
public class ChimeException extends RuntimeException {
    private static final long serialVersionUID = 1L;
    /** chime names the refused field of an INVALID_ARGUMENT in this metadata key. */
    public static final String FIELD_METADATA = "chime-field";
    private static final Metadata.Key<String> FIELD_KEY =
            Metadata.Key.of(FIELD_METADATA, Metadata.ASCII_STRING_MARSHALLER);

    private final Status.Code code;
    private final String details;
    private final String field;

    /** An error with this code, details and field (null: none). */
    public ChimeException(Status.Code code, String details, String field, Throwable cause) {
        super(details == null || details.isEmpty() ? code.name() : code.name() + ": " + details, cause);
        this.code = code;
        this.details = details == null ? "" : details;
        this.field = field;
    }

    /** Maps a failed gRPC call (any {@link Throwable} carrying a status). */
    public static ChimeException from(Throwable t) {
        Status s = Status.fromThrowable(t);
        Metadata tr = Status.trailersFromThrowable(t);
        String field = tr == null ? null : tr.get(FIELD_KEY);
        return new ChimeException(s.getCode(), s.getDescription(), field, t);
    }

    /** The gRPC status code. */
    public Status.Code code() {
        return code;
    }

    /** The status message. */
    public String details() {
        return details;
    }

    /** The refused field for INVALID_ARGUMENT ({@code items[3].payload}), else null. */
    public String field() {
        return field;
    }

    /** True when the token was missing or wrong (UNAUTHENTICATED). */
    public boolean isUnauthenticated() {
        return code == Status.Code.UNAUTHENTICATED;
    }

    static boolean isStatus(Throwable t) {
        return t instanceof StatusRuntimeException || t instanceof io.grpc.StatusException;
    }
}
