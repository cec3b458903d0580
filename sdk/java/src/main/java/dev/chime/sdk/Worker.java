// Worker: runs job handlers and item handlers together; lifecycle, drain, signals.
package dev.chime.sdk;

import dev.chime.sdk.ChimeLogger.Level;
import java.net.InetAddress;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

/**
 * Runs job handlers (a session with the coordinator) and item handlers (a
 * subscription to a chime worker's delivery service), or either alone.
 *
 * <pre>{@code
 * Worker worker = Worker.builder()
 *     .coordinator("http://127.0.0.1:7070").group("push")
 *     .deliveries("http://127.0.0.1:7071").tokenFile("worker.token")
 *     .job("push.daily", ctx -> "done")
 *     .item("coupon.remind", ctx -> System.out.println(ctx.item().text()))
 *     .build();
 * worker.runUntilSignal(); // SIGTERM/SIGINT drains, then returns
 * }</pre>
 *
 * <p>Life cycle: {@link #start()} opens the session/subscription on background
 * threads and returns; {@link #stop()} starts the drain (no new work; running
 * handlers finish within the drain timeout, then job shards are cancelled and item
 * deliveries released) and returns at once; {@link #awaitTermination()} waits for
 * the drain; {@link #close()} is stop and wait. That matches Spring's
 * {@code SmartLifecycle} (start/stop/isRunning) without depending on Spring.
 */
public final class Worker implements AutoCloseable {
    private final JobSession session;
    private final Subscriber subscriber;
    private final ChimeLogger log;
    private final String workerId;
    private final CountDownLatch done = new CountDownLatch(1);
    private final AtomicReference<Throwable> failure = new AtomicReference<>();
    private final List<Thread> threads = new ArrayList<>();
    private volatile boolean started;
    private volatile boolean stopRequested;

    private Worker(Builder b) {
        this.log = b.logger;
        this.workerId = b.workerId != null ? b.workerId : hostName();
        Token token = b.token != null ? b.token : Token.none();
        if (!b.coordinators.isEmpty()) {
            if (b.jobs.isEmpty()) {
                throw new IllegalArgumentException("a coordinator is set but no job handler is registered");
            }
            JobSession.Options o = new JobSession.Options();
            o.endpoints = b.coordinators;
            o.group = b.group;
            o.workerId = workerId;
            o.token = token;
            o.capacity = b.capacity;
            o.labels = b.labels;
            o.drainTimeoutMs = b.drainTimeoutMs;
            session = new JobSession(b.jobs, o, log);
        } else {
            if (!b.jobs.isEmpty()) {
                throw new IllegalArgumentException("job handlers are registered but no coordinator is set");
            }
            session = null;
        }
        if (b.deliveries != null) {
            if (b.items.isEmpty()) {
                throw new IllegalArgumentException("a deliveries endpoint is set but no item handler is registered");
            }
            Subscriber.Options o = new Subscriber.Options();
            o.endpoint = b.deliveries;
            o.token = token;
            o.subscriber = workerId + "/" + ProcessHandle.current().pid();
            o.credit = b.credit;
            o.settleTimeoutMs = b.settleTimeoutMs;
            o.drainTimeoutMs = b.drainTimeoutMs;
            subscriber = new Subscriber(b.items, o, log);
        } else {
            if (!b.items.isEmpty()) {
                throw new IllegalArgumentException("item handlers are registered but no deliveries endpoint is set");
            }
            subscriber = null;
        }
        if (session == null && subscriber == null) {
            throw new IllegalArgumentException("give a coordinator (job handlers), deliveries (item handlers), or both");
        }
    }

    private static String hostName() {
        String h = System.getenv("HOSTNAME");
        if (h != null && !h.isEmpty()) {
            return h;
        }
        try {
            return InetAddress.getLocalHost().getHostName();
        } catch (Exception e) {
            return "worker";
        }
    }

    /** A new builder. */
    public static Builder builder() {
        return new Builder();
    }

    /** The worker id this worker registers with. */
    public String workerId() {
        return workerId;
    }

    /** Opens the session and the subscription on background threads; returns at once. */
    public synchronized void start() {
        if (started) {
            throw new IllegalStateException("this worker was started already");
        }
        started = true;
        AtomicInteger left = new AtomicInteger((session != null ? 1 : 0) + (subscriber != null ? 1 : 0));
        Runnable finished = () -> {
            if (left.decrementAndGet() == 0) {
                done.countDown();
            }
        };
        if (session != null) {
            threads.add(side("chime-session", () -> session.run(), finished));
        }
        if (subscriber != null) {
            threads.add(side("chime-subscriber", () -> subscriber.run(), finished));
        }
        if (stopRequested) {
            stopParts();
        }
        threads.forEach(Thread::start);
    }

    private interface Body {
        void run() throws Exception;
    }

    private Thread side(String name, Body body, Runnable finished) {
        Thread t = new Thread(() -> {
            try {
                body.run();
            } catch (Throwable e) {
                failure.compareAndSet(null, e);
                log.log(Level.ERROR, name + " stopped: " + e.getMessage(), e);
                stop(); // the other side drains before the error surfaces
            } finally {
                finished.run();
            }
        }, name);
        t.setDaemon(false);
        return t;
    }

    /** True between {@link #start()} and the end of the drain. */
    public boolean isRunning() {
        return started && done.getCount() > 0;
    }

    /** Starts the drain and returns at once (safe from any thread, idempotent). */
    public void stop() {
        stopRequested = true;
        if (started) {
            stopParts();
        }
    }

    private void stopParts() {
        if (session != null) {
            session.stop();
        }
        if (subscriber != null) {
            subscriber.stop();
        }
    }

    /**
     * Waits until the worker stopped (after {@link #stop()} and the drain).
     *
     * @throws ChimeException when a side could not go on (a refused subscription)
     */
    public void awaitTermination() throws InterruptedException {
        done.await();
        rethrow();
    }

    /** Waits up to {@code timeout}; true when the worker stopped. */
    public boolean awaitTermination(Duration timeout) throws InterruptedException {
        boolean ok = done.await(timeout.toMillis(), TimeUnit.MILLISECONDS);
        if (ok) {
            rethrow();
        }
        return ok;
    }

    private void rethrow() {
        Throwable f = failure.get();
        if (f instanceof RuntimeException) {
            throw (RuntimeException) f;
        }
        if (f != null) {
            throw new IllegalStateException(f);
        }
    }

    /** The error that stopped a side, or null. */
    public Throwable failure() {
        return failure.get();
    }

    /** {@link #stop()} then {@link #awaitTermination()} (interrupts are kept). */
    @Override
    public void close() {
        stop();
        if (!started) {
            return;
        }
        try {
            done.await();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    /**
     * Installs SIGTERM and SIGINT handlers that call {@link #stop()} (a second signal
     * exits at once with status 130). Uses {@code sun.misc.Signal} (module
     * jdk.unsupported) so the JVM does not run its shutdown hooks and exit 143; after
     * {@link #awaitTermination()} the program exits as it likes (0 after a drain).
     */
    public void installSignalHandlers() {
        AtomicInteger signals = new AtomicInteger();
        for (String name : Arrays.asList("TERM", "INT")) {
            sun.misc.Signal.handle(new sun.misc.Signal(name), sig -> {
                if (signals.incrementAndGet() == 1) {
                    log.log(Level.INFO, "SIG" + sig.getName() + ": draining (send it again to stop at once)", null);
                    stop();
                } else {
                    log.log(Level.WARN, "SIG" + sig.getName() + " again: stopping without waiting for the drain", null);
                    Runtime.getRuntime().halt(130);
                }
            });
        }
    }

    /**
     * The whole program's loop: installs the signal handlers, starts, and returns once
     * SIGTERM/SIGINT drained the worker.
     */
    public void runUntilSignal() throws InterruptedException {
        installSignalHandlers();
        start();
        awaitTermination();
    }

    /** Configures a {@link Worker}. */
    public static final class Builder {
        private final List<Endpoint> coordinators = new ArrayList<>();
        private String group = "default";
        private String workerId;
        private int capacity = 16;
        private final Map<String, String> labels = new HashMap<>();
        private Endpoint deliveries;
        private int credit = 64;
        private int settleTimeoutMs;
        private Token token;
        private long drainTimeoutMs = 10_000;
        private ChimeLogger logger = ChimeLogger.system();
        private final Map<String, JobHandler> jobs = new LinkedHashMap<>();
        private final Map<String, ItemHandler> items = new LinkedHashMap<>();

        private Builder() {
            String d = System.getenv("CHIME_DELIVERIES");
            if (d != null && !d.isEmpty()) {
                deliveries = Endpoint.parse(d);
                String tf = System.getenv("CHIME_DELIVERIES_TOKEN_FILE");
                if (tf != null && !tf.isEmpty()) {
                    token = Token.file(tf);
                }
            }
        }

        /**
         * Coordinator endpoints, {@code http://host:port}, one or several (or one
         * comma-separated string); a follower redirects to the leader.
         */
        public Builder coordinator(String... urls) {
            for (String u : urls) {
                for (String part : u.split(",")) {
                    if (!part.isBlank()) {
                        coordinators.add(Endpoint.parse(part));
                    }
                }
            }
            return this;
        }

        /** The worker group jobs name (default {@code default}). */
        public Builder group(String group) {
            this.group = group;
            return this;
        }

        /** A stable id unique among live workers (default: the host name, a pod's name). */
        public Builder workerId(String workerId) {
            this.workerId = workerId;
            return this;
        }

        /** The most shards run at once (default 16). */
        public Builder capacity(int capacity) {
            this.capacity = capacity;
            return this;
        }

        /** A free-form label (zone, version, …). */
        public Builder label(String key, String value) {
            labels.put(key, value);
            return this;
        }

        /**
         * The chime worker's delivery service ({@code http://127.0.0.1:7071} for a
         * sidecar). Default: the environment variable {@code CHIME_DELIVERIES} (and the
         * token file {@code CHIME_DELIVERIES_TOKEN_FILE}), as the Helm chart sets.
         */
        public Builder deliveries(String url) {
            this.deliveries = url == null || url.isEmpty() ? null : Endpoint.parse(url);
            return this;
        }

        /** The most deliveries held at once, 1–10,000 (default 64): the item handlers' concurrency. */
        public Builder credit(int credit) {
            this.credit = credit;
            return this;
        }

        /** How long a delivery may run before it counts as failed unless extended (0: the worker's 30 s). */
        public Builder settleTimeoutMs(int ms) {
            this.settleTimeoutMs = ms;
            return this;
        }

        /** A fixed bearer token for both sides. */
        public Builder token(String token) {
            this.token = Token.of(token);
            return this;
        }

        /** A token file (first non-empty line), re-read at each reconnection. */
        public Builder tokenFile(String path) {
            this.token = Token.file(path);
            return this;
        }

        /** How long a drain waits for running handlers (default 10 s). */
        public Builder drainTimeout(Duration timeout) {
            this.drainTimeoutMs = timeout.toMillis();
            return this;
        }

        /** Where the SDK logs (default {@link ChimeLogger#system()}). */
        public Builder logger(ChimeLogger logger) {
            this.logger = logger;
            return this;
        }

        /** Registers a job handler. */
        public Builder job(String name, JobHandler handler) {
            if (jobs.putIfAbsent(name, handler) != null) {
                throw new IllegalArgumentException("job handler " + name + " registered twice");
            }
            return this;
        }

        /** Registers an item handler. */
        public Builder item(String name, ItemHandler handler) {
            if (items.putIfAbsent(name, handler) != null) {
                throw new IllegalArgumentException("item handler " + name + " registered twice");
            }
            return this;
        }

        /**
         * Registers every method of {@code bean} annotated {@link ChimeJob} (signature
         * {@code String m(JobContext)}) or {@link ChimeItem} ({@code void m(ItemContext)}).
         */
        public Builder handlers(Object bean) {
            for (java.lang.reflect.Method m : bean.getClass().getMethods()) {
                ChimeJob j = m.getAnnotation(ChimeJob.class);
                if (j != null) {
                    job(j.value(), ctx -> {
                        Object r = invoke(m, bean, ctx);
                        return r == null ? null : r.toString();
                    });
                }
                ChimeItem i = m.getAnnotation(ChimeItem.class);
                if (i != null) {
                    item(i.value(), ctx -> invoke(m, bean, ctx));
                }
            }
            return this;
        }

        private static Object invoke(java.lang.reflect.Method m, Object bean, Object ctx) throws Exception {
            try {
                return m.invoke(bean, ctx);
            } catch (java.lang.reflect.InvocationTargetException e) {
                Throwable c = e.getCause();
                if (c instanceof Exception) {
                    throw (Exception) c;
                }
                throw e;
            }
        }

        /** Builds the worker (nothing connects before {@link Worker#start()}). */
        public Worker build() {
            return new Worker(this);
        }
    }
}
