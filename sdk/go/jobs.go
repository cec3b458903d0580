// jobs.go owns the job side: the worker's session with the coordinator
// (chime.v1.WorkerGateway/Session, see proto/chime/v1/worker.proto).
//
//   - register (worker id, group, handlers, capacity, labels, and the shards still
//     running from a previous session), then heartbeat at the interval Registered
//     gives, listing the running shards;
//   - a follower answers NotLeader with the leader's host:port, dialed with the
//     scheme of the endpoint that answered; otherwise the endpoints are tried in
//     turn with a backoff (100 ms doubling to 1 s);
//   - each Assign runs its handler in its own goroutine with a context cancelled on
//     Cancel (kill, timeout, overlap policy) and at the drain timeout: RunStarted,
//     RunLog lines, and exactly one RunResult per (run, shard, attempt). Shards
//     outlive the stream: after a reconnect the worker registers with them and
//     re-sends the results of the last minute;
//   - a worker that went three heartbeat intervals without a heartbeat (frozen or
//     starved) starts no Assign it reads afterwards on that session and registers
//     again; an Assign read after its start_by_session_ms is dropped unstarted;
//   - drain: Draining, shards finish within the drain timeout, the rest are
//     cancelled and reported, then the stream closes.

package chime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/chime-scheduler/chime/sdk/go/chimev1"
)

const (
	// resendWindow: results are sent again to every coordinator registered with
	// within this window (a new leader may have adopted a shard from an old record).
	resendWindow = time.Minute
	// resendMax: at most this many results are kept for re-sending.
	resendMax = 10_000
	// cancelGrace: how long a handler cancelled at the drain timeout may take to
	// return before its shard is reported cancelled without it.
	cancelGrace = 2 * time.Second
	// registerTimeout: a coordinator silent this long after Register is given up on
	// (a follower during an election may hold the answer up to 6 s).
	registerTimeout = 10 * time.Second
	maxLogBytes     = 4096
	maxOutputBytes  = 64 << 10
)

// JobHandler runs one shard of a run. It returns the shard's output, or an error
// (the shard fails with err.Error(); the coordinator retries it when the job
// allows). ctx is cancelled when the shard must stop (kill, timeout, overlap
// policy, drain timeout); a handler that returns an error after that ends the
// shard as cancelled.
type JobHandler func(ctx context.Context, job *Job) (string, error)

// Job is one shard of a run to execute.
type Job struct {
	// RunID is the run id.
	RunID string
	// FireID is the fire: `<job>@<scheduled instant ms>` for scheduled fires.
	FireID string
	// Name is the job's name.
	Name string
	// Handler is the handler name.
	Handler string
	// Params are the job parameters (text, often JSON).
	Params string
	// ShardParams are this shard's parameters (fixed sharding with per-shard params).
	ShardParams string
	// ShardIndex is this shard's index, 0-based.
	ShardIndex int
	// ShardTotal is the number of shards of the run.
	ShardTotal int
	// Attempt is the attempt number, 1-based.
	Attempt int
	// ScheduledAtMs is the instant the fire was scheduled for, Unix ms.
	ScheduledAtMs int64
	// DeadlineMs is when the coordinator cancels the shard (its clock, Unix ms; 0: never).
	DeadlineMs int64
	// Traceparent is the W3C trace context of the run's fire span (empty: none).
	Traceparent string

	s   *session
	ref *pb.RunRef

	mu     sync.Mutex
	reason string
}

// Log sends a line to the run history (the coordinator keeps the tail per shard;
// lines are cut to 4 KiB). Lines are dropped while the session is down.
func (j *Job) Log(line string) {
	j.s.emit(&pb.WorkerMessage{Kind: &pb.WorkerMessage_RunLog{RunLog: &pb.RunLog{
		Run: j.ref, Line: cut(line, maxLogBytes), AtMs: nowMs(),
	}}}, true)
}

// Logf is Log with fmt.Sprintf.
func (j *Job) Logf(format string, args ...any) { j.Log(fmt.Sprintf(format, args...)) }

// CancelReason says why the shard was cancelled ("" while it was not).
func (j *Job) CancelReason() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.reason
}

type runKey struct {
	run     string
	shard   uint32
	attempt uint32
}

func (k runKey) ref() *pb.RunRef {
	return &pb.RunRef{RunId: k.run, ShardIndex: k.shard, Attempt: k.attempt}
}

type shard struct {
	job       *Job
	cancel    context.CancelFunc
	cancelled bool
	reported  bool
	startedMs int64
}

type sentResult struct {
	msg    *pb.WorkerMessage
	sentAt time.Time // zero while no coordinator took it
}

// errStalled ends a session whose worker could not heartbeat for three intervals.
var errStalled = errors.New("heartbeats stalled")

// session is the job side (see the file comment).
type session struct {
	handlers map[string]JobHandler
	cfg      *config
	log      logf

	mu           sync.Mutex
	running      map[runKey]*shard
	idle         chan struct{} // closed while no shard runs
	out          *outq[*pb.WorkerMessage]
	results      []*sentResult
	lastBeat     time.Time
	stallLimit   time.Duration
	sessionClock time.Time
	drainDead    time.Time

	stopping chan struct{}
	stopOnce sync.Once
	conns    map[Endpoint]*grpc.ClientConn
}

func newSession(handlers map[string]JobHandler, cfg *config) *session {
	idle := make(chan struct{})
	close(idle)
	return &session{
		handlers: handlers,
		cfg:      cfg,
		log:      logf{cfg.logger},
		running:  map[runKey]*shard{},
		idle:     idle,
		stopping: make(chan struct{}),
		conns:    map[Endpoint]*grpc.ClientConn{},
	}
}

// stop starts the drain.
func (s *session) stop() {
	s.stopOnce.Do(func() {
		s.mu.Lock()
		s.drainDead = time.Now().Add(s.cfg.drainTimeout)
		s.mu.Unlock()
		close(s.stopping)
		time.AfterFunc(s.cfg.drainTimeout, s.drainTimedOut)
	})
}

func (s *session) isStopping() bool {
	select {
	case <-s.stopping:
		return true
	default:
		return false
	}
}

func (s *session) idleChan() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.idle
}

func (s *session) emit(m *pb.WorkerMessage, lossy bool) {
	s.mu.Lock()
	q := s.out
	s.mu.Unlock()
	if q != nil {
		q.push(m, lossy)
	}
}

// --- shards ---------------------------------------------------------------------

func (s *session) start(a *pb.Assign) {
	r := a.GetRun()
	k := runKey{r.GetRunId(), r.GetShardIndex(), r.GetAttempt()}
	s.mu.Lock()
	if _, ok := s.running[k]; ok {
		s.mu.Unlock()
		return // an assignment we already run (sent again after a reconnect)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sh := &shard{cancel: cancel, job: &Job{
		RunID: k.run, FireID: a.FireId, Name: a.Job, Handler: a.Handler, Params: a.Params,
		ShardParams: a.ShardParams, ShardIndex: int(a.ShardIndex), ShardTotal: int(a.ShardTotal),
		Attempt: int(k.attempt), ScheduledAtMs: a.ScheduledAtMs, DeadlineMs: a.DeadlineMs,
		Traceparent: a.Traceparent, s: s, ref: k.ref(),
	}}
	if len(s.running) == 0 {
		s.idle = make(chan struct{})
	}
	s.running[k] = sh
	s.mu.Unlock()
	go s.runShard(ctx, k, sh)
}

func (s *session) runShard(ctx context.Context, k runKey, sh *shard) {
	defer sh.cancel()
	started := nowMs()
	s.mu.Lock()
	sh.startedMs = started
	s.mu.Unlock()
	s.emit(&pb.WorkerMessage{Kind: &pb.WorkerMessage_RunStarted{RunStarted: &pb.RunStarted{
		Run: k.ref(), StartedAtMs: started,
	}}}, false)
	st, output, errText := pb.RunStatus_RUN_STATUS_SUCCEEDED, "", ""
	h := s.handlers[sh.job.Handler]
	var err error
	if h == nil {
		err = fmt.Errorf("no job handler %q on this worker", sh.job.Handler)
	} else {
		output, err = callJob(ctx, h, sh.job)
	}
	if err != nil {
		if reason := sh.job.CancelReason(); reason != "" {
			st, errText = pb.RunStatus_RUN_STATUS_CANCELLED, reason
		} else {
			st, errText = pb.RunStatus_RUN_STATUS_FAILED, err.Error()
			s.log.warn("job handler %s failed (run %s shard %d): %v", sh.job.Handler, k.run, k.shard, err)
		}
		output = ""
	}
	s.report(k, sh, st, cut(output, maxOutputBytes), cut(errText, maxLogBytes))
}

// callJob runs h, turning a panic into an error.
func callJob(ctx context.Context, h JobHandler, j *Job) (out string, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	return h(ctx, j)
}

func (s *session) report(k runKey, sh *shard, st pb.RunStatus, output, errText string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sh.reported {
		return
	}
	m := &pb.WorkerMessage{Kind: &pb.WorkerMessage_RunResult{RunResult: &pb.RunResult{
		Run: k.ref(), Status: st, Output: output, Error: errText,
		StartedAtMs: sh.startedMs, FinishedAtMs: nowMs(),
	}}}
	sh.reported = true
	if s.running[k] == sh {
		delete(s.running, k)
		if len(s.running) == 0 {
			close(s.idle)
		}
	}
	r := &sentResult{msg: m}
	if s.out != nil {
		r.sentAt = time.Now()
		s.out.push(m, false)
	}
	s.results = append(s.results, r)
	if len(s.results) > resendMax {
		s.results = append(s.results[:0:0], s.results[len(s.results)-resendMax:]...)
	}
}

func (s *session) cancelShard(k runKey, reason string) {
	s.mu.Lock()
	sh := s.running[k]
	if sh == nil || sh.cancelled {
		s.mu.Unlock()
		return
	}
	sh.cancelled = true
	s.mu.Unlock()
	sh.job.mu.Lock()
	sh.job.reason = reason
	sh.job.mu.Unlock()
	s.log.info("cancelling run %s shard %d (%s)", k.run, k.shard, reason)
	sh.cancel()
}

func (s *session) drainTimedOut() {
	s.mu.Lock()
	keys := make([]runKey, 0, len(s.running))
	for k := range s.running {
		keys = append(keys, k)
	}
	s.mu.Unlock()
	if len(keys) == 0 {
		return
	}
	s.log.warn("drain timeout: cancelling %d running shards", len(keys))
	for _, k := range keys {
		s.cancelShard(k, "drain timeout")
	}
	time.AfterFunc(cancelGrace, s.giveUp)
}

// giveUp reports handlers that ignored their cancellation as cancelled anyway, so
// the drain ends and the coordinator hands the shards to another worker.
func (s *session) giveUp() {
	s.mu.Lock()
	left := make(map[runKey]*shard, len(s.running))
	for k, sh := range s.running {
		left[k] = sh
	}
	s.mu.Unlock()
	for k, sh := range left {
		s.log.warn("run %s shard %d did not stop within %v of its cancellation", k.run, k.shard, cancelGrace)
		s.report(k, sh, pb.RunStatus_RUN_STATUS_CANCELLED, "", "did not stop after its cancellation")
	}
}

func (s *session) unsent() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.results {
		if r.sentAt.IsZero() {
			n++
		}
	}
	return n
}

func (s *session) isIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.running) == 0
}

// --- connections ----------------------------------------------------------------

// run connects and serves until stop, then drains and returns.
func (s *session) run() {
	eps := s.cfg.endpoints
	bo := newBackoff()
	next := 0
	var redirect *Endpoint
	redirects := 0
	defer func() {
		s.mu.Lock()
		for _, sh := range s.running {
			sh.cancel()
		}
		s.mu.Unlock()
		for _, c := range s.conns {
			c.Close()
		}
	}()
	for {
		var ep Endpoint
		if redirect != nil {
			ep, redirect = *redirect, nil
		} else {
			ep = eps[next%len(eps)]
			next++
		}
		drained, to := s.connect(ep, bo)
		if drained {
			return
		}
		if to != nil {
			redirect = to
			redirects++
			if *to != ep && redirects <= len(eps)+1 {
				s.log.info("coordinator %s is not the leader; following to %s", ep.URL(), to.URL())
				continue
			}
			// A coordinator naming itself (restarted, its old claim not expired yet)
			// or a ring of stale answers: the election is not settled; wait.
			s.log.debug("coordinator %s names %s as the leader; waiting", ep.URL(), to.URL())
		} else {
			redirects = 0
		}
		if s.isStopping() {
			if s.isIdle() && s.unsent() == 0 {
				return // nothing left to report to anyone
			}
			s.mu.Lock()
			past := time.Now().After(s.drainDead.Add(cancelGrace + 5*time.Second))
			s.mu.Unlock()
			if past {
				s.log.warn("stopping with %d results no coordinator received", s.unsent())
				return
			}
		}
		s.pause(bo.nextDelay())
	}
}

// pause waits d; a stop with nothing running ends it at once.
func (s *session) pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	stopC := s.stopping
	var idleC chan struct{}
	for {
		select {
		case <-t.C:
			return
		case <-stopC:
			stopC, idleC = nil, s.idleChan()
		case <-idleC:
			return
		}
	}
}

func (s *session) conn(e Endpoint) (*grpc.ClientConn, error) {
	if c := s.conns[e]; c != nil {
		return c, nil
	}
	c, err := dial(e, s.cfg.tlsConfig, s.cfg.dialOptions)
	if err != nil {
		return nil, err
	}
	s.conns[e] = c
	return c, nil
}

type coordAnswer struct {
	m   *pb.CoordinatorMessage
	err error
}

// connect runs one connection: drained is true when the drain finished on it;
// redirect is the leader a follower named.
func (s *session) connect(ep Endpoint, bo *reconnectBackoff) (drained bool, redirect *Endpoint) {
	cfg := s.cfg
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx, err := cfg.token.outgoing(ctx)
	if err != nil {
		s.log.error("cannot read the worker token: %v", err)
		return false, nil
	}
	cc, err := s.conn(ep)
	if err != nil {
		s.log.warn("coordinator %s: %v", ep.URL(), err)
		return false, nil
	}
	stream, err := pb.NewWorkerGatewayClient(cc).Session(ctx)
	if err != nil {
		s.rpcFailed(ep, err, false)
		return false, nil
	}
	handlers := make([]string, 0, len(s.handlers))
	for h := range s.handlers {
		handlers = append(handlers, h)
	}
	sort.Strings(handlers)
	s.mu.Lock()
	var running []*pb.RunRef
	for k := range s.running {
		running = append(running, k.ref())
	}
	s.mu.Unlock()
	// A failed Send answers io.EOF; the status comes from Recv below.
	_ = stream.Send(&pb.WorkerMessage{Kind: &pb.WorkerMessage_Register{Register: &pb.Register{
		WorkerId: cfg.workerID, Group: cfg.group, Handlers: handlers,
		Capacity: uint32(cfg.capacity), Labels: cfg.labels, Running: running,
	}}})

	first := make(chan coordAnswer, 1)
	go func() {
		m, err := stream.Recv()
		first <- coordAnswer{m, err}
	}()
	timer := time.NewTimer(registerTimeout)
	defer timer.Stop()
	stopC := s.stopping
	var idleC chan struct{}
	var ans coordAnswer
wait:
	for {
		select {
		case ans = <-first:
			break wait
		case <-timer.C:
			s.log.warn("coordinator %s did not answer Register within %v", ep.URL(), registerTimeout)
			return false, nil
		case <-stopC:
			stopC, idleC = nil, s.idleChan()
		case <-idleC:
			if s.unsent() == 0 {
				return false, nil // stopped while waiting, with nothing to report
			}
			idleC = nil
		}
	}
	if ans.err != nil {
		if ans.err == io.EOF {
			s.log.warn("coordinator %s closed the session without answering", ep.URL())
		} else {
			s.rpcFailed(ep, ans.err, false)
		}
		return false, nil
	}
	switch k := ans.m.Kind.(type) {
	case *pb.CoordinatorMessage_NotLeader:
		if k.NotLeader.Leader == "" {
			time.Sleep(200 * time.Millisecond) // an election is under way
			return false, nil
		}
		to := redirectTarget(ep, k.NotLeader.Leader)
		return false, &to
	case *pb.CoordinatorMessage_Registered:
		return s.serve(ep, stream, k.Registered, bo), nil
	default:
		s.log.warn("coordinator %s answered %T to Register", ep.URL(), ans.m.Kind)
		return false, nil
	}
}

// serve runs a registered session until it ends; true when the drain finished.
func (s *session) serve(ep Endpoint, stream pb.WorkerGateway_SessionClient, reg *pb.Registered, bo *reconnectBackoff) bool {
	bo.reset()
	where := reg.Coordinator
	if where == "" {
		where = ep.URL()
	}
	s.log.info("registered with coordinator %s as %s in group %s", where, reg.WorkerId, s.cfg.group)
	interval := time.Duration(reg.HeartbeatIntervalMs) * time.Millisecond
	if interval < 100*time.Millisecond {
		interval = 100 * time.Millisecond
	}
	q := newOutq[*pb.WorkerMessage]()
	now := time.Now()
	s.mu.Lock()
	// The session clock Assign.start_by_session_ms counts on.
	s.sessionClock = now
	s.stallLimit = 3 * interval
	s.lastBeat = now
	// Results of the last minute, and those that ended while away, go first.
	i := 0
	for i < len(s.results) && !s.results[i].sentAt.IsZero() && s.results[i].sentAt.Before(now.Add(-resendWindow)) {
		i++
	}
	s.results = s.results[i:]
	for _, r := range s.results {
		if r.sentAt.IsZero() {
			r.sentAt = now
		}
		q.push(r.msg, false)
	}
	s.out = q
	s.mu.Unlock()
	done := make(chan struct{})
	defer func() {
		s.mu.Lock()
		if s.out == q {
			s.out = nil
		}
		s.mu.Unlock()
		close(done)
	}()
	writerErr := make(chan error, 1)
	go func() { writerErr <- q.write(stream.Send, stream.CloseSend, done) }()
	readerErr := make(chan error, 1)
	go func() { readerErr <- s.read(stream) }()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	stopC := s.stopping
	var idleC chan struct{}
	for {
		select {
		case <-ticker.C:
			if s.stalled() {
				return false
			}
			s.beat(q)
		case err := <-readerErr:
			switch {
			case err == errStalled:
			case err == nil:
				s.log.warn("session with coordinator %s ended; reconnecting", ep.URL())
			default:
				s.rpcFailed(ep, err, true)
			}
			return false
		case <-writerErr:
			writerErr = nil // the reader reports how the stream ended
		case <-stopC:
			stopC = nil
			s.mu.Lock()
			n := len(s.running)
			s.mu.Unlock()
			s.log.info("draining: no new shards, %d running", n)
			q.push(&pb.WorkerMessage{Kind: &pb.WorkerMessage_Draining{Draining: &pb.Draining{}}}, false)
			idleC = s.idleChan()
		case <-idleC:
			if c := s.idleChan(); c != idleC {
				idleC = c // a shard started meanwhile
				continue
			}
			// Every shard reported: send what is queued, half-close, and wait for
			// the coordinator to end the stream (SessionEnded DRAINED): resetting
			// it at once could lose the last results. A silent peer gets 5 s.
			q.close()
			select {
			case <-readerErr:
			case <-time.After(5 * time.Second):
			}
			s.log.info("drained: every shard reported")
			return true
		}
	}
}

func (s *session) beat(q *outq[*pb.WorkerMessage]) {
	s.mu.Lock()
	s.lastBeat = time.Now()
	running := make([]*pb.RunRef, 0, len(s.running))
	for k := range s.running {
		running = append(running, k.ref())
	}
	s.mu.Unlock()
	q.push(&pb.WorkerMessage{Kind: &pb.WorkerMessage_Heartbeat{Heartbeat: &pb.Heartbeat{Running: running}}}, false)
}

// stalled is true (and says so) when this session went three heartbeat
// intervals without a heartbeat: the coordinator has taken the worker for dead.
func (s *session) stalled() bool {
	s.mu.Lock()
	silent := time.Since(s.lastBeat)
	limit := s.stallLimit
	s.mu.Unlock()
	if silent <= limit {
		return false
	}
	s.log.warn("this worker could not heartbeat for %d ms (frozen or starved); the coordinator "+
		"has taken it for dead, so it starts nothing more on this session and registers again", silent.Milliseconds())
	return true
}

func (s *session) read(stream pb.WorkerGateway_SessionClient) error {
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch k := m.Kind.(type) {
		case *pb.CoordinatorMessage_Assign:
			if s.stalled() {
				return errStalled
			}
			a := k.Assign
			if a.StartBySessionMs > 0 {
				s.mu.Lock()
				at := time.Since(s.sessionClock).Milliseconds()
				s.mu.Unlock()
				if at > a.StartBySessionMs {
					// Read too late: it may run elsewhere already. Left unstarted (and
					// out of the heartbeats) it is taken as lost and runs elsewhere.
					s.log.warn("assignment %s shard %d arrived %d ms after its start-by time "+
						"(the stream was stalled); not starting it", a.GetRun().GetRunId(), a.ShardIndex, at-a.StartBySessionMs)
					continue
				}
			}
			s.start(a)
		case *pb.CoordinatorMessage_Cancel:
			r := k.Cancel.GetRun()
			reason := k.Cancel.Reason
			if reason == "" {
				reason = "cancelled"
			}
			s.cancelShard(runKey{r.GetRunId(), r.GetShardIndex(), r.GetAttempt()}, reason)
		case *pb.CoordinatorMessage_SessionEnded:
			s.log.info("coordinator ended the session: %s %s", k.SessionEnded.Reason, k.SessionEnded.Detail)
		}
	}
}

func (s *session) rpcFailed(ep Endpoint, err error, registered bool) {
	st, _ := status.FromError(err)
	switch {
	case st.Code() == codes.Unauthenticated:
		s.log.error("coordinator %s refused the worker token: UNAUTHENTICATED: %s", ep.URL(), st.Message())
	case registered:
		s.log.warn("session with coordinator %s broke (%s); reconnecting", ep.URL(), st.Code())
	case st.Code() == codes.Unavailable:
		s.log.debug("cannot reach coordinator %s: %s", ep.URL(), st.Message())
	default:
		s.log.warn("session with coordinator %s failed: %s %s", ep.URL(), st.Code(), st.Message())
	}
}
