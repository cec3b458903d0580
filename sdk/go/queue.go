// queue.go owns QueueClient, the producer client of chime.v1.Queue
// (proto/chime/v1/queue.proto): enqueue batches, get, reschedule, cancel items,
// queue stats and dead letters. Any coordinator replica answers.

package chime

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	pb "github.com/chime-scheduler/chime/sdk/go/chimev1"
)

// EnqueueOutcome says what Enqueue did with one item.
type EnqueueOutcome string

// Enqueue outcomes.
const (
	// Created: stored; it will fire.
	Created EnqueueOutcome = "created"
	// Duplicate: an item with this id exists (pending, in flight or dead); nothing changed.
	Duplicate EnqueueOutcome = "duplicate"
)

// ItemState is where an item is in its life.
type ItemState string

// Item states.
const (
	// StatePending: waiting in its queue until DueScoreMs.
	StatePending ItemState = "pending"
	// StateInFlight: handed to a worker; due again at DeadlineMs unless settled.
	StateInFlight ItemState = "in_flight"
	// StateDead: out of attempts, in the dead letters since SinceMs.
	StateDead ItemState = "dead"
	// StateWaiting: due, but no worker that popped it has a subscriber for its handler.
	StateWaiting ItemState = "waiting"
)

// CancelOutcome says what Cancel did.
type CancelOutcome string

// Cancel outcomes.
const (
	// Cancelled: removed before it fired (or removed from the dead letters).
	Cancelled CancelOutcome = "cancelled"
	// CancelInFlight: already handed to a worker; it will not be retried.
	CancelInFlight CancelOutcome = "in_flight"
	// CancelNotFound: no such item (never enqueued, already fired or cancelled).
	CancelNotFound CancelOutcome = "not_found"
)

// RescheduleOutcome says what Reschedule did.
type RescheduleOutcome string

// Reschedule outcomes.
const (
	// Rescheduled: the item now fires at the new time.
	Rescheduled RescheduleOutcome = "rescheduled"
	// RescheduleInFlight: already handed to a worker; unchanged.
	RescheduleInFlight RescheduleOutcome = "in_flight"
	// RescheduleDead: dead-lettered; requeue it instead.
	RescheduleDead RescheduleOutcome = "dead"
	// RescheduleNotFound: no such item.
	RescheduleNotFound RescheduleOutcome = "not_found"
)

// NewItem is an item to deliver at DueAt, or In after the store's clock (due now
// with neither). Keep its Key: finding the item later takes the key and the id.
type NewItem struct {
	// ID is caller-chosen (1–512 bytes); enqueue is idempotent on it.
	ID string
	// Handler runs it (1–128 bytes of [A-Za-z0-9._:-]).
	Handler string
	// Key routes it (the user, say) and picks its merge group; empty: the id.
	Key string
	// DueAt is the due time (zero: use In).
	DueAt time.Time
	// In is the delay after the store's clock when DueAt is zero.
	In time.Duration
	// Payload is opaque, at most 64 KiB.
	Payload []byte
	// MaxAttempts before dead-lettering (1–100; 0: the default, 3).
	MaxAttempts int
	// MergeKey merges items of one key and handler due within the merge window.
	MergeKey string
	// Traceparent is the W3C trace context the handler's span joins (empty: none).
	Traceparent string
}

// ItemRef finds an item: its routing key (empty: the id) and its id.
type ItemRef struct {
	// Key is the routing key it was enqueued with (empty: the id).
	Key string
	// ID is the item id.
	ID string
}

// ItemView is a stored item and its state.
type ItemView struct {
	// ID, Key and Handler are the item's id, routing key and handler.
	ID, Key, Handler string
	// DueAtMs is the scheduled due time (the latest asked for), Unix ms.
	DueAtMs int64
	// Payload as enqueued.
	Payload []byte
	// MaxAttempts before dead-lettering; Attempts made so far.
	MaxAttempts, Attempts int
	// MergeKey (empty: none).
	MergeKey string
	// Queue is the queue index it lives in.
	Queue uint32
	// State is where it is.
	State ItemState
	// DueScoreMs: pending, when it becomes due; waiting, its due time.
	DueScoreMs int64
	// DeadlineMs: in flight, the visibility deadline.
	DeadlineMs int64
	// CancelledInFlight: in flight and cancelled meanwhile.
	CancelledInFlight bool
	// SinceMs: dead since.
	SinceMs int64
	// LastError is the error of its last failed attempt.
	LastError string
}

// QueueClient calls chime.v1.Queue on a coordinator. It is safe for concurrent use.
type QueueClient struct {
	cfg  *config
	conn *grpc.ClientConn
	rpc  pb.QueueClient
}

// NewQueueClient connects (lazily) to a coordinator's `http://host:port`.
// Options: WithToken / WithTokenFile, WithTLSConfig, WithDialOptions, WithLogger.
func NewQueueClient(url string, opts ...Option) (*QueueClient, error) {
	c := newConfig(opts)
	ep, err := ParseEndpoint(url)
	if err != nil {
		return nil, err
	}
	if _, err := c.token.get(); err != nil {
		return nil, err
	}
	conn, err := dial(ep, c.tlsConfig, c.dialOptions)
	if err != nil {
		return nil, err
	}
	return &QueueClient{cfg: c, conn: conn, rpc: pb.NewQueueClient(conn)}, nil
}

// Close closes the connection.
func (q *QueueClient) Close() error { return q.conn.Close() }

// call runs one unary call with the token, mapping its error to *Error.
func (q *QueueClient) call(ctx context.Context, f func(ctx context.Context, opts ...grpc.CallOption) error) error {
	ctx, err := q.cfg.token.outgoing(ctx)
	if err != nil {
		return err
	}
	var hdr, tr metadata.MD
	err = f(ctx, grpc.Header(&hdr), grpc.Trailer(&tr))
	return fromRPC(err, hdr, tr)
}

// Enqueue stores a batch (1–100,000 items) and answers one outcome per item, in
// order. One bad item refuses the whole batch: an *Error matching
// ErrInvalidArgument whose Field names it (`items[3].payload`).
func (q *QueueClient) Enqueue(ctx context.Context, items ...NewItem) ([]EnqueueOutcome, error) {
	req := &pb.EnqueueRequest{Items: make([]*pb.NewItem, len(items))}
	for i, it := range items {
		p := &pb.NewItem{
			Id: it.ID, Key: it.Key, Handler: it.Handler, InMs: it.In.Milliseconds(), Payload: it.Payload,
			MaxAttempts: uint32(it.MaxAttempts), MergeKey: it.MergeKey, Traceparent: it.Traceparent,
		}
		if !it.DueAt.IsZero() {
			p.DueAtMs = it.DueAt.UnixMilli()
		}
		req.Items[i] = p
	}
	var resp *pb.EnqueueResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		resp, err = q.rpc.Enqueue(ctx, req, o...)
		return
	})
	if err != nil {
		return nil, err
	}
	out := make([]EnqueueOutcome, len(resp.Outcomes))
	for i, o := range resp.Outcomes {
		switch o {
		case pb.EnqueueOutcome_ENQUEUE_OUTCOME_CREATED:
			out[i] = Created
		case pb.EnqueueOutcome_ENQUEUE_OUTCOME_DUPLICATE:
			out[i] = Duplicate
		default:
			return nil, fmt.Errorf("chime: unexpected %v in the answer", o)
		}
	}
	return out, nil
}

// Get answers an item with its state; an unknown item is an error matching
// ErrNotFound.
func (q *QueueClient) Get(ctx context.Context, ref ItemRef) (*ItemView, error) {
	var v *pb.ItemView
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		v, err = q.rpc.GetItem(ctx, &pb.ItemRef{Key: ref.Key, Id: ref.ID}, o...)
		return
	})
	if err != nil {
		return nil, err
	}
	return viewOf(v), nil
}

func viewOf(v *pb.ItemView) *ItemView {
	st := map[pb.ItemState]ItemState{
		pb.ItemState_ITEM_STATE_PENDING: StatePending, pb.ItemState_ITEM_STATE_IN_FLIGHT: StateInFlight,
		pb.ItemState_ITEM_STATE_DEAD: StateDead, pb.ItemState_ITEM_STATE_WAITING: StateWaiting,
	}[v.State]
	return &ItemView{
		ID: v.Id, Key: v.Key, Handler: v.Handler, DueAtMs: v.DueAtMs, Payload: v.Payload,
		MaxAttempts: int(v.MaxAttempts), Attempts: int(v.Attempts), MergeKey: v.MergeKey, Queue: v.Queue,
		State: st, DueScoreMs: v.DueScoreMs, DeadlineMs: v.DeadlineMs, CancelledInFlight: v.Cancelled,
		SinceMs: v.SinceMs, LastError: v.LastError,
	}
}

// Cancel removes a pending or dead item; an in-flight one is not retried.
func (q *QueueClient) Cancel(ctx context.Context, ref ItemRef) (CancelOutcome, error) {
	var r *pb.CancelItemResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		r, err = q.rpc.CancelItem(ctx, &pb.ItemRef{Key: ref.Key, Id: ref.ID}, o...)
		return
	})
	if err != nil {
		return "", err
	}
	switch r.Outcome {
	case pb.CancelOutcome_CANCEL_OUTCOME_CANCELLED:
		return Cancelled, nil
	case pb.CancelOutcome_CANCEL_OUTCOME_IN_FLIGHT:
		return CancelInFlight, nil
	case pb.CancelOutcome_CANCEL_OUTCOME_NOT_FOUND:
		return CancelNotFound, nil
	}
	return "", fmt.Errorf("chime: unexpected %v in the answer", r.Outcome)
}

// Reschedule moves a pending item to dueAt.
func (q *QueueClient) Reschedule(ctx context.Context, ref ItemRef, dueAt time.Time) (RescheduleOutcome, error) {
	var r *pb.RescheduleItemResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		r, err = q.rpc.RescheduleItem(ctx, &pb.RescheduleItemRequest{
			Item: &pb.ItemRef{Key: ref.Key, Id: ref.ID}, DueAtMs: dueAt.UnixMilli(),
		}, o...)
		return
	})
	if err != nil {
		return "", err
	}
	switch r.Outcome {
	case pb.RescheduleOutcome_RESCHEDULE_OUTCOME_RESCHEDULED:
		return Rescheduled, nil
	case pb.RescheduleOutcome_RESCHEDULE_OUTCOME_IN_FLIGHT:
		return RescheduleInFlight, nil
	case pb.RescheduleOutcome_RESCHEDULE_OUTCOME_DEAD:
		return RescheduleDead, nil
	case pb.RescheduleOutcome_RESCHEDULE_OUTCOME_NOT_FOUND:
		return RescheduleNotFound, nil
	}
	return "", fmt.Errorf("chime: unexpected %v in the answer", r.Outcome)
}

// Stats answers the raw per-queue counts (depth, due, in flight, dead, waiting).
func (q *QueueClient) Stats(ctx context.Context) (*pb.QueueStatsResponse, error) {
	var r *pb.QueueStatsResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		r, err = q.rpc.QueueStats(ctx, &pb.QueueStatsRequest{}, o...)
		return
	})
	return r, err
}

// DeadLetters answers up to limit dead letters (0: 100; at most 1,000).
func (q *QueueClient) DeadLetters(ctx context.Context, limit int) ([]*ItemView, error) {
	var r *pb.ListDeadLettersResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		r, err = q.rpc.ListDeadLetters(ctx, &pb.ListDeadLettersRequest{Limit: uint32(limit)}, o...)
		return
	})
	if err != nil {
		return nil, err
	}
	out := make([]*ItemView, len(r.Items))
	for i, v := range r.Items {
		out[i] = viewOf(v)
	}
	return out, nil
}

// Requeue puts the given dead letters (all of them when refs is empty) back in
// their queues, due now, with fresh attempts; it answers how many.
func (q *QueueClient) Requeue(ctx context.Context, refs ...ItemRef) (uint64, error) {
	req := &pb.RequeueDeadLettersRequest{All: len(refs) == 0}
	for _, r := range refs {
		req.Items = append(req.Items, &pb.ItemRef{Key: r.Key, Id: r.ID})
	}
	var r *pb.RequeueDeadLettersResponse
	err := q.call(ctx, func(ctx context.Context, o ...grpc.CallOption) (err error) {
		r, err = q.rpc.RequeueDeadLetters(ctx, req, o...)
		return
	})
	if err != nil {
		return 0, err
	}
	return r.Requeued, nil
}
