// errors.go owns the SDK's errors: what a call to chime answered (Error, with
// sentinels for errors.Is) and what an item handler returns to pick a retry delay.

package chime

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Sentinel errors, matched with errors.Is against an *Error (or a wrapped one).
var (
	// ErrUnauthenticated: the token is missing or wrong (gRPC UNAUTHENTICATED).
	ErrUnauthenticated = errors.New("chime: unauthenticated")
	// ErrNotFound: no such item (gRPC NOT_FOUND).
	ErrNotFound = errors.New("chime: not found")
	// ErrInvalidArgument: the request was refused as a whole, nothing stored
	// (gRPC INVALID_ARGUMENT); Error.Field names the refused field.
	ErrInvalidArgument = errors.New("chime: invalid argument")
	// ErrUnavailable: chime or its store is unreachable now (gRPC UNAVAILABLE);
	// retrying is safe.
	ErrUnavailable = errors.New("chime: unavailable")
)

// FieldMetadata is the metadata key chime names the refused field of an
// INVALID_ARGUMENT in (`items[3].payload`, `subscribe.credit`, …).
const FieldMetadata = "chime-field"

// Error is a failed call to chime: its gRPC code and message and, for
// INVALID_ARGUMENT, the refused field.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message.
	Message string
	// Field is the refused field (`items[0].handler`) for INVALID_ARGUMENT, else "".
	Field string
}

// Error implements error.
func (e *Error) Error() string {
	s := "chime: " + e.Code.String()
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Field != "" && e.Code == codes.InvalidArgument {
		s += " (field " + e.Field + ")"
	}
	return s
}

// Is matches the sentinel errors by code.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrUnauthenticated:
		return e.Code == codes.Unauthenticated
	case ErrNotFound:
		return e.Code == codes.NotFound
	case ErrInvalidArgument:
		return e.Code == codes.InvalidArgument
	case ErrUnavailable:
		return e.Code == codes.Unavailable
	}
	return false
}

// GRPCStatus lets status.FromError / status.Code see the original code.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

// fromRPC maps a failed call's error (nil stays nil); header and trailer are the
// call's metadata, where `chime-field` is looked up.
func fromRPC(err error, header, trailer metadata.MD) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message()}
	if v := trailer.Get(FieldMetadata); len(v) > 0 {
		e.Field = v[0]
	} else if v := header.Get(FieldMetadata); len(v) > 0 {
		e.Field = v[0]
	}
	return e
}

// HandlerError fails an item delivery with a message and, optionally, the delay
// before its next attempt (instead of the chime worker's exponential backoff).
// Any other error fails the delivery too, with err.Error() as the message.
type HandlerError struct {
	// Err is the failure; its text is kept as the items' last error.
	Err error
	// RetryAfter, when positive, is the delay before the next attempt (at most 24 h).
	RetryAfter time.Duration
}

// Error implements error.
func (e *HandlerError) Error() string { return e.Err.Error() }

// Unwrap answers the failure.
func (e *HandlerError) Unwrap() error { return e.Err }

// RetryAfter wraps err so the delivery is retried after d (at most 24 h) rather
// than after the chime worker's backoff.
func RetryAfter(err error, d time.Duration) error {
	if d < 0 {
		d = 0
	}
	if d > 24*time.Hour {
		d = 24 * time.Hour
	}
	return &HandlerError{Err: err, RetryAfter: d}
}

// errorf builds an INVALID_ARGUMENT-like *Error of the SDK itself (bad options).
func invalid(field, format string, args ...any) error {
	return &Error{Code: codes.InvalidArgument, Message: fmt.Sprintf(format, args...), Field: field}
}
