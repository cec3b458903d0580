// Unit tests of the Java SDK (offline): parsing, tokens, the runner pool, and a
// delivery stream against an in-process fake of the chime worker's Deliveries service.
package dev.chime.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.ByteString;
import dev.chime.proto.v1.DeliveredItem;
import dev.chime.proto.v1.DeliveriesGrpc;
import dev.chime.proto.v1.Deliver;
import dev.chime.proto.v1.Delivery;
import dev.chime.proto.v1.Drained;
import dev.chime.proto.v1.SubscribeRequest;
import dev.chime.proto.v1.SubscribeResponse;
import dev.chime.proto.v1.Subscribed;
import io.grpc.Server;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.StreamObserver;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;

class SdkTest {
    @Test
    void endpoints() {
        Endpoint e = Endpoint.parse("http://127.0.0.1:7070/");
        assertEquals("127.0.0.1:7070", e.target());
        assertFalse(e.secure());
        assertTrue(Endpoint.parse("https://c:1").secure());
        assertEquals("http://h:2", Endpoint.parse("h:2").url());
        assertThrows(IllegalArgumentException.class, () -> Endpoint.parse("grpc://h:1"));
        assertThrows(IllegalArgumentException.class, () -> Endpoint.parse("http://h:1/x"));
        assertEquals("https://l:9", Endpoint.redirect(Endpoint.parse("https://c:1"), "l:9").url());
        assertEquals("http://l:9", Endpoint.redirect(Endpoint.parse("https://c:1"), "http://l:9").url());
    }

    @Test
    void tokens() throws Exception {
        Path f = Files.createTempFile("tok", ".txt");
        Files.writeString(f, "\n  secret-token-0123456789  \nother\n");
        assertEquals("secret-token-0123456789", Token.file(f.toString()).get());
        assertEquals("Bearer secret-token-0123456789",
                Token.file(f.toString()).metadata().get(Token.AUTHORIZATION));
        assertNull(Token.none().metadata().get(Token.AUTHORIZATION));
        assertNull(Token.file("").get());
        // A coordinator's token file works as it is: comments skipped, the first field.
        Files.writeString(f, "# ci\n\nnamed-token-0123456789 ci-deployer role=operator\n");
        assertEquals("named-token-0123456789", Token.file(f.toString()).get());
        Files.writeString(f, "\n\n");
        assertThrows(IllegalArgumentException.class, () -> Token.file(f.toString()));
        Files.delete(f);
    }

    @Test
    void cutKeepsCharacters() {
        assertEquals("abc", Conn.cut("abc", 10));
        String s = "é".repeat(3000); // 2 bytes each
        String c = Conn.cut(s, 4095);
        assertEquals(2047, c.length());
    }

    @Test
    void handlerExceptionBounds() {
        assertEquals(300L, new HandlerException("x", 300).retryAfterMs());
        assertNull(new HandlerException("x").retryAfterMs());
        assertThrows(IllegalArgumentException.class, () -> new HandlerException("x", -1));
    }

    @Test
    void builderValidation() {
        assertThrows(IllegalArgumentException.class, () -> Worker.builder().build());
        assertThrows(IllegalArgumentException.class,
                () -> Worker.builder().deliveries("http://h:1").item("bad name!", ctx -> { }).build());
        assertThrows(IllegalArgumentException.class,
                () -> Worker.builder().coordinator("http://h:1").build());
        assertThrows(IllegalArgumentException.class,
                () -> Worker.builder().deliveries("http://h:1").credit(0).item("a", ctx -> { }).build());
        assertThrows(IllegalArgumentException.class,
                () -> Worker.builder().job("a", ctx -> "").job("a", ctx -> ""));
    }

    @Test
    void runnersRunFastTasksOnOneThreadAndBlockingOnesInParallel() throws Exception {
        Runners r = new Runners("test");
        Set<String> names = ConcurrentHashMap.newKeySet();
        for (int i = 0; i < 200; i++) {
            CountDownLatch one = new CountDownLatch(1);
            r.submit(() -> {
                names.add(Thread.currentThread().getName());
                one.countDown();
            });
            assertTrue(one.await(5, TimeUnit.SECONDS));
        }
        assertTrue(names.size() <= 10, "tasks one after another used " + names.size() + " threads");
        CountDownLatch all = new CountDownLatch(20);
        CountDownLatch release = new CountDownLatch(1);
        for (int i = 0; i < 20; i++) {
            r.submit(() -> {
                all.countDown();
                try {
                    release.await();
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            });
        }
        assertTrue(all.await(5, TimeUnit.SECONDS), "20 blocking tasks must run at once");
        release.countDown();
        r.shutdown();
    }

    @Test
    void annotatedHandlers() {
        class Bean {
            @ChimeJob("j")
            public String j(JobContext ctx) {
                return "x";
            }

            @ChimeItem("i")
            public void i(ItemContext ctx) { }
        }
        Worker w = Worker.builder().coordinator("http://h:1").deliveries("http://h:2").handlers(new Bean()).build();
        assertFalse(w.isRunning());
    }

    /** A fake Deliveries service: 3 deliveries, records settlements, answers Drain. */
    static final class FakeDeliveries extends DeliveriesGrpc.DeliveriesImplBase {
        final List<Long> acks = new CopyOnWriteArrayList<>();
        final List<String> failures = new CopyOnWriteArrayList<>();
        final CountDownLatch settled = new CountDownLatch(3);
        final CountDownLatch closed = new CountDownLatch(1);

        @Override
        public StreamObserver<SubscribeRequest> subscribe(StreamObserver<SubscribeResponse> out) {
            return new StreamObserver<>() {
                @Override
                public void onNext(SubscribeRequest m) {
                    switch (m.getKindCase()) {
                        case SUBSCRIBE:
                            out.onNext(SubscribeResponse.newBuilder().setSubscribed(Subscribed.newBuilder()
                                    .setWorkerId("w1").setCredit(m.getSubscribe().getCredit())).build());
                            Deliver.Builder d = Deliver.newBuilder();
                            for (int i = 1; i <= 3; i++) {
                                d.addDeliveries(Delivery.newBuilder().setDeliveryId(i).setHandler("h")
                                        .addItems(DeliveredItem.newBuilder().setId("i" + i).setAttempt(1)
                                                .setPayload(ByteString.copyFromUtf8(i == 2 ? "fail" : "ok"))));
                            }
                            out.onNext(SubscribeResponse.newBuilder().setDeliver(d).build());
                            break;
                        case SETTLE:
                            acks.addAll(m.getSettle().getAcksList());
                            m.getSettle().getFailuresList().forEach(f -> failures.add(
                                    f.getDeliveryId() + ":" + f.getError() + ":" + f.getRetryAfterMs()));
                            for (int i = 0; i < m.getSettle().getAcksCount() + m.getSettle().getFailuresCount(); i++) {
                                settled.countDown();
                            }
                            break;
                        case DRAIN:
                            out.onNext(SubscribeResponse.newBuilder().setDrained(Drained.getDefaultInstance()).build());
                            break;
                        default:
                            break;
                    }
                }

                @Override
                public void onError(Throwable t) { }

                @Override
                public void onCompleted() {
                    closed.countDown();
                    out.onCompleted();
                }
            };
        }
    }

    @Test
    void subscriberSettlesAndDrains() throws Exception {
        FakeDeliveries fake = new FakeDeliveries();
        Server server = NettyServerBuilder.forPort(0).addService(fake).build().start();
        try {
            Worker w = Worker.builder()
                    .deliveries("http://127.0.0.1:" + server.getPort())
                    .logger(ChimeLogger.quiet())
                    .drainTimeout(Duration.ofSeconds(2))
                    .item("h", ctx -> {
                        if (ctx.item().text().equals("fail")) {
                            throw new HandlerException("planned failure", 300);
                        }
                    })
                    .build();
            w.start();
            assertTrue(fake.settled.await(10, TimeUnit.SECONDS), "3 settlements");
            assertEquals(Set.of(1L, 3L), Set.copyOf(fake.acks));
            assertEquals(List.of("2:planned failure:300"), fake.failures);
            w.stop();
            assertTrue(w.awaitTermination(Duration.ofSeconds(10)), "drained");
            assertTrue(fake.closed.await(1, TimeUnit.SECONDS), "half-closed after the drain");
        } finally {
            server.shutdownNow();
        }
    }
}
