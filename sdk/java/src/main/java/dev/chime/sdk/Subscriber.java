// The item side: runs item handlers over chime.v1.Deliveries/Subscribe streams.
package dev.chime.sdk;

import dev.chime.proto.v1.DeliveriesGrpc;
import dev.chime.proto.v1.Delivery;
import dev.chime.proto.v1.Drain;
import dev.chime.proto.v1.Extend;
import dev.chime.proto.v1.Failure;
import dev.chime.proto.v1.Settle;
import dev.chime.proto.v1.Subscribe;
import dev.chime.proto.v1.SubscribeRequest;
import dev.chime.proto.v1.SubscribeResponse;
import dev.chime.sdk.ChimeLogger.Level;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.regex.Pattern;

/**
 * The delivery conversation of delivery.proto, ported from the Python SDK's items.py:
 * subscribe with a credit, run each delivery's handler on a pooled thread (at most
 * {@code credit} at once, since the chime worker never sends more), settle it (ack,
 * fail with an optional retry delay, release on a drain timeout) in batches — sent as
 * soon as the settler thread gets to them (what settles meanwhile joins the same
 * {@code Settle}), or at once when a quarter of the credit (at most 512) is waiting —
 * and drain on stop. Reconnects with backoff when a stream breaks.
 */
final class Subscriber {
    static final Pattern HANDLER_NAME = Pattern.compile("^[A-Za-z0-9._:-]{1,128}$");
    static final int SETTLE_MAX_BATCH = 512;
    static final long CANCEL_GRACE_MS = 2000;
    static final int MAX_ERROR_BYTES = 4096;

    /** Options of the item side. */
    static final class Options {
        Endpoint endpoint;
        Token token;
        String subscriber = "";
        int credit = 64;
        int settleTimeoutMs;
        long drainTimeoutMs = 10_000;
    }

    private final Map<String, ItemHandler> handlers;
    private final Options o;
    private final ChimeLogger log;
    private final Runners pool = new Runners("chime-item");
    private final ScheduledExecutorService timer =
            Executors.newSingleThreadScheduledExecutor(Conn.daemons("chime-settle"));
    private final CompletableFuture<Void> stopped = new CompletableFuture<>();

    Subscriber(Map<String, ItemHandler> handlers, Options o, ChimeLogger log) {
        if (handlers.isEmpty()) {
            throw new IllegalArgumentException("no item handlers to subscribe");
        }
        if (handlers.size() > 64) {
            throw new IllegalArgumentException("at most 64 item handlers per subscription");
        }
        for (String name : handlers.keySet()) {
            if (!HANDLER_NAME.matcher(name).matches()) {
                throw new IllegalArgumentException("item handler name " + name + ": 1-128 characters of [A-Za-z0-9._:-]");
            }
        }
        if (o.credit < 1 || o.credit > 10_000) {
            throw new IllegalArgumentException("credit " + o.credit + ": must be 1..10000");
        }
        if (o.settleTimeoutMs != 0 && (o.settleTimeoutMs < 1000 || o.settleTimeoutMs > 3_600_000)) {
            throw new IllegalArgumentException("settleTimeoutMs " + o.settleTimeoutMs + ": must be 0 or 1000..3600000");
        }
        this.handlers = Map.copyOf(handlers);
        this.o = o;
        this.log = log;
    }

    /** Starts the drain (thread-safe). */
    void stop() {
        stopped.complete(null);
    }

    /**
     * Subscribes and runs handlers until {@link #stop()}, then drains. A refused token is
     * logged (with UNAUTHENTICATED) and retried; a refused subscription throws.
     */
    void run() throws InterruptedException {
        Conn.Backoff backoff = new Conn.Backoff();
        ManagedChannel channel = Conn.open(o.endpoint, null);
        try {
            while (!stopped.isDone()) {
                boolean ok = oneStream(channel);
                if (stopped.isDone()) {
                    break;
                }
                if (ok) {
                    backoff.reset();
                }
                try {
                    stopped.get(backoff.nextMs(), TimeUnit.MILLISECONDS);
                } catch (TimeoutException | ExecutionException e) {
                    channel.resetConnectBackoff();
                }
            }
        } finally {
            channel.shutdownNow();
            pool.shutdown();
            timer.shutdownNow();
        }
    }

    private boolean oneStream(ManagedChannel channel) throws InterruptedException {
        DeliveriesGrpc.DeliveriesStub stub;
        try {
            stub = DeliveriesGrpc.newStub(channel).withInterceptors(Conn.auth(o.token));
        } catch (RuntimeException e) {
            log.log(Level.ERROR, "cannot read the delivery token: " + e.getMessage(), null);
            return false;
        }
        Stream s = new Stream();
        try {
            stub.subscribe(s);
            s.send(SubscribeRequest.newBuilder().setSubscribe(Subscribe.newBuilder()
                    .addAllHandlers(new TreeSet<>(handlers.keySet()))
                    .setCredit(o.credit)
                    .setSubscriber(o.subscriber.length() > 253 ? o.subscriber.substring(0, 253) : o.subscriber)
                    .setSettleTimeoutMs(o.settleTimeoutMs)).build());
            try {
                CompletableFuture.anyOf(s.end, stopped).get();
            } catch (ExecutionException e) {
                // not completed exceptionally
            }
            if (!s.end.isDone()) {
                drain(s);
            }
            Throwable err = s.end.getNow(null);
            if (err == null) {
                if (!s.draining) {
                    log.log(Level.INFO, "delivery stream to " + o.endpoint.url() + " ended", null);
                }
                return s.subscribed;
            }
            Status st = Status.fromThrowable(err);
            switch (st.getCode()) {
                case UNAUTHENTICATED:
                    log.log(Level.ERROR, "the delivery service at " + o.endpoint.url()
                            + " refused the token: UNAUTHENTICATED: " + st.getDescription(), null);
                    break;
                case INVALID_ARGUMENT:
                    throw ChimeException.from(err);
                case CANCELLED:
                    if (s.closed) {
                        break; // we cancelled it: the drain is over
                    }
                    // fall through
                default:
                    log.log(Level.WARN, "delivery stream to " + o.endpoint.url() + " broke: " + st.getCode() + " "
                            + st.getDescription(), null);
            }
            return s.subscribed;
        } finally {
            s.close();
        }
    }

    private void drain(Stream s) throws InterruptedException {
        synchronized (s.lock) {
            if (!s.subscribed) {
                s.closeLocked();
            } else {
                s.draining = true;
                s.sendLocked(SubscribeRequest.newBuilder().setDrain(Drain.getDefaultInstance()).build());
                if (!s.held.isEmpty()) {
                    log.log(Level.INFO, "draining: " + s.held.size() + " deliveries running", null);
                }
            }
        }
        if (s.closed) {
            s.cancelCall();
            waitEnd(s, 1000);
            return;
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(o.drainTimeoutMs);
        boolean giveUp = false;
        synchronized (s.lock) {
            // Deliveries sent before the worker read our Drain may still come; its
            // Drained answer follows the last of them. Run them too.
            while (!(s.drainedAnswer && s.held.isEmpty()) && !s.end.isDone()) {
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    giveUp = !s.held.isEmpty();
                    break;
                }
                TimeUnit.NANOSECONDS.timedWait(s.lock, left);
            }
        }
        if (giveUp) {
            giveUp(s);
        }
        s.finishWriting();
        if (!waitEnd(s, 5000)) {
            log.log(Level.WARN, "delivery stream did not end 5 s after the drain; closing it", null);
            s.close();
        }
    }

    private static boolean waitEnd(Stream s, long ms) throws InterruptedException {
        try {
            s.end.get(ms, TimeUnit.MILLISECONDS);
            return true;
        } catch (TimeoutException e) {
            return false;
        } catch (ExecutionException e) {
            return true;
        }
    }

    /** The drain timeout passed: cancels running handlers (they release) and releases the rest. */
    private void giveUp(Stream s) throws InterruptedException {
        List<ItemContext> held;
        synchronized (s.lock) {
            held = new ArrayList<>(s.held.values());
        }
        log.log(Level.WARN, "drain timeout: releasing " + held.size() + " deliveries", null);
        for (ItemContext ctx : held) {
            if (ctx.cancel()) {
                s.settle(ctx, Kind.RELEASE, null, null); // never started
            }
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(CANCEL_GRACE_MS);
        synchronized (s.lock) {
            while (!s.held.isEmpty() && !s.end.isDone()) {
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    break;
                }
                TimeUnit.NANOSECONDS.timedWait(s.lock, left);
            }
            held = new ArrayList<>(s.held.values());
        }
        for (ItemContext ctx : held) {
            s.settle(ctx, Kind.RELEASE, null, null); // a handler that ignores its cancellation
        }
    }

    private void runOne(Stream s, ItemContext ctx) {
        if (!ctx.begin(Thread.currentThread())) {
            s.settle(ctx, Kind.RELEASE, null, null);
            return;
        }
        try {
            ItemHandler h = handlers.get(ctx.handler());
            if (h == null) {
                s.settle(ctx, Kind.FAIL, "no item handler " + ctx.handler() + " in this subscriber", null);
                return;
            }
            h.handle(ctx);
            s.settle(ctx, Kind.ACK, null, null);
        } catch (HandlerException e) {
            s.settle(ctx, Kind.FAIL, e.getMessage() == null ? "" : e.getMessage(), e.retryAfterMs());
        } catch (Throwable e) {
            if (ctx.isCancelled()) {
                s.settle(ctx, Kind.RELEASE, null, null);
            } else {
                log.log(Level.WARN, "item handler " + ctx.handler() + " failed (delivery " + ctx.deliveryId() + ")", e);
                String m = e.getMessage();
                s.settle(ctx, Kind.FAIL, m == null || m.isEmpty() ? e.getClass().getName() : e.getClass().getSimpleName()
                        + ": " + m, null);
            }
        } finally {
            ctx.end();
            Thread.interrupted(); // a late cancellation must not reach the next delivery
        }
    }

    enum Kind { ACK, FAIL, RELEASE }

    /** One Subscribe stream: what it holds, its settlements, its writes. */
    final class Stream implements ClientResponseObserver<SubscribeRequest, SubscribeResponse> {
        final Object lock = new Object();
        final HashMap<Long, ItemContext> held = new HashMap<>();
        final CompletableFuture<Throwable> end = new CompletableFuture<>();
        volatile String workerId = "";
        volatile boolean closed;
        volatile boolean subscribed;
        volatile boolean draining;
        boolean drainedAnswer;
        private ClientCallStreamObserver<SubscribeRequest> call;
        private final int threshold = Math.max(1, Math.min(SETTLE_MAX_BATCH, o.credit / 4));
        private long[] acks = new long[16];
        private int nAcks;
        private final List<Failure> failures = new ArrayList<>();
        private final List<Long> releases = new ArrayList<>();
        private boolean flushQueued;

        @Override
        public void beforeStart(ClientCallStreamObserver<SubscribeRequest> rs) {
            call = rs;
        }

        @Override
        public void onNext(SubscribeResponse m) {
            switch (m.getKindCase()) {
                case DELIVER:
                    for (Delivery d : m.getDeliver().getDeliveriesList()) {
                        ItemContext ctx = new ItemContext(d, this);
                        synchronized (lock) {
                            if (closed) {
                                return;
                            }
                            held.put(d.getDeliveryId(), ctx);
                        }
                        pool.submit(() -> runOne(this, ctx));
                    }
                    if (draining) {
                        synchronized (lock) {
                            lock.notifyAll();
                        }
                    }
                    break;
                case SUBSCRIBED:
                    var sub = m.getSubscribed();
                    workerId = sub.getWorkerId();
                    subscribed = true;
                    log.log(Level.INFO, "subscribed to " + o.endpoint.url() + " (chime worker " + sub.getWorkerId()
                            + ", family " + sub.getFamily() + ", credit " + sub.getCredit() + ", settle timeout "
                            + sub.getSettleTimeoutMs() + " ms): " + String.join(", ", new TreeSet<>(handlers.keySet())),
                            null);
                    break;
                case DRAINED:
                    synchronized (lock) {
                        drainedAnswer = true;
                        lock.notifyAll();
                    }
                    break;
                case REFUSED:
                    log.log(Level.WARN, "chime worker refused settling " + m.getRefused().getDeliveryIdsCount()
                            + " deliveries: " + m.getRefused().getReason(), null);
                    break;
                case CLOSING:
                    log.log(Level.INFO, "chime worker " + workerId + " is closing (" + m.getClosing().getReason()
                            + "); settlements accepted for "
                            + Math.max(0, m.getClosing().getDeadlineMs() - Conn.nowMs()) + " ms", null);
                    break;
                default:
                    break;
            }
        }

        @Override
        public void onError(Throwable t) {
            end.complete(t);
            synchronized (lock) {
                lock.notifyAll();
            }
        }

        @Override
        public void onCompleted() {
            end.complete(null);
            synchronized (lock) {
                lock.notifyAll();
            }
        }

        void send(SubscribeRequest m) {
            synchronized (lock) {
                sendLocked(m);
            }
        }

        void sendLocked(SubscribeRequest m) {
            if (!closed) {
                try {
                    call.onNext(m);
                } catch (RuntimeException e) {
                    log.log(Level.DEBUG, "delivery stream write failed: " + e, null);
                }
            }
        }

        boolean extend(ItemContext ctx, int ms) {
            synchronized (lock) {
                if (closed || !held.containsKey(ctx.deliveryId())) {
                    return false;
                }
                sendLocked(SubscribeRequest.newBuilder().setExtend(
                        Extend.newBuilder().addDeliveryIds(ctx.deliveryId()).setExtendMs(ms)).build());
                return true;
            }
        }

        void settle(ItemContext ctx, Kind kind, String error, Long retryAfterMs) {
            synchronized (lock) {
                if (held.remove(ctx.deliveryId()) == null) {
                    return; // not held: settled already, or the stream is gone
                }
                long id = ctx.deliveryId();
                switch (kind) {
                    case ACK:
                        if (nAcks == acks.length) {
                            acks = java.util.Arrays.copyOf(acks, nAcks * 2);
                        }
                        acks[nAcks++] = id;
                        break;
                    case FAIL:
                        Failure.Builder f = Failure.newBuilder().setDeliveryId(id).setError(Conn.cut(error, MAX_ERROR_BYTES));
                        if (retryAfterMs != null) {
                            f.setRetryAfterMs(retryAfterMs);
                        }
                        failures.add(f.build());
                        break;
                    default:
                        releases.add(id);
                }
                if (nAcks + failures.size() + releases.size() >= threshold) {
                    flushLocked();
                } else if (!flushQueued) {
                    // Sent as soon as the settler thread runs: what settles meanwhile joins
                    // the same Settle (batches grow with the load, no added latency).
                    flushQueued = true;
                    timer.execute(this::flush);
                }
                if (draining && held.isEmpty()) {
                    lock.notifyAll();
                }
            }
        }

        void flush() {
            synchronized (lock) {
                flushLocked();
            }
        }

        private void flushLocked() {
            flushQueued = false;
            if (nAcks + failures.size() + releases.size() == 0) {
                return;
            }
            Settle.Builder b = Settle.newBuilder();
            for (int i = 0; i < nAcks; i++) {
                b.addAcks(acks[i]);
            }
            b.addAllFailures(failures).addAllReleases(releases);
            nAcks = 0;
            failures.clear();
            releases.clear();
            sendLocked(SubscribeRequest.newBuilder().setSettle(b).build());
        }

        /** Flushes the settlements and half-closes the stream after them. */
        void finishWriting() {
            synchronized (lock) {
                flushLocked();
                if (!closed) {
                    try {
                        call.onCompleted();
                    } catch (RuntimeException e) {
                        log.log(Level.DEBUG, "delivery stream close failed: " + e, null);
                    }
                }
            }
        }

        void closeLocked() {
            if (closed) {
                return;
            }
            closed = true;
            nAcks = 0;
            failures.clear();
            releases.clear();
            for (ItemContext ctx : held.values()) {
                ctx.cancel();
            }
            held.clear();
            lock.notifyAll();
        }

        /**
         * The stream is over: its unsettled deliveries already count as failed on the
         * worker's side, so their handlers are cancelled.
         */
        void close() {
            synchronized (lock) {
                closeLocked();
            }
            cancelCall();
        }

        void cancelCall() {
            if (!end.isDone()) {
                call.cancel("subscriber closed", null);
            }
        }
    }
}
