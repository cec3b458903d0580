// Command conformance is the Go SDK's conformance agent (contract:
// sdk/conformance/README.md), started through the `agent` script next to it:
//
//	agent run     --record FILE [--coordinator URLS] [--group G] [--worker-id ID]
//	              [--deliveries URL] [--items H1,H2] [--credit N]
//	              [--token-file FILE] [--drain-timeout-ms MS]
//	agent produce --record FILE --coordinator URL [--token-file FILE]
//	agent bench   --deliveries URL --record FILE [--token-file F] [--credit N] [--handler H]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	chime "github.com/chime-scheduler/chime/sdk/go"
)

func nowMs() int64 { return time.Now().UnixMilli() }

// records appends JSON lines, one write each (a kill -9 loses at most one).
type records struct{ f *os.File }

func openRecords(path string) *records {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		log.Fatalf("agent: %v", err)
	}
	return &records{f}
}

func (r *records) write(kind string, fields map[string]any) {
	if fields == nil {
		fields = map[string]any{}
	}
	fields["kind"] = kind
	fields["at_ms"] = nowMs()
	b, _ := json.Marshal(fields)
	_, _ = r.f.Write(append(b, '\n'))
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: agent run|produce|bench ...")
		os.Exit(2)
	}
	var code int
	switch os.Args[1] {
	case "run":
		code = cmdRun(os.Args[2:])
	case "produce":
		code = cmdProduce(os.Args[2:])
	case "bench":
		code = cmdBench(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: agent run|produce|bench ...")
		code = 2
	}
	os.Exit(code)
}

var logger = chime.NewStdLogger(log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds), chime.LevelInfo)

func cmdRun(args []string) int {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	record := fs.String("record", "", "record file")
	coordinator := fs.String("coordinator", "", "coordinator URLs")
	group := fs.String("group", "conformance", "group")
	workerID := fs.String("worker-id", "", "worker id")
	deliveries := fs.String("deliveries", "", "delivery service URL")
	itemsFlag := fs.String("items", "conf.item", "item handlers")
	credit := fs.Int("credit", 64, "credit")
	tokenFile := fs.String("token-file", "", "token file")
	drainMs := fs.Int("drain-timeout-ms", 10_000, "drain timeout")
	_ = fs.Parse(args)
	if *coordinator == "" && *deliveries == "" {
		fmt.Fprintln(os.Stderr, "run: give --coordinator, --deliveries, or both")
		return 2
	}
	rec := openRecords(*record)
	id := *workerID
	if id == "" {
		id, _ = os.Hostname()
	}
	opts := []chime.Option{
		chime.WithGroup(*group), chime.WithWorkerID(id), chime.WithCredit(*credit),
		chime.WithDrainTimeout(time.Duration(*drainMs) * time.Millisecond), chime.WithLogger(logger),
	}
	if *coordinator != "" {
		opts = append(opts, chime.WithCoordinator(*coordinator))
	}
	if *deliveries != "" {
		opts = append(opts, chime.WithDeliveries(*deliveries))
	}
	if *tokenFile != "" {
		opts = append(opts, chime.WithTokenFile(*tokenFile))
	}
	w, err := chime.NewWorker(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent: %v\n", err)
		return 1
	}
	if *coordinator != "" {
		jobHandlers(w, rec, id)
	}
	if *deliveries != "" {
		h := itemHandler(rec)
		for _, n := range strings.Split(*itemsFlag, ",") {
			if n = strings.TrimSpace(n); n != "" {
				w.HandleItem(n, h)
			}
		}
	}
	rec.write("started", map[string]any{"worker_id": id})
	if err := w.Run(context.Background()); err != nil {
		fmt.Fprintf(os.Stderr, "agent: %v\n", err)
		return 1
	}
	rec.write("drained", nil)
	return 0
}

func jobHandlers(w *chime.Worker, rec *records, workerID string) {
	w.HandleJob("conf.shard", func(ctx context.Context, j *chime.Job) (string, error) {
		rec.write("shard", map[string]any{
			"run_id": j.RunID, "job": j.Name, "shard_index": j.ShardIndex, "shard_total": j.ShardTotal,
			"attempt": j.Attempt, "params": j.Params, "shard_params": j.ShardParams, "worker_id": workerID,
		})
		line := fmt.Sprintf("shard %d/%d", j.ShardIndex, j.ShardTotal)
		j.Log(line)
		return line, nil
	})
	w.HandleJob("conf.block", func(ctx context.Context, j *chime.Job) (string, error) {
		which := func() map[string]any {
			return map[string]any{"run_id": j.RunID, "shard_index": j.ShardIndex, "attempt": j.Attempt}
		}
		rec.write("block_start", which())
		var p struct {
			Ms *int64 `json:"ms"`
		}
		var wait <-chan time.Time
		if json.Unmarshal([]byte(j.Params), &p) == nil && p.Ms != nil {
			t := time.NewTimer(time.Duration(*p.Ms) * time.Millisecond)
			defer t.Stop()
			wait = t.C
		}
		select {
		case <-ctx.Done():
			rec.write("cancelled", which())
			return "", ctx.Err()
		case <-wait:
		}
		rec.write("block_done", which())
		return "done", nil
	})
	w.HandleJob("conf.fail", func(ctx context.Context, j *chime.Job) (string, error) {
		return "", errors.New("planned failure")
	})
}

func itemHandler(rec *records) chime.ItemHandler {
	return func(ctx context.Context, d *chime.Delivery) error {
		payload := string(d.Items[0].Payload)
		ids := make([]string, len(d.Items))
		keys := make([]string, len(d.Items))
		attempts := make([]int, len(d.Items))
		payloads := make([]string, len(d.Items))
		for i, it := range d.Items {
			ids[i], keys[i], attempts[i], payloads[i] = it.ID, it.Key, it.Attempt, string(it.Payload)
		}
		if payload == "hold" || (payload == "hold-once" && d.Attempt() == 1) {
			rec.write("held", map[string]any{"handler": d.Handler, "ids": ids, "attempts": attempts})
			<-ctx.Done() // until a drain gives up on it (then released)
			return ctx.Err()
		}
		if strings.HasPrefix(payload, "sleep:") {
			ms := strings.TrimPrefix(payload, "sleep:")
			rec.write("sleeping", map[string]any{"handler": d.Handler, "ids": ids})
			n, _ := strconv.Atoi(ms)
			select {
			case <-time.After(time.Duration(n) * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		failAfter := strings.HasPrefix(payload, "fail-after:")
		after := strings.TrimPrefix(payload, "fail-after:")
		fails := payload == "fail" || failAfter
		outcome := "ack"
		if fails {
			outcome = "fail"
		}
		rec.write("item", map[string]any{
			"handler": d.Handler, "ids": ids, "keys": keys, "attempts": attempts, "payloads": payloads,
			"merged": d.Merged(), "outcome": outcome,
		})
		if payload == "fail" {
			return errors.New("planned failure")
		}
		if failAfter {
			n, _ := strconv.Atoi(after)
			return chime.RetryAfter(errors.New("planned failure"), time.Duration(n)*time.Millisecond)
		}
		return nil
	}
}

func cmdProduce(args []string) int {
	fs := flag.NewFlagSet("produce", flag.ExitOnError)
	record := fs.String("record", "", "record file")
	coordinator := fs.String("coordinator", "", "coordinator URL")
	tokenFile := fs.String("token-file", "", "token file")
	_ = fs.Parse(args)
	rec := openRecords(*record)
	opts := []chime.Option{chime.WithLogger(logger)}
	if *tokenFile != "" {
		opts = append(opts, chime.WithTokenFile(*tokenFile))
	}
	q, err := chime.NewQueueClient(*coordinator, opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent produce: %v\n", err)
		return 1
	}
	defer q.Close()
	if err := produce(rec, q); err != nil {
		fmt.Fprintf(os.Stderr, "agent produce: %v\n", err)
		return 1
	}
	return 0
}

func produce(rec *records, q *chime.QueueClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	step := func(name string, outcome any) {
		rec.write("produced", map[string]any{"step": name, "outcome": outcome})
	}
	out, err := q.Enqueue(ctx,
		chime.NewItem{ID: "p-1", Handler: "conf.item", Key: "user-p", Payload: []byte("one")},
		chime.NewItem{ID: "p-2", Handler: "conf.item", Key: "user-p", In: time.Hour, Payload: []byte("two")},
		chime.NewItem{ID: "p-3", Handler: "conf.item", In: time.Hour, Payload: []byte("three")},
	)
	if err != nil {
		return err
	}
	step("enqueue", out)
	if out, err = q.Enqueue(ctx, chime.NewItem{ID: "p-1", Handler: "conf.item", Key: "user-p", Payload: []byte("one")}); err != nil {
		return err
	}
	step("enqueue-again", out)
	v, err := q.Get(ctx, chime.ItemRef{Key: "user-p", ID: "p-2"})
	if err != nil {
		return err
	}
	step("get", v.State)
	r, err := q.Reschedule(ctx, chime.ItemRef{Key: "user-p", ID: "p-2"}, time.Now())
	if err != nil {
		return err
	}
	step("reschedule", r)
	for _, name := range []string{"cancel", "cancel-again"} {
		c, err := q.Cancel(ctx, chime.ItemRef{ID: "p-3"})
		if err != nil {
			return err
		}
		step(name, c)
	}
	if _, err := q.Get(ctx, chime.ItemRef{ID: "nope"}); errors.Is(err, chime.ErrNotFound) {
		step("get-missing", "not_found")
	} else if err != nil {
		return err
	} else {
		step("get-missing", "found")
	}
	_, err = q.Enqueue(ctx, chime.NewItem{ID: "p-bad", Handler: "bad handler!"})
	var ce *chime.Error
	switch {
	case err == nil:
		step("bad-input", "accepted")
	case errors.Is(err, chime.ErrInvalidArgument) && errors.As(err, &ce):
		step("bad-input", ce.Field)
	default:
		return err
	}
	return nil
}

func cmdBench(args []string) int {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	deliveries := fs.String("deliveries", "", "delivery service URL")
	record := fs.String("record", "", "record file")
	tokenFile := fs.String("token-file", "", "token file")
	credit := fs.Int("credit", 64, "credit")
	handler := fs.String("handler", "bench", "handler")
	_ = fs.Parse(args)
	f, err := os.OpenFile(*record, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent bench: %v\n", err)
		return 1
	}
	defer f.Close()
	var mu sync.Mutex
	buf := make([]byte, 0, 1<<20)
	flush := func() {
		mu.Lock()
		b := buf
		buf = make([]byte, 0, 1<<20)
		mu.Unlock()
		if len(b) > 0 {
			_, _ = f.Write(b)
		}
	}
	opts := []chime.Option{chime.WithDeliveries(*deliveries), chime.WithCredit(*credit), chime.WithLogger(logger),
		chime.WithSignals(false)}
	if *tokenFile != "" {
		opts = append(opts, chime.WithTokenFile(*tokenFile))
	}
	w, err := chime.NewWorker(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent bench: %v\n", err)
		return 1
	}
	w.HandleItem(*handler, func(ctx context.Context, d *chime.Delivery) error {
		start := nowMs()
		mu.Lock()
		for _, it := range d.Items {
			buf = append(buf, it.ID...)
			buf = append(buf, ' ')
			buf = strconv.AppendInt(buf, it.DueAtMs, 10)
			buf = append(buf, ' ')
			buf = strconv.AppendInt(buf, start, 10)
			buf = append(buf, ' ')
			buf = strconv.AppendInt(buf, int64(it.Attempt), 10)
			buf = append(buf, '\n')
		}
		mu.Unlock()
		return nil
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(50 * time.Millisecond) // the contract asks for at least every 100 ms
		defer t.Stop()
		for {
			select {
			case <-t.C:
				flush()
			case <-done:
				return
			}
		}
	}()
	err = w.Run(ctx)
	close(done)
	flush()
	if err != nil {
		fmt.Fprintf(os.Stderr, "agent bench: %v\n", err)
		return 1
	}
	return 0
}
