// The job side: the worker's session with the coordinator (chime.v1.WorkerGateway).
package dev.chime.sdk;

import dev.chime.proto.v1.Assign;
import dev.chime.proto.v1.CoordinatorMessage;
import dev.chime.proto.v1.Draining;
import dev.chime.proto.v1.Heartbeat;
import dev.chime.proto.v1.Register;
import dev.chime.proto.v1.RunLog;
import dev.chime.proto.v1.RunRef;
import dev.chime.proto.v1.RunResult;
import dev.chime.proto.v1.RunStarted;
import dev.chime.proto.v1.RunStatus;
import dev.chime.proto.v1.WorkerGatewayGrpc;
import dev.chime.proto.v1.WorkerMessage;
import dev.chime.sdk.ChimeLogger.Level;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.TreeSet;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

/**
 * The session conversation of worker.proto, ported from the Python SDK's jobs.py.
 * One control thread owns all state and is the only one writing to the stream; the
 * gRPC callbacks and handler threads hand it events through a queue.
 *
 * <ul>
 *   <li>register (with the shards still running), heartbeat at the interval
 *       {@code Registered} gives, follow {@code NotLeader}, else try the endpoints in
 *       turn with a backoff (100 ms doubling to 1 s);</li>
 *   <li>each {@code Assign} runs on its own thread: {@code RunStarted}, {@code RunLog},
 *       exactly one {@code RunResult}; results of the last minute are re-sent after a
 *       reconnect;</li>
 *   <li>a session that went three heartbeat intervals without a heartbeat (frozen or
 *       starved process) starts nothing more and registers again; an {@code Assign}
 *       read past its {@code start_by_session_ms} is dropped unstarted;</li>
 *   <li>drain: {@code Draining}, shards finish within the drain timeout, the rest are
 *       cancelled (reported after a 2 s grace at the latest), then the stream closes.</li>
 * </ul>
 */
final class JobSession {
    static final long RESEND_WINDOW_NS = TimeUnit.SECONDS.toNanos(60);
    static final int RESEND_MAX = 10_000;
    static final long CANCEL_GRACE_NS = TimeUnit.SECONDS.toNanos(2);
    static final long REGISTER_TIMEOUT_NS = TimeUnit.SECONDS.toNanos(10);
    static final int MAX_LOG_BYTES = 4096;
    static final int MAX_OUTPUT_BYTES = 64 * 1024;

    /** Options of the job side. */
    static final class Options {
        List<Endpoint> endpoints;
        String group;
        String workerId;
        Token token;
        int capacity = 16;
        Map<String, String> labels = new HashMap<>();
        long drainTimeoutMs = 10_000;
    }

    private record Key(String runId, int shard, int attempt) {
        RunRef ref() {
            return RunRef.newBuilder().setRunId(runId).setShardIndex(shard).setAttempt(attempt).build();
        }
    }

    private static final class Shard {
        final JobContext ctx;
        long startedMs;
        boolean reported;

        Shard(JobContext ctx) {
            this.ctx = ctx;
        }
    }

    private static final class Result {
        final WorkerMessage msg;
        long sentAt; // nanoTime a connection first took it; 0: never

        Result(WorkerMessage msg) {
            this.msg = msg;
        }
    }

    // --- events from other threads -------------------------------------------------
    private record Msg(Connection conn, CoordinatorMessage m) {}

    private record End(Connection conn, Throwable error) {}

    private record Emit(WorkerMessage m) {}

    private record Done(Key key, Shard shard, RunStatus status, String output, String error) {}

    private static final Object STOP = new Object();
    private static final Object WAKE = new Object();

    /** One stream. */
    private final class Connection {
        final Endpoint endpoint;
        StreamObserver<WorkerMessage> out;
        ClientCallStreamObserver<WorkerMessage> call;
        boolean registered;
        boolean ended;
        boolean stalled;
        boolean drainingSent;
        long sessionClock;
        long intervalNs;
        long nextBeat;

        Connection(Endpoint endpoint) {
            this.endpoint = endpoint;
        }

        void send(WorkerMessage m) {
            if (!ended) {
                try {
                    out.onNext(m);
                } catch (RuntimeException e) {
                    log.log(Level.DEBUG, "session write failed: " + e, null);
                }
            }
        }
    }

    private enum Outcome { DRAINED, FAILED, REDIRECT }

    private final Map<String, JobHandler> handlers;
    private final Options o;
    private final ChimeLogger log;
    private final LinkedBlockingQueue<Object> events = new LinkedBlockingQueue<>();
    private final Map<Key, Shard> running = new LinkedHashMap<>();
    private final ArrayDeque<Result> results = new ArrayDeque<>();
    private final Map<Endpoint, ManagedChannel> channels = new HashMap<>();
    private final ExecutorService pool;
    private Connection conn;
    private boolean stopping;
    private long drainDeadline;
    private long giveUpAt;
    private long lastBeat;
    private long stallLimitNs = Long.MAX_VALUE;
    private Endpoint redirectTo;

    JobSession(Map<String, JobHandler> handlers, Options o, ChimeLogger log) {
        if (handlers.isEmpty()) {
            throw new IllegalArgumentException("no job handlers to register");
        }
        if (o.capacity < 1) {
            throw new IllegalArgumentException("capacity " + o.capacity + ": must be at least 1");
        }
        if (o.endpoints == null || o.endpoints.isEmpty()) {
            throw new IllegalArgumentException("no coordinator endpoint");
        }
        this.handlers = Map.copyOf(handlers);
        this.o = o;
        this.log = log;
        this.pool = Executors.newCachedThreadPool(Conn.daemons("chime-job"));
    }

    /** Starts the drain (thread-safe). */
    void stop() {
        events.add(STOP);
    }

    // --- the control loop ------------------------------------------------------------

    /** Connects and serves until stopped, then drains and returns. */
    void run() throws InterruptedException {
        Conn.Backoff backoff = new Conn.Backoff();
        int next = 0;
        int redirects = 0;
        try {
            while (true) {
                if (stopping && running.isEmpty() && unsent() == 0) {
                    return; // stopped between connections with nothing left to report
                }
                Endpoint endpoint;
                if (redirectTo != null) {
                    endpoint = redirectTo;
                    redirectTo = null;
                } else {
                    endpoint = o.endpoints.get(next % o.endpoints.size());
                    next++;
                }
                Outcome r = connect(endpoint, backoff);
                if (r == Outcome.DRAINED) {
                    return;
                }
                if (r == Outcome.REDIRECT) {
                    redirects++;
                    if (!redirectTo.equals(endpoint) && redirects <= o.endpoints.size() + 1) {
                        log.log(Level.INFO, "coordinator " + endpoint.url() + " is not the leader; following to "
                                + redirectTo.url(), null);
                        continue;
                    }
                    log.log(Level.DEBUG, "coordinator " + endpoint.url() + " names " + redirectTo.url()
                            + " as the leader; waiting", null);
                } else {
                    redirects = 0;
                }
                if (stopping) {
                    if (running.isEmpty() && unsent() == 0) {
                        return;
                    }
                    if (System.nanoTime() > drainDeadline + CANCEL_GRACE_NS + TimeUnit.SECONDS.toNanos(5)) {
                        log.log(Level.WARN, "stopping with " + unsent() + " results no coordinator received", null);
                        return;
                    }
                }
                pause(TimeUnit.MILLISECONDS.toNanos(backoff.nextMs()));
            }
        } finally {
            for (Shard s : running.values()) {
                s.ctx.cancel("worker stopped");
            }
            for (ManagedChannel ch : channels.values()) {
                ch.shutdownNow();
            }
            pool.shutdownNow();
        }
    }

    private int unsent() {
        int n = 0;
        for (Result r : results) {
            if (r.sentAt == 0) {
                n++;
            }
        }
        return n;
    }

    private void pause(long ns) throws InterruptedException {
        long until = System.nanoTime() + ns;
        while (System.nanoTime() < until) {
            if (stopping && running.isEmpty()) {
                return;
            }
            poll(until); // Msg/End of a finished connection: ignored
        }
    }

    /**
     * Waits for the next event until {@code deadline} (nanoTime), handling timers and
     * the events that do not depend on a connection; answers a connection's event,
     * {@link #WAKE} after a timer changed something, or null at the deadline.
     */
    private Object poll(long deadline) throws InterruptedException {
        while (true) {
            long now = System.nanoTime();
            if (fireTimers(now)) {
                return WAKE;
            }
            if (now - deadline >= 0) {
                return null;
            }
            long until = deadline;
            if (conn != null && conn.registered && conn.nextBeat - until < 0) {
                until = conn.nextBeat;
            }
            if (stopping && drainDeadline != 0 && drainDeadline - until < 0 && giveUpAt == 0 && !running.isEmpty()) {
                until = drainDeadline;
            }
            if (giveUpAt != 0 && giveUpAt - until < 0) {
                until = giveUpAt;
            }
            Object e = events.poll(Math.max(0, until - now), TimeUnit.NANOSECONDS);
            if (e == null) {
                continue;
            }
            if (e instanceof Done d) {
                report(d.key, d.shard, d.status, d.output, d.error);
                return WAKE;
            }
            if (e instanceof Emit m) {
                if (conn != null && conn.registered) {
                    conn.send(m.m);
                }
                continue;
            }
            if (e == STOP) {
                beginStop();
                return WAKE;
            }
            return e;
        }
    }

    /** Heartbeats, the drain timeout and its grace; true when the caller must look again. */
    private boolean fireTimers(long now) {
        boolean changed = false;
        Connection c = conn;
        if (c != null && c.registered && !c.stalled && now - c.nextBeat >= 0) {
            if (stalled(now)) {
                c.stalled = true;
                changed = true;
            } else {
                lastBeat = now;
                Heartbeat.Builder hb = Heartbeat.newBuilder();
                for (Key k : running.keySet()) {
                    hb.addRunning(k.ref());
                }
                c.send(WorkerMessage.newBuilder().setHeartbeat(hb).build());
                c.nextBeat = now + c.intervalNs;
            }
        }
        if (stopping && giveUpAt == 0 && now - drainDeadline >= 0 && !running.isEmpty()) {
            log.log(Level.WARN, "drain timeout: cancelling " + running.size() + " running shards", null);
            for (Shard s : new ArrayList<>(running.values())) {
                cancel(s, "drain timeout");
            }
            giveUpAt = now + CANCEL_GRACE_NS;
        }
        if (giveUpAt != 0 && now - giveUpAt >= 0) {
            giveUpAt = Long.MAX_VALUE / 2 + now; // once
            for (Map.Entry<Key, Shard> e : new ArrayList<>(running.entrySet())) {
                log.log(Level.WARN, "run " + e.getKey().runId + " shard " + e.getKey().shard
                        + " did not stop within 2 s of its cancellation", null);
                report(e.getKey(), e.getValue(), RunStatus.RUN_STATUS_CANCELLED, "",
                        "did not stop after its cancellation");
            }
            changed = true;
        }
        return changed;
    }

    private boolean stalled(long now) {
        long silent = now - lastBeat;
        if (silent <= stallLimitNs) {
            return false;
        }
        log.log(Level.WARN, "this worker could not heartbeat for " + TimeUnit.NANOSECONDS.toMillis(silent)
                + " ms (frozen or starved); the coordinator has taken it for dead, so it starts nothing more "
                + "on this session and registers again", null);
        return true;
    }

    private void beginStop() {
        if (stopping) {
            return;
        }
        stopping = true;
        drainDeadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(o.drainTimeoutMs);
        log.log(Level.INFO, "draining: no new shards, " + running.size() + " running", null);
        if (conn != null && conn.registered && !conn.drainingSent) {
            conn.drainingSent = true;
            conn.send(WorkerMessage.newBuilder().setDraining(Draining.getDefaultInstance()).build());
        }
    }

    private ManagedChannel channel(Endpoint e) {
        return channels.computeIfAbsent(e, x -> Conn.open(x, null));
    }

    /** One connection. */
    private Outcome connect(Endpoint endpoint, Conn.Backoff backoff) throws InterruptedException {
        WorkerGatewayGrpc.WorkerGatewayStub stub;
        try {
            stub = WorkerGatewayGrpc.newStub(channel(endpoint)).withInterceptors(Conn.auth(o.token));
        } catch (RuntimeException e) {
            log.log(Level.ERROR, "cannot read the worker token: " + e.getMessage(), null);
            return Outcome.FAILED;
        }
        Connection c = new Connection(endpoint);
        conn = c;
        try {
            c.out = stub.session(new ClientResponseObserver<WorkerMessage, CoordinatorMessage>() {
                @Override
                public void beforeStart(ClientCallStreamObserver<WorkerMessage> rs) {
                    c.call = rs;
                }

                @Override
                public void onNext(CoordinatorMessage m) {
                    events.add(new Msg(c, m));
                }

                @Override
                public void onError(Throwable t) {
                    events.add(new End(c, t));
                }

                @Override
                public void onCompleted() {
                    events.add(new End(c, null));
                }
            });
            Register.Builder reg = Register.newBuilder()
                    .setWorkerId(o.workerId)
                    .setGroup(o.group)
                    .addAllHandlers(new TreeSet<>(handlers.keySet()))
                    .setCapacity(o.capacity)
                    .putAllLabels(o.labels);
            for (Key k : running.keySet()) {
                reg.addRunning(k.ref());
            }
            c.send(WorkerMessage.newBuilder().setRegister(reg).build());
            // The answer to Register.
            long deadline = System.nanoTime() + REGISTER_TIMEOUT_NS;
            CoordinatorMessage first = null;
            while (first == null) {
                Object e = poll(deadline);
                if (e == null) {
                    log.log(Level.WARN, "coordinator " + endpoint.url() + " did not answer Register within 10 s", null);
                    return Outcome.FAILED;
                }
                if (e == WAKE) {
                    if (stopping && running.isEmpty() && unsent() == 0) {
                        return Outcome.FAILED; // stopped while waiting, nothing to report
                    }
                    continue;
                }
                if (e instanceof Msg m && m.conn == c) {
                    first = m.m;
                } else if (e instanceof End en && en.conn == c) {
                    c.ended = true;
                    failed(c, en.error);
                    return Outcome.FAILED;
                }
            }
            switch (first.getKindCase()) {
                case NOT_LEADER:
                    if (first.getNotLeader().getLeader().isEmpty()) {
                        pause(TimeUnit.MILLISECONDS.toNanos(200)); // an election is under way
                        return Outcome.FAILED;
                    }
                    redirectTo = Endpoint.redirect(endpoint, first.getNotLeader().getLeader());
                    return Outcome.REDIRECT;
                case REGISTERED:
                    break;
                default:
                    log.log(Level.WARN, "coordinator " + endpoint.url() + " answered " + first.getKindCase()
                            + " to Register", null);
                    return Outcome.FAILED;
            }
            var r = first.getRegistered();
            long now = System.nanoTime();
            c.sessionClock = now;
            c.registered = true;
            backoff.reset();
            log.log(Level.INFO, "registered with coordinator "
                    + (r.getCoordinator().isEmpty() ? endpoint.url() : r.getCoordinator()) + " as "
                    + r.getWorkerId() + " in group " + o.group, null);
            while (!results.isEmpty() && results.peekFirst().sentAt != 0
                    && now - results.peekFirst().sentAt > RESEND_WINDOW_NS) {
                results.pollFirst();
            }
            for (Result res : results) {
                if (res.sentAt == 0) {
                    res.sentAt = now;
                }
                c.send(res.msg);
            }
            c.intervalNs = TimeUnit.MILLISECONDS.toNanos(Math.max(100, r.getHeartbeatIntervalMs()));
            stallLimitNs = 3 * c.intervalNs;
            lastBeat = now;
            c.nextBeat = now + c.intervalNs;
            if (stopping) {
                c.drainingSent = true;
                c.send(WorkerMessage.newBuilder().setDraining(Draining.getDefaultInstance()).build());
            }
            // Serve.
            while (true) {
                if (stopping && running.isEmpty()) {
                    return finishDrain(c);
                }
                Object e = poll(System.nanoTime() + TimeUnit.SECONDS.toNanos(1));
                if (c.stalled) {
                    return Outcome.FAILED;
                }
                if (e instanceof Msg m && m.conn == c) {
                    CoordinatorMessage cm = m.m;
                    switch (cm.getKindCase()) {
                        case ASSIGN:
                            if (stalled(System.nanoTime())) {
                                c.stalled = true;
                                return Outcome.FAILED;
                            }
                            Assign a = cm.getAssign();
                            long sessionNowMs = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - c.sessionClock);
                            if (a.getStartBySessionMs() > 0 && sessionNowMs > a.getStartBySessionMs()) {
                                log.log(Level.WARN, "assignment " + a.getRun().getRunId() + " shard "
                                        + a.getShardIndex() + " arrived " + (sessionNowMs - a.getStartBySessionMs())
                                        + " ms after its start-by time (the stream was stalled); not starting it",
                                        null);
                                break;
                            }
                            start(a);
                            break;
                        case CANCEL:
                            var rr = cm.getCancel().getRun();
                            Shard s = running.get(new Key(rr.getRunId(), rr.getShardIndex(), rr.getAttempt()));
                            if (s != null) {
                                String reason = cm.getCancel().getReason();
                                cancel(s, reason.isEmpty() ? "cancelled" : reason);
                            }
                            break;
                        case SESSION_ENDED:
                            log.log(Level.INFO, "coordinator ended the session: "
                                    + cm.getSessionEnded().getReason() + " " + cm.getSessionEnded().getDetail(), null);
                            break;
                        default:
                            break;
                    }
                } else if (e instanceof End en && en.conn == c) {
                    c.ended = true;
                    failed(c, en.error);
                    return Outcome.FAILED;
                }
            }
        } finally {
            conn = null;
            if (!c.ended && c.call != null) {
                c.ended = true;
                c.call.cancel("session closed", null);
            }
        }
    }

    private void failed(Connection c, Throwable error) {
        if (error == null) {
            log.log(Level.WARN, "session with coordinator " + c.endpoint.url() + " ended; reconnecting", null);
            return;
        }
        Status s = Status.fromThrowable(error);
        if (s.getCode() == Status.Code.UNAUTHENTICATED) {
            log.log(Level.ERROR, "coordinator " + c.endpoint.url() + " refused the worker token: UNAUTHENTICATED: "
                    + s.getDescription(), null);
        } else if (c.registered) {
            log.log(Level.WARN, "session with coordinator " + c.endpoint.url() + " broke (" + s.getCode()
                    + "); reconnecting", null);
        } else if (s.getCode() == Status.Code.UNAVAILABLE) {
            log.log(Level.DEBUG, "cannot reach coordinator " + c.endpoint.url() + ": " + s.getDescription(), null);
            ManagedChannel ch = channels.get(c.endpoint);
            if (ch != null) {
                ch.resetConnectBackoff();
            }
        } else {
            log.log(Level.WARN, "session with coordinator " + c.endpoint.url() + " failed: " + s.getCode() + " "
                    + s.getDescription(), null);
        }
    }

    /** Every shard reported: close our side and wait (5 s at most) for SessionEnded. */
    private Outcome finishDrain(Connection c) throws InterruptedException {
        c.ended = true;
        try {
            c.out.onCompleted();
        } catch (RuntimeException e) {
            return Outcome.DRAINED;
        }
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
        while (true) {
            Object e = poll(deadline);
            if (e == null || (e instanceof End en && en.conn == c)) {
                break;
            }
        }
        log.log(Level.INFO, "drained: every shard reported", null);
        return Outcome.DRAINED;
    }

    // --- shards --------------------------------------------------------------------

    private void start(Assign a) {
        Key k = new Key(a.getRun().getRunId(), a.getRun().getShardIndex(), a.getRun().getAttempt());
        if (running.containsKey(k)) {
            return; // sent again after a reconnect
        }
        RunRef ref = k.ref();
        JobContext ctx = new JobContext(a, line -> events.add(new Emit(WorkerMessage.newBuilder()
                .setRunLog(RunLog.newBuilder().setRun(ref).setLine(Conn.cut(line, MAX_LOG_BYTES)).setAtMs(Conn.nowMs()))
                .build())));
        Shard shard = new Shard(ctx);
        shard.startedMs = Conn.nowMs();
        running.put(k, shard);
        conn.send(WorkerMessage.newBuilder()
                .setRunStarted(RunStarted.newBuilder().setRun(ref).setStartedAtMs(shard.startedMs)).build());
        JobHandler h = handlers.get(a.getHandler());
        if (h == null) {
            report(k, shard, RunStatus.RUN_STATUS_FAILED, "", "no job handler " + a.getHandler() + " on this worker");
            return;
        }
        pool.execute(() -> execute(k, shard, h));
    }

    private void execute(Key k, Shard shard, JobHandler h) {
        JobContext ctx = shard.ctx;
        ctx.bind(Thread.currentThread());
        RunStatus status;
        String output = "";
        String error = "";
        try {
            String out = h.handle(ctx);
            status = RunStatus.RUN_STATUS_SUCCEEDED;
            output = out == null ? "" : Conn.cut(out, MAX_OUTPUT_BYTES);
        } catch (Throwable e) {
            if (ctx.isCancelled()) {
                status = RunStatus.RUN_STATUS_CANCELLED;
                error = Objects.requireNonNullElse(ctx.cancelReason(), "cancelled");
            } else {
                status = RunStatus.RUN_STATUS_FAILED;
                error = e.getMessage() != null ? e.getMessage() : e.getClass().getName();
                log.log(Level.WARN, "job handler " + ctx.handler() + " failed (run " + ctx.runId() + " shard "
                        + ctx.shardIndex() + ")", e);
            }
        } finally {
            ctx.bind(null);
            Thread.interrupted(); // a late cancellation must not reach the next task
        }
        events.add(new Done(k, shard, status, output, error));
    }

    private void cancel(Shard s, String reason) {
        if (s.ctx.isCancelled()) {
            return;
        }
        log.log(Level.INFO, "cancelling run " + s.ctx.runId() + " shard " + s.ctx.shardIndex() + " (" + reason + ")",
                null);
        s.ctx.cancel(reason);
    }

    private void report(Key k, Shard shard, RunStatus status, String output, String error) {
        if (shard.reported) {
            return;
        }
        shard.reported = true;
        running.remove(k);
        Result r = new Result(WorkerMessage.newBuilder().setRunResult(RunResult.newBuilder()
                .setRun(k.ref())
                .setStatus(status)
                .setOutput(output)
                .setError(error)
                .setStartedAtMs(shard.startedMs)
                .setFinishedAtMs(Conn.nowMs())).build());
        while (results.size() >= RESEND_MAX) {
            results.pollFirst();
        }
        results.addLast(r);
        if (conn != null && conn.registered && !conn.ended) {
            r.sentAt = System.nanoTime();
            conn.send(r.msg);
        }
    }
}
