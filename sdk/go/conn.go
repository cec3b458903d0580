// conn.go owns endpoints, gRPC connections (keep-alives, reconnect backoff), the
// bearer token and the reconnect backoff shared by every client of the SDK.

package chime

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
)

// Endpoint is a parsed `http://host:port`, `https://host:port` or bare `host:port`.
type Endpoint struct {
	// Target is `host:port`.
	Target string
	// Secure is true for `https://` (TLS).
	Secure bool
}

// URL is the endpoint as a URL.
func (e Endpoint) URL() string {
	if e.Secure {
		return "https://" + e.Target
	}
	return "http://" + e.Target
}

// ParseEndpoint parses an endpoint URL; a bare `host:port` is plaintext.
func ParseEndpoint(url string) (Endpoint, error) {
	u := strings.TrimSpace(url)
	secure := false
	switch {
	case strings.HasPrefix(u, "https://"):
		secure, u = true, u[len("https://"):]
	case strings.HasPrefix(u, "http://"):
		u = u[len("http://"):]
	case strings.Contains(u, "://"):
		return Endpoint{}, fmt.Errorf("endpoint %q: only http:// and https:// are supported: %w", url, ErrInvalidArgument)
	}
	u = strings.TrimRight(u, "/")
	if u == "" || strings.Contains(u, "/") {
		return Endpoint{}, fmt.Errorf("endpoint %q: expected scheme://host:port: %w", url, ErrInvalidArgument)
	}
	return Endpoint{Target: u, Secure: secure}, nil
}

// parseEndpoints parses a list of URLs, each possibly comma-separated.
func parseEndpoints(urls []string) ([]Endpoint, error) {
	var out []Endpoint
	for _, list := range urls {
		for _, u := range strings.Split(list, ",") {
			if strings.TrimSpace(u) == "" {
				continue
			}
			e, err := ParseEndpoint(u)
			if err != nil {
				return nil, err
			}
			out = append(out, e)
		}
	}
	return out, nil
}

// redirectTarget is the endpoint a NotLeader names: a bare `host:port` is dialed
// the way the current endpoint was (same scheme), a URL as given.
func redirectTarget(current Endpoint, leader string) Endpoint {
	if strings.Contains(leader, "://") {
		if e, err := ParseEndpoint(leader); err == nil {
			return e
		}
	}
	return Endpoint{Target: strings.TrimRight(strings.TrimSpace(leader), "/"), Secure: current.Secure}
}

// token is where the bearer token comes from: a fixed value, a file, or nothing.
// A file is read at every (re)connection, so a token fixed or rotated on disk is
// picked up without a restart. Its first line that is neither blank nor a `#`
// comment holds the token, as its first field: a line of a coordinator's token
// file (`<token> <name> role=…`) works as it is.
type token struct {
	value string
	file  string
}

// get answers the token now ("" sends no authorization header).
func (t token) get() (string, error) {
	if t.file == "" {
		return strings.TrimSpace(t.value), nil
	}
	raw, err := os.ReadFile(t.file)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) > 0 && !strings.HasPrefix(f[0], "#") {
			return f[0], nil
		}
	}
	return "", fmt.Errorf("token file %s has no token", t.file)
}

// outgoing adds `authorization: Bearer <token>` to ctx (nothing without a token).
func (t token) outgoing(ctx context.Context) (context.Context, error) {
	v, err := t.get()
	if err != nil || v == "" {
		return ctx, err
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+v), nil
}

// dial opens a non-blocking connection to e, with keep-alives short enough that a
// frozen peer is noticed within 5 s (worker.proto asks for it) and a reconnect
// backoff of at most 1 s (a new leader must be reached at once).
func dial(e Endpoint, tlsConfig *tls.Config, extra []grpc.DialOption) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:                2 * time.Second,
			Timeout:             3 * time.Second,
			PermitWithoutStream: true,
		}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 2,
				Jitter:     0.2,
				MaxDelay:   time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8 << 20)),
	}
	if e.Secure {
		cfg := tlsConfig
		if cfg == nil {
			cfg = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		opts = append(opts, grpc.WithInsecure())
	}
	opts = append(opts, extra...)
	return grpc.DialContext(context.Background(), e.Target, opts...)
}

// reconnectBackoff is an exponential reconnect delay with ±20 % jitter (so many
// subscribers that lost the same server do not come back in lockstep).
type reconnectBackoff struct {
	first, max, next time.Duration
}

func newBackoff() *reconnectBackoff {
	return &reconnectBackoff{first: 100 * time.Millisecond, max: time.Second, next: 100 * time.Millisecond}
}

func (b *reconnectBackoff) reset() { b.next = b.first }

func (b *reconnectBackoff) nextDelay() time.Duration {
	d := b.next
	b.next *= 2
	if b.next > b.max {
		b.next = b.max
	}
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// nowMs is the Unix time in milliseconds.
func nowMs() int64 { return time.Now().UnixMilli() }

// cut shortens s to at most limit bytes without splitting a UTF-8 sequence.
func cut(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	i := limit
	for i > 0 && i < len(s) && s[i]&0xC0 == 0x80 {
		i--
	}
	return s[:i]
}
