// items.go owns the item side: the delayed items a chime worker hands over its
// delivery service (chime.v1.Deliveries/Subscribe, see delivery.proto). Each
// delivery runs its handler in its own goroutine (credit bounds how many);
// settlements are batched: one Settle per 5 ms, or at once when a quarter of the
// credit (at most 512) is waiting. A drain sends Drain, lets handlers finish within
// the drain timeout, then cancels their contexts and releases what is left.

package chime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/chime-scheduler/chime/sdk/go/chimev1"
)

const (
	settleFlush    = 5 * time.Millisecond
	settleMaxBatch = 512
)

// ItemHandler runs one delivery. Returning nil acks it (the items are deleted);
// an error fails it (retried after the chime worker's backoff, or after the delay
// of RetryAfter, and dead-lettered when out of attempts). ctx is cancelled when
// the SDK gives up on the handler (the drain timeout passed: the delivery is then
// released, handed back unprocessed, whatever the handler returns; or the stream
// to the chime worker broke).
type ItemHandler func(ctx context.Context, d *Delivery) error

// Item is one delayed item of a delivery.
type Item struct {
	// ID is the item id.
	ID string
	// Key is the routing key (the id when it was enqueued without one).
	Key string
	// DueAtMs is when it was due, Unix ms.
	DueAtMs int64
	// Payload is the payload as the producer gave it.
	Payload []byte
	// Attempt is this attempt, 1-based.
	Attempt int
	// MaxAttempts is how many attempts it has before it is dead-lettered.
	MaxAttempts int
	// MergeKey is the merge key (empty: none).
	MergeKey string
}

// Delivery is one handler call: one item, or several merged items (same routing
// key, handler and merge key, due within the merge window).
type Delivery struct {
	// ID names the delivery on its stream.
	ID uint64
	// Handler is the handler it is for.
	Handler string
	// Queue is the queue the items came from.
	Queue uint32
	// Items are the items, earliest due first (more than one when merged).
	Items []Item
	// SettleDeadlineMs: settle or Extend by this instant (chime worker clock, Unix ms).
	SettleDeadlineMs int64
	// Traceparent is the W3C trace context of the chime worker's span of this
	// delivery: make the handler's span its child. Empty when none is sampled.
	Traceparent string
	// WorkerID is the id of the chime worker that delivered it.
	WorkerID string

	st       *subStream
	cancel   context.CancelFunc
	released atomic.Bool
}

// Attempt is the attempt of the first item, 1-based.
func (d *Delivery) Attempt() int { return d.Items[0].Attempt }

// Merged is true when several items were merged into this delivery.
func (d *Delivery) Merged() bool { return len(d.Items) > 1 }

// Extend asks for more time (1 ms to 1 h from now; 0: the subscription's settle
// timeout) before this delivery counts as a failed attempt. It answers false when
// the delivery is no longer held (settled, or its stream is gone).
func (d *Delivery) Extend(by time.Duration) bool {
	ms := by.Milliseconds()
	if ms < 0 || ms > 3_600_000 {
		return false
	}
	st := d.st
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed || st.held[d.ID] != d {
		return false
	}
	st.q.push(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Extend{Extend: &pb.Extend{
		DeliveryIds: []uint64{d.ID}, ExtendMs: uint32(ms),
	}}}, false)
	return true
}

// subStream is one Subscribe stream: what it holds, its settlements, its writer.
type subStream struct {
	q         *outq[*pb.SubscribeRequest]
	threshold int
	workerID  string

	mu       sync.Mutex
	held     map[uint64]*Delivery
	closed   bool
	draining bool
	drained  bool
	acks     []uint64
	failures []*pb.Failure
	releases []uint64
	timer    *time.Timer
	changed  chan struct{} // signalled while draining when held, arrivals or Drained change
}

func (st *subStream) signal() {
	select {
	case st.changed <- struct{}{}:
	default:
	}
}

type settleKind int

const (
	settleAck settleKind = iota
	settleFail
	settleRelease
)

func (st *subStream) settle(d *Delivery, kind settleKind, errText string, retryAfter time.Duration) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed || st.held[d.ID] != d {
		return
	}
	delete(st.held, d.ID)
	switch kind {
	case settleAck:
		st.acks = append(st.acks, d.ID)
	case settleFail:
		f := &pb.Failure{DeliveryId: d.ID, Error: cut(errText, maxLogBytes)}
		if retryAfter > 0 {
			ms := uint64(retryAfter.Milliseconds())
			f.RetryAfterMs = &ms
		}
		st.failures = append(st.failures, f)
	case settleRelease:
		st.releases = append(st.releases, d.ID)
	}
	if st.draining {
		st.signal()
	}
	if len(st.acks)+len(st.failures)+len(st.releases) >= st.threshold {
		st.flushLocked()
	} else if st.timer == nil {
		st.timer = time.AfterFunc(settleFlush, st.flush)
	}
}

func (st *subStream) flush() {
	st.mu.Lock()
	st.flushLocked()
	st.mu.Unlock()
}

func (st *subStream) flushLocked() {
	if st.timer != nil {
		st.timer.Stop()
		st.timer = nil
	}
	if st.closed || len(st.acks)+len(st.failures)+len(st.releases) == 0 {
		return
	}
	st.q.push(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Settle{Settle: &pb.Settle{
		Acks: st.acks, Failures: st.failures, Releases: st.releases,
	}}}, false)
	st.acks, st.failures, st.releases = nil, nil, nil
}

// close forgets the stream: held handlers are cancelled, their settlements would
// mean nothing elsewhere.
func (st *subStream) close() {
	st.mu.Lock()
	st.closed = true
	held := st.held
	st.held = map[uint64]*Delivery{}
	if st.timer != nil {
		st.timer.Stop()
		st.timer = nil
	}
	st.acks, st.failures, st.releases = nil, nil, nil
	st.mu.Unlock()
	for _, d := range held {
		d.cancel()
	}
	st.q.close()
}

// subscriber is the item side.
type subscriber struct {
	handlers map[string]ItemHandler
	cfg      *config
	log      logf

	stopping chan struct{}
	stopOnce sync.Once
	conn     *grpc.ClientConn
}

func newSubscriber(handlers map[string]ItemHandler, cfg *config) *subscriber {
	return &subscriber{handlers: handlers, cfg: cfg, log: logf{cfg.logger}, stopping: make(chan struct{})}
}

func (s *subscriber) stop() { s.stopOnce.Do(func() { close(s.stopping) }) }

func (s *subscriber) isStopping() bool {
	select {
	case <-s.stopping:
		return true
	default:
		return false
	}
}

// run subscribes (again after every break, with a backoff) until stop, then
// drains; it answers an error only for a subscription the chime worker refuses as
// invalid.
func (s *subscriber) run() error {
	c, err := dial(s.cfg.deliveries, s.cfg.tlsConfig, s.cfg.dialOptions)
	if err != nil {
		return err
	}
	s.conn = c
	defer c.Close()
	bo := newBackoff()
	for !s.isStopping() {
		fatal, done := s.connect(bo)
		if fatal != nil {
			return fatal
		}
		if done {
			return nil
		}
		t := time.NewTimer(bo.nextDelay())
		select {
		case <-t.C:
		case <-s.stopping:
			t.Stop()
		}
	}
	return nil
}

type subAnswer struct {
	m   *pb.SubscribeResponse
	err error
}

func (s *subscriber) connect(bo *reconnectBackoff) (fatal error, done bool) {
	cfg := s.cfg
	ep := cfg.deliveries
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx, err := cfg.token.outgoing(ctx)
	if err != nil {
		s.log.error("cannot read the token: %v", err)
		return nil, false
	}
	stream, err := pb.NewDeliveriesClient(s.conn).Subscribe(ctx)
	if err != nil {
		return s.failed(ep, err, nil), false
	}
	handlers := make([]string, 0, len(s.handlers))
	for h := range s.handlers {
		handlers = append(handlers, h)
	}
	sort.Strings(handlers)
	_ = stream.Send(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Subscribe{Subscribe: &pb.Subscribe{
		Handlers: handlers, Credit: uint32(cfg.credit), Subscriber: cut(cfg.subscriber, 253),
		SettleTimeoutMs: uint32(cfg.settleTimeout.Milliseconds()),
	}}})
	first := make(chan subAnswer, 1)
	go func() {
		m, err := stream.Recv()
		first <- subAnswer{m, err}
	}()
	var ans subAnswer
	select {
	case ans = <-first:
	case <-s.stopping:
		return nil, true // nothing held, nothing to settle
	}
	if ans.err != nil {
		if ans.err == io.EOF {
			s.log.warn("chime worker %s closed the stream without answering", ep.URL())
			return nil, false
		}
		return s.failed(ep, ans.err, stream), false
	}
	sub := ans.m.GetSubscribed()
	if sub == nil {
		s.log.warn("chime worker %s answered %T to Subscribe", ep.URL(), ans.m.Kind)
		return nil, false
	}
	bo.reset()
	s.log.info("subscribed to chime worker %s (%s, family %s) for %v with credit %d",
		ep.URL(), sub.WorkerId, sub.Family, handlers, sub.Credit)
	threshold := cfg.credit / 4
	if threshold > settleMaxBatch {
		threshold = settleMaxBatch
	}
	if threshold < 1 {
		threshold = 1
	}
	st := &subStream{
		q: newOutq[*pb.SubscribeRequest](), threshold: threshold, workerID: sub.WorkerId,
		held: make(map[uint64]*Delivery, cfg.credit), changed: make(chan struct{}, 1),
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() { _ = st.q.write(stream.Send, stream.CloseSend, stop) }()
	readerErr := make(chan error, 1)
	go func() { readerErr <- s.read(stream, st) }()
	select {
	case err := <-readerErr:
		st.close()
		if err == nil {
			s.log.warn("delivery stream from %s ended; subscribing again", ep.URL())
		} else {
			s.log.warn("delivery stream from %s broke (%v); subscribing again", ep.URL(), status.Code(err))
		}
		return nil, false
	case <-s.stopping:
		s.drain(st, readerErr)
		return nil, true
	}
}

func (s *subscriber) failed(ep Endpoint, err error, stream grpc.ClientStream) error {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.Unauthenticated:
		s.log.error("chime worker %s refused the token: UNAUTHENTICATED: %s", ep.URL(), st.Message())
	case codes.InvalidArgument:
		var hdr, tr metadata.MD
		if stream != nil {
			hdr, _ = stream.Header()
			tr = stream.Trailer()
		}
		e := fromRPC(err, hdr, tr)
		s.log.error("chime worker %s refused the subscription: %v", ep.URL(), e)
		return e
	case codes.Unavailable:
		s.log.debug("cannot reach chime worker %s: %s", ep.URL(), st.Message())
	default:
		s.log.warn("subscription to chime worker %s failed: %s %s", ep.URL(), st.Code(), st.Message())
	}
	return nil
}

func (s *subscriber) read(stream pb.Deliveries_SubscribeClient, st *subStream) error {
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch k := m.Kind.(type) {
		case *pb.SubscribeResponse_Deliver:
			s.dispatch(st, k.Deliver.Deliveries)
		case *pb.SubscribeResponse_Drained:
			st.mu.Lock()
			st.drained = true
			st.mu.Unlock()
			st.signal()
		case *pb.SubscribeResponse_Closing:
			s.log.info("chime worker is draining (%s); settlements accepted until %d", k.Closing.Reason, k.Closing.DeadlineMs)
		case *pb.SubscribeResponse_Refused:
			s.log.debug("chime worker refused settling %v: %s", k.Refused.DeliveryIds, k.Refused.Reason)
		}
	}
}

func (s *subscriber) dispatch(st *subStream, ds []*pb.Delivery) {
	for _, pd := range ds {
		items := make([]Item, len(pd.Items))
		for i, it := range pd.Items {
			items[i] = Item{
				ID: it.Id, Key: it.Key, DueAtMs: it.DueAtMs, Payload: it.Payload,
				Attempt: int(it.Attempt), MaxAttempts: int(it.MaxAttempts), MergeKey: it.MergeKey,
			}
		}
		if len(items) == 0 {
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		d := &Delivery{
			ID: pd.DeliveryId, Handler: pd.Handler, Queue: pd.Queue, Items: items,
			SettleDeadlineMs: pd.SettleDeadlineMs, Traceparent: pd.Traceparent, WorkerID: st.workerID,
			st: st, cancel: cancel,
		}
		st.mu.Lock()
		if st.closed {
			st.mu.Unlock()
			cancel()
			return
		}
		st.held[d.ID] = d
		if st.draining {
			st.signal()
		}
		st.mu.Unlock()
		go s.runOne(ctx, d)
	}
}

func (s *subscriber) runOne(ctx context.Context, d *Delivery) {
	defer d.cancel()
	h := s.handlers[d.Handler]
	if h == nil {
		d.st.settle(d, settleFail, fmt.Sprintf("no item handler %q in this subscriber", d.Handler), 0)
		return
	}
	err := callItem(ctx, h, d)
	switch {
	case d.released.Load():
		d.st.settle(d, settleRelease, "", 0)
	case err == nil:
		d.st.settle(d, settleAck, "", 0)
	default:
		var he *HandlerError
		if errors.As(err, &he) {
			d.st.settle(d, settleFail, he.Error(), he.RetryAfter)
			return
		}
		s.log.warn("item handler %s failed (delivery %d): %v", d.Handler, d.ID, err)
		d.st.settle(d, settleFail, err.Error(), 0)
	}
}

// callItem runs h, turning a panic into an error.
func callItem(ctx context.Context, h ItemHandler, d *Delivery) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return h(ctx, d)
}

// drain sends Drain, lets the held deliveries (and those the chime worker sent
// before it read the Drain) finish within the drain timeout, releases the rest,
// then half-closes and waits for the chime worker to end the stream.
func (s *subscriber) drain(st *subStream, readerErr chan error) {
	st.mu.Lock()
	st.draining = true
	n := len(st.held)
	st.q.push(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Drain{Drain: &pb.Drain{}}}, false)
	st.mu.Unlock()
	if n > 0 {
		s.log.info("draining: %d deliveries running", n)
	}
	timer := time.NewTimer(s.cfg.drainTimeout)
	defer timer.Stop()
loop:
	for {
		st.mu.Lock()
		finished := st.drained && len(st.held) == 0
		held := len(st.held)
		st.mu.Unlock()
		if finished {
			break
		}
		select {
		case <-st.changed:
		case <-readerErr:
			st.close()
			return
		case <-timer.C:
			if held > 0 {
				s.giveUp(st)
			}
			break loop
		}
	}
	st.flush()
	st.q.close()
	select {
	case <-readerErr:
	case <-time.After(5 * time.Second):
		s.log.warn("delivery stream did not end 5 s after the drain; closing it")
	}
	st.close()
}

// giveUp cancels the handlers still running at the drain timeout (their
// deliveries are released as they return) and releases the rest after a grace.
func (s *subscriber) giveUp(st *subStream) {
	st.mu.Lock()
	held := make([]*Delivery, 0, len(st.held))
	for _, d := range st.held {
		held = append(held, d)
	}
	st.mu.Unlock()
	s.log.warn("drain timeout: releasing %d deliveries", len(held))
	for _, d := range held {
		d.released.Store(true)
		d.cancel()
	}
	grace := time.NewTimer(cancelGrace)
	defer grace.Stop()
	for {
		st.mu.Lock()
		n := len(st.held)
		st.mu.Unlock()
		if n == 0 {
			return
		}
		select {
		case <-st.changed:
		case <-grace.C:
			for _, d := range held {
				st.settle(d, settleRelease, "", 0) // a handler that ignores its cancellation
			}
			return
		}
	}
}
