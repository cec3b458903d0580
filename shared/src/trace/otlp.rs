//! The OTLP/gRPC span exporter: the edge between [`super::Tracer`] and an
//! OpenTelemetry receiver (Collector, Jaeger, Tempo, a vendor's endpoint).
//!
//! One task per process owns the gRPC client. Ended spans arrive through a bounded
//! channel (the tracer drops rather than waits when it is full); the task sends a
//! batch when it holds [`BATCH`] spans or its oldest span has waited
//! [`LINGER`], one `Export` call at a time. A failed batch is counted and dropped,
//! not retried: traces are diagnostics, and a receiver that is down must cost the
//! scheduler nothing but the buffer. On shutdown the task sends what it holds,
//! within [`FLUSH_TIMEOUT`].

use std::time::Duration;

use proto::otlp as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Span, SpanKind, Tracer, Value};
use crate::error::{Error, Result};
use crate::tls::ClientTls;

/// Spans buffered between the recorders and the export task.
pub const BUFFER: usize = 8_192;
/// Spans per `Export` call, at most.
pub const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
pub const LINGER: Duration = Duration::from_millis(500);
/// One `Export` call may take this long.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shutdown sends what is buffered within this long.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Where and as whom to export.
#[derive(Debug, Clone, Default)]
pub struct OtlpOptions {
    /// `http://host:4317` or `https://host:4317`.
    pub endpoint: String,
    /// `service.name` of the spans (`chime-coordinator`, `chime-worker`).
    pub service_name: String,
    /// `service.instance.id` (the worker id, the pod name).
    pub instance: String,
    /// Metadata sent with every export (`x-honeycomb-team`, `authorization`, …).
    pub headers: Vec<(String, String)>,
    /// TLS of `https://` endpoints.
    pub tls: ClientTls,
    /// Share of the traces this process starts (fires) that are sampled, 0..=1.
    pub root_sample_ratio: f64,
}

impl OtlpOptions {
    /// Parses `key=value,key2=value2` (the `OTEL_EXPORTER_OTLP_HEADERS` form) into
    /// headers; `field` names the setting in errors.
    pub fn parse_headers(field: &str, raw: &str) -> Result<Vec<(String, String)>> {
        raw.split(',')
            .map(str::trim)
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Error::invalid(field, format!("{kv:?} is not key=value")))?;
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes())
                    .map_err(|_| Error::invalid(field, format!("{k:?} is not a header name")))?;
                tonic::metadata::MetadataValue::<tonic::metadata::Ascii>::try_from(v.as_str())
                    .map_err(|_| {
                        Error::invalid(field, format!("the value of {k:?} is not ASCII text"))
                    })?;
                Ok((k, v))
            })
            .collect()
    }
}

/// The running export task; [`Exporter::shutdown`] flushes it.
#[derive(Debug)]
pub struct Exporter {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Exporter {
    /// Sends what is buffered (within [`FLUSH_TIMEOUT`]) and stops.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.task).await;
    }
}

/// Checks `opts` and starts the export task; answers the tracer to install. The
/// receiver is dialled lazily, so a receiver that is down does not stop the start.
pub fn start(opts: OtlpOptions) -> Result<(Tracer, Exporter)> {
    const FIELD: &str = "tracing.otlp_endpoint";
    let url = opts.endpoint.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::invalid(
            FIELD,
            format!(
                "{url:?} must be http://host:port or https://host:port (OTLP over gRPC, usually port 4317)"
            ),
        ));
    }
    if !(0.0..=1.0).contains(&opts.root_sample_ratio) {
        return Err(Error::invalid(
            "tracing.sample_ratio",
            format!("{} is not within 0..=1", opts.root_sample_ratio),
        ));
    }
    let mut ep = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| Error::invalid(FIELD, format!("{url:?}: {e}")))?
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        ep = ep
            .tls_config(opts.tls.tonic("tracing.otlp_")?)
            .map_err(|e| Error::invalid("tracing.otlp_tls_ca_file", e.to_string()))?;
    }
    let client = pb::trace_service_client::TraceServiceClient::new(ep.connect_lazy());
    let (tx, rx) = mpsc::channel(BUFFER);
    let stop = CancellationToken::new();
    let resource = resource(&opts);
    let task = tokio::spawn(run(client, rx, resource, opts.headers, stop.clone()));
    Ok((
        Tracer::new(tx, opts.root_sample_ratio),
        Exporter { stop, task },
    ))
}

type Client = pb::trace_service_client::TraceServiceClient<tonic::transport::Channel>;

async fn run(
    mut client: Client,
    mut rx: mpsc::Receiver<Span>,
    resource: pb::Resource,
    headers: Vec<(String, String)>,
    stop: CancellationToken,
) {
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    loop {
        // Wait for the first span of a batch, then at most LINGER for the rest.
        tokio::select! {
            got = rx.recv() => match got {
                Some(s) => batch.push(s),
                None => break,
            },
            _ = stop.cancelled() => break,
        }
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while batch.len() < BATCH {
            tokio::select! {
                got = rx.recv() => match got {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = &mut linger => break,
                _ = stop.cancelled() => break,
            }
        }
        export(&mut client, &resource, &headers, std::mem::take(&mut batch)).await;
    }
    // Shutting down: what is buffered goes out in full batches.
    while let Ok(s) = rx.try_recv() {
        batch.push(s);
        if batch.len() == BATCH {
            export(&mut client, &resource, &headers, std::mem::take(&mut batch)).await;
        }
    }
    if !batch.is_empty() {
        export(&mut client, &resource, &headers, batch).await;
    }
}

async fn export(
    client: &mut Client,
    resource: &pb::Resource,
    headers: &[(String, String)],
    spans: Vec<Span>,
) {
    let n = spans.len() as u64;
    let body = pb::ExportTraceServiceRequest {
        resource_spans: vec![pb::ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![pb::ScopeSpans {
                scope: Some(pb::InstrumentationScope {
                    name: "chime".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans: spans.into_iter().map(to_proto).collect(),
            }],
        }],
    };
    let mut req = tonic::Request::new(body);
    for (k, v) in headers {
        // Checked by `parse_headers` at start.
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    match client.export(req).await {
        Ok(resp) => {
            let rejected = resp
                .into_inner()
                .partial_success
                .map_or(0, |p| p.rejected_spans.max(0) as u64);
            metrics::counter!(super::SPANS_EXPORTED, "outcome" => "exported")
                .increment(n - rejected.min(n));
            if rejected > 0 {
                metrics::counter!(super::SPANS_EXPORTED, "outcome" => "failed")
                    .increment(rejected.min(n));
            }
            debug!(spans = n, rejected, "spans exported");
        }
        Err(status) => {
            metrics::counter!(super::SPANS_EXPORTED, "outcome" => "failed").increment(n);
            warn!(spans = n, code = ?status.code(), error = status.message(), "span export failed; the batch is dropped");
        }
    }
}

fn resource(opts: &OtlpOptions) -> pb::Resource {
    let mut attributes = vec![
        kv("service.name", Value::Str(opts.service_name.clone())),
        kv(
            "service.version",
            Value::Str(env!("CARGO_PKG_VERSION").into()),
        ),
        kv("telemetry.sdk.name", Value::Str("chime".into())),
        kv("telemetry.sdk.language", Value::Str("rust".into())),
    ];
    if !opts.instance.is_empty() {
        attributes.push(kv("service.instance.id", Value::Str(opts.instance.clone())));
    }
    pb::Resource { attributes }
}

fn kv(key: &str, value: Value) -> pb::KeyValue {
    pb::KeyValue {
        key: key.to_owned(),
        value: Some(pb::AnyValue {
            value: Some(match value {
                Value::Str(s) => pb::any_value::Value::StringValue(s),
                Value::Int(n) => pb::any_value::Value::IntValue(n),
            }),
        }),
    }
}

/// Span flags: the W3C flags, and "whether the parent is remote" (bit 9), which
/// is known (bit 8) for every span chime makes.
fn flags(w3c: u8, remote: bool) -> u32 {
    u32::from(w3c) | 0x100 | if remote { 0x200 } else { 0 }
}

fn to_proto(s: Span) -> pb::Span {
    pb::Span {
        trace_id: s.context.trace_id.to_vec(),
        span_id: s.context.span_id.to_vec(),
        trace_state: String::new(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name,
        kind: match s.kind {
            SpanKind::Server => pb::SpanKind::Server,
            SpanKind::Producer => pb::SpanKind::Producer,
            SpanKind::Consumer => pb::SpanKind::Consumer,
        } as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns,
        attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
        links: s
            .links
            .into_iter()
            .map(|l| pb::Link {
                trace_id: l.trace_id.to_vec(),
                span_id: l.span_id.to_vec(),
                trace_state: String::new(),
                flags: flags(l.flags, true),
            })
            .collect(),
        status: Some(match s.error {
            Some(message) => pb::Status {
                message,
                code: pb::StatusCode::Error as i32,
            },
            None => pb::Status {
                message: String::new(),
                code: pb::StatusCode::Unset as i32,
            },
        }),
        flags: flags(s.context.flags, s.parent_remote),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceContext;

    #[test]
    fn spans_map_to_otlp_with_their_links_and_status() {
        let parent =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut s = Span::at("process remind", SpanKind::Consumer, &parent, 5);
        s.attr("chime.handler", "remind")
            .attr("chime.items", 2u32)
            .fail("boom");
        s.links.push(parent);
        s.end_unix_ns = 9;
        let p = to_proto(s.clone());
        assert_eq!(p.trace_id, parent.trace_id.to_vec());
        assert_eq!(p.parent_span_id, parent.span_id.to_vec());
        assert_eq!(p.span_id, s.context.span_id.to_vec());
        assert_eq!(p.kind, pb::SpanKind::Consumer as i32);
        assert_eq!((p.start_time_unix_nano, p.end_time_unix_nano), (5, 9));
        assert_eq!(p.flags, 0x301);
        assert_eq!(p.status.unwrap().code, pb::StatusCode::Error as i32);
        assert_eq!(p.links.len(), 1);
        assert_eq!(p.attributes[1].key, "chime.items");
        let root = to_proto(Span::root(
            "fire j",
            SpanKind::Producer,
            TraceContext::for_run("r", 1.0),
            1,
        ));
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.flags, 0x101);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let err = |o: OtlpOptions| start(o).unwrap_err().to_string();
        assert!(
            err(OtlpOptions {
                endpoint: "collector:4317".into(),
                ..Default::default()
            })
            .contains("tracing.otlp_endpoint")
        );
        assert!(
            err(OtlpOptions {
                endpoint: "http://c:4317".into(),
                root_sample_ratio: 1.5,
                ..Default::default()
            })
            .contains("tracing.sample_ratio")
        );
        let h = OtlpOptions::parse_headers(
            "tracing.otlp_headers",
            "X-Team=abc, authorization = Bearer t",
        )
        .unwrap();
        assert_eq!(
            h,
            vec![
                ("x-team".into(), "abc".into()),
                ("authorization".into(), "Bearer t".into())
            ]
        );
        for bad in ["novalue", "bad key=v", "k=\u{7f}é"] {
            let e = OtlpOptions::parse_headers("tracing.otlp_headers", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("tracing.otlp_headers"), "{bad}: {e}");
        }
    }
}
