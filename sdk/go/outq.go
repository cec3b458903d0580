// outq.go owns outq, the send queue between the goroutines that produce a
// stream's messages and the one goroutine that writes them (gRPC streams allow
// one sender at a time).

package chime

import "sync"

// outq is a FIFO of messages with a close marker. Its length is bounded by its
// producers: credit bounds settlements, capacity bounds job results, and lossy
// messages (run log lines) are refused past maxLossy.
type outq[T any] struct {
	mu     sync.Mutex
	items  []T
	closed bool // no more pushes; the writer half-closes after the last item
	wake   chan struct{}
}

// maxLossy is how many messages may wait before lossy pushes are dropped.
const maxLossy = 10_000

func newOutq[T any]() *outq[T] { return &outq[T]{wake: make(chan struct{}, 1)} }

// push appends m (false when closed, or when lossy and the queue is long).
func (q *outq[T]) push(m T, lossy bool) bool {
	q.mu.Lock()
	if q.closed || (lossy && len(q.items) >= maxLossy) {
		q.mu.Unlock()
		return false
	}
	q.items = append(q.items, m)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// close marks the end: the writer sends what is queued, then half-closes.
func (q *outq[T]) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take answers every queued message (nil when none) and whether the queue is
// closed and now empty.
func (q *outq[T]) take(buf []T) ([]T, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	buf = append(buf[:0], q.items...)
	var zero T
	for i := range q.items {
		q.items[i] = zero
	}
	q.items = q.items[:0]
	return buf, q.closed && len(buf) == 0
}

// write sends everything pushed with send until the queue is closed (then calls
// closeSend) or done is closed or a send fails.
func (q *outq[T]) write(send func(T) error, closeSend func() error, done <-chan struct{}) error {
	var buf []T
	for {
		var end bool
		buf, end = q.take(buf)
		if end {
			return closeSend()
		}
		for _, m := range buf {
			if err := send(m); err != nil {
				return err
			}
		}
		if len(buf) > 0 {
			continue
		}
		select {
		case <-q.wake:
		case <-done:
			return nil
		}
	}
}
