// log.go owns the logging hook: the SDK reports connections, refusals and drains
// through a Logger the user passes (WithLogger); by default warnings and errors
// go to stderr, as grpc-go's own logger does.

package chime

import (
	"fmt"
	"log"
	"os"
)

// Level is a log record's severity.
type Level int

// Log levels.
const (
	// LevelDebug: connection attempts and other chatter.
	LevelDebug Level = iota
	// LevelInfo: registrations, redirects, drains.
	LevelInfo
	// LevelWarn: lost sessions, handler failures, drain timeouts.
	LevelWarn
	// LevelError: refusals (UNAUTHENTICATED) and unusable configuration.
	LevelError
)

// String is the level's name.
func (l Level) String() string {
	switch l {
	case LevelDebug:
		return "DEBUG"
	case LevelInfo:
		return "INFO"
	case LevelWarn:
		return "WARN"
	default:
		return "ERROR"
	}
}

// Logger receives the SDK's log records. Implementations must be safe for
// concurrent use.
type Logger interface {
	// Log records one message.
	Log(level Level, msg string)
}

// LoggerFunc adapts a function to Logger.
type LoggerFunc func(level Level, msg string)

// Log implements Logger.
func (f LoggerFunc) Log(level Level, msg string) { f(level, msg) }

// NewStdLogger logs records of at least min to l ("LEVEL chime: message").
func NewStdLogger(l *log.Logger, min Level) Logger {
	return LoggerFunc(func(level Level, msg string) {
		if level >= min {
			l.Printf("%s chime: %s", level, msg)
		}
	})
}

// DiscardLogger drops every record.
var DiscardLogger Logger = LoggerFunc(func(Level, string) {})

// defaultLogger writes warnings and errors to stderr.
var defaultLogger = NewStdLogger(log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds), LevelWarn)

// logf formats a record for l.
type logf struct{ l Logger }

func (g logf) debug(format string, a ...any) { g.l.Log(LevelDebug, fmt.Sprintf(format, a...)) }
func (g logf) info(format string, a ...any)  { g.l.Log(LevelInfo, fmt.Sprintf(format, a...)) }
func (g logf) warn(format string, a ...any)  { g.l.Log(LevelWarn, fmt.Sprintf(format, a...)) }
func (g logf) error(format string, a ...any) { g.l.Log(LevelError, fmt.Sprintf(format, a...)) }
