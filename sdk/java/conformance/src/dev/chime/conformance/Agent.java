// The Java SDK's conformance agent (contract: sdk/conformance/README.md): run, produce, bench.
package dev.chime.conformance;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import dev.chime.sdk.ChimeException;
import dev.chime.sdk.ChimeLogger;
import dev.chime.sdk.HandlerException;
import dev.chime.sdk.Item;
import dev.chime.sdk.ItemContext;
import dev.chime.sdk.ItemHandler;
import dev.chime.sdk.ItemRef;
import dev.chime.sdk.ItemView;
import dev.chime.sdk.JobContext;
import dev.chime.sdk.NewItem;
import dev.chime.sdk.Outcomes;
import dev.chime.sdk.QueueClient;
import dev.chime.sdk.Worker;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/** The agent's entry point. */
public final class Agent {
    private Agent() {}

    /** {@code Agent run|produce|bench ARGS}. */
    public static void main(String[] argv) throws Exception {
        if (argv.length == 0) {
            usage();
        }
        Map<String, String> a = new HashMap<>();
        for (int i = 1; i < argv.length; i++) {
            String k = argv[i];
            if (!k.startsWith("--") || i + 1 >= argv.length) {
                usage();
            }
            a.put(k.substring(2), argv[++i]);
        }
        int code;
        switch (argv[0]) {
            case "run": code = run(a); break;
            case "produce": code = produce(a); break;
            case "bench": code = bench(a); break;
            default: usage(); return;
        }
        System.exit(code);
    }

    private static void usage() {
        System.err.println("usage: agent run|produce|bench --record FILE ...");
        System.exit(2);
    }

    // --- records -------------------------------------------------------------------

    /** JSON lines appended to the record file, one write each. */
    static final class Records {
        private final FileOutputStream out;

        Records(String path) throws IOException {
            out = new FileOutputStream(path, true);
        }

        synchronized void write(String kind, Object... fields) {
            StringBuilder b = new StringBuilder(128).append("{\"kind\":");
            json(b, kind);
            b.append(",\"at_ms\":").append(System.currentTimeMillis());
            for (int i = 0; i < fields.length; i += 2) {
                b.append(',');
                json(b, (String) fields[i]);
                b.append(':');
                json(b, fields[i + 1]);
            }
            b.append("}\n");
            try {
                out.write(b.toString().getBytes(StandardCharsets.UTF_8));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }

        static void json(StringBuilder b, Object v) {
            if (v == null) {
                b.append("null");
            } else if (v instanceof Number || v instanceof Boolean) {
                b.append(v);
            } else if (v instanceof List<?> l) {
                b.append('[');
                for (int i = 0; i < l.size(); i++) {
                    if (i > 0) {
                        b.append(',');
                    }
                    json(b, l.get(i));
                }
                b.append(']');
            } else {
                String s = v.toString();
                b.append('"');
                for (int i = 0; i < s.length(); i++) {
                    char c = s.charAt(i);
                    switch (c) {
                        case '"': b.append("\\\""); break;
                        case '\\': b.append("\\\\"); break;
                        case '\n': b.append("\\n"); break;
                        case '\r': b.append("\\r"); break;
                        case '\t': b.append("\\t"); break;
                        default:
                            if (c < 0x20) {
                                b.append(String.format("\\u%04x", (int) c));
                            } else {
                                b.append(c);
                            }
                    }
                }
                b.append('"');
            }
        }
    }

    // --- run -------------------------------------------------------------------------

    private static int run(Map<String, String> a) throws Exception {
        String coordinator = a.get("coordinator");
        String deliveries = a.get("deliveries");
        if (coordinator == null && deliveries == null) {
            System.err.println("run: give --coordinator, --deliveries, or both");
            return 2;
        }
        Records rec = new Records(req(a, "record"));
        Worker.Builder b = Worker.builder()
                .logger(ChimeLogger.stderr(ChimeLogger.Level.INFO))
                .drainTimeout(Duration.ofMillis(Long.parseLong(a.getOrDefault("drain-timeout-ms", "10000"))));
        b.deliveries(deliveries);
        if (a.containsKey("worker-id")) {
            b.workerId(a.get("worker-id"));
        }
        if (a.containsKey("token-file")) {
            b.tokenFile(a.get("token-file"));
        }
        Worker probe = null;
        String workerId = a.get("worker-id");
        if (coordinator != null) {
            b.coordinator(coordinator).group(a.getOrDefault("group", "conformance"));
            String[] wid = new String[1];
            b.job("conf.shard", ctx -> {
                rec.write("shard", "run_id", ctx.runId(), "job", ctx.job(), "shard_index", ctx.shardIndex(),
                        "shard_total", ctx.shardTotal(), "attempt", ctx.attempt(), "params", ctx.params(),
                        "shard_params", ctx.shardParams(), "worker_id", wid[0]);
                String line = "shard " + ctx.shardIndex() + "/" + ctx.shardTotal();
                ctx.log(line);
                return line;
            });
            b.job("conf.block", ctx -> block(rec, ctx));
            b.job("conf.fail", ctx -> {
                throw new RuntimeException("planned failure");
            });
            if (deliveries != null) {
                addItems(b, a, rec);
            }
            probe = b.build();
            wid[0] = probe.workerId();
        } else {
            addItems(b, a, rec);
            probe = b.build();
        }
        Worker worker = probe;
        worker.installSignalHandlers();
        rec.write("started", "worker_id", workerId != null ? workerId : worker.workerId());
        worker.start();
        try {
            worker.awaitTermination();
        } catch (RuntimeException e) {
            System.err.println("agent: " + e.getMessage());
            return 1;
        }
        rec.write("drained");
        return 0;
    }

    private static String req(Map<String, String> a, String k) {
        String v = a.get(k);
        if (v == null) {
            System.err.println("missing --" + k);
            System.exit(2);
        }
        return v;
    }

    private static String block(Records rec, JobContext ctx) throws Exception {
        Object[] which = {"run_id", ctx.runId(), "shard_index", ctx.shardIndex(), "attempt", ctx.attempt()};
        rec.write("block_start", which);
        Long ms = null;
        try {
            JsonElement p = JsonParser.parseString(ctx.params());
            if (p.isJsonObject()) {
                JsonElement m = p.getAsJsonObject().get("ms");
                if (m != null && m.isJsonPrimitive() && m.getAsJsonPrimitive().isNumber()) {
                    ms = m.getAsLong();
                }
            }
        } catch (RuntimeException e) {
            // not JSON: block until cancelled
        }
        try {
            if (ms == null) {
                ctx.cancellation().get();
                throw new InterruptedException("cancelled");
            }
            Thread.sleep(ms);
        } catch (InterruptedException | java.util.concurrent.ExecutionException e) {
            rec.write("cancelled", which);
            throw e;
        }
        rec.write("block_done", which);
        return "done";
    }

    private static void addItems(Worker.Builder b, Map<String, String> a, Records rec) {
        b.credit(Integer.parseInt(a.getOrDefault("credit", "64")));
        ItemHandler h = ctx -> item(rec, ctx);
        for (String name : a.getOrDefault("items", "conf.item").split(",")) {
            if (!name.isBlank()) {
                b.item(name.strip(), h);
            }
        }
    }

    private static void item(Records rec, ItemContext ctx) throws Exception {
        String payload = ctx.item().text();
        List<String> ids = new ArrayList<>();
        List<Integer> attempts = new ArrayList<>();
        List<String> keys = new ArrayList<>();
        List<String> payloads = new ArrayList<>();
        for (Item i : ctx.items()) {
            ids.add(i.id());
            attempts.add(i.attempt());
            keys.add(i.key());
            payloads.add(i.text());
        }
        if (payload.equals("hold") || (payload.equals("hold-once") && ctx.attempt() == 1)) {
            rec.write("held", "handler", ctx.handler(), "ids", ids, "attempts", attempts);
            ctx.cancellation().get(); // until a drain gives up on it (then released)
            throw new InterruptedException("released");
        }
        if (payload.startsWith("sleep:")) {
            rec.write("sleeping", "handler", ctx.handler(), "ids", ids);
            Thread.sleep(Long.parseLong(payload.substring(6)));
        }
        boolean fails = payload.equals("fail") || payload.startsWith("fail-after:");
        rec.write("item", "handler", ctx.handler(), "ids", ids, "keys", keys, "attempts", attempts,
                "payloads", payloads, "merged", ctx.merged(), "outcome", fails ? "fail" : "ack");
        if (payload.equals("fail")) {
            throw new HandlerException("planned failure");
        }
        if (payload.startsWith("fail-after:")) {
            throw new HandlerException("planned failure", Long.parseLong(payload.substring(11)));
        }
    }

    // --- produce ---------------------------------------------------------------------

    private static int produce(Map<String, String> a) throws Exception {
        Records rec = new Records(req(a, "record"));
        QueueClient.Builder qb = QueueClient.builder(req(a, "coordinator"));
        if (a.containsKey("token-file")) {
            qb.tokenFile(a.get("token-file"));
        }
        try (QueueClient q = qb.build()) {
            long in1h = 3_600_000;
            rec.write("produced", "step", "enqueue", "outcome", values(q.enqueue(List.of(
                    NewItem.of("p-1", "conf.item").key("user-p").payload("one"),
                    NewItem.of("p-2", "conf.item").key("user-p").inMs(in1h).payload("two"),
                    NewItem.of("p-3", "conf.item").inMs(in1h).payload("three")))));
            rec.write("produced", "step", "enqueue-again", "outcome", values(q.enqueue(List.of(
                    NewItem.of("p-1", "conf.item").key("user-p").payload("one")))));
            Optional<ItemView> got = q.get(ItemRef.of("p-2", "user-p"));
            rec.write("produced", "step", "get", "outcome", got.map(v -> v.state().value()).orElse("not_found"));
            rec.write("produced", "step", "reschedule", "outcome",
                    q.reschedule(ItemRef.of("p-2", "user-p"), System.currentTimeMillis()).value());
            rec.write("produced", "step", "cancel", "outcome", q.cancel(ItemRef.of("p-3")).value());
            rec.write("produced", "step", "cancel-again", "outcome", q.cancel(ItemRef.of("p-3")).value());
            Optional<ItemView> missing = q.get(ItemRef.of("nope"));
            rec.write("produced", "step", "get-missing", "outcome",
                    missing.map(v -> v.state().value()).orElse("not_found"));
            try {
                q.enqueue(List.of(NewItem.of("p-bad", "bad handler!")));
                rec.write("produced", "step", "bad-input", "outcome", "accepted");
            } catch (ChimeException e) {
                if (e.field() == null) {
                    throw e;
                }
                rec.write("produced", "step", "bad-input", "outcome", e.field());
            }
        } catch (RuntimeException e) {
            System.err.println("agent produce: " + e);
            return 1;
        }
        return 0;
    }

    private static List<String> values(List<Outcomes.Enqueue> xs) {
        List<String> out = new ArrayList<>();
        xs.forEach(x -> out.add(x.value()));
        return out;
    }

    // --- bench -----------------------------------------------------------------------

    private static int bench(Map<String, String> a) throws Exception {
        FileOutputStream out = new FileOutputStream(req(a, "record"), true);
        StringBuilder[] buf = {new StringBuilder(1 << 16)};
        Object lock = new Object();
        Worker.Builder b = Worker.builder()
                .logger(ChimeLogger.stderr(ChimeLogger.Level.INFO))
                .deliveries(req(a, "deliveries"))
                .credit(Integer.parseInt(a.getOrDefault("credit", "64")));
        if (a.containsKey("token-file")) {
            b.tokenFile(a.get("token-file"));
        }
        b.item(a.getOrDefault("handler", "bench"), ctx -> {
            long start = System.currentTimeMillis();
            StringBuilder local = new StringBuilder(48 * ctx.items().size());
            for (Item i : ctx.items()) {
                local.append(i.id()).append(' ').append(i.dueAtMs()).append(' ').append(start).append(' ')
                        .append(i.attempt()).append('\n');
            }
            synchronized (lock) {
                buf[0].append(local);
            }
        });
        Worker worker = b.build();
        Runnable flush = () -> {
            String s;
            synchronized (lock) {
                if (buf[0].length() == 0) {
                    return;
                }
                s = buf[0].toString();
                buf[0].setLength(0);
            }
            try {
                out.write(s.getBytes(StandardCharsets.UTF_8));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        };
        Thread flusher = new Thread(() -> {
            while (true) {
                try {
                    Thread.sleep(50);
                } catch (InterruptedException e) {
                    return;
                }
                flush.run();
            }
        }, "bench-flush");
        flusher.setDaemon(true);
        flusher.start();
        worker.installSignalHandlers();
        worker.start();
        try {
            worker.awaitTermination();
        } catch (RuntimeException e) {
            System.err.println("agent bench: " + e.getMessage());
            return 1;
        } finally {
            flusher.interrupt();
            flusher.join();
            flush.run();
        }
        return 0;
    }
}
