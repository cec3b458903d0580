// The bearer token (a value or a file re-read at each connection) and its call metadata.
package dev.chime.sdk;

import io.grpc.Metadata;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

/**
 * Where the bearer token comes from: a fixed value, a file, or nothing. A file is read
 * at every (re)connection, so a token fixed or rotated on disk is picked up without a
 * restart; its first line that is neither blank nor a {@code #} comment holds the token,
 * as its first field.
 */
public final class Token {
    static final Metadata.Key<String> AUTHORIZATION =
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

    private final String value;
    private final Path file;

    private Token(String value, Path file) {
        this.value = value;
        this.file = file;
    }

    /** No token: calls carry no {@code authorization} header. */
    public static Token none() {
        return new Token(null, null);
    }

    /** A fixed token. */
    public static Token of(String value) {
        return new Token(value == null ? null : value.trim(), null);
    }

    /**
     * A token file, checked now and re-read at each connection: its first line that is
     * neither blank nor a {@code #} comment holds the token, as its first field (a line of a
     * coordinator's token file, {@code <token> <name> role=…}, works as it is).
     * An empty path means no token.
     *
     * @throws IllegalArgumentException when the file is missing or empty
     */
    public static Token file(String path) {
        if (path == null || path.isEmpty()) {
            return none();
        }
        Token t = new Token(null, Path.of(path));
        t.get();
        return t;
    }

    /**
     * The token now (null: none).
     *
     * @throws IllegalArgumentException when the file has no token
     * @throws UncheckedIOException when it cannot be read
     */
    public String get() {
        if (file == null) {
            return value == null || value.isEmpty() ? null : value;
        }
        try {
            for (String line : Files.readAllLines(file, StandardCharsets.UTF_8)) {
                String first = line.strip().split("\\s+", 2)[0];
                if (!first.isEmpty() && !first.startsWith("#")) {
                    return first;
                }
            }
        } catch (IOException e) {
            throw new UncheckedIOException("token file " + file + ": " + e.getMessage(), e);
        }
        throw new IllegalArgumentException("token file " + file + " has no token");
    }

    /** Call metadata carrying {@code authorization: Bearer <token>} (empty without a token). */
    public Metadata metadata() {
        Metadata md = new Metadata();
        String t = get();
        if (t != null) {
            md.put(AUTHORIZATION, "Bearer " + t);
        }
        return md;
    }
}
