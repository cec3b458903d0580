//! The gRPC edge of the [`Hub`]: `chime.v1.Deliveries` served on a listener the
//! binary binds. Each stream is two tasks: a reader that turns the subscriber's
//! messages into hub calls, and a writer that batches what the hub sends into
//! `Deliver` messages. Handlers here stay thin; every decision is the hub's.
//!
//! The token check, the timeout, the concurrency limit with load shedding, tracing
//! and metrics are the same tower layers as on the coordinator's gRPC edge.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chime_shared::Error;
use chime_shared::auth::{self, Gate, Policy, Tokens};
use chime_shared::limits;
use chime_shared::telemetry::{self, Edge, RequestMetricsLayer};
use pb::subscribe_request::Kind as In;
use pb::subscribe_response::Kind as Out;
use proto as pb;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::{Hub, MAX_DECODE_BYTES, MAX_ENCODE_BYTES, Outgoing, Subscriber, wire};
use crate::WorkerError;

/// How long a new stream may take to send `Subscribe`.
pub const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(10);
/// A `Deliver` message is closed at this many deliveries or bytes.
const BATCH_DELIVERIES: usize = 512;
const BATCH_BYTES: usize = 1024 * 1024;
/// gRPC metadata key carrying the field an `InvalidArgument` names.
pub const FIELD_METADATA: &str = "chime-field";
/// A call must be answered within this (or the caller's shorter `grpc-timeout`).
/// It runs until the answer's head: a subscription is bounded only until it is
/// open (its `Subscribe` is awaited 10 s), never for its life.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls one connection may have in progress at once; one more is refused
/// `RESOURCE_EXHAUSTED` (load shedding). Open streams do not count.
const MAX_CALLS_PER_CONNECTION: usize = 256;

/// Who may subscribe.
#[derive(Debug, Clone)]
pub enum Access {
    /// Callers must present one of these tokens.
    Tokens(Arc<Tokens>),
    /// Anyone who can reach the port (the operator said so).
    Open,
}

/// The service (see the module doc).
#[derive(Debug, Clone)]
pub struct DeliveryService {
    hub: Arc<Hub>,
    /// The tokens, for a token limited to namespaces (`<token> app ns=payments`):
    /// it subscribes only to handlers of those namespaces (`payments/charge`).
    tokens: Option<Arc<Tokens>>,
}

/// The one conversion of an error to a status on this edge: a bad argument names
/// its field (message and `chime-field` metadata).
fn status(e: Error) -> Status {
    match &e {
        Error::InvalidArgument { field, .. } => {
            let mut s = Status::invalid_argument(e.to_string());
            if let Ok(v) = field.parse() {
                s.metadata_mut().insert(FIELD_METADATA, v);
            }
            s
        }
        _ => Status::unavailable(e.to_string()),
    }
}

impl DeliveryService {
    /// The service over `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, tokens: None }
    }

    /// This service, keeping subscribers whose token is limited to namespaces to
    /// their handlers (`tokens`: the service's tokens).
    pub fn limited_by(mut self, tokens: Option<Arc<Tokens>>) -> Self {
        self.tokens = tokens;
        self
    }

    /// Refuses a subscription to a handler outside the namespaces of the caller's
    /// token (`header`: its `authorization`), naming the handler's field.
    fn check_namespaces(&self, header: Option<&str>, handlers: &[String]) -> Result<(), Status> {
        let Some(who) = auth::Access::tokens(self.tokens.clone()).identify(header) else {
            return Ok(());
        };
        let Some(only) = who.namespaces else {
            return Ok(());
        };
        match handlers
            .iter()
            .position(|h| !only.iter().any(|ns| ns == limits::namespace_of(h)))
        {
            None => Ok(()),
            Some(i) => Err(Status::permission_denied(format!(
                "subscribe.handlers[{i}]: token {} may subscribe only to handlers of namespaces {}, not {:?}",
                who.name,
                only.join(", "),
                handlers[i]
            ))),
        }
    }
}

#[tonic::async_trait]
impl pb::deliveries_server::Deliveries for DeliveryService {
    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown peer".into());
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut inbound = req.into_inner();
        let first = match tokio::time::timeout(SUBSCRIBE_DEADLINE, inbound.message()).await {
            Err(_) => {
                return Err(status(Error::invalid(
                    "subscribe",
                    "no Subscribe message within 10 s",
                )));
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(m)) => m,
        };
        let Some(pb::SubscribeRequest {
            kind: Some(In::Subscribe(s)),
        }) = first
        else {
            return Err(status(Error::invalid(
                "subscribe",
                "the first message of a stream must be Subscribe",
            )));
        };
        let spec = wire::spec_from_proto(s, peer);
        self.check_namespaces(header.as_deref(), &spec.handlers)?;
        let (sub, out) = self.hub.subscribe(spec).map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        let hello = Out::Subscribed(pb::Subscribed {
            worker_id: self.hub.options().worker_id.clone(),
            family: self.hub.options().family.clone(),
            credit: sub.credit(),
            settle_timeout_ms: sub.settle_timeout_ms(),
        });
        let _ = tx
            .send(Ok(pb::SubscribeResponse { kind: Some(hello) }))
            .await;
        tokio::spawn(write(out, tx.clone()));
        tokio::spawn(read(self.hub.clone(), sub, inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Turns the subscriber's messages into hub calls until its stream ends (or a bad
/// message ends it), then unsubscribes: what it still held counts as failed.
async fn read(
    hub: Arc<Hub>,
    sub: Arc<Subscriber>,
    mut inbound: Streaming<pb::SubscribeRequest>,
    errors: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = hub.stopped() => break,
        };
        let kind = match msg {
            Ok(Some(pb::SubscribeRequest { kind: Some(k) })) => k,
            Ok(Some(pb::SubscribeRequest { kind: None })) => {
                let _ = errors
                    .send(Err(status(Error::invalid("kind", "an empty message"))))
                    .await;
                break;
            }
            // The subscriber closed its side (after a drain) or the stream broke.
            Ok(None) | Err(_) => break,
        };
        match kind {
            In::Settle(s) => {
                let refused = hub.settle(&sub, wire::verdicts_from_proto(s));
                sub.refuse(
                    refused,
                    "not held by this stream (unknown, already settled, or timed out)",
                );
            }
            In::Extend(e) => {
                let refused = sub.extend(&e.delivery_ids, e.extend_ms);
                sub.refuse(
                    refused,
                    "not held by this stream (unknown, already settled, or timed out)",
                );
            }
            In::Credit(c) => {
                if let Err(e) = hub.set_credit(&sub, c.credit) {
                    let _ = errors.send(Err(status(e))).await;
                    break;
                }
            }
            In::Drain(_) => hub.drain(&sub),
            In::Subscribe(_) => {
                let _ = errors
                    .send(Err(status(Error::invalid(
                        "subscribe",
                        "this stream is already subscribed",
                    ))))
                    .await;
                break;
            }
        }
    }
    hub.unsubscribe(&sub);
}

/// Sends what the hub hands this stream, deliveries batched into `Deliver`
/// messages; ends when the hub drops the stream (unsubscribed or shut down) or the
/// subscriber stops reading.
async fn write(
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
) {
    let mut next = out.recv().await;
    while let Some(first) = next.take() {
        let kind = match first {
            Outgoing::Deliver(d) => {
                // Deliveries are handed over by many tasks woken together (a pop's
                // worth, or the credit a settlement freed): let them queue up, so one
                // message carries many.
                tokio::task::yield_now().await;
                let mut bytes = wire::approx_bytes(&d);
                let mut batch = vec![wire::delivery_to_proto(d)];
                while batch.len() < BATCH_DELIVERIES && bytes < BATCH_BYTES {
                    match out.try_recv() {
                        Ok(Outgoing::Deliver(d)) => {
                            bytes += wire::approx_bytes(&d);
                            batch.push(wire::delivery_to_proto(d));
                        }
                        // Anything else goes after this batch, in order.
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Out::Deliver(pb::Deliver { deliveries: batch })
            }
            Outgoing::Refused { ids, reason } => Out::Refused(pb::Refused {
                delivery_ids: ids,
                reason,
            }),
            Outgoing::Drained => Out::Drained(pb::Drained {}),
            Outgoing::Closing { deadline_ms } => Out::Closing(pb::Closing {
                reason: "the chime worker is draining (shutting down)".into(),
                deadline_ms,
            }),
        };
        if tx
            .send(Ok(pb::SubscribeResponse { kind: Some(kind) }))
            .await
            .is_err()
        {
            return;
        }
        if next.is_none() {
            next = out.recv().await;
        }
    }
}

type Service = pb::deliveries_server::DeliveriesServer<DeliveryService>;

/// The service takes a token unless the operator opened it.
fn policy(access: Access) -> Policy {
    let access = match access {
        Access::Open => auth::Access::Open,
        Access::Tokens(tokens) => auth::Access::Tokens(vec![tokens]),
    };
    Policy::new().prefix(
        format!("/{}/", <Service as NamedService>::NAME),
        Gate::new("deliveries", access),
    )
}

/// The refusal of a call without an accepted token.
fn refuse(_: &Gate, _: &auth::Refusal) -> http::Response<tonic::body::Body> {
    Status::unauthenticated(
        "missing or unknown token: send `authorization: Bearer <token>` with a token of the worker's deliveries.token_file",
    )
    .into_http()
}

fn route_of(uri: &http::Uri, _: &http::Extensions) -> String {
    telemetry::grpc_service(uri.path(), &[<Service as NamedService>::NAME]).to_owned()
}

/// Serves `chime.v1.Deliveries` of `hub` on `listener` (TLS when `tls` is set)
/// until `shutdown` completes and every stream has ended.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    access: Access,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let tokens = match &access {
        Access::Tokens(t) => Some(t.clone()),
        Access::Open => None,
    };
    let svc = Service::new(DeliveryService::new(hub).limited_by(tokens))
        .max_decoding_message_size(MAX_DECODE_BYTES)
        .max_encoding_message_size(MAX_ENCODE_BYTES);
    let mut builder = tonic::transport::Server::builder()
        // A subscriber that vanished without closing (a frozen pod, a cut network)
        // is noticed within seconds, and what it held is redelivered.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // Settlements of a whole credit arrive without waiting for window updates.
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| WorkerError::Serve(format!("deliveries TLS: {e}")))?;
    }
    builder
        // tonic's own layers (outermost), then a debug span per call, metrics,
        // and the token check: as on the coordinator's gRPC edge.
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .load_shed(true)
        .layer(telemetry::grpc_trace())
        .layer(RequestMetricsLayer::new(Edge::Grpc, route_of))
        .layer(auth::require_token(
            policy(access),
            refuse as fn(&Gate, &auth::Refusal) -> http::Response<tonic::body::Body>,
        ))
        .add_service(svc)
        // TCP_NODELAY: a `Deliver` written while the previous one is unacknowledged
        // would otherwise wait for the subscriber's delayed ACK (40 ms on Linux),
        // which stalled a Node subscriber to a sixth of its rate.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| WorkerError::Serve(format!("delivery service stopped: {e}")))
}

#[cfg(test)]
mod tests {
    use chime_shared::auth::Bearer;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::delivery::HubOptions;

    /// The token layer on the real server: no token or a wrong one is refused
    /// `UNAUTHENTICATED` before the stream opens; the right one subscribes.
    #[tokio::test]
    async fn subscriptions_take_a_token() {
        const TOKEN: &str = "deliveries-token-0123456789";
        const TEAM: &str = "team-a-deliveries-token-0123456789";
        let hub = Hub::new(HubOptions::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        let served = tokio::spawn(serve(
            listener,
            hub.clone(),
            Access::Tokens(Arc::new(Tokens::fixed_limited([
                (TOKEN.to_owned(), auth::Role::Admin, None),
                (
                    TEAM.to_owned(),
                    auth::Role::Admin,
                    Some(vec!["team-a".to_owned()]),
                ),
            ]))),
            None,
            async move { until.cancelled().await },
        ));
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let subscribe = |token: Option<&str>, handler: &str| {
            let handler = handler.to_owned();
            let mut client = pb::deliveries_client::DeliveriesClient::with_interceptor(
                channel.clone(),
                Bearer::new(token).unwrap(),
            );
            async move {
                let hello = pb::SubscribeRequest {
                    kind: Some(In::Subscribe(pb::Subscribe {
                        handlers: vec![handler],
                        credit: 1,
                        ..Default::default()
                    })),
                };
                client.subscribe(tokio_stream::iter(vec![hello])).await
            }
        };
        for token in [None, Some("wrong-token-0123456789")] {
            let e = subscribe(token, "h").await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}");
            assert!(e.message().starts_with("missing or unknown token"), "{e:?}");
        }
        let mut stream = subscribe(Some(TOKEN), "h").await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(Out::Subscribed(_))), "{first:?}");
        // A token limited to a namespace subscribes to its handlers only.
        let e = subscribe(Some(TEAM), "team-b/charge").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().starts_with("subscribe.handlers[0]: token ")
                && e.message().contains("namespaces team-a"),
            "{e:?}"
        );
        let mut team = subscribe(Some(TEAM), "team-a/charge")
            .await
            .unwrap()
            .into_inner();
        let first = team.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(Out::Subscribed(_))), "{first:?}");
        drop(team);
        drop((stream, channel));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}
