// Command quickstart schedules three reminders through the coordinator, receives
// them through a chime worker's delivery service, prints them, and exits.
//
//	cargo run -p chime -- dev          # in another terminal
//	sdk/go/scripts/example quickstart  # or: go run ./examples/quickstart
//
// Against `chime dev` the defaults fit (coordinator 127.0.0.1:7070, delivery
// service 127.0.0.1:7071, no token); elsewhere pass -coordinator, -deliveries and
// the token files. Exits 0 once every reminder arrived, 1 if they did not all
// arrive within -timeout.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	chime "github.com/chime-scheduler/chime/sdk/go"
)

func clock(ms int64) string { return time.UnixMilli(ms).Format("15:04:05.000") }

func main() {
	coordinator := flag.String("coordinator", "http://127.0.0.1:7070", "coordinator (producer side)")
	deliveries := flag.String("deliveries", "http://127.0.0.1:7071", "delivery service of a chime worker")
	tokenFile := flag.String("token-file", "", "token of the delivery service (a worker token)")
	producerTokenFile := flag.String("producer-token-file", "", "token of the coordinator's queue (a producer token)")
	timeout := flag.Duration("timeout", 30*time.Second, "give up after")
	flag.Parse()
	os.Exit(run(*coordinator, *deliveries, *tokenFile, *producerTokenFile, *timeout))
}

func run(coordinator, deliveries, tokenFile, producerTokenFile string, timeout time.Duration) int {
	var b [4]byte
	_, _ = rand.Read(b[:])
	runID := hex.EncodeToString(b[:]) // fresh ids on every run (an existing id is a duplicate)

	opts := []chime.Option{chime.WithDeliveries(deliveries), chime.WithCredit(16)}
	if tokenFile != "" {
		opts = append(opts, chime.WithTokenFile(tokenFile))
	}
	w, err := chime.NewWorker(opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var mu sync.Mutex
	expected := map[string]bool{}
	allSeen := make(chan struct{})
	w.HandleItem("quickstart.remind", func(ctx context.Context, d *chime.Delivery) error {
		now := time.Now().UnixMilli()
		mu.Lock()
		defer mu.Unlock()
		for _, it := range d.Items {
			lag := now - it.DueAtMs
			when := fmt.Sprintf("%d ms after due", lag)
			if lag < 0 {
				when = fmt.Sprintf("%d ms early: merged, it fires with the earliest", -lag)
			}
			fmt.Printf("[%s] got %s for %s: %q (attempt %d, %s)\n", clock(now), it.ID, it.Key, it.Payload, it.Attempt, when)
			delete(expected, it.ID)
		}
		if d.Merged() {
			fmt.Printf("           ^ %d reminders of one user merged into one delivery\n", len(d.Items))
		}
		if len(expected) == 0 {
			select {
			case <-allSeen:
			default:
				close(allSeen)
			}
		}
		return nil // ack
	})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }() // subscribes now; drains when ctx ends

	var qopts []chime.Option
	if producerTokenFile != "" {
		qopts = append(qopts, chime.WithTokenFile(producerTokenFile))
	}
	q, err := chime.NewQueueClient(coordinator, qopts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer q.Close()
	items := []chime.NewItem{
		{ID: "hello-" + runID + "-1", Handler: "quickstart.remind", Key: "user-42", In: time.Second,
			Payload: []byte("coupon 7 opens soon")},
		// Same key and merge key, due within the merge window: one delivery.
		{ID: "hello-" + runID + "-2", Handler: "quickstart.remind", Key: "user-7", MergeKey: "coupons",
			In: 2 * time.Second, Payload: []byte("coupon 8 opens soon")},
		{ID: "hello-" + runID + "-3", Handler: "quickstart.remind", Key: "user-7", MergeKey: "coupons",
			In: 2300 * time.Millisecond, Payload: []byte("coupon 9 opens soon")},
	}
	mu.Lock()
	for _, it := range items {
		expected[it.ID] = true
	}
	mu.Unlock()
	callCtx, callCancel := context.WithTimeout(ctx, 10*time.Second)
	outcomes, err := q.Enqueue(callCtx, items...)
	callCancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "enqueue:", err)
		return 1
	}
	fmt.Printf("[%s] enqueued %d reminders: %v\n", clock(time.Now().UnixMilli()), len(items), outcomes)

	code := 0
	select {
	case <-allSeen:
		fmt.Println("every reminder arrived; bye")
	case <-time.After(timeout):
		mu.Lock()
		fmt.Fprintf(os.Stderr, "not delivered within %v: %v\n", timeout, expected)
		mu.Unlock()
		code = 1
	case err := <-done:
		fmt.Fprintln(os.Stderr, "worker stopped:", err)
		return 1
	}
	cancel()
	if err := <-done; err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return code
}
