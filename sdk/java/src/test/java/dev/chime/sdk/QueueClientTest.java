// Unit tests of the producer client against an in-process fake of chime.v1.Queue:
// outcomes, NOT_FOUND as empty, the refused field of INVALID_ARGUMENT, the token header.
package dev.chime.sdk;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.chime.proto.v1.EnqueueOutcome;
import dev.chime.proto.v1.EnqueueRequest;
import dev.chime.proto.v1.EnqueueResponse;
import dev.chime.proto.v1.QueueGrpc;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.StreamObserver;
import java.util.List;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.Test;

class QueueClientTest {
    static final class FakeQueue extends QueueGrpc.QueueImplBase {
        @Override
        public void enqueue(EnqueueRequest req, StreamObserver<EnqueueResponse> out) {
            for (int i = 0; i < req.getItemsCount(); i++) {
                if (req.getItems(i).getHandler().contains(" ")) {
                    Metadata tr = new Metadata();
                    tr.put(Metadata.Key.of("chime-field", Metadata.ASCII_STRING_MARSHALLER), "items[" + i + "].handler");
                    out.onError(Status.INVALID_ARGUMENT.withDescription("items[" + i + "].handler: bad name")
                            .asRuntimeException(tr));
                    return;
                }
            }
            EnqueueResponse.Builder r = EnqueueResponse.newBuilder();
            req.getItemsList().forEach(x -> r.addOutcomes(x.getId().endsWith("dup")
                    ? EnqueueOutcome.ENQUEUE_OUTCOME_DUPLICATE : EnqueueOutcome.ENQUEUE_OUTCOME_CREATED));
            out.onNext(r.build());
            out.onCompleted();
        }

        @Override
        public void getItem(dev.chime.proto.v1.ItemRef ref, StreamObserver<dev.chime.proto.v1.ItemView> out) {
            out.onError(Status.NOT_FOUND.withDescription("no item").asRuntimeException());
        }
    }

    @Test
    void outcomesErrorsAndToken() throws Exception {
        AtomicReference<String> auth = new AtomicReference<>();
        ServerInterceptor capture = new ServerInterceptor() {
            @Override
            public <Q, R> ServerCall.Listener<Q> interceptCall(ServerCall<Q, R> call, Metadata md,
                    ServerCallHandler<Q, R> next) {
                auth.set(md.get(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER)));
                return next.startCall(call, md);
            }
        };
        Server server = NettyServerBuilder.forPort(0)
                .addService(ServerInterceptors.intercept(new FakeQueue(), capture)).build().start();
        try (QueueClient q = QueueClient.builder("http://127.0.0.1:" + server.getPort())
                .token("producer-token-0123456789").build()) {
            assertEquals(List.of(Outcomes.Enqueue.CREATED, Outcomes.Enqueue.DUPLICATE),
                    q.enqueue(List.of(NewItem.of("a", "h"), NewItem.of("a-dup", "h"))));
            assertEquals("Bearer producer-token-0123456789", auth.get());
            assertTrue(q.get(ItemRef.of("nope")).isEmpty());
            ChimeException e = assertThrows(ChimeException.class,
                    () -> q.enqueue(List.of(NewItem.of("b", "bad handler!"))));
            assertEquals(Status.Code.INVALID_ARGUMENT, e.code());
            assertEquals("items[0].handler", e.field());
        } finally {
            server.shutdownNow();
        }
    }
}
