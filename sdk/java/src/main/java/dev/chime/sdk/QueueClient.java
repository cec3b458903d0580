// The producer client for chime.v1.Queue (enqueue, get, cancel, reschedule, stats, dead letters).
package dev.chime.sdk;

import dev.chime.proto.v1.EnqueueRequest;
import dev.chime.proto.v1.EnqueueResponse;
import dev.chime.proto.v1.ListDeadLettersRequest;
import dev.chime.proto.v1.QueueGrpc;
import dev.chime.proto.v1.QueueStatsRequest;
import dev.chime.proto.v1.QueueStatsResponse;
import dev.chime.proto.v1.RequeueDeadLettersRequest;
import dev.chime.proto.v1.RescheduleItemRequest;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * The delay queue for producers: a blocking client of {@code chime.v1.Queue}. Any
 * coordinator replica answers. Thread-safe; one per application is enough.
 *
 * <pre>{@code
 * try (QueueClient q = QueueClient.builder("http://127.0.0.1:7070").tokenFile("producer.token").build()) {
 *     q.enqueue(List.of(NewItem.of("coupon:7:user:42", "coupon.remind").key("user:42").inMs(60_000)));
 * }
 * }</pre>
 *
 * Errors throw {@link ChimeException} with the gRPC code and, for INVALID_ARGUMENT,
 * the refused field ({@code items[3].payload}). UNAVAILABLE is retried by gRPC a few
 * times (every call is safe to repeat: enqueue is idempotent on the item id).
 */
public final class QueueClient implements AutoCloseable {
    private static final Map<String, ?> SERVICE_CONFIG = Map.of("methodConfig", List.of(Map.of(
            "name", List.of(Map.of("service", "chime.v1.Queue")),
            "retryPolicy", Map.of(
                    "maxAttempts", 4.0,
                    "initialBackoff", "0.1s",
                    "maxBackoff", "1s",
                    "backoffMultiplier", 2.0,
                    "retryableStatusCodes", List.of("UNAVAILABLE")))));

    private final ManagedChannel channel;
    private final Token token;
    private final long timeoutMs;

    private QueueClient(Builder b) {
        this.channel = Conn.open(Endpoint.parse(b.url), SERVICE_CONFIG);
        this.token = b.token;
        this.timeoutMs = b.timeoutMs;
    }

    /** A builder for the coordinator at {@code url} ({@code http://host:port}). */
    public static Builder builder(String url) {
        return new Builder(url);
    }

    private QueueGrpc.QueueBlockingStub stub() {
        QueueGrpc.QueueBlockingStub s = QueueGrpc.newBlockingStub(channel).withInterceptors(Conn.auth(token));
        return timeoutMs > 0 ? s.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS) : s;
    }

    private static <T> T call(Supplier<T> c) {
        try {
            return c.get();
        } catch (StatusRuntimeException e) {
            throw ChimeException.from(e);
        }
    }

    /**
     * Stores a batch (1–100,000 items) in one call; one outcome per item, in order. One
     * bad item refuses the whole batch (INVALID_ARGUMENT naming the field).
     */
    public List<Outcomes.Enqueue> enqueue(List<NewItem> items) {
        if (items.isEmpty()) {
            throw new IllegalArgumentException("enqueue: no items");
        }
        EnqueueRequest.Builder req = EnqueueRequest.newBuilder();
        for (NewItem i : items) {
            req.addItems(i.toProto());
        }
        EnqueueResponse r = call(() -> stub().enqueue(req.build()));
        List<Outcomes.Enqueue> out = new ArrayList<>(r.getOutcomesCount());
        for (var o : r.getOutcomesList()) {
            out.add(Outcomes.map(Outcomes.Enqueue.class, o.name(), "ENQUEUE_OUTCOME_"));
        }
        return out;
    }

    /** The item and its state, or empty when there is no such item. */
    public Optional<ItemView> get(ItemRef ref) {
        try {
            return Optional.of(new ItemView(call(() -> stub().getItem(ref.toProto()))));
        } catch (ChimeException e) {
            if (e.code() == Status.Code.NOT_FOUND) {
                return Optional.empty();
            }
            throw e;
        }
    }

    /** Removes a pending or dead item (an in-flight one is not retried). */
    public Outcomes.Cancel cancel(ItemRef ref) {
        var r = call(() -> stub().cancelItem(ref.toProto()));
        return Outcomes.map(Outcomes.Cancel.class, r.getOutcome().name(), "CANCEL_OUTCOME_");
    }

    /** Moves a pending item to {@code dueAtMs} (Unix ms). */
    public Outcomes.Reschedule reschedule(ItemRef ref, long dueAtMs) {
        var r = call(() -> stub().rescheduleItem(
                RescheduleItemRequest.newBuilder().setItem(ref.toProto()).setDueAtMs(dueAtMs).build()));
        return Outcomes.map(Outcomes.Reschedule.class, r.getOutcome().name(), "RESCHEDULE_OUTCOME_");
    }

    /** Depth, due, in-flight, dead and waiting counts per queue (the protobuf answer). */
    public QueueStatsResponse stats() {
        return call(() -> stub().queueStats(QueueStatsRequest.getDefaultInstance()));
    }

    /** Up to {@code limit} (at most 1,000) dead letters across all queues. */
    public List<ItemView> deadLetters(int limit) {
        var r = call(() -> stub().listDeadLetters(ListDeadLettersRequest.newBuilder().setLimit(limit).build()));
        List<ItemView> out = new ArrayList<>();
        r.getItemsList().forEach(v -> out.add(new ItemView(v)));
        return out;
    }

    /** Puts these dead letters back, due now, with fresh attempts; answers how many. */
    public long requeue(List<ItemRef> refs) {
        RequeueDeadLettersRequest.Builder b = RequeueDeadLettersRequest.newBuilder();
        refs.forEach(r -> b.addItems(r.toProto()));
        return call(() -> stub().requeueDeadLetters(b.build())).getRequeued();
    }

    /** Puts every dead letter back (at most 100,000 per call); answers how many. */
    public long requeueAll() {
        return call(() -> stub().requeueDeadLetters(RequeueDeadLettersRequest.newBuilder().setAll(true).build()))
                .getRequeued();
    }

    /** Closes the channel. */
    @Override
    public void close() {
        channel.shutdownNow();
        try {
            channel.awaitTermination(5, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    /** Configures a {@link QueueClient}. */
    public static final class Builder {
        private final String url;
        private Token token = Token.none();
        private long timeoutMs = 30_000;

        private Builder(String url) {
            this.url = url;
        }

        /** A fixed producer (or admin) token. */
        public Builder token(String token) {
            this.token = Token.of(token);
            return this;
        }

        /** A token file, re-read at each call. */
        public Builder tokenFile(String path) {
            this.token = Token.file(path);
            return this;
        }

        /** The deadline of each call (default 30 s; zero: none). */
        public Builder timeout(Duration timeout) {
            this.timeoutMs = timeout.toMillis();
            return this;
        }

        /** Accepted for symmetry with {@link Worker.Builder#logger}; the client logs nothing itself. */
        public Builder logger(ChimeLogger logger) {
            return this;
        }

        /** Builds the client (the channel connects lazily). */
        public QueueClient build() {
            return new QueueClient(this);
        }
    }
}
