//! The gRPC edge: the worker gateway (sessions), the admin API and ([`queue`]) the
//! delay queue. Handlers are thin: they convert between `proto` and the
//! domain, and call the engine, the job store or the delay store. With `http.rs`,
//! this is the only place that sees generated types.
//!
//! What every call goes through before a handler comes from tower layers on the
//! server ([`server`]): a timeout, a per-connection concurrency limit with load
//! shedding, tracing, metrics, and the token check ([`grpc_policy`]: which token
//! each service takes).

pub mod queue;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chime_shared::auth::{self, Access, Gate, Policy, Refusal, RequireTokenLayer, Role, Tokens};
use chime_shared::clock::Clock;
use chime_shared::telemetry::{self, Edge, RequestMetricsLayer};
use chime_shared::tls::ClientTls;
use pb::coordinator_message::Kind as Out;
use pb::worker_message::Kind as In;
use proto as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tower::layer::util::{Identity, Stack};
use tower_http::trace::{GrpcMakeClassifier, TraceLayer};
use tracing::{debug, warn};

use crate::Shared;
use crate::admin::{Admin, AdminAnswer, AdminCall, Caller, Forwarder};
use crate::audit::Audit;
use crate::engine::workers_api::{EndReason, ToWorker, WorkerHello};
use crate::engine::{ShardKey, ShardOutcome, TriggerState};
use crate::error::CoordError;
use crate::model::{
    AuditEntry, JobSpec, Misfire, Overlap, Routing, RunRecord, RunState, Schedule, ShardRecord,
    WorkerView,
};
use crate::store::{JobStore, RunStore, StoredJob};

/// The admin service over these stores, with its gRPC edge; a follower forwards
/// to the leader over gRPC (with `peer_tls` when the cluster speaks TLS). Changes
/// are recorded in the audit log in `runs`, naming callers from `auth`'s tokens.
pub fn admin_api(
    shared: Arc<Shared>,
    jobs: JobStore,
    runs: Arc<dyn RunStore>,
    clock: Arc<dyn Clock>,
    auth: &Auth,
    peer_tls: Option<ClientTls>,
) -> AdminApi {
    let forwarder = Arc::new(GrpcForwarder {
        peer_tls,
        leader: Default::default(),
    });
    let audit = Audit::new(
        runs.clone(),
        clock.clone(),
        auth.admin.clone(),
        auth.producer.clone(),
    );
    AdminApi {
        admin: Admin::new(shared, jobs, runs, clock, forwarder, audit)
            .limited_by(auth.admin.clone()),
    }
}

/// Who may call what: `None` lets anyone in (`auth.allow_unauthenticated`).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Tokens of the admin API (console, CLI).
    pub admin: Option<Arc<Tokens>>,
    /// Tokens workers present when they open a session.
    pub worker: Option<Arc<Tokens>>,
    /// Tokens that open only the delay queue (`chime.v1.Queue`, the JSON API's item
    /// calls), for producer services. `None` means there are none: the queue then
    /// takes the admin tokens only (it never makes the queue open).
    pub producer: Option<Arc<Tokens>>,
    /// Whether the HTTP listener's `/metrics` takes an admin token of role viewer
    /// or above and of no namespace (`auth.metrics_require_token`): its labels
    /// name every namespace's worker groups and handlers. Off, it is open, for a
    /// scraper on a network the teams do not reach.
    pub metrics_require_token: bool,
}

impl Auth {
    /// The admin API (and everything else but sessions): admin tokens whose role is
    /// admin. A route that takes less says so (`.needs(Role::Viewer)`).
    pub fn admin_gate(&self) -> Gate {
        Gate::new("admin", Access::tokens(self.admin.clone())).needs(Role::Admin)
    }

    /// Worker sessions: worker tokens.
    pub fn worker_gate(&self) -> Gate {
        Gate::new("worker", Access::tokens(self.worker.clone()))
    }

    /// The delay queue: an admin token, or a producer one (no producer tokens
    /// configured opens nothing by itself). Producer tokens have no role and pass
    /// whatever the call; an admin-set token needs the call's role.
    pub fn producer_gate(&self) -> Gate {
        Gate::new(
            "producer or admin",
            Access::tokens(self.admin.clone()).or(self.producer.clone()),
        )
        .needs(Role::Admin)
    }

    /// Who `header` is on the admin API (`None`: no token of it).
    pub fn admin_identity(&self, header: Option<&str>) -> Option<auth::Identity> {
        Access::tokens(self.admin.clone()).identify(header)
    }
}

/// What an API call reaches: jobs, runs, workers and delayed items, which belong
/// to namespaces (a token limited to namespaces passes, and the admin service or
/// `crate::scope` keeps it to them), or what is cluster-wide (alert rules, queue
/// counts, the audit log), which such a token does not reach at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Of namespaces.
    Namespaced,
    /// Cluster-wide.
    Cluster,
}

impl Reach {
    /// `gate`, refusing tokens limited to namespaces when this is cluster-wide.
    pub fn limit(self, gate: Gate) -> Gate {
        match self {
            Reach::Namespaced => gate,
            Reach::Cluster => gate.cluster_wide(),
        }
    }
}

/// The least role of an admin token for each admin API method, and what it
/// reaches. Every method of `chime.v1.Admin` has its line (a test fails when the
/// proto gains one without); one without would fall to the service's catch-all,
/// which takes unlimited admins only.
pub const ADMIN_METHODS: [(&str, Role, Reach); 15] = [
    ("CreateJob", Role::Admin, Reach::Namespaced),
    ("CreateJobs", Role::Admin, Reach::Namespaced),
    ("UpdateJob", Role::Admin, Reach::Namespaced),
    ("DeleteJob", Role::Admin, Reach::Namespaced),
    ("GetJob", Role::Viewer, Reach::Namespaced),
    ("ListJobs", Role::Viewer, Reach::Namespaced),
    ("PauseJob", Role::Operator, Reach::Namespaced),
    ("ResumeJob", Role::Operator, Reach::Namespaced),
    ("TriggerJob", Role::Operator, Reach::Namespaced),
    ("ListRuns", Role::Viewer, Reach::Namespaced),
    ("GetRun", Role::Viewer, Reach::Namespaced),
    ("KillRun", Role::Operator, Reach::Namespaced),
    ("RerunWorkflow", Role::Operator, Reach::Namespaced),
    ("ListWorkers", Role::Viewer, Reach::Namespaced),
    ("ListAudit", Role::Viewer, Reach::Cluster),
];

/// The least role of an admin token for each delay queue method (a producer token
/// passes them all), and its reach. Every method of `chime.v1.Queue` has its line.
/// A token limited to namespaces (or handlers) reaches the items of its scope
/// (`crate::scope`), not the queues' counts, which are everyone's.
pub const QUEUE_METHODS: [(&str, Role, Reach); 7] = [
    ("Enqueue", Role::Operator, Reach::Namespaced),
    ("GetItem", Role::Viewer, Reach::Namespaced),
    ("CancelItem", Role::Operator, Reach::Namespaced),
    ("RescheduleItem", Role::Operator, Reach::Namespaced),
    ("QueueStats", Role::Viewer, Reach::Cluster),
    ("ListDeadLetters", Role::Viewer, Reach::Namespaced),
    ("RequeueDeadLetters", Role::Operator, Reach::Namespaced),
];

/// `/<service>/`, the prefix of every method path of a gRPC service.
fn methods_of<S: NamedService>() -> String {
    format!("/{}/", S::NAME)
}

/// Which token each gRPC method takes: sessions a worker token; the admin API an
/// admin token of the method's role ([`ADMIN_METHODS`]); the delay queue a
/// producer token, or an admin one of the method's role ([`QUEUE_METHODS`]). A
/// method of those services without its own line takes admins only. Health and
/// reflection are open (they change nothing), and so are unknown paths, which
/// tonic answers `UNIMPLEMENTED`.
pub fn grpc_policy(auth: &Auth) -> Policy {
    let admin = methods_of::<pb::admin_server::AdminServer<AdminApi>>();
    let queue = methods_of::<pb::queue_server::QueueServer<queue::QueueApi>>();
    let mut policy = Policy::new().prefix(
        methods_of::<pb::worker_gateway_server::WorkerGatewayServer<Gateway>>(),
        auth.worker_gate(),
    );
    for (method, need, reach) in ADMIN_METHODS {
        let gate = reach.limit(auth.admin_gate().needs(need));
        policy = policy.exact(format!("{admin}{method}"), gate);
    }
    // Producers hold a producer token (or an admin one): it opens the delay queue
    // and nothing else. A token limited to namespaces reaches its items
    // (`crate::scope`), not the queues' counts, which are everyone's.
    for (method, need, reach) in QUEUE_METHODS {
        let gate = reach.limit(auth.producer_gate().needs(need));
        policy = policy.exact(format!("{queue}{method}"), gate);
    }
    policy
        .prefix(admin, auth.admin_gate().cluster_wide())
        .prefix(queue, auth.producer_gate().cluster_wide())
}

/// The refusal of a call its gate does not pass: `UNAUTHENTICATED` without a known
/// token, `PERMISSION_DENIED` for a known one whose role is too low, as a gRPC
/// answer (HTTP 200, the status in the headers).
fn refuse(gate: &Gate, why: &Refusal) -> http::Response<tonic::body::Body> {
    Status::from(refusal_error(gate, why)).into_http()
}

/// A gate's refusal as the domain error both edges answer.
pub(crate) fn refusal_error(gate: &Gate, why: &Refusal) -> CoordError {
    match why {
        Refusal::Unauthenticated => {
            CoordError::Unauthenticated(format!("missing or unknown {} token", gate.name()))
        }
        Refusal::ClusterWide { who } => CoordError::PermissionDenied(format!(
            "token {} is limited to namespaces {}; this is cluster-wide and needs a token of no namespace",
            who.name,
            who.namespaces.as_deref().unwrap_or_default().join(", ")
        )),
        Refusal::Forbidden { who, need } => CoordError::PermissionDenied(format!(
            "token {} is {} {}; this needs {} {} token",
            who.name,
            article(who.role),
            who.role,
            article(*need),
            need
        )),
    }
}

fn article(role: Role) -> &'static str {
    match role {
        Role::Operator | Role::Admin => "an",
        Role::Viewer => "a",
    }
}

/// The services the coordinator serves, the `route` label of its gRPC metrics.
const SERVICES: [&str; 5] = [
    <pb::worker_gateway_server::WorkerGatewayServer<Gateway> as NamedService>::NAME,
    <pb::admin_server::AdminServer<AdminApi> as NamedService>::NAME,
    <pb::queue_server::QueueServer<queue::QueueApi> as NamedService>::NAME,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

fn route_of(uri: &http::Uri, _: &http::Extensions) -> String {
    telemetry::grpc_service(uri.path(), &SERVICES).to_owned()
}

/// A worker's result → the shard it names and how it ended (an unknown status is a
/// failure).
pub fn outcome_from_proto(r: pb::RunResult) -> (Option<pb::RunRef>, ShardOutcome) {
    let outcome = match pb::RunStatus::try_from(r.status) {
        Ok(pb::RunStatus::Succeeded) => ShardOutcome::Succeeded(r.output),
        Ok(pb::RunStatus::Cancelled) => ShardOutcome::Cancelled(r.error),
        _ => ShardOutcome::Failed(if r.error.is_empty() {
            "failed".into()
        } else {
            r.error
        }),
    };
    (r.run, outcome)
}

/// Largest gRPC message the coordinator decodes (a job with 64 KiB params and
/// 64 KiB of shard params, a register with many running shards, fit many times).
/// The gRPC edge's body limit: per message, since a stream's body never ends.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// A call must be answered within this (or the caller's shorter `grpc-timeout`),
/// else `CANCELLED`. It runs until the answer's head: a session stream is bounded
/// only until it is open (its `Register` is awaited 10 s), never for its life.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls one connection may have in progress at once; one more is refused
/// `RESOURCE_EXHAUSTED` at once (load shedding) rather than queued. Open streams do
/// not count, only calls not yet answered.
pub const MAX_CALLS_PER_CONNECTION: usize = 256;

/// The layers [`server`] adds inside tonic's own (a `Stack` names the innermost
/// first: the token check, then metrics, then tracing).
pub type Layers = Stack<
    RequireTokenLayer<fn(&Gate, &Refusal) -> http::Response<tonic::body::Body>>,
    Stack<RequestMetricsLayer, Stack<TraceLayer<GrpcMakeClassifier>, Identity>>,
>;

/// The gRPC router: the worker gateway, `admin`, `queue`, the standard health
/// service and server reflection (so `grpcurl` and friends work without the proto
/// files).
pub async fn server(
    shared: Arc<Shared>,
    admin: AdminApi,
    queue: queue::QueueApi,
    auth: Auth,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::server::Router<Layers>, CoordError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // A coordinator serves both services whether it leads or not: a follower
    // redirects workers and forwards admin calls, so it is healthy either way.
    health
        .set_serving::<pb::worker_gateway_server::WorkerGatewayServer<Gateway>>()
        .await;
    health
        .set_serving::<pb::admin_server::AdminServer<AdminApi>>()
        .await;
    health
        .set_serving::<pb::queue_server::QueueServer<queue::QueueApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| CoordError::invalid("tls.cert_file", e))?;
    }
    let router = builder
        // Short keep-alives: a worker whose coordinator froze (or the other way
        // round) notices within seconds, not minutes.
        .http2_keepalive_interval(Some(Duration::from_secs(3)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        // tonic's own tower layers, outermost: the timeout (which also honours
        // `grpc-timeout`), the concurrency limit and load shedding.
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .load_shed(true)
        // Then, outermost first: a debug span per call (failures are answers
        // like any other here, and headers, which carry tokens, are never
        // recorded), metrics, and the token check.
        .layer(telemetry::grpc_trace())
        .layer(RequestMetricsLayer::new(Edge::Grpc, route_of))
        .layer(auth::require_token(
            grpc_policy(&auth),
            refuse as fn(&Gate, &Refusal) -> http::Response<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(
            pb::worker_gateway_server::WorkerGatewayServer::new(Gateway {
                shared,
                workers: auth.worker.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::admin_server::AdminServer::new(admin).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::queue_server::QueueServer::new(queue).max_decoding_message_size(MAX_MESSAGE_BYTES),
        );
    Ok(match reflection {
        Some(r) => router.add_service(r),
        None => router,
    })
}

/// How long a follower that knows no live leader holds a worker's Register for
/// one to be elected, before it answers `NotLeader` anyway: longer than a lease
/// runs out after a leader dies (default TTL 5 s), well short of `CALL_TIMEOUT`.
const HOLD_FOR_A_LEADER: Duration = Duration::from_secs(6);

/// The worker gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    /// The worker tokens: one limited to namespaces registers only into groups
    /// of them.
    workers: Option<Arc<Tokens>>,
}

fn shard_key(r: Option<pb::RunRef>) -> Result<ShardKey, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("invalid run: missing"))?;
    Ok(ShardKey {
        run_id: r.run_id,
        shard: r.shard_index,
        attempt: r.attempt,
    })
}

fn run_ref(k: &ShardKey) -> pb::RunRef {
    pb::RunRef {
        run_id: k.run_id.clone(),
        shard_index: k.shard,
        attempt: k.attempt,
    }
}

/// The wire form of an engine message on a session that the engine accepted at
/// `accepted_at_ms` (the origin of the session clock).
fn to_proto(msg: ToWorker, accepted_at_ms: i64) -> pb::CoordinatorMessage {
    let kind = match msg {
        ToWorker::Assign(a) => Out::Assign(pb::Assign {
            // The fire's span, named by the run id: the same for every shard and
            // attempt, and for the leader that finishes the run (engine/runs.rs).
            traceparent: chime_shared::trace::tracer()
                .run_context(&a.key.run_id)
                .filter(|t| t.sampled())
                .map(|t| t.to_string())
                .unwrap_or_default(),
            run: Some(run_ref(&a.key)),
            fire_id: a.fire_id,
            job: a.job,
            handler: a.handler,
            params: a.params,
            shard_params: a.shard_params,
            shard_index: a.key.shard,
            shard_total: a.shard_total,
            deadline_ms: a.deadline_ms,
            scheduled_at_ms: a.scheduled_at_ms,
            // At least 1: 0 means "no limit" on the wire.
            start_by_session_ms: (a.start_by_ms - accepted_at_ms).max(1),
        }),
        ToWorker::Cancel(k, reason) => Out::Cancel(pb::Cancel {
            run: Some(run_ref(&k)),
            reason,
        }),
        ToWorker::End(why) => {
            let (reason, detail) = end_reason(why);
            Out::SessionEnded(pb::SessionEnded {
                reason: reason as i32,
                detail: detail.to_owned(),
            })
        }
    };
    pb::CoordinatorMessage { kind: Some(kind) }
}

/// Why a session ended, for the wire.
fn end_reason(why: EndReason) -> (pb::SessionEndReason, &'static str) {
    use pb::SessionEndReason as R;
    match why {
        EndReason::DeclaredDead => (
            R::DeclaredDead,
            "declared dead: heartbeats missed; its shards went to other workers",
        ),
        EndReason::Replaced => (
            R::Replaced,
            "replaced by a newer session with the same worker id",
        ),
        EndReason::Drained => (R::Drained, "drained: every result arrived"),
        EndReason::LeadershipEnded => (
            R::LeadershipEnded,
            "this coordinator stopped leading; reconnect to the next leader",
        ),
        // Never sent: the worker closed the stream itself.
        EndReason::WorkerClosed => (R::Unspecified, "the worker closed the stream"),
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_gateway_server::WorkerGateway for Gateway {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let who = Access::tokens(self.workers.clone()).identify(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
        );
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10 s"))??;
        let Some(pb::WorkerMessage {
            kind: Some(In::Register(reg)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "invalid session: the first message must be Register",
            ));
        };
        // A worker token of a team's namespaces cannot join another team's
        // group: its jobs' shards (and params) would reach it.
        if let Some(who) = &who {
            let ns = chime_shared::limits::namespace_of(&reg.group);
            if !who.may_see(ns) {
                return Err(Status::from(CoordError::PermissionDenied(format!(
                    "register.group: token {} may register into groups of namespaces {} only, not {ns:?}",
                    who.name,
                    who.namespaces.as_deref().unwrap_or_default().join(", ")
                ))));
            }
        }
        let hello = WorkerHello {
            worker_id: reg.worker_id,
            group: reg.group,
            handlers: reg.handlers,
            capacity: reg.capacity,
            labels: reg.labels.into_iter().collect::<BTreeMap<_, _>>(),
            running: reg
                .running
                .into_iter()
                .map(|r| ShardKey {
                    run_id: r.run_id,
                    shard: r.shard_index,
                    attempt: r.attempt,
                })
                .collect(),
        };
        let worker = hello.worker_id.clone();
        // Room for a second's assignments of 10,000 jobs on two workers (the
        // channel's blocks are allocated as they fill, not up front).
        let (to_worker, from_engine) = mpsc::channel::<ToWorker>(8192);
        // A follower that cannot name a live leader holds the answer until the
        // election settles (see `Shared::leader_named`).
        let current = self.shared.leader_named(HOLD_FOR_A_LEADER).await;
        let registered = match &current.engine {
            Some(engine) => engine.register(hello, to_worker).await,
            None => Err(CoordError::NotLeader {
                leader: current.leader.clone(),
            }),
        };
        let accepted = match registered {
            Ok(a) => a,
            Err(CoordError::NotLeader { leader }) => {
                // One message, then the stream ends: the worker asks the leader.
                let not_leader = pb::CoordinatorMessage {
                    kind: Some(Out::NotLeader(pb::NotLeader { leader })),
                };
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(not_leader)))));
            }
            Err(e) => return Err(e.into()),
        };
        let registered = pb::CoordinatorMessage {
            kind: Some(Out::Registered(pb::Registered {
                worker_id: worker.clone(),
                heartbeat_interval_ms: accepted.heartbeat_interval_ms as u32,
                coordinator: accepted.coordinator,
            })),
        };
        // Engine -> worker: converted as tonic reads them, with no task or channel
        // between (each hop was a wake per assignment). Ends after the engine's
        // `End` (the session was replaced, declared dead or drained, or the engine
        // stopped).
        let outbound = ToWorkerStream {
            first: Some(registered),
            from_engine,
            accepted_at_ms: accepted.accepted_at_ms,
            ended: false,
        };
        // Worker -> engine, until the stream ends.
        let Some(engine) = current.engine else {
            return Err(Status::unavailable("not the leader"));
        };
        let session = accepted.session;
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(worker_id = %worker, error = %e, "session stream error");
                        break;
                    }
                };
                let r = match msg.kind {
                    Some(In::Heartbeat(h)) => {
                        let running = h
                            .running
                            .into_iter()
                            .map(|r| ShardKey {
                                run_id: r.run_id,
                                shard: r.shard_index,
                                attempt: r.attempt,
                            })
                            .collect();
                        engine.heartbeat(&worker, session, running).await
                    }
                    Some(In::RunStarted(s)) => match shard_key(s.run) {
                        Ok(k) => engine.started(&worker, session, k, s.started_at_ms).await,
                        Err(_) => Ok(()),
                    },
                    Some(In::RunLog(l)) => match shard_key(l.run) {
                        Ok(k) => engine.log(k, l.line).await,
                        Err(_) => Ok(()),
                    },
                    Some(In::RunResult(r)) => {
                        let (run, outcome) = outcome_from_proto(r);
                        match shard_key(run) {
                            Ok(k) => engine.result(&worker, session, k, outcome).await,
                            Err(_) => Ok(()),
                        }
                    }
                    Some(In::Draining(_)) => engine.draining(&worker, session).await,
                    Some(In::Register(_)) | None => {
                        warn!(worker_id = %worker, "unexpected message in a session; ignored");
                        Ok(())
                    }
                };
                if r.is_err() {
                    break;
                }
            }
            let _ = engine.closed(&worker, session).await;
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// What a session sends its worker once the engine accepted it: `Registered`,
/// then the engine's messages in their wire form, up to and including `End`.
struct ToWorkerStream {
    first: Option<pb::CoordinatorMessage>,
    from_engine: mpsc::Receiver<ToWorker>,
    accepted_at_ms: i64,
    ended: bool,
}

impl Stream for ToWorkerStream {
    type Item = Result<pb::CoordinatorMessage, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(first)));
        }
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        self.from_engine.poll_recv(cx).map(|m| {
            m.map(|m| {
                self.ended = matches!(m, ToWorker::End(_));
                Ok(to_proto(m, self.accepted_at_ms))
            })
        })
    }
}

type LeaderClient = pb::admin_client::AdminClient<tonic::transport::Channel>;

/// The gRPC edge of the admin service ([`Admin`]): converts each request to an
/// [`AdminCall`] and the answer back, nothing more. Forwarding to the leader happens
/// inside [`Admin`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    admin: Admin,
}

impl AdminApi {
    /// The domain service this edge wraps (the HTTP edge wraps the same one).
    pub fn service(&self) -> Admin {
        self.admin.clone()
    }
}

/// Reaches the leader's admin service over gRPC: the client is cached per leader
/// address, and the caller's token goes along (the leader checks it again).
#[derive(Debug)]
struct GrpcForwarder {
    /// TLS for forwarding to the leader (when the cluster speaks TLS).
    peer_tls: Option<ClientTls>,
    leader: tokio::sync::Mutex<Option<(String, LeaderClient)>>,
}

/// Proto job -> domain job (validation happens in the store).
pub fn job_from_proto(j: pb::Job) -> Result<(JobSpec, i64), CoordError> {
    let schedule = match j.schedule.and_then(|s| s.kind) {
        Some(pb::schedule::Kind::Cron(c)) => Schedule::Cron {
            expr: c.expr,
            time_zone: c.time_zone,
        },
        Some(pb::schedule::Kind::FixedRate(r)) => Schedule::FixedRate {
            every_ms: r.every_ms,
        },
        Some(pb::schedule::Kind::FixedDelay(d)) => Schedule::FixedDelay {
            delay_ms: d.delay_ms,
        },
        Some(pb::schedule::Kind::Once(o)) => Schedule::Once { at_ms: o.at_ms },
        Some(pb::schedule::Kind::Manual(_)) => Schedule::Manual,
        None => return Err(CoordError::invalid("schedule", "is missing")),
    };
    let routing = match pb::Routing::try_from(j.routing)
        .map_err(|_| CoordError::invalid("routing", "unknown value"))?
    {
        pb::Routing::Unspecified | pb::Routing::RoundRobin => Routing::RoundRobin,
        pb::Routing::ShardingBroadcast => Routing::ShardingBroadcast,
        pb::Routing::Random => Routing::Random,
        pb::Routing::ConsistentHash => Routing::ConsistentHash,
        pb::Routing::LeastRecentlyUsed => Routing::LeastRecentlyUsed,
        pb::Routing::LeastLoaded => Routing::LeastLoaded,
        pb::Routing::Failover => Routing::Failover,
        pb::Routing::BusyOver => Routing::BusyOver,
        pb::Routing::First => Routing::First,
        pb::Routing::Last => Routing::Last,
    };
    let overlap = match pb::Overlap::try_from(j.overlap)
        .map_err(|_| CoordError::invalid("overlap", "unknown value"))?
    {
        pb::Overlap::Unspecified | pb::Overlap::Allow => Overlap::Allow,
        pb::Overlap::Skip => Overlap::Skip,
        pb::Overlap::BufferOne => Overlap::BufferOne,
        pb::Overlap::CancelRunning => Overlap::CancelRunning,
    };
    let misfire = match pb::Misfire::try_from(j.misfire)
        .map_err(|_| CoordError::invalid("misfire", "unknown value"))?
    {
        pb::Misfire::Unspecified | pb::Misfire::FireOnce => Misfire::FireOnce,
        pb::Misfire::Skip => Misfire::Skip,
        pb::Misfire::FireAll => Misfire::FireAll,
    };
    let workflow = match j.workflow_json.trim() {
        "" => None,
        text => {
            Some(serde_json::from_str(text).map_err(|e| CoordError::invalid("workflow_json", e))?)
        }
    };
    Ok((
        JobSpec {
            name: j.name,
            group: j.group,
            handler: j.handler,
            schedule,
            routing,
            shard_count: j.shard_count,
            shard_params: j.shard_params,
            hash_param: j.hash_param,
            params: j.params,
            overlap,
            misfire,
            catch_up_window_ms: j.catch_up_window_ms,
            timeout_ms: j.timeout_ms,
            retries: j.retries,
            retry_backoff_ms: j.retry_backoff_ms,
            children: j.children,
            paused: j.paused,
            start_at_ms: j.start_at_ms,
            end_at_ms: j.end_at_ms,
            jitter_ms: j.jitter_ms,
            created_at_ms: j.created_at_ms,
            workflow,
        },
        j.version,
    ))
}

pub use crate::admin::JobView;

/// Proto job -> the view clients print.
pub fn job_view(j: pb::Job) -> Result<JobView, CoordError> {
    let next_fire_ms = (j.next_fire_ms != 0).then_some(j.next_fire_ms);
    let last_fire_ms = (j.last_fire_ms != 0).then_some(j.last_fire_ms);
    let (spec, version) = job_from_proto(j)?;
    Ok(JobView {
        spec,
        version,
        next_fire_ms,
        last_fire_ms,
    })
}

/// Domain job -> proto job.
pub fn job_to_proto(j: &StoredJob, state: TriggerState) -> pb::Job {
    let s = &j.spec;
    let schedule = match &s.schedule {
        Schedule::Cron { expr, time_zone } => pb::schedule::Kind::Cron(pb::CronSchedule {
            expr: expr.clone(),
            time_zone: time_zone.clone(),
        }),
        Schedule::FixedRate { every_ms } => pb::schedule::Kind::FixedRate(pb::FixedRate {
            every_ms: *every_ms,
        }),
        Schedule::FixedDelay { delay_ms } => pb::schedule::Kind::FixedDelay(pb::FixedDelay {
            delay_ms: *delay_ms,
        }),
        Schedule::Once { at_ms } => pb::schedule::Kind::Once(pb::Once { at_ms: *at_ms }),
        Schedule::Manual => pb::schedule::Kind::Manual(pb::Manual {}),
    };
    let routing = match s.routing {
        Routing::ShardingBroadcast => pb::Routing::ShardingBroadcast,
        Routing::RoundRobin => pb::Routing::RoundRobin,
        Routing::Random => pb::Routing::Random,
        Routing::ConsistentHash => pb::Routing::ConsistentHash,
        Routing::LeastRecentlyUsed => pb::Routing::LeastRecentlyUsed,
        Routing::LeastLoaded => pb::Routing::LeastLoaded,
        Routing::Failover => pb::Routing::Failover,
        Routing::BusyOver => pb::Routing::BusyOver,
        Routing::First => pb::Routing::First,
        Routing::Last => pb::Routing::Last,
    };
    let overlap = match s.overlap {
        Overlap::Allow => pb::Overlap::Allow,
        Overlap::Skip => pb::Overlap::Skip,
        Overlap::BufferOne => pb::Overlap::BufferOne,
        Overlap::CancelRunning => pb::Overlap::CancelRunning,
    };
    let misfire = match s.misfire {
        Misfire::Skip => pb::Misfire::Skip,
        Misfire::FireOnce => pb::Misfire::FireOnce,
        Misfire::FireAll => pb::Misfire::FireAll,
    };
    pb::Job {
        name: s.name.clone(),
        group: s.group.clone(),
        handler: s.handler.clone(),
        schedule: Some(pb::Schedule {
            kind: Some(schedule),
        }),
        routing: routing as i32,
        shard_count: s.shard_count,
        shard_params: s.shard_params.clone(),
        hash_param: s.hash_param.clone(),
        params: s.params.clone(),
        overlap: overlap as i32,
        misfire: misfire as i32,
        catch_up_window_ms: s.catch_up_window_ms,
        timeout_ms: s.timeout_ms,
        retries: s.retries,
        retry_backoff_ms: s.retry_backoff_ms,
        children: s.children.clone(),
        paused: s.paused,
        start_at_ms: s.start_at_ms,
        end_at_ms: s.end_at_ms,
        jitter_ms: s.jitter_ms,
        next_fire_ms: state.next_fire_ms.unwrap_or(0),
        last_fire_ms: state.last_fire_ms.unwrap_or(0),
        version: j.version,
        created_at_ms: s.created_at_ms,
        workflow_json: s
            .workflow
            .as_ref()
            .and_then(|w| serde_json::to_string(w).ok())
            .unwrap_or_default(),
    }
}

fn state_to_proto(s: RunState) -> i32 {
    (match s {
        RunState::Pending => pb::RunState::Pending,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
        RunState::TimedOut => pb::RunState::TimedOut,
        RunState::Skipped => pb::RunState::Skipped,
    }) as i32
}

fn shard_to_proto(s: &ShardRecord) -> pb::Shard {
    pb::Shard {
        index: s.index,
        total: s.total,
        worker_id: s.worker_id.clone(),
        attempt: s.attempt,
        state: state_to_proto(s.state),
        started_at_ms: s.started_at_ms,
        finished_at_ms: s.finished_at_ms,
        output: s.output.clone(),
        error: s.error.clone(),
        log_tail: s.log_tail.clone(),
        shard_params: s.shard_params.clone(),
        failures: s.failures,
    }
}

/// Domain run -> proto run.
pub fn run_to_proto(r: &RunRecord) -> pb::Run {
    pb::Run {
        run_id: r.run_id.clone(),
        fire_id: r.fire_id.clone(),
        job: r.job.clone(),
        cause: r.cause.clone(),
        scheduled_at_ms: r.scheduled_at_ms,
        fired_at_ms: r.fired_at_ms,
        finished_at_ms: r.finished_at_ms,
        state: state_to_proto(r.state),
        params: r.params.clone(),
        shards: r.shards.iter().map(shard_to_proto).collect(),
        parent_run_id: r.parent_run_id.clone(),
        note: r.note.clone(),
        fence: r.fence,
        nodes_json: if r.nodes.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&r.nodes).unwrap_or_default()
        },
    }
}

fn worker_to_proto(w: WorkerView) -> pb::WorkerInfo {
    pb::WorkerInfo {
        worker_id: w.worker_id,
        group: w.group,
        handlers: w.handlers,
        capacity: w.capacity,
        running: w.running,
        labels: w.labels.into_iter().collect(),
        connected_at_ms: w.connected_at_ms,
        last_heartbeat_ms: w.last_heartbeat_ms,
        draining: w.draining,
    }
}

impl GrpcForwarder {
    /// A client of the leader at `leader`.
    async fn client(&self, leader: &str) -> Result<LeaderClient, CoordError> {
        let mut cached = self.leader.lock().await;
        if let Some((addr, client)) = cached.as_ref()
            && addr == leader
        {
            return Ok(client.clone());
        }
        // Peers speak TLS when this coordinator does (they share one config).
        let (url, tls) = match &self.peer_tls {
            _ if leader.starts_with("http") => (leader.to_owned(), self.peer_tls.clone()),
            Some(t) => (format!("https://{leader}"), Some(t.clone())),
            None => (format!("http://{leader}"), None),
        };
        let unreachable = |e: &dyn std::fmt::Display| {
            CoordError::Unavailable(format!("cannot reach the leader {leader}: {e}"))
        };
        let endpoint = chime_shared::tls::endpoint(&url, &tls.unwrap_or_default(), "tls.")
            .map_err(|e| unreachable(&e))?;
        let channel = endpoint.connect().await.map_err(|e| unreachable(&e))?;
        let client = LeaderClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        *cached = Some((leader.to_owned(), client.clone()));
        Ok(client)
    }
}

/// Marks an admin call a follower forwarded. Views of who leads can be stale (a
/// coordinator restarted on its old address finds itself in the leader key until
/// the old lease expires), and a forwarded call that is forwarded again could go
/// round in circles, a call in progress per hop; one hop is all a call gets
/// ([`Caller::forwarded`]).
const FORWARDED: &str = "chime-forwarded";

/// A request to the leader carrying the caller's token, marked forwarded.
fn as_caller<T>(caller: &Caller, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(v) = caller.authorization.as_deref().and_then(|v| v.parse().ok()) {
        req.metadata_mut().insert("authorization", v);
    }
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

/// The caller of a gRPC request.
pub(crate) fn caller_of<T>(req: &Request<T>) -> Caller {
    Caller {
        authorization: req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        forwarded: req.metadata().contains_key(FORWARDED),
    }
}

#[async_trait::async_trait]
impl Forwarder for GrpcForwarder {
    async fn forward(
        &self,
        leader: &str,
        caller: &Caller,
        call: AdminCall,
    ) -> Result<AdminAnswer, CoordError> {
        let mut c = self.client(leader).await?;
        let job = |j: Response<pb::Job>| job_view(j.into_inner()).map(AdminAnswer::Job);
        let run = |r: Response<pb::Run>| AdminAnswer::Run(run_from_proto(r.into_inner()));
        let out = match call {
            AdminCall::CreateJob(spec) => {
                let req = pb::CreateJobRequest {
                    job: Some(job_to_proto(
                        &StoredJob { spec, version: 0 },
                        TriggerState::default(),
                    )),
                };
                job(c.create_job(as_caller(caller, req)).await?)?
            }
            AdminCall::CreateJobs(specs) => {
                let req = pb::CreateJobsRequest {
                    jobs: specs
                        .into_iter()
                        .map(|spec| {
                            job_to_proto(&StoredJob { spec, version: 0 }, TriggerState::default())
                        })
                        .collect(),
                };
                let jobs = c
                    .create_jobs(as_caller(caller, req))
                    .await?
                    .into_inner()
                    .jobs;
                AdminAnswer::Jobs(jobs.into_iter().map(job_view).collect::<Result<_, _>>()?)
            }
            AdminCall::UpdateJob { spec, version } => {
                let req = pb::UpdateJobRequest {
                    job: Some(job_to_proto(
                        &StoredJob { spec, version },
                        TriggerState::default(),
                    )),
                };
                job(c.update_job(as_caller(caller, req)).await?)?
            }
            AdminCall::DeleteJob(name) => {
                c.delete_job(as_caller(caller, pb::JobRef { name })).await?;
                AdminAnswer::Deleted
            }
            AdminCall::GetJob(name) => {
                job(c.get_job(as_caller(caller, pb::JobRef { name })).await?)?
            }
            AdminCall::ListJobs { group, namespace } => {
                let jobs = c
                    .list_jobs(as_caller(caller, pb::ListJobsRequest { group, namespace }))
                    .await?
                    .into_inner()
                    .jobs;
                AdminAnswer::Jobs(jobs.into_iter().map(job_view).collect::<Result<_, _>>()?)
            }
            AdminCall::PauseJob(name) => {
                job(c.pause_job(as_caller(caller, pb::JobRef { name })).await?)?
            }
            AdminCall::ResumeJob(name) => {
                job(c.resume_job(as_caller(caller, pb::JobRef { name })).await?)?
            }
            AdminCall::TriggerJob { name, params } => {
                let req = pb::TriggerJobRequest {
                    name,
                    params: params.unwrap_or_default(),
                };
                run(c.trigger_job(as_caller(caller, req)).await?)
            }
            AdminCall::ListRuns {
                job,
                limit,
                namespace,
            } => {
                let req = pb::ListRunsRequest {
                    job,
                    limit,
                    namespace,
                };
                let runs = c.list_runs(as_caller(caller, req)).await?.into_inner().runs;
                AdminAnswer::Runs(runs.into_iter().map(run_from_proto).collect())
            }
            AdminCall::GetRun(run_id) => {
                run(c.get_run(as_caller(caller, pb::RunId { run_id })).await?)
            }
            AdminCall::KillRun(run_id) => {
                run(c.kill_run(as_caller(caller, pb::RunId { run_id })).await?)
            }
            AdminCall::RerunWorkflow { run_id, node } => {
                let req = pb::RerunRequest { run_id, node };
                run(c.rerun_workflow(as_caller(caller, req)).await?)
            }
            AdminCall::ListAudit { limit, before } => {
                let entries = c
                    .list_audit(as_caller(caller, pb::ListAuditRequest { limit, before }))
                    .await?
                    .into_inner()
                    .entries;
                AdminAnswer::Audit(entries.into_iter().map(audit_from_proto).collect())
            }
            AdminCall::ListWorkers { group, namespace } => {
                let w = c
                    .list_workers(as_caller(
                        caller,
                        pb::ListWorkersRequest { group, namespace },
                    ))
                    .await?
                    .into_inner();
                AdminAnswer::Workers {
                    workers: w.workers.into_iter().map(worker_from_proto).collect(),
                    leader: w.leader,
                }
            }
        };
        Ok(out)
    }
}

impl AdminApi {
    /// Answers `call` for the caller of `req`.
    async fn answer<T>(&self, req: &Request<T>, call: AdminCall) -> Result<AdminAnswer, Status> {
        Ok(self.admin.call(&caller_of(req), call).await?)
    }

    async fn job_answer<T>(
        &self,
        req: &Request<T>,
        call: AdminCall,
    ) -> Result<Response<pb::Job>, Status> {
        let j = self.answer(req, call).await?.into_job()?;
        Ok(Response::new(view_to_proto(&j)))
    }

    async fn run_answer<T>(
        &self,
        req: &Request<T>,
        call: AdminCall,
    ) -> Result<Response<pb::Run>, Status> {
        let r = self.answer(req, call).await?.into_run()?;
        Ok(Response::new(run_to_proto(&r)))
    }
}

/// Domain job view -> proto job.
pub fn view_to_proto(v: &JobView) -> pb::Job {
    let stored = StoredJob {
        spec: v.spec.clone(),
        version: v.version,
    };
    let state = TriggerState {
        next_fire_ms: v.next_fire_ms,
        last_fire_ms: v.last_fire_ms,
    };
    job_to_proto(&stored, state)
}

/// The job a create or update request carries.
fn job_in(job: Option<pb::Job>) -> Result<(JobSpec, i64), Status> {
    let job = job.ok_or_else(|| Status::invalid_argument("invalid job: missing"))?;
    Ok(job_from_proto(job)?)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let (spec, _) = job_in(req.get_ref().job.clone())?;
        self.job_answer(&req, AdminCall::CreateJob(spec)).await
    }

    async fn create_jobs(
        &self,
        req: Request<pb::CreateJobsRequest>,
    ) -> Result<Response<pb::CreateJobsResponse>, Status> {
        let specs = req
            .get_ref()
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                job_from_proto(j.clone())
                    .map(|(spec, _)| spec)
                    .map_err(|e| e.at("jobs", i))
            })
            .collect::<Result<Vec<_>, CoordError>>()?;
        let jobs = self
            .answer(&req, AdminCall::CreateJobs(specs))
            .await?
            .into_jobs()?;
        Ok(Response::new(pb::CreateJobsResponse {
            jobs: jobs.iter().map(view_to_proto).collect(),
        }))
    }

    async fn update_job(
        &self,
        req: Request<pb::UpdateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let (spec, version) = job_in(req.get_ref().job.clone())?;
        self.job_answer(&req, AdminCall::UpdateJob { spec, version })
            .await
    }

    async fn delete_job(
        &self,
        req: Request<pb::JobRef>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let name = req.get_ref().name.clone();
        self.answer(&req, AdminCall::DeleteJob(name)).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let name = req.get_ref().name.clone();
        self.job_answer(&req, AdminCall::GetJob(name)).await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let call = AdminCall::ListJobs {
            group: req.get_ref().group.clone(),
            namespace: req.get_ref().namespace.clone(),
        };
        let jobs = self.answer(&req, call).await?.into_jobs()?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(view_to_proto).collect(),
        }))
    }

    async fn pause_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let name = req.get_ref().name.clone();
        self.job_answer(&req, AdminCall::PauseJob(name)).await
    }

    async fn resume_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let name = req.get_ref().name.clone();
        self.job_answer(&req, AdminCall::ResumeJob(name)).await
    }

    async fn trigger_job(
        &self,
        req: Request<pb::TriggerJobRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = req.get_ref();
        let call = AdminCall::TriggerJob {
            name: r.name.clone(),
            params: (!r.params.is_empty()).then(|| r.params.clone()),
        };
        self.run_answer(&req, call).await
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = req.get_ref();
        let call = AdminCall::ListRuns {
            job: r.job.clone(),
            limit: r.limit,
            namespace: r.namespace.clone(),
        };
        let runs = self.answer(&req, call).await?.into_runs()?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(run_to_proto).collect(),
        }))
    }

    async fn get_run(&self, req: Request<pb::RunId>) -> Result<Response<pb::Run>, Status> {
        let id = req.get_ref().run_id.clone();
        self.run_answer(&req, AdminCall::GetRun(id)).await
    }

    async fn kill_run(&self, req: Request<pb::RunId>) -> Result<Response<pb::Run>, Status> {
        let id = req.get_ref().run_id.clone();
        self.run_answer(&req, AdminCall::KillRun(id)).await
    }

    async fn rerun_workflow(
        &self,
        req: Request<pb::RerunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let call = AdminCall::RerunWorkflow {
            run_id: req.get_ref().run_id.clone(),
            node: req.get_ref().node.clone(),
        };
        self.run_answer(&req, call).await
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let call = AdminCall::ListWorkers {
            group: req.get_ref().group.clone(),
            namespace: req.get_ref().namespace.clone(),
        };
        let (workers, leader) = self.answer(&req, call).await?.into_workers()?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers.into_iter().map(worker_to_proto).collect(),
            leader,
        }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let pb::ListAuditRequest { limit, before } = req.get_ref().clone();
        let entries = self
            .answer(&req, AdminCall::ListAudit { limit, before })
            .await?
            .into_audit()?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries.into_iter().map(audit_to_proto).collect(),
        }))
    }
}

fn audit_to_proto(e: AuditEntry) -> pb::AuditEntry {
    let json = |v: Option<serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_default();
    pb::AuditEntry {
        id: e.id,
        at_ms: e.at_ms,
        who: e.who,
        action: e.action,
        target: e.target,
        before_json: json(e.before),
        after_json: json(e.after),
    }
}

fn audit_from_proto(e: pb::AuditEntry) -> AuditEntry {
    let json = |s: String| {
        (!s.is_empty())
            .then(|| serde_json::from_str(&s).ok())
            .flatten()
    };
    AuditEntry {
        id: e.id,
        at_ms: e.at_ms,
        who: e.who,
        action: e.action,
        target: e.target,
        before: json(e.before_json),
        after: json(e.after_json),
    }
}

fn state_from_proto(s: i32) -> RunState {
    match pb::RunState::try_from(s) {
        Ok(pb::RunState::Running) => RunState::Running,
        Ok(pb::RunState::Succeeded) => RunState::Succeeded,
        Ok(pb::RunState::Failed) => RunState::Failed,
        Ok(pb::RunState::Cancelled) => RunState::Cancelled,
        Ok(pb::RunState::TimedOut) => RunState::TimedOut,
        Ok(pb::RunState::Skipped) => RunState::Skipped,
        _ => RunState::Pending,
    }
}

/// Proto run -> domain run (for clients that print runs).
pub fn run_from_proto(r: pb::Run) -> RunRecord {
    RunRecord {
        run_id: r.run_id,
        fire_id: r.fire_id,
        job: r.job,
        cause: r.cause,
        scheduled_at_ms: r.scheduled_at_ms,
        fired_at_ms: r.fired_at_ms,
        finished_at_ms: r.finished_at_ms,
        state: state_from_proto(r.state),
        params: r.params,
        shards: r
            .shards
            .into_iter()
            .map(|s| ShardRecord {
                index: s.index,
                total: s.total,
                worker_id: s.worker_id,
                attempt: s.attempt,
                failures: s.failures,
                state: state_from_proto(s.state),
                started_at_ms: s.started_at_ms,
                finished_at_ms: s.finished_at_ms,
                output: s.output,
                error: s.error,
                log_tail: s.log_tail,
                shard_params: s.shard_params,
            })
            .collect(),
        parent_run_id: r.parent_run_id,
        note: r.note,
        fence: r.fence,
        // Written by `run_to_proto`; a leader of another version sends none.
        nodes: serde_json::from_str(&r.nodes_json).unwrap_or_default(),
    }
}

/// Proto worker -> domain view.
pub fn worker_from_proto(w: pb::WorkerInfo) -> WorkerView {
    WorkerView {
        worker_id: w.worker_id,
        group: w.group,
        handlers: w.handlers,
        capacity: w.capacity,
        running: w.running,
        labels: w.labels.into_iter().collect(),
        connected_at_ms: w.connected_at_ms,
        last_heartbeat_ms: w.last_heartbeat_ms,
        draining: w.draining,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use chime_shared::clock::SystemClock;
    use chime_shared::config::source::MemorySource;
    use pb::admin_server::Admin;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::engine::{EngineOptions, ShardOutcome};
    use crate::store::{MemoryRunStore, Retention};

    /// A run that ends leaves the engine before its history write lands (the
    /// writer gathers writes for 200 ms); GetRun must then read the snapshot on its
    /// way to the store, not the store's older copy: once SUCCEEDED, always.
    #[tokio::test]
    async fn get_run_never_goes_back_after_a_run_ends() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let jobs = JobStore::new(Arc::new(MemorySource::default()));
        jobs.create(
            JobSpec::new("m", "g", "h", Schedule::Manual),
            clock.now_ms(),
        )
        .await
        .unwrap();
        let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new(Retention::default()));
        assert!(runs.install_fence(1).await.unwrap().installed());
        let stop = CancellationToken::new();
        let (engine, _task) = crate::engine::start(
            jobs.clone(),
            runs.clone(),
            clock.clone(),
            EngineOptions::default(),
            crate::engine::Term {
                fence: 1,
                handover: None,
                warm: None,
            },
            CancellationToken::new(),
            stop.clone(),
        )
        .await
        .unwrap();
        let shared = Arc::new(Shared::default());
        shared.set(crate::Current {
            engine: Some(engine.clone()),
            leader: "here".into(),
            fence: 1,
        });
        let api = admin_api(shared, jobs, runs.clone(), clock, &Auth::default(), None);
        let (tx, mut rx) = mpsc::channel(8);
        let hello = WorkerHello {
            worker_id: "w1".into(),
            group: "g".into(),
            handlers: vec!["h".into()],
            capacity: 1,
            labels: BTreeMap::new(),
            running: vec![],
        };
        let session = engine.register(hello, tx).await.unwrap().session;
        let run = engine.trigger("m", None).await.unwrap();
        let Some(ToWorker::Assign(a)) = rx.recv().await else {
            panic!("no assignment");
        };
        engine
            .result("w1", session, a.key, ShardOutcome::Succeeded("done".into()))
            .await
            .unwrap();
        let id = run.run_id.clone();
        let state = || async {
            api.get_run(Request::new(pb::RunId { run_id: id.clone() }))
                .await
                .unwrap()
                .into_inner()
                .state
        };
        // Through the write and well after it: succeeded at every read.
        let until = Instant::now() + Duration::from_millis(600);
        let mut reads = 0;
        while Instant::now() < until {
            assert_eq!(
                state().await,
                pb::RunState::Succeeded as i32,
                "read {reads}"
            );
            reads += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stored = runs.get_run(&run.run_id).await.unwrap().unwrap();
        assert_eq!(stored.state, RunState::Succeeded, "the write landed");
        stop.cancel();
    }

    /// A forwarded call reaching a replica that does not lead is answered, not
    /// forwarded again (stale views of the leader must not send calls in circles).
    #[tokio::test]
    async fn a_forwarded_call_is_not_forwarded_again() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let shared = Arc::new(Shared::default());
        shared.set(crate::Current {
            engine: None,
            leader: "127.0.0.1:1".into(),
            fence: 0,
        });
        let jobs = JobStore::new(Arc::new(MemorySource::default()));
        let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new(Retention::default()));
        let api = admin_api(shared, jobs, runs, clock, &Auth::default(), None);
        let mut req = Request::new(pb::ListWorkersRequest::default());
        req.metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let e = api.list_workers(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().starts_with("not the leader"), "{e:?}");
        // Not forwarded: this one is (and finds nobody there).
        let e = api
            .list_workers(Request::new(pb::ListWorkersRequest::default()))
            .await
            .unwrap_err();
        assert!(e.message().contains("cannot reach the leader"), "{e:?}");
    }

    /// The real gRPC server (no engine, memory stores) checking `auth`, on a free
    /// port: a channel to it, the token that stops it, and its task.
    async fn serve_for_test(
        auth: Auth,
    ) -> (
        tonic::transport::Channel,
        CancellationToken,
        tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    ) {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let shared = Arc::new(Shared::default());
        let jobs = JobStore::new(Arc::new(MemorySource::default()));
        let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new(Retention::default()));
        let admin = admin_api(shared.clone(), jobs, runs, clock, &Auth::default(), None);
        let router = server(shared, admin, queue::QueueApi::new(None, None), auth, None)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        let served = tokio::spawn(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { until.cancelled().await },
        ));
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        (channel, stop, served)
    }

    /// The token layer on the real server: each service takes its token and
    /// answers `UNAUTHENTICATED` without it (the message names the token); health is
    /// open; unknown paths are tonic's.
    #[tokio::test]
    async fn each_service_takes_its_token() {
        const ADMIN: &str = "admin-token-0123456789";
        const WORKER: &str = "worker-token-0123456789";
        const PRODUCER: &str = "producer-token-0123456789";
        let auth = Auth {
            admin: Some(Arc::new(Tokens::fixed(ADMIN))),
            worker: Some(Arc::new(Tokens::fixed(WORKER))),
            producer: Some(Arc::new(Tokens::fixed(PRODUCER))),
            metrics_require_token: false,
        };
        let (channel, stop, served) = serve_for_test(auth).await;
        let with = |token: Option<&str>| chime_shared::auth::Bearer::new(token).unwrap();
        let admin =
            |token| pb::admin_client::AdminClient::with_interceptor(channel.clone(), with(token));
        let queue =
            |token| pb::queue_client::QueueClient::with_interceptor(channel.clone(), with(token));
        let workers = |token| async move {
            admin(token)
                .list_workers(pb::ListWorkersRequest::default())
                .await
        };
        for token in [None, Some(WORKER), Some(PRODUCER)] {
            let e = workers(token).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}");
            assert_eq!(e.message(), "missing or unknown admin token");
        }
        workers(Some(ADMIN)).await.unwrap();
        let get = |token| async move { queue(token).get_item(pb::ItemRef::default()).await };
        for token in [None, Some(WORKER)] {
            let e = get(token).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}");
            assert_eq!(e.message(), "missing or unknown producer or admin token");
        }
        for token in [PRODUCER, ADMIN] {
            // Past the gate: this coordinator has no delay store.
            let e = get(Some(token)).await.unwrap_err();
            assert_ne!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        stop.cancel();
        served.await.unwrap().unwrap();
    }

    /// The `rpc` names a service declares in its proto file.
    fn rpcs(proto_text: &str) -> Vec<String> {
        proto_text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(|m| m.trim().to_owned())
            .collect()
    }

    /// Every method of the admin API and the delay queue has its own rule (a role),
    /// read from the proto files: a method added without one fails here, instead
    /// of silently falling to the catch-all. Sessions take a worker token, whatever
    /// the method.
    #[test]
    fn every_grpc_method_has_its_own_rule() {
        let auth = Auth {
            admin: Some(Arc::new(Tokens::fixed("admin-token-0123456789"))),
            worker: Some(Arc::new(Tokens::fixed("worker-token-0123456789"))),
            producer: None,
            metrics_require_token: false,
        };
        let policy = grpc_policy(&auth);
        let post = http::Method::POST;
        for (service, text) in [
            (
                "chime.v1.Admin",
                include_str!("../../../proto/chime/v1/admin.proto"),
            ),
            (
                "chime.v1.Queue",
                include_str!("../../../proto/chime/v1/queue.proto"),
            ),
        ] {
            let methods = rpcs(text);
            assert!(methods.len() >= 7, "{service}: {methods:?}");
            for m in methods {
                let path = format!("/{service}/{m}");
                assert!(
                    policy.names(&post, &path),
                    "{path} has no rule of its own: add it to ADMIN_METHODS or QUEUE_METHODS"
                );
            }
        }
        for m in rpcs(include_str!("../../../proto/chime/v1/worker.proto")) {
            let path = format!("/chime.v1.WorkerGateway/{m}");
            assert_eq!(
                policy.gate_for(&post, &path).map(Gate::name),
                Some("worker"),
                "{path}"
            );
        }
    }

    /// Roles on the real server: a viewer reads and is refused every change with
    /// `PERMISSION_DENIED` naming its token; an operator acts but does not define;
    /// an admin does everything; a producer token opens the queue only.
    #[tokio::test]
    async fn admin_tokens_act_by_their_role() {
        let dir = std::env::temp_dir().join(format!("chime-grpc-roles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("admin-tokens");
        std::fs::write(
            &file,
            "viewer-token-0123456789 grafana role=viewer\n\
             operator-token-0123456789 oncall role=operator\n\
             admin-token-0123456789 ci\n",
        )
        .unwrap();
        const PRODUCER: &str = "producer-token-0123456789";
        let auth = Auth {
            admin: Some(Arc::new(Tokens::from_file_with_roles(&file).unwrap())),
            worker: Some(Arc::new(Tokens::fixed("worker-token-0123456789"))),
            producer: Some(Arc::new(Tokens::fixed(PRODUCER))),
            metrics_require_token: false,
        };
        let (channel, stop, served) = serve_for_test(auth).await;
        let with = |token: &str| chime_shared::auth::Bearer::new(Some(token)).unwrap();
        let admin =
            |token| pb::admin_client::AdminClient::with_interceptor(channel.clone(), with(token));
        let queue =
            |token| pb::queue_client::QueueClient::with_interceptor(channel.clone(), with(token));
        let job = || pb::JobRef {
            name: "nope".into(),
        };
        let code = |r: std::result::Result<(), Status>| {
            r.err().map(|e| (e.code(), e.message().to_owned()))
        };
        let passed = |c: Option<(tonic::Code, String)>| {
            !matches!(
                c,
                Some((
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated,
                    _
                ))
            )
        };
        for (token, read, act, define) in [
            ("viewer-token-0123456789", true, false, false),
            ("operator-token-0123456789", true, true, false),
            ("admin-token-0123456789", true, true, true),
        ] {
            let r = code(admin(token).get_job(job()).await.map(|_| ()));
            assert_eq!(passed(r.clone()), read, "{token} read: {r:?}");
            let r = code(admin(token).pause_job(job()).await.map(|_| ()));
            assert_eq!(passed(r.clone()), act, "{token} pause: {r:?}");
            let r = code(admin(token).delete_job(job()).await.map(|_| ()));
            assert_eq!(passed(r.clone()), define, "{token} delete: {r:?}");
            let r = code(
                queue(token)
                    .enqueue(pb::EnqueueRequest::default())
                    .await
                    .map(|_| ()),
            );
            assert_eq!(passed(r.clone()), act, "{token} enqueue: {r:?}");
            let r = code(
                queue(token)
                    .get_item(pb::ItemRef::default())
                    .await
                    .map(|_| ()),
            );
            assert!(passed(r.clone()), "{token} get item: {r:?}");
        }
        // The refusal names the token and both roles, never the secret.
        let e = admin("viewer-token-0123456789")
            .trigger_job(pb::TriggerJobRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "token grafana is a viewer; this needs an operator token"
        );
        // A producer token opens every queue call and no admin one.
        let r = code(
            queue(PRODUCER)
                .requeue_dead_letters(pb::RequeueDeadLettersRequest::default())
                .await
                .map(|_| ()),
        );
        assert!(passed(r.clone()), "{r:?}");
        let e = admin(PRODUCER).get_job(job()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        stop.cancel();
        served.await.unwrap().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
