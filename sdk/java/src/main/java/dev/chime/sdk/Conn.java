// Channels (keep-alives, reconnect backoff) and the reconnect backoff shared by the SDK.
package dev.chime.sdk;

import io.grpc.ClientInterceptor;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.MetadataUtils;
import java.util.Map;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/** Package-private helpers for channels and backoff. */
final class Conn {
    private Conn() {}

    /**
     * A channel to {@code e}: HTTP/2 pings so a silent peer is noticed (grpc-java clamps
     * the ping interval to at least 10 s), allowed on idle streams, 8 MiB messages in.
     */
    static ManagedChannel open(Endpoint e, Map<String, ?> serviceConfig) {
        NettyChannelBuilder b = NettyChannelBuilder.forTarget(e.target())
                .keepAliveTime(2, TimeUnit.SECONDS)
                .keepAliveTimeout(3, TimeUnit.SECONDS)
                .keepAliveWithoutCalls(true)
                .maxInboundMessageSize(8 * 1024 * 1024)
                // Callbacks only queue work (never block): run them on the transport thread.
                .directExecutor();
        if (e.secure()) {
            b.useTransportSecurity();
        } else {
            b.usePlaintext();
        }
        if (serviceConfig != null) {
            b.defaultServiceConfig(serviceConfig).enableRetry();
        }
        return b.build();
    }

    /** An interceptor attaching the token's metadata, read now. */
    static ClientInterceptor auth(Token token) {
        Metadata md = token.metadata();
        return MetadataUtils.newAttachHeadersInterceptor(md);
    }

    /** Exponential reconnect delay with ±20 % jitter, 100 ms doubling to 1 s. */
    static final class Backoff {
        private final long firstMs;
        private final long maxMs;
        private long next;

        Backoff() {
            this(100, 1000);
        }

        Backoff(long firstMs, long maxMs) {
            this.firstMs = firstMs;
            this.maxMs = maxMs;
            this.next = firstMs;
        }

        void reset() {
            next = firstMs;
        }

        long nextMs() {
            long d = next;
            next = Math.min(next * 2, maxMs);
            return (long) (d * ThreadLocalRandom.current().nextDouble(0.8, 1.2));
        }
    }

    /** Unix ms now. */
    static long nowMs() {
        return System.currentTimeMillis();
    }

    /** {@code text} cut to at most {@code limit} UTF-8 bytes, on a character boundary. */
    static String cut(String text, int limit) {
        if (text == null) {
            return "";
        }
        if (text.length() * 3 <= limit) {
            return text;
        }
        byte[] raw = text.getBytes(java.nio.charset.StandardCharsets.UTF_8);
        if (raw.length <= limit) {
            return text;
        }
        int end = limit;
        while (end > 0 && (raw[end] & 0xC0) == 0x80) {
            end--;
        }
        return new String(raw, 0, end, java.nio.charset.StandardCharsets.UTF_8);
    }

    /** A daemon thread factory naming its threads {@code prefix-N}. */
    static java.util.concurrent.ThreadFactory daemons(String prefix) {
        java.util.concurrent.atomic.AtomicInteger n = new java.util.concurrent.atomic.AtomicInteger();
        return r -> {
            Thread t = new Thread(r, prefix + "-" + n.incrementAndGet());
            t.setDaemon(true);
            return t;
        };
    }
}
