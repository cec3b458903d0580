// Unit tests of the job session against in-process fakes of the coordinator's
// WorkerGateway: NotLeader redirect, register, heartbeats, results, cancel, drain.
package dev.chime.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.chime.proto.v1.Assign;
import dev.chime.proto.v1.Cancel;
import dev.chime.proto.v1.CoordinatorMessage;
import dev.chime.proto.v1.NotLeader;
import dev.chime.proto.v1.Registered;
import dev.chime.proto.v1.RunRef;
import dev.chime.proto.v1.RunResult;
import dev.chime.proto.v1.SessionEndReason;
import dev.chime.proto.v1.SessionEnded;
import dev.chime.proto.v1.WorkerGatewayGrpc;
import dev.chime.proto.v1.WorkerMessage;
import io.grpc.Server;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.StreamObserver;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

class JobSessionTest {
    /** Redirects every session to {@code leader}. */
    static final class Follower extends WorkerGatewayGrpc.WorkerGatewayImplBase {
        final String leader;

        Follower(String leader) {
            this.leader = leader;
        }

        @Override
        public StreamObserver<WorkerMessage> session(StreamObserver<CoordinatorMessage> out) {
            return new StreamObserver<>() {
                @Override
                public void onNext(WorkerMessage m) {
                    out.onNext(CoordinatorMessage.newBuilder()
                            .setNotLeader(NotLeader.newBuilder().setLeader(leader)).build());
                    out.onCompleted();
                }

                @Override
                public void onError(Throwable t) { }

                @Override
                public void onCompleted() { }
            };
        }
    }

    /** Registers, assigns two shards, cancels the second once it started, ends a drain. */
    static final class Leader extends WorkerGatewayGrpc.WorkerGatewayImplBase {
        final Map<String, RunResult> results = new ConcurrentHashMap<>();
        final List<String> logs = new CopyOnWriteArrayList<>();
        final AtomicInteger heartbeats = new AtomicInteger();
        final CountDownLatch twoResults = new CountDownLatch(2);
        final CountDownLatch draining = new CountDownLatch(1);

        static Assign assign(String run, String handler) {
            return Assign.newBuilder().setRun(RunRef.newBuilder().setRunId(run).setAttempt(1))
                    .setHandler(handler).setJob("j").setShardTotal(1).setParams("{}").build();
        }

        @Override
        public StreamObserver<WorkerMessage> session(StreamObserver<CoordinatorMessage> out) {
            return new StreamObserver<>() {
                @Override
                public synchronized void onNext(WorkerMessage m) {
                    switch (m.getKindCase()) {
                        case REGISTER:
                            out.onNext(CoordinatorMessage.newBuilder().setRegistered(Registered.newBuilder()
                                    .setWorkerId(m.getRegister().getWorkerId()).setHeartbeatIntervalMs(100)).build());
                            out.onNext(CoordinatorMessage.newBuilder().setAssign(assign("r1", "ok")).build());
                            out.onNext(CoordinatorMessage.newBuilder().setAssign(assign("r2", "block")).build());
                            break;
                        case RUN_STARTED:
                            if (m.getRunStarted().getRun().getRunId().equals("r2")) {
                                out.onNext(CoordinatorMessage.newBuilder().setCancel(Cancel.newBuilder()
                                        .setRun(m.getRunStarted().getRun()).setReason("kill")).build());
                            }
                            break;
                        case RUN_LOG:
                            logs.add(m.getRunLog().getLine());
                            break;
                        case RUN_RESULT:
                            results.put(m.getRunResult().getRun().getRunId(), m.getRunResult());
                            twoResults.countDown();
                            break;
                        case HEARTBEAT:
                            heartbeats.incrementAndGet();
                            break;
                        case DRAINING:
                            draining.countDown();
                            break;
                        default:
                            break;
                    }
                }

                @Override
                public void onError(Throwable t) { }

                @Override
                public synchronized void onCompleted() {
                    out.onNext(CoordinatorMessage.newBuilder().setSessionEnded(SessionEnded.newBuilder()
                            .setReason(SessionEndReason.SESSION_END_REASON_DRAINED)).build());
                    out.onCompleted();
                }
            };
        }
    }

    @Test
    void followsTheLeaderRunsShardsAndDrains() throws Exception {
        Leader leader = new Leader();
        Server ls = NettyServerBuilder.forPort(0).addService(leader).build().start();
        Server fs = NettyServerBuilder.forPort(0).addService(new Follower("127.0.0.1:" + ls.getPort())).build().start();
        try {
            Worker w = Worker.builder()
                    .coordinator("http://127.0.0.1:" + fs.getPort())
                    .workerId("w-test")
                    .logger(ChimeLogger.quiet())
                    .job("ok", ctx -> {
                        ctx.log("hello");
                        return "out";
                    })
                    .job("block", ctx -> {
                        Thread.sleep(60_000);
                        return "never";
                    })
                    .build();
            w.start();
            assertTrue(leader.twoResults.await(10, TimeUnit.SECONDS), "two results");
            assertEquals("RUN_STATUS_SUCCEEDED", leader.results.get("r1").getStatus().name());
            assertEquals("out", leader.results.get("r1").getOutput());
            assertEquals("RUN_STATUS_CANCELLED", leader.results.get("r2").getStatus().name());
            assertEquals("kill", leader.results.get("r2").getError());
            Thread.sleep(300);
            assertTrue(leader.heartbeats.get() >= 1, "heartbeats");
            assertTrue(leader.logs.contains("hello"));
            w.stop();
            assertTrue(w.awaitTermination(Duration.ofSeconds(10)), "drained");
            assertEquals(0, leader.draining.getCount(), "Draining sent");
        } finally {
            fs.shutdownNow();
            ls.shutdownNow();
        }
    }
}
