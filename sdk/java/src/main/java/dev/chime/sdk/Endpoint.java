// Endpoint URLs (`http://host:port`) and the NotLeader redirect rule.
package dev.chime.sdk;

import java.util.Objects;

/** A parsed {@code http://host:port}, {@code https://host:port} or bare {@code host:port}. */
public final class Endpoint {
    private final String target;
    private final boolean secure;

    private Endpoint(String target, boolean secure) {
        this.target = target;
        this.secure = secure;
    }

    /**
     * Parses an endpoint URL; a bare {@code host:port} is plaintext.
     *
     * @throws IllegalArgumentException for another scheme or a path
     */
    public static Endpoint parse(String url) {
        String u = url.trim();
        boolean secure = false;
        if (u.startsWith("https://")) {
            secure = true;
            u = u.substring(8);
        } else if (u.startsWith("http://")) {
            u = u.substring(7);
        } else if (u.contains("://")) {
            throw new IllegalArgumentException("endpoint " + url + ": only http:// and https:// are supported");
        }
        while (u.endsWith("/")) {
            u = u.substring(0, u.length() - 1);
        }
        if (u.isEmpty() || u.contains("/")) {
            throw new IllegalArgumentException("endpoint " + url + ": expected scheme://host:port");
        }
        return new Endpoint(u, secure);
    }

    /**
     * The endpoint a {@code NotLeader} names: a bare {@code host:port} is dialed the way
     * {@code current} was (same scheme), a URL as given.
     */
    public static Endpoint redirect(Endpoint current, String leader) {
        if (leader.contains("://")) {
            return parse(leader);
        }
        String t = leader.trim();
        while (t.endsWith("/")) {
            t = t.substring(0, t.length() - 1);
        }
        return new Endpoint(t, current.secure);
    }

    /** {@code host:port}. */
    public String target() {
        return target;
    }

    /** True for {@code https://}. */
    public boolean secure() {
        return secure;
    }

    /** The URL form, {@code http://host:port}. */
    public String url() {
        return (secure ? "https://" : "http://") + target;
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof Endpoint && ((Endpoint) o).target.equals(target) && ((Endpoint) o).secure == secure;
    }

    @Override
    public int hashCode() {
        return Objects.hash(target, secure);
    }

    @Override
    public String toString() {
        return url();
    }
}
