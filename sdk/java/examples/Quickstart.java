// Quickstart: schedule three reminders through the coordinator, receive them through a
// chime worker's delivery service, print them, and exit (0 once all arrived, 1 after 30 s).
//
//   cargo run -p chime -- dev &                                    # coordinator :7070, deliveries :7071
//   sdk/java/conformance/agent build                               # builds the SDK offline
//   java -cp "$(cat target/sdk-java/classpath)" sdk/java/examples/Quickstart.java
//
// Arguments (optional): COORDINATOR_URL DELIVERIES_URL. No token (chime dev needs none).
import dev.chime.sdk.ChimeLogger;
import dev.chime.sdk.Item;
import dev.chime.sdk.NewItem;
import dev.chime.sdk.QueueClient;
import dev.chime.sdk.Worker;
import java.time.Duration;
import java.util.List;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/** The quickstart program. */
public class Quickstart {
    /** Entry point. */
    public static void main(String[] args) throws Exception {
        String coordinator = args.length > 0 ? args[0] : "http://127.0.0.1:7070";
        String deliveries = args.length > 1 ? args[1] : "http://127.0.0.1:7071";
        String run = UUID.randomUUID().toString().substring(0, 8); // fresh ids on every run
        Set<String> expected = ConcurrentHashMap.newKeySet();
        CountDownLatch allSeen = new CountDownLatch(1);

        Worker worker = Worker.builder()
                .deliveries(deliveries)
                .credit(16)
                .logger(ChimeLogger.stderr(ChimeLogger.Level.WARN))
                .item("quickstart.remind", ctx -> {
                    long now = System.currentTimeMillis();
                    for (Item item : ctx.items()) {
                        long lag = now - item.dueAtMs();
                        String when = lag >= 0 ? lag + " ms after due"
                                : -lag + " ms early: merged, it fires with the earliest";
                        System.out.printf("got %s for %s: %s (attempt %d, %s)%n",
                                item.id(), item.key(), item.text(), item.attempt(), when);
                        expected.remove(item.id());
                    }
                    if (ctx.merged()) {
                        System.out.println("  ^ " + ctx.items().size() + " reminders of one user merged into one delivery");
                    }
                    if (expected.isEmpty()) {
                        allSeen.countDown();
                    }
                })
                .build();
        worker.start(); // subscribes in the background

        List<NewItem> items = List.of(
                NewItem.of("hello-" + run + "-1", "quickstart.remind").key("user-42").inMs(1_000)
                        .payload("coupon 7 opens soon"),
                // Same key and merge key, due within the merge window: one delivery.
                NewItem.of("hello-" + run + "-2", "quickstart.remind").key("user-7").mergeKey("coupons")
                        .inMs(2_000).payload("coupon 8 opens soon"),
                NewItem.of("hello-" + run + "-3", "quickstart.remind").key("user-7").mergeKey("coupons")
                        .inMs(2_300).payload("coupon 9 opens soon"));
        items.forEach(i -> expected.add(i.toProto().getId()));
        try (QueueClient q = QueueClient.builder(coordinator).timeout(Duration.ofSeconds(10)).build()) {
            System.out.println("enqueued " + items.size() + " reminders: " + q.enqueue(items));
        }

        boolean ok = allSeen.await(30, TimeUnit.SECONDS);
        worker.close(); // drains: running handlers finish, the subscription closes
        if (!ok) {
            System.err.println("not delivered within 30 s: " + expected);
            System.exit(1);
        }
        System.out.println("every reminder arrived; bye");
    }
}
