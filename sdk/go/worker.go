// worker.go owns Worker, which runs job handlers (a session with the coordinator)
// and item handlers (a subscription to a chime worker's delivery service), its
// functional options and its lifecycle: Run until the context ends or SIGTERM /
// SIGINT, then drain.

package chime

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

// config is what the options set.
type config struct {
	coordinators  []string
	endpoints     []Endpoint
	group         string
	workerID      string
	capacity      int
	labels        map[string]string
	deliveriesURL string
	deliveries    Endpoint
	credit        int
	settleTimeout time.Duration
	subscriber    string
	token         token
	drainTimeout  time.Duration
	tlsConfig     *tls.Config
	dialOptions   []grpc.DialOption
	logger        Logger
	signals       bool
}

// Option configures a Worker or a QueueClient.
type Option func(*config)

// WithCoordinator sets the coordinator endpoints of the job side
// (`http://host:port`, several, or comma-separated; a follower redirects to the
// leader). Without it the worker runs no job handlers.
func WithCoordinator(urls ...string) Option {
	return func(c *config) { c.coordinators = append(c.coordinators, urls...) }
}

// WithGroup sets the worker group jobs name (default "default").
func WithGroup(group string) Option { return func(c *config) { c.group = group } }

// WithWorkerID sets the stable worker id, unique among live workers (default:
// the host name, a pod's name).
func WithWorkerID(id string) Option { return func(c *config) { c.workerID = id } }

// WithCapacity sets the most shards run at once (default 16).
func WithCapacity(n int) Option { return func(c *config) { c.capacity = n } }

// WithLabels sets free-form worker labels (zone, version, …).
func WithLabels(labels map[string]string) Option { return func(c *config) { c.labels = labels } }

// WithDeliveries sets the delivery service of a chime worker for the item side
// (`http://127.0.0.1:7071` for a sidecar). Unset, it is read from the environment
// variable CHIME_DELIVERIES (and the token file from CHIME_DELIVERIES_TOKEN_FILE).
func WithDeliveries(url string) Option { return func(c *config) { c.deliveriesURL = url } }

// WithCredit sets the most deliveries held at once, 1–10,000 (default 64): the
// concurrency of item handlers.
func WithCredit(n int) Option { return func(c *config) { c.credit = n } }

// WithSettleTimeout sets how long a delivery may run before it counts as failed
// unless its handler calls Extend (1 s–1 h; 0: the chime worker's default, 30 s).
func WithSettleTimeout(d time.Duration) Option { return func(c *config) { c.settleTimeout = d } }

// WithToken sets the bearer token sent on every call.
func WithToken(t string) Option { return func(c *config) { c.token = token{value: t} } }

// WithTokenFile reads the bearer token from a file (the first field of its first line
// that is neither blank nor a `#` comment), at
// every (re)connection, so a rotated token is picked up without a restart.
func WithTokenFile(path string) Option { return func(c *config) { c.token = token{file: path} } }

// WithDrainTimeout sets how long a drain waits for running handlers before it
// cancels them (job shards, reported cancelled) or releases them (deliveries,
// handed back unprocessed). Default 10 s.
func WithDrainTimeout(d time.Duration) Option { return func(c *config) { c.drainTimeout = d } }

// WithTLSConfig sets the TLS configuration for `https://` endpoints (default: the
// system's roots).
func WithTLSConfig(cfg *tls.Config) Option { return func(c *config) { c.tlsConfig = cfg } }

// WithDialOptions adds gRPC dial options (interceptors, a custom dialer, …).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOptions = append(c.dialOptions, opts...) }
}

// WithLogger sets the logging hook (default: warnings and errors to stderr;
// DiscardLogger silences the SDK).
func WithLogger(l Logger) Option { return func(c *config) { c.logger = l } }

// WithSignals sets whether Run drains on SIGTERM and SIGINT (default true).
func WithSignals(on bool) Option { return func(c *config) { c.signals = on } }

func newConfig(opts []Option) *config {
	c := &config{
		group: "default", capacity: 16, credit: 64, drainTimeout: 10 * time.Second,
		logger: defaultLogger, signals: true,
	}
	for _, o := range opts {
		o(c)
	}
	if c.logger == nil {
		c.logger = DiscardLogger
	}
	return c
}

// Worker runs job handlers, item handlers, or both. Register handlers with
// HandleJob and HandleItem, then call Run.
type Worker struct {
	cfg   *config
	jobs  map[string]JobHandler
	items map[string]ItemHandler

	mu      sync.Mutex
	running bool
}

// NewWorker makes a worker; it needs WithCoordinator (job handlers),
// WithDeliveries (item handlers), or both.
func NewWorker(opts ...Option) (*Worker, error) {
	c := newConfig(opts)
	if c.deliveriesURL == "" {
		if env := os.Getenv("CHIME_DELIVERIES"); env != "" {
			c.deliveriesURL = env
			if c.token == (token{}) {
				c.token = token{file: os.Getenv("CHIME_DELIVERIES_TOKEN_FILE")}
			}
		}
	}
	var err error
	if c.endpoints, err = parseEndpoints(c.coordinators); err != nil {
		return nil, err
	}
	if c.deliveriesURL != "" {
		if c.deliveries, err = ParseEndpoint(c.deliveriesURL); err != nil {
			return nil, err
		}
	}
	if len(c.endpoints) == 0 && c.deliveriesURL == "" {
		return nil, invalid("coordinator", "give a coordinator (job handlers), deliveries (item handlers), or both")
	}
	if c.capacity < 1 {
		return nil, invalid("capacity", "capacity %d: must be at least 1", c.capacity)
	}
	if c.credit < 1 || c.credit > 10_000 {
		return nil, invalid("credit", "credit %d: must be 1..10000", c.credit)
	}
	if c.settleTimeout != 0 && (c.settleTimeout < time.Second || c.settleTimeout > time.Hour) {
		return nil, invalid("settle_timeout", "settle timeout %v: must be 0 or 1s..1h", c.settleTimeout)
	}
	if _, err := c.token.get(); err != nil {
		return nil, err
	}
	if c.workerID == "" {
		c.workerID, _ = os.Hostname()
	}
	c.subscriber = fmt.Sprintf("%s/%d", c.workerID, os.Getpid())
	return &Worker{cfg: c, jobs: map[string]JobHandler{}, items: map[string]ItemHandler{}}, nil
}

// WorkerID is the id the worker registers with.
func (w *Worker) WorkerID() string { return w.cfg.workerID }

// HandleJob registers a job handler under name. It panics on an empty or
// duplicate name, or when the worker has no coordinator (like http.Handle).
func (w *Worker) HandleJob(name string, h JobHandler) {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case len(w.cfg.endpoints) == 0:
		panic(fmt.Sprintf("chime: job handler %q: this worker has no coordinator", name))
	case name == "" || h == nil:
		panic("chime: HandleJob needs a name and a handler")
	case w.jobs[name] != nil:
		panic(fmt.Sprintf("chime: job handler %q registered twice", name))
	}
	w.jobs[name] = h
}

// HandleItem registers an item handler under name. It panics on an empty or
// duplicate name, or when the worker has no deliveries endpoint.
func (w *Worker) HandleItem(name string, h ItemHandler) {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.cfg.deliveriesURL == "":
		panic(fmt.Sprintf("chime: item handler %q: this worker has no deliveries endpoint", name))
	case name == "" || h == nil:
		panic("chime: HandleItem needs a name and a handler")
	case w.items[name] != nil:
		panic(fmt.Sprintf("chime: item handler %q registered twice", name))
	}
	w.items[name] = h
}

// Run serves until ctx is done or the process gets SIGTERM or SIGINT (unless
// WithSignals(false)), then drains: no new work; running handlers finish within
// the drain timeout or are cancelled (shards) or released (deliveries). A second
// signal during the drain ends the process as Go does by default. Run returns nil
// after the drain, or an error when a side cannot go on (a subscription the chime
// worker refuses as invalid; the other side drains first).
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return fmt.Errorf("chime: worker already running")
	}
	w.running = true
	c := w.cfg
	if len(c.endpoints) > 0 && len(w.jobs) == 0 {
		w.mu.Unlock()
		return invalid("handlers", "a coordinator is set but no job handler is registered")
	}
	if c.deliveriesURL != "" && len(w.items) == 0 {
		w.mu.Unlock()
		return invalid("handlers", "a deliveries endpoint is set but no item handler is registered")
	}
	jobs, items := w.jobs, w.items
	w.mu.Unlock()

	if c.signals {
		var stop context.CancelFunc
		ctx, stop = signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		go func() {
			<-ctx.Done()
			stop() // a second signal terminates the process
		}()
	}
	var stops []func()
	errs := make(chan error, 2)
	parts := 0
	if len(c.endpoints) > 0 {
		s := newSession(jobs, c)
		stops = append(stops, s.stop)
		parts++
		go func() { s.run(); errs <- nil }()
	}
	if c.deliveriesURL != "" {
		s := newSubscriber(items, c)
		stops = append(stops, s.stop)
		parts++
		go func() { errs <- s.run() }()
	}
	stopAll := func() {
		for _, f := range stops {
			f()
		}
	}
	var first error
	ended := 0
	for ended < parts {
		select {
		case <-ctx.Done():
			if ended == 0 && first == nil {
				logf{c.logger}.info("stopping: draining")
			}
			stopAll()
			ctx = context.Background() // Done() of Background is nil: wait for the parts
		case err := <-errs:
			ended++
			if err != nil && first == nil {
				first = err
				stopAll()
			}
		}
	}
	return first
}
