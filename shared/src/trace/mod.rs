//! Distributed tracing: W3C trace context and the spans chime records.
//!
//! chime makes few spans, all at the boundaries a user asks about: the `Enqueue`
//! of a producer's items (a child of the producer's `traceparent`), the processing
//! of a delivery (a child of the context stored with the item), a job's fire (a
//! root) and each shard run (a child of the fire). Spans are recorded when they
//! end and handed to the process's [`Tracer`], which exports them over OTLP
//! ([`otlp`]) or drops them when no exporter is configured.
//!
//! Why a process-global tracer, like the `metrics` facade: the places that end
//! spans (the consumer, the engine, the gRPC edges) would otherwise all take one
//! more handle through their constructors for an optional, fire-and-forget
//! side effect. Recording never blocks: a full export buffer drops the span and
//! counts it (`chime_trace_spans_dropped_total`).
//!
//! Sampling: a span with a parent follows the parent's `sampled` flag (W3C
//! "parent-based"); a root (a fire) is sampled by its trace id against the
//! configured ratio, so every replica and every shard agree without talking. An
//! item without a trace context, or with an unsampled one, makes no span.
//!
//! A fire's trace context is a function of its run id ([`TraceContext::for_run`]):
//! the coordinator that fires, the workers that run the shards and the leader that
//! finishes the run after a failover all name the same span without storing it.

pub mod otlp;

use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Spans dropped because the export buffer was full.
pub const SPANS_DROPPED: &str = "chime_trace_spans_dropped_total";
/// Spans sent to the OTLP receiver (label `outcome`: exported, failed).
pub const SPANS_EXPORTED: &str = "chime_trace_spans_exported_total";

/// The `sampled` bit of the W3C trace flags.
const SAMPLED: u8 = 0x01;

/// A W3C trace context: which trace, which span in it, and its flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero: the span this context names.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` header value (`00-<32 hex>-<16 hex>-<2 hex>`).
    ///
    /// Per the W3C spec, a version above `00` is read by its first four fields
    /// (a longer value must continue with `-`); version `ff`, all-zero ids,
    /// upper-case hex and wrong lengths are refused. The error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let b = s.as_bytes();
        // Byte positions below are char boundaries only in ASCII text.
        if !s.is_ascii() {
            return Err(format!("{s:?} is not a W3C traceparent (ASCII only)"));
        }
        if b.len() < 55 {
            return Err(format!(
                "{s:?} is not a W3C traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)"
            ));
        }
        let hex = |range: std::ops::Range<usize>, what: &str| -> Result<Vec<u8>, String> {
            let part = &s[range];
            if !part
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            {
                return Err(format!("{what} {part:?} is not lower-case hex"));
            }
            Ok((0..part.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&part[i..i + 2], 16).unwrap_or(0))
                .collect())
        };
        let version = hex(0..2, "version")?[0];
        if version == 0xff {
            return Err("version ff is invalid".into());
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(format!("{s:?}: fields must be separated by '-'"));
        }
        if (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return Err(format!("{s:?}: unexpected data after the flags"));
        }
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&hex(3..35, "trace id")?);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&hex(36..52, "span id")?);
        let flags = hex(53..55, "flags")?[0];
        if trace_id == [0; 16] {
            return Err("the trace id is all zeros".into());
        }
        if span_id == [0; 8] {
            return Err("the span id is all zeros".into());
        }
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Parses an optional header value: absent, empty or malformed is `None` (a
    /// receiver ignores a traceparent it cannot read, per the W3C spec).
    pub fn from_header(value: Option<&str>) -> Option<Self> {
        value
            .filter(|v| !v.is_empty())
            .and_then(|v| Self::parse(v).ok())
    }

    /// A new trace (a root span's context), sampled by `ratio` of the trace id.
    pub fn new_root(ratio: f64) -> Self {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&nonzero_u64().to_be_bytes());
        trace_id[8..].copy_from_slice(&nonzero_u64().to_be_bytes());
        Self::root_with(trace_id, nonzero_u64().to_be_bytes(), ratio)
    }

    /// The context of the fire of run `run_id`: its ids are a hash of the run id,
    /// so everyone who knows the run names the same span.
    pub fn for_run(run_id: &str, ratio: f64) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, run_id.as_bytes());
        let d = digest.as_ref();
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&d[..16]);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&d[16..24]);
        // SHA-256 output all zero in 16 (or 8) bytes does not happen; still, the
        // ids must be valid.
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        Self::root_with(trace_id, span_id, ratio)
    }

    fn root_with(trace_id: [u8; 16], span_id: [u8; 8], ratio: f64) -> Self {
        // The W3C "random" part of a trace id is its right 7 bytes; comparing it
        // with the ratio is the OpenTelemetry TraceIdRatioBased rule, so a trace
        // is sampled the same way wherever the decision is made.
        let mut low = [0u8; 8];
        low[1..].copy_from_slice(&trace_id[9..]);
        let r = u64::from_be_bytes(low) as f64 / (1u64 << 56) as f64;
        let flags = if r < ratio { SAMPLED } else { 0 };
        Self {
            trace_id,
            span_id,
            flags,
        }
    }

    /// A new span in the same trace, with the same flags.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_u64().to_be_bytes(),
            ..*self
        }
    }

    /// The `sampled` flag: spans of this trace are recorded.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

/// The `traceparent` form (version 00).
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn to_hex(b: &[u8]) -> String {
    use fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// What kind of work a span is (OTLP's span kinds that chime uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Handles a request (the `Enqueue` call).
    Server,
    /// Starts work that others do later (a fire).
    Producer,
    /// Does work others started (a delivery, a shard).
    Consumer,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// An integer.
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Self::Int(i64::from(n))
    }
}

/// A span: started by [`Span::start`], given attributes, and recorded by
/// [`Span::end`]. Dropping it unended records nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// This span's context (its span id, its trace, its flags).
    pub context: TraceContext,
    /// The parent span's id; `None` for a root.
    pub parent_span_id: Option<[u8; 8]>,
    /// The parent lives in another process (it came over the wire).
    pub parent_remote: bool,
    /// Low-cardinality name (`process remind`, `fire nightly`).
    pub name: String,
    /// What kind of work.
    pub kind: SpanKind,
    /// Start, Unix ns.
    pub start_unix_ns: u64,
    /// End, Unix ns (0 until ended).
    pub end_unix_ns: u64,
    /// Attributes, in the order added.
    pub attributes: Vec<(&'static str, Value)>,
    /// Other contexts this span is linked to (merged items' producers).
    pub links: Vec<TraceContext>,
    /// `Some(message)` when the work failed.
    pub error: Option<String>,
}

impl Span {
    /// A span starting now as a child of `parent` (a remote parent: it came over
    /// the wire or out of the store).
    pub fn start(name: impl Into<String>, kind: SpanKind, parent: &TraceContext) -> Self {
        Self::at(name, kind, parent, now_unix_ns())
    }

    /// A child of `parent` starting at `start_unix_ns`.
    pub fn at(
        name: impl Into<String>,
        kind: SpanKind,
        parent: &TraceContext,
        start_unix_ns: u64,
    ) -> Self {
        Self {
            parent_span_id: Some(parent.span_id),
            parent_remote: true,
            ..Self::root(name, kind, parent.child(), start_unix_ns)
        }
    }

    /// A root span with the given context (a fire's), starting at `start_unix_ns`.
    pub fn root(
        name: impl Into<String>,
        kind: SpanKind,
        context: TraceContext,
        start_unix_ns: u64,
    ) -> Self {
        Self {
            context,
            parent_span_id: None,
            parent_remote: false,
            name: name.into(),
            kind,
            start_unix_ns,
            end_unix_ns: 0,
            attributes: Vec::new(),
            links: Vec::new(),
            error: None,
        }
    }

    /// Adds an attribute.
    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) -> &mut Self {
        self.attributes.push((key, value.into()));
        self
    }

    /// Marks the work failed with `message`.
    pub fn fail(&mut self, message: impl Into<String>) -> &mut Self {
        self.error = Some(message.into());
        self
    }

    /// Ends the span now and records it (when sampled).
    pub fn end(self) {
        self.end_at(now_unix_ns());
    }

    /// Ends the span at `end_unix_ns` and records it (when sampled).
    pub fn end_at(mut self, end_unix_ns: u64) {
        self.end_unix_ns = end_unix_ns.max(self.start_unix_ns);
        if self.context.sampled() {
            tracer().record(self);
        }
    }
}

/// The trace context a producer's call carries (its `traceparent` header or
/// metadata), when this process traces: a coordinator without an exporter keeps
/// items in the body format older workers read, whatever its callers send (so an
/// instrumented producer cannot break a rolling upgrade).
pub fn call_context(header: Option<&str>) -> Option<TraceContext> {
    if tracer().enabled() {
        TraceContext::from_header(header)
    } else {
        None
    }
}

/// The span of a call that stores items for a producer whose context is
/// `parent` (`transport`: `grpc` or `http`). `None` unless this process exports
/// traces and the parent is sampled; the items are then stored with the span's
/// context, so their handlers' spans are its children.
pub fn enqueue_span(parent: Option<TraceContext>, transport: &'static str) -> Option<Span> {
    let parent = parent.filter(|p| p.sampled() && tracer().enabled())?;
    let mut s = Span::start("enqueue", SpanKind::Server, &parent);
    s.attr("messaging.system", "chime")
        .attr("messaging.operation.type", "send")
        .attr("chime.transport", transport);
    Some(s)
}

/// Ends an [`enqueue_span`] after storing `items` items (or failing with `error`).
pub fn end_enqueue_span(span: Option<Span>, items: usize, error: Option<&dyn fmt::Display>) {
    if let Some(mut s) = span {
        s.attr("messaging.batch.message_count", items as i64);
        if let Some(e) = error {
            s.fail(e.to_string());
        }
        s.end();
    }
}

/// Now, Unix ns (spans carry wall-clock times: that is what trace viewers line up).
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Unix ms as Unix ns.
pub fn ms_to_ns(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(1_000_000)
}

/// Where this process's ended spans go: an export buffer, or nowhere.
#[derive(Debug, Clone)]
pub struct Tracer {
    tx: Option<mpsc::Sender<Span>>,
    root_ratio: f64,
}

impl Tracer {
    /// A tracer that records nothing (the default of every process).
    pub const fn disabled() -> Self {
        Self {
            tx: None,
            root_ratio: 0.0,
        }
    }

    /// A tracer feeding `tx` (an exporter's buffer), sampling `root_ratio` of the
    /// traces this process starts (0..=1).
    pub fn new(tx: mpsc::Sender<Span>, root_ratio: f64) -> Self {
        Self {
            tx: Some(tx),
            root_ratio: root_ratio.clamp(0.0, 1.0),
        }
    }

    /// Spans are exported.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The context of run `run_id`'s fire, when this process traces: every shard
    /// of the run becomes a child of it. `None` without an exporter.
    pub fn run_context(&self, run_id: &str) -> Option<TraceContext> {
        self.enabled()
            .then(|| TraceContext::for_run(run_id, self.root_ratio))
    }

    /// Hands an ended span to the exporter; drops (and counts) it when the buffer
    /// is full, so recording never waits.
    pub fn record(&self, span: Span) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(span).is_err() {
            metrics::counter!(SPANS_DROPPED).increment(1);
        }
    }
}

static TRACER: OnceLock<Tracer> = OnceLock::new();
static DISABLED: Tracer = Tracer::disabled();

/// Makes `t` this process's tracer. Only the first call counts (the binary makes
/// it once at start); later calls answer false.
pub fn install(t: Tracer) -> bool {
    TRACER.set(t).is_ok()
}

/// This process's tracer (disabled until [`install`]).
pub fn tracer() -> &'static Tracer {
    TRACER.get().unwrap_or(&DISABLED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let c = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(c.to_string(), EXAMPLE);
        assert!(c.sampled());
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = c.child();
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        assert_eq!(child.flags, c.flags);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
        // A future version may append fields; its first four are read.
        let future = format!("{}-extra", EXAMPLE.replacen("00", "01", 1));
        assert_eq!(TraceContext::parse(&future).unwrap().span_id, c.span_id);
    }

    #[test]
    fn malformed_traceparents_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "not a W3C traceparent"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "not a W3C",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "lower-case hex",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "trace id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "span id is all zeros",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "after the flags",
            ),
            (
                "]🙂-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "ASCII only",
            ),
        ] {
            let e = TraceContext::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert_eq!(TraceContext::from_header(Some("garbage")), None);
        assert_eq!(TraceContext::from_header(None), None);
    }

    #[test]
    fn a_run_names_the_same_fire_everywhere_and_ratios_sample() {
        let a = TraceContext::for_run("nightly@1700000000000", 1.0);
        assert_eq!(a, TraceContext::for_run("nightly@1700000000000", 1.0));
        assert_ne!(
            a.trace_id,
            TraceContext::for_run("nightly@1700000060000", 1.0).trace_id
        );
        assert!(a.sampled());
        assert!(!TraceContext::for_run("nightly@1700000000000", 0.0).sampled());
        let sampled = (0..2000)
            .filter(|i| TraceContext::for_run(&format!("run-{i}"), 0.25).sampled())
            .count();
        assert!((350..650).contains(&sampled), "{sampled} of 2000 at 0.25");
        assert!(TraceContext::new_root(1.0).sampled());
    }

    #[test]
    fn unsampled_and_disabled_spans_go_nowhere() {
        let (tx, mut rx) = mpsc::channel(1);
        let t = Tracer::new(tx, 1.0);
        let parent = TraceContext::parse(EXAMPLE).unwrap();
        let mut s = Span::start("process remind", SpanKind::Consumer, &parent);
        s.attr("chime.handler", "remind").fail("boom");
        t.record(s.clone());
        let got = rx.try_recv().unwrap();
        assert_eq!(got.parent_span_id, Some(parent.span_id));
        assert_eq!(got.error.as_deref(), Some("boom"));
        // A full buffer drops instead of waiting.
        t.record(s.clone());
        t.record(s);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
        assert_eq!(Tracer::disabled().run_context("r"), None);
        assert!(t.run_context("r").is_some());
    }
}
