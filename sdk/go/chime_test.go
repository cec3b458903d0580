// chime_test.go: fast offline unit tests of the SDK's pure parts (endpoints,
// tokens, errors, the send queue, options) and of a job session and a
// subscription against in-process fake servers.

package chime

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/chime-scheduler/chime/sdk/go/chimev1"
)

func TestParseEndpoint(t *testing.T) {
	for in, want := range map[string]Endpoint{
		"http://127.0.0.1:7070":    {Target: "127.0.0.1:7070"},
		"https://chime.local:443/": {Target: "chime.local:443", Secure: true},
		" localhost:1 ":            {Target: "localhost:1"},
	} {
		got, err := ParseEndpoint(in)
		if err != nil || got != want {
			t.Errorf("ParseEndpoint(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "grpc://x:1", "http://x:1/path"} {
		if _, err := ParseEndpoint(bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ParseEndpoint(%q) = %v; want ErrInvalidArgument", bad, err)
		}
	}
	eps, err := parseEndpoints([]string{"http://a:1,http://b:2", ""})
	if err != nil || len(eps) != 2 || eps[1].Target != "b:2" {
		t.Errorf("parseEndpoints = %v, %v", eps, err)
	}
}

func TestRedirectTarget(t *testing.T) {
	cur := Endpoint{Target: "a:1", Secure: true}
	if got := redirectTarget(cur, "b:2"); got != (Endpoint{Target: "b:2", Secure: true}) {
		t.Errorf("bare host:port keeps the scheme: %v", got)
	}
	if got := redirectTarget(cur, "http://c:3"); got != (Endpoint{Target: "c:3"}) {
		t.Errorf("a URL is taken as given: %v", got)
	}
}

func TestTokenFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(p, []byte("\n  secret-token-0123456789 \nother\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, err := token{file: p}.outgoing(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	md, _ := metadata.FromOutgoingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer secret-token-0123456789" {
		t.Errorf("authorization = %v", got)
	}
	// A coordinator's token file works as it is: comments skipped, the first field.
	if err := os.WriteFile(p, []byte("# ci\n\nnamed-token-0123456789 ci-deployer role=operator\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := (token{file: p}).get(); err != nil || got != "named-token-0123456789" {
		t.Errorf("named line: %q %v", got, err)
	}
	if _, err := (token{file: filepath.Join(t.TempDir(), "missing")}).get(); err == nil {
		t.Error("a missing token file must fail")
	}
	ctx, _ = token{}.outgoing(context.Background())
	if _, ok := metadata.FromOutgoingContext(ctx); ok {
		t.Error("no token, no metadata")
	}
}

func TestErrors(t *testing.T) {
	err := fromRPC(status.Error(codes.InvalidArgument, "items[0].handler: bad"), nil,
		metadata.Pairs(FieldMetadata, "items[0].handler"))
	var e *Error
	if !errors.Is(err, ErrInvalidArgument) || !errors.As(err, &e) || e.Field != "items[0].handler" {
		t.Errorf("fromRPC = %#v", err)
	}
	if errors.Is(err, ErrNotFound) {
		t.Error("InvalidArgument is not NotFound")
	}
	if !errors.Is(fromRPC(status.Error(codes.Unauthenticated, "no"), nil, nil), ErrUnauthenticated) {
		t.Error("Unauthenticated")
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Error("GRPCStatus keeps the code")
	}
	var he *HandlerError
	if r := RetryAfter(errors.New("x"), 48*time.Hour); !errors.As(r, &he) || he.RetryAfter != 24*time.Hour {
		t.Errorf("RetryAfter caps at 24 h: %v", r)
	}
}

func TestCut(t *testing.T) {
	if got := cut("héllo", 2); got != "h" {
		t.Errorf("cut splits no rune: %q", got)
	}
	if got := cut("abc", 5); got != "abc" {
		t.Errorf("cut = %q", got)
	}
}

func TestOutq(t *testing.T) {
	q := newOutq[int]()
	for i := 0; i < 3; i++ {
		q.push(i, false)
	}
	for i := 0; i < maxLossy; i++ {
		q.push(i, true)
	}
	if q.push(0, true) {
		t.Error("lossy pushes stop at maxLossy")
	}
	q.close()
	if q.push(1, false) {
		t.Error("closed queue takes nothing")
	}
	var got []int
	closed := false
	err := q.write(func(m int) error { got = append(got, m); return nil }, func() error { closed = true; return nil }, nil)
	if err != nil || !closed || len(got) != 3+maxLossy-3 {
		t.Errorf("write: err %v closed %v n %d", err, closed, len(got))
	}
}

func TestNewWorkerValidates(t *testing.T) {
	t.Setenv("CHIME_DELIVERIES", "")
	if _, err := NewWorker(); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("no endpoint: %v", err)
	}
	var e *Error
	if _, err := NewWorker(WithDeliveries("http://x:1"), WithCredit(0)); !errors.As(err, &e) || e.Field != "credit" {
		t.Errorf("credit 0: %v", err)
	}
	w, err := NewWorker(WithCoordinator("http://x:1"), WithWorkerID("w1"))
	if err != nil || w.WorkerID() != "w1" {
		t.Fatalf("NewWorker: %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Error("an item handler without deliveries panics")
		}
	}()
	w.HandleItem("x", func(context.Context, *Delivery) error { return nil })
}

// --- a fake coordinator and a fake chime worker ----------------------------------

type fakeGateway struct {
	pb.UnimplementedWorkerGatewayServer
	mu      sync.Mutex
	results []*pb.RunResult
	tokens  []string
	cancel  bool
}

func (g *fakeGateway) Session(s pb.WorkerGateway_SessionServer) error {
	md, _ := metadata.FromIncomingContext(s.Context())
	g.mu.Lock()
	g.tokens = append(g.tokens, md.Get("authorization")...)
	g.mu.Unlock()
	m, err := s.Recv()
	if err != nil || m.GetRegister() == nil {
		return status.Error(codes.InvalidArgument, "register first")
	}
	if m.GetRegister().Capacity < 1 {
		return status.Error(codes.InvalidArgument, "register.capacity")
	}
	_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_Registered{Registered: &pb.Registered{
		WorkerId: m.GetRegister().WorkerId, HeartbeatIntervalMs: 200}}})
	run := &pb.RunRef{RunId: "r1", ShardIndex: 0, Attempt: 1}
	_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_Assign{Assign: &pb.Assign{
		Run: run, Handler: "ok", ShardTotal: 2, StartBySessionMs: 60_000}}})
	_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_Assign{Assign: &pb.Assign{
		Run: &pb.RunRef{RunId: "r2", Attempt: 1}, Handler: "block"}}})
	time.Sleep(100 * time.Millisecond)
	// An assignment read past its start-by time is never started.
	_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_Assign{Assign: &pb.Assign{
		Run: &pb.RunRef{RunId: "late", Attempt: 1}, Handler: "ok", StartBySessionMs: 1}}})
	_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_Cancel{Cancel: &pb.Cancel{
		Run: &pb.RunRef{RunId: "r2", Attempt: 1}, Reason: "killed"}}})
	for {
		m, err := s.Recv()
		if err != nil {
			return nil
		}
		if r := m.GetRunResult(); r != nil {
			g.mu.Lock()
			g.results = append(g.results, r)
			g.mu.Unlock()
		}
		if m.GetDraining() != nil {
			_ = s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_SessionEnded{SessionEnded: &pb.SessionEnded{
				Reason: pb.SessionEndReason_SESSION_END_REASON_DRAINED}}})
			return nil
		}
	}
}

func serve(t *testing.T, register func(*grpc.Server)) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	register(srv)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return "http://" + lis.Addr().String()
}

func TestJobSession(t *testing.T) {
	g := &fakeGateway{}
	url := serve(t, func(s *grpc.Server) { pb.RegisterWorkerGatewayServer(s, g) })
	w, err := NewWorker(WithCoordinator(url), WithToken("tok-0123456789abcdef"), WithSignals(false),
		WithLogger(DiscardLogger), WithDrainTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan string, 4)
	w.HandleJob("ok", func(ctx context.Context, j *Job) (string, error) {
		ran <- j.RunID
		j.Logf("shard %d/%d", j.ShardIndex, j.ShardTotal)
		return "fine", nil
	})
	w.HandleJob("block", func(ctx context.Context, j *Job) (string, error) {
		<-ctx.Done()
		if j.CancelReason() != "killed" {
			t.Errorf("reason %q", j.CancelReason())
		}
		return "", ctx.Err()
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	deadline := time.After(5 * time.Second)
	for {
		g.mu.Lock()
		n := len(g.results)
		g.mu.Unlock()
		if n >= 2 {
			break
		}
		select {
		case <-deadline:
			t.Fatal("no results")
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if r := <-ran; r != "r1" {
		t.Errorf("ran %s", r)
	}
	if len(ran) != 0 {
		t.Error("the late assignment must not start")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	got := map[string]pb.RunStatus{}
	for _, r := range g.results {
		got[r.Run.RunId] = r.Status
	}
	if got["r1"] != pb.RunStatus_RUN_STATUS_SUCCEEDED || got["r2"] != pb.RunStatus_RUN_STATUS_CANCELLED || len(got) != 2 {
		t.Errorf("results %v", got)
	}
	if len(g.tokens) == 0 || g.tokens[0] != "Bearer tok-0123456789abcdef" {
		t.Errorf("tokens %v", g.tokens)
	}
}

type fakeDeliveries struct {
	pb.UnimplementedDeliveriesServer
	mu      sync.Mutex
	settled *pb.Settle
}

func (f *fakeDeliveries) Subscribe(s pb.Deliveries_SubscribeServer) error {
	m, err := s.Recv()
	if err != nil {
		return err
	}
	if m.GetSubscribe().Credit > 10_000 {
		s.SetTrailer(metadata.Pairs(FieldMetadata, "subscribe.credit"))
		return status.Error(codes.InvalidArgument, "subscribe.credit")
	}
	_ = s.Send(&pb.SubscribeResponse{Kind: &pb.SubscribeResponse_Subscribed{Subscribed: &pb.Subscribed{WorkerId: "cw"}}})
	item := func(id, payload string) *pb.DeliveredItem {
		return &pb.DeliveredItem{Id: id, Key: id, Payload: []byte(payload), Attempt: 1}
	}
	_ = s.Send(&pb.SubscribeResponse{Kind: &pb.SubscribeResponse_Deliver{Deliver: &pb.Deliver{Deliveries: []*pb.Delivery{
		{DeliveryId: 1, Handler: "h", Items: []*pb.DeliveredItem{item("a", "ok")}},
		{DeliveryId: 2, Handler: "h", Items: []*pb.DeliveredItem{item("b", "fail")}},
		{DeliveryId: 3, Handler: "h", Items: []*pb.DeliveredItem{item("c", "hold")}},
	}}}})
	all := &pb.Settle{}
	for {
		m, err := s.Recv()
		if err != nil {
			break
		}
		if st := m.GetSettle(); st != nil {
			all.Acks = append(all.Acks, st.Acks...)
			all.Failures = append(all.Failures, st.Failures...)
			all.Releases = append(all.Releases, st.Releases...)
		}
		if m.GetDrain() != nil {
			_ = s.Send(&pb.SubscribeResponse{Kind: &pb.SubscribeResponse_Drained{Drained: &pb.Drained{}}})
		}
	}
	f.mu.Lock()
	f.settled = all
	f.mu.Unlock()
	return nil
}

func TestSubscription(t *testing.T) {
	f := &fakeDeliveries{}
	url := serve(t, func(s *grpc.Server) { pb.RegisterDeliveriesServer(s, f) })
	w, err := NewWorker(WithDeliveries(url), WithSignals(false), WithLogger(DiscardLogger),
		WithDrainTimeout(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{}, 3)
	w.HandleItem("h", func(ctx context.Context, d *Delivery) error {
		started <- struct{}{}
		switch string(d.Items[0].Payload) {
		case "fail":
			return RetryAfter(errors.New("planned failure"), 300*time.Millisecond)
		case "hold":
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	for i := 0; i < 3; i++ {
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("deliveries not run")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.settled
	if s == nil || len(s.Acks) != 1 || s.Acks[0] != 1 || len(s.Failures) != 1 || s.Failures[0].GetRetryAfterMs() != 300 ||
		s.Failures[0].Error != "planned failure" || len(s.Releases) != 1 || s.Releases[0] != 3 {
		t.Errorf("settled %v", s)
	}
}

func TestSubscriptionRefused(t *testing.T) {
	f := &fakeDeliveries{}
	url := serve(t, func(s *grpc.Server) { pb.RegisterDeliveriesServer(s, f) })
	w, err := NewWorker(WithDeliveries(url), WithSignals(false), WithLogger(DiscardLogger), WithCredit(10_000))
	if err != nil {
		t.Fatal(err)
	}
	w.cfg.credit = 20_000 // past the SDK's own check, to see the server's refusal
	w.HandleItem("h", func(context.Context, *Delivery) error { return nil })
	err = w.Run(context.Background())
	var e *Error
	if !errors.Is(err, ErrInvalidArgument) || !errors.As(err, &e) || e.Field != "subscribe.credit" {
		t.Errorf("Run = %v", err)
	}
}

type redirector struct {
	pb.UnimplementedWorkerGatewayServer
	leader string
}

func (r *redirector) Session(s pb.WorkerGateway_SessionServer) error {
	if _, err := s.Recv(); err != nil {
		return err
	}
	return s.Send(&pb.CoordinatorMessage{Kind: &pb.CoordinatorMessage_NotLeader{NotLeader: &pb.NotLeader{Leader: r.leader}}})
}

func TestNotLeaderRedirect(t *testing.T) {
	g := &fakeGateway{}
	leader := serve(t, func(s *grpc.Server) { pb.RegisterWorkerGatewayServer(s, g) })
	follower := serve(t, func(s *grpc.Server) {
		pb.RegisterWorkerGatewayServer(s, &redirector{leader: leader[len("http://"):]})
	})
	w, err := NewWorker(WithCoordinator(follower), WithSignals(false), WithLogger(DiscardLogger))
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan struct{}, 4)
	w.HandleJob("ok", func(ctx context.Context, j *Job) (string, error) { ran <- struct{}{}; return "", nil })
	w.HandleJob("block", func(ctx context.Context, j *Job) (string, error) { <-ctx.Done(); return "", ctx.Err() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("the leader's shard never ran")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

type fakeQueue struct {
	pb.UnimplementedQueueServer
}

func (fakeQueue) Enqueue(ctx context.Context, r *pb.EnqueueRequest) (*pb.EnqueueResponse, error) {
	for i, it := range r.Items {
		if it.Handler == "bad handler!" {
			field := "items[" + string(rune('0'+i)) + "].handler"
			_ = grpc.SetTrailer(ctx, metadata.Pairs(FieldMetadata, field))
			return nil, status.Error(codes.InvalidArgument, field+": not a handler name")
		}
	}
	out := make([]pb.EnqueueOutcome, len(r.Items))
	for i := range out {
		out[i] = pb.EnqueueOutcome_ENQUEUE_OUTCOME_CREATED
	}
	return &pb.EnqueueResponse{Outcomes: out}, nil
}

func (fakeQueue) GetItem(ctx context.Context, r *pb.ItemRef) (*pb.ItemView, error) {
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("authorization")) == 0 {
		return nil, status.Error(codes.Unauthenticated, "no token")
	}
	if r.Id != "p-2" {
		return nil, status.Error(codes.NotFound, "no such item")
	}
	return &pb.ItemView{Id: r.Id, Key: r.Key, State: pb.ItemState_ITEM_STATE_PENDING}, nil
}

func TestQueueClient(t *testing.T) {
	url := serve(t, func(s *grpc.Server) { pb.RegisterQueueServer(s, fakeQueue{}) })
	ctx := context.Background()
	anon, err := NewQueueClient(url, WithLogger(DiscardLogger))
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, err := anon.Get(ctx, ItemRef{ID: "p-2"}); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("no token: %v", err)
	}
	q, err := NewQueueClient(url, WithToken("tok-0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	out, err := q.Enqueue(ctx, NewItem{ID: "a", Handler: "h"}, NewItem{ID: "b", Handler: "h", DueAt: time.Now()})
	if err != nil || len(out) != 2 || out[0] != Created {
		t.Errorf("Enqueue = %v, %v", out, err)
	}
	_, err = q.Enqueue(ctx, NewItem{ID: "a", Handler: "h"}, NewItem{ID: "x", Handler: "bad handler!"})
	var e *Error
	if !errors.Is(err, ErrInvalidArgument) || !errors.As(err, &e) || e.Field != "items[1].handler" {
		t.Errorf("bad input: %v", err)
	}
	v, err := q.Get(ctx, ItemRef{Key: "user-p", ID: "p-2"})
	if err != nil || v.State != StatePending || v.Key != "user-p" {
		t.Errorf("Get = %+v, %v", v, err)
	}
	if _, err := q.Get(ctx, ItemRef{ID: "nope"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing: %v", err)
	}
}
