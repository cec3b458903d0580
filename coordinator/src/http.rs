//! The coordinator's HTTP side: the web console (three static files compiled into
//! the binary, so nothing is built or fetched at run time), its JSON API (the
//! contract is `docs/http-api.md`), and the ops endpoints `/livez`, `/readyz` and
//! `/metrics` from `chime_shared::ops`.
//!
//! The API handlers are thin. Job, run and worker calls go to the domain
//! [`Admin`] service the gRPC admin service wraps too, so a follower forwards them to
//! the leader in one place (the caller's token goes along), and JSON never passes
//! through protobuf.
//! Queue and config calls read the delay store and the live-settings source
//! directly: any replica can answer those. JSON is converted from and to the domain
//! types here and nowhere else.
//!
//! Tokens and the body limit are tower layers on the router ([`http_policy`]: which
//! token each path takes); `ops::serve` adds the layers every HTTP edge shares.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::Method;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use chime_shared::auth::{self, Gate, Policy, Refusal, Role};
use chime_shared::clock::Clock;
use chime_shared::config::source::ConfigSource;
use chime_shared::config::{self as live};
use chime_shared::queue::{DelayStore, ItemRef, ItemSpec, validate_batch};
use chime_shared::trace::{call_context, end_enqueue_span, enqueue_span};
use chime_shared::{limits, ops};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower_http::limit::RequestBodyLimitLayer;

use crate::Shared;
use crate::admin::{Admin, AdminAnswer, AdminCall, Caller, JobView};
use crate::alerts::rule::AlertRule;
use crate::alerts::sink::{Notice, NoticeStatus, Sender};
use crate::audit::Change;
use crate::error::CoordError;
use crate::model::{AuditAction, JobSpec, RunRecord};

/// The console's files, embedded at build time.
const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// Largest JSON body the API reads (a job with 64 KiB params and shard params fits).
const MAX_BODY_BYTES: usize = 512 * 1024;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The admin service (forwards to the leader on a follower).
    pub admin: Admin,
    /// Who leads.
    pub shared: Arc<Shared>,
    /// The delay store, when the console shows queues.
    pub queues: Option<Arc<dyn DelayStore>>,
    /// The live-settings source, when the console shows config.
    pub config: Option<Arc<dyn ConfigSource>>,
    /// Who may call what (admin tokens for the API and console, producer tokens
    /// for the item calls too; no admin tokens: no login).
    pub auth: crate::grpc::Auth,
    /// This replica's address.
    pub this: String,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The alert rules this replica follows.
    pub alerts: crate::alerts::Rules,
    /// The queue family the coordinators watch (alert rules are checked against it).
    pub family: String,
    /// The last hour of activity the console charts (`None`: no charts).
    pub history: Option<Arc<dyn chime_shared::activity::HistoryStore>>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("this", &self.this)
            .finish_non_exhaustive()
    }
}

/// The whole HTTP router: console, API, ops endpoints.
pub fn router(state: HttpState, ready: ops::Readiness) -> Router {
    // Every API route comes from `api_routes`, which the token policy is built
    // from too: a route cannot be served without its own rule.
    let api = api_routes()
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler));
    let policy = http_policy(&state.auth);
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { file("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/session", get(session))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .with_state(state)
        .merge(ops::router(ready))
        // The body limit is tower-http's (413 past it, read or announced), so
        // axum's own default limit is off.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // Outermost: a caller without the token learns nothing else, and its body
        // is never read.
        .layer(auth::require_token(
            policy,
            refuse as fn(&Gate, &Refusal) -> Response,
        ))
}

/// Who may call an API route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Admin tokens of this role or above, limited to namespaces or not: the route
    /// reaches jobs, runs, workers (the admin service keeps a limited token to its
    /// namespaces) or live settings (a limited token reaches its handlers' only,
    /// `crate::scope`).
    Admin(Role),
    /// Admin tokens of this role or above and of no namespace: the route reaches
    /// what is cluster-wide (alert rules, queue counts, the audit log).
    Cluster(Role),
    /// Producer tokens (whatever the call), or admin tokens of this role or above,
    /// limited to namespaces or not: the item and dead-letter calls a producer
    /// service needs, and nothing more; a limited token reaches only the items of
    /// its handlers and namespaces (`crate::scope`).
    Producer(Role),
}

/// One route of the JSON API.
pub struct ApiRoute {
    /// Its method.
    pub method: Method,
    /// Its path, `{…}` segments as the router writes them.
    pub path: &'static str,
    /// Who may call it.
    pub who: Who,
    handler: MethodRouter<HttpState>,
}

impl std::fmt::Debug for ApiRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiRoute")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

/// Every route of the JSON API, with who may call it (see [`Role`] for what each
/// role may do). [`router`] serves these and [`http_policy`] guards them, both
/// from this one list.
pub fn api_routes() -> Vec<ApiRoute> {
    use Role::{Admin, Operator, Viewer};
    let r = |method: Method, path, who, handler| ApiRoute {
        method,
        path,
        who,
        handler,
    };
    vec![
        r(
            Method::GET,
            "/api/overview",
            Who::Cluster(Viewer),
            get(overview),
        ),
        r(Method::GET, "/api/jobs", Who::Admin(Viewer), get(list_jobs)),
        r(
            Method::POST,
            "/api/jobs",
            Who::Admin(Admin),
            post(create_job),
        ),
        r(
            Method::GET,
            "/api/jobs/{name}",
            Who::Admin(Viewer),
            get(get_job),
        ),
        r(
            Method::PUT,
            "/api/jobs/{name}",
            Who::Admin(Admin),
            put(update_job),
        ),
        r(
            Method::DELETE,
            "/api/jobs/{name}",
            Who::Admin(Admin),
            delete(delete_job),
        ),
        r(
            Method::POST,
            "/api/jobs/{name}/pause",
            Who::Admin(Operator),
            post(pause_job),
        ),
        r(
            Method::POST,
            "/api/jobs/{name}/resume",
            Who::Admin(Operator),
            post(resume_job),
        ),
        r(
            Method::POST,
            "/api/jobs/{name}/trigger",
            Who::Admin(Operator),
            post(trigger_job),
        ),
        r(Method::GET, "/api/runs", Who::Admin(Viewer), get(list_runs)),
        r(
            Method::GET,
            "/api/runs/{id}",
            Who::Admin(Viewer),
            get(get_run),
        ),
        r(
            Method::POST,
            "/api/runs/{id}/kill",
            Who::Admin(Operator),
            post(kill_run),
        ),
        r(
            Method::POST,
            "/api/runs/{id}/rerun",
            Who::Admin(Operator),
            post(rerun_workflow),
        ),
        r(
            Method::GET,
            "/api/workers",
            Who::Admin(Viewer),
            get(list_workers),
        ),
        r(
            Method::GET,
            "/api/audit",
            Who::Cluster(Viewer),
            get(list_audit),
        ),
        // Rules are shown without their sinks' secrets.
        r(
            Method::GET,
            "/api/alerts",
            Who::Cluster(Viewer),
            get(list_alerts),
        ),
        r(
            Method::PUT,
            "/api/alerts/{name}",
            Who::Cluster(Admin),
            put(put_alert),
        ),
        r(
            Method::DELETE,
            "/api/alerts/{name}",
            Who::Cluster(Admin),
            delete(delete_alert),
        ),
        r(
            Method::POST,
            "/api/alerts/{name}/test",
            Who::Cluster(Operator),
            post(test_alert),
        ),
        r(
            Method::GET,
            "/api/history",
            Who::Cluster(Viewer),
            get(history),
        ),
        r(
            Method::GET,
            "/api/queues",
            Who::Cluster(Viewer),
            get(queues),
        ),
        r(
            Method::GET,
            "/api/queues/dead",
            Who::Producer(Viewer),
            get(dead_letters),
        ),
        r(
            Method::POST,
            "/api/queues/dead/requeue",
            Who::Producer(Operator),
            post(requeue),
        ),
        r(
            Method::GET,
            "/api/config",
            Who::Admin(Viewer),
            get(get_config),
        ),
        r(
            Method::PUT,
            "/api/config",
            Who::Admin(Admin),
            put(put_config),
        ),
        r(
            Method::DELETE,
            "/api/config",
            Who::Admin(Admin),
            delete(delete_config),
        ),
        r(
            Method::POST,
            "/api/queues/items",
            Who::Producer(Operator),
            post(enqueue),
        ),
        r(
            Method::GET,
            "/api/queues/item",
            Who::Producer(Viewer),
            get(get_item),
        ),
        r(
            Method::POST,
            "/api/queues/item/cancel",
            Who::Producer(Operator),
            post(cancel_item),
        ),
        r(
            Method::POST,
            "/api/queues/item/reschedule",
            Who::Producer(Operator),
            post(reschedule_item),
        ),
    ]
}

/// Which token each HTTP route takes ([`api_routes`]); any other path under
/// `/api/` takes an admin. Open: the console's files, `/api/session` (the console
/// asks whether it needs a login, and who it is), the probes, and `/metrics`
/// unless `auth.metrics_require_token` asks for a viewer token of no namespace.
pub fn http_policy(auth: &crate::grpc::Auth) -> Policy {
    let mut policy = Policy::new().exact("/api/session", Gate::open());
    if auth.metrics_require_token {
        policy = policy.exact(
            "/metrics",
            auth.admin_gate().needs(Role::Viewer).cluster_wide(),
        );
    }
    api_routes()
        .into_iter()
        .fold(policy, |p, route| {
            let gate = match route.who {
                Who::Admin(need) => auth.admin_gate().needs(need),
                Who::Cluster(need) => auth.admin_gate().needs(need).cluster_wide(),
                Who::Producer(need) => auth.producer_gate().needs(need),
            };
            p.route(route.method, route.path, gate)
        })
        .prefix("/api/", auth.admin_gate().cluster_wide())
}

/// A refusal: 401 naming the token the caller lacks, or 403 naming the role.
fn refuse(gate: &Gate, why: &Refusal) -> Response {
    let mut e = ApiError::from(crate::grpc::refusal_error(gate, why));
    if *why == Refusal::Unauthenticated {
        e.message = format!("{} (Authorization: Bearer <token>)", e.message);
    }
    e.into_response()
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // The console only talks to its own origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// An API failure, answered as `{"error": {code, message, field?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: format!("invalid {field}: {}", message.into()),
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({ "code": self.code, "message": self.message });
        if let Some(f) = self.field {
            err["field"] = Value::String(f);
        }
        (self.status, axum::Json(json!({ "error": err }))).into_response()
    }
}

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> Self {
        let message = e.to_string();
        let (status, code, field) = match e {
            CoordError::InvalidArgument { field, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_argument", Some(field))
            }
            CoordError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated", None),
            CoordError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied", None),
            CoordError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            CoordError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists", None),
            CoordError::Conflict(_) | CoordError::NotConfigured(_) => {
                (StatusCode::CONFLICT, "conflict", None)
            }
            CoordError::NotLeader { .. } | CoordError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
            }
        };
        Self {
            status,
            code,
            message,
            field,
        }
    }
}

impl From<chime_shared::Error> for ApiError {
    fn from(e: chime_shared::Error) -> Self {
        match e {
            chime_shared::Error::InvalidArgument { field, reason } => Self::invalid(field, reason),
            other => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

type ApiResult<T = axum::Json<Value>> = Result<T, ApiError>;

fn ok(v: impl Serialize) -> ApiResult {
    serde_json::to_value(v)
        .map(axum::Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// The HTTP caller, with their token (for forwarding to the leader).
fn caller(headers: &HeaderMap) -> Caller {
    Caller {
        authorization: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        forwarded: false,
    }
}

impl HttpState {
    /// The handler scope of the caller of `headers` (`scope.rs`).
    fn scope(&self, headers: &HeaderMap) -> crate::scope::HandlerScope {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        crate::scope::HandlerScope::of(&self.auth, header)
    }

    /// Answers an admin call for the caller of `headers`.
    async fn admin(&self, headers: &HeaderMap, call: AdminCall) -> ApiResult<AdminAnswer> {
        Ok(self.admin.call(&caller(headers), call).await?)
    }
}

async fn session(State(st): State<HttpState>, headers: HeaderMap) -> ApiResult {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Without admin tokens (`auth.allow_unauthenticated`) everyone is an admin.
    let who = match st.auth.admin {
        None => Some((String::new(), Role::Admin, None)),
        Some(_) => st
            .auth
            .admin_identity(header)
            .map(|i| (i.name, i.role, i.namespaces)),
    };
    ok(json!({
        "auth_required": st.auth.admin.is_some(),
        "authenticated": st.auth.admin.is_some() && who.is_some(),
        // Who the token is, so the console shows what it may see and hides
        // what it may not do (the API refuses it either way).
        "name": who.as_ref().map(|w| w.0.clone()),
        "role": who.as_ref().map(|w| w.1.as_str()),
        // The namespaces it is limited to (null: all, and what is cluster-wide).
        "namespaces": who.as_ref().and_then(|w| w.2.clone()),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

// ---- jobs ----

/// Fields the API answers but does not take.
const ANSWER_ONLY: [&str; 3] = ["version", "next_fire_ms", "last_fire_ms"];

/// A job from a JSON body; errors name the field (`schedule.expr`, `retries`, …).
pub fn job_in(body: &[u8]) -> Result<(JobSpec, i64), ApiError> {
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    };
    let version = obj.get("version").and_then(Value::as_i64).unwrap_or(0);
    for k in ANSWER_ONLY {
        obj.remove(k);
    }
    obj.remove("created_at_ms");
    let spec: JobSpec = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names a missing or unknown field in the message, at the path of the
        // object that lacks or has it.
        let named = ["missing field `", "unknown field `", "unknown variant `"]
            .iter()
            .find_map(|p| inner.strip_prefix(p))
            .and_then(|r| r.split_once('`'))
            .map(|(name, _)| name.to_owned());
        let field = match (path.as_str(), named) {
            (".", Some(n)) if !inner.starts_with("unknown variant") => n,
            (p, Some(n)) if inner.starts_with("missing field") => format!("{p}.{n}"),
            (".", None) => "body".to_owned(),
            (p, _) => p.to_owned(),
        };
        ApiError::invalid(field, inner)
    })?;
    Ok((spec, version))
}

#[derive(Deserialize)]
struct GroupQuery {
    #[serde(default)]
    group: String,
    /// Only this namespace (`default` for names without one).
    #[serde(default)]
    namespace: String,
}

async fn list_jobs(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<GroupQuery>,
) -> ApiResult {
    let call = AdminCall::ListJobs {
        group: q.group,
        namespace: q.namespace,
    };
    let jobs: Vec<JobView> = st.admin(&headers, call).await?.into_jobs()?;
    ok(json!({ "jobs": jobs }))
}

async fn create_job(
    State(st): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let (spec, _) = job_in(&body)?;
    let j = st
        .admin(&headers, AdminCall::CreateJob(spec))
        .await?
        .into_job()?;
    Ok((StatusCode::CREATED, ok(j)?))
}

/// A handler making one admin call on a job by name (`/api/jobs/{name}[/…]`).
macro_rules! job_ref_call {
    ($handler:ident, $call:ident) => {
        async fn $handler(
            State(st): State<HttpState>,
            headers: HeaderMap,
            Path(name): Path<String>,
        ) -> ApiResult {
            ok(st
                .admin(&headers, AdminCall::$call(name))
                .await?
                .into_job()?)
        }
    };
}

job_ref_call!(get_job, GetJob);
job_ref_call!(pause_job, PauseJob);
job_ref_call!(resume_job, ResumeJob);

/// A handler making one admin call on a run by id (`/api/runs/{id}[/…]`).
macro_rules! run_id_call {
    ($handler:ident, $call:ident) => {
        async fn $handler(
            State(st): State<HttpState>,
            headers: HeaderMap,
            Path(run_id): Path<String>,
        ) -> ApiResult {
            ok(st
                .admin(&headers, AdminCall::$call(run_id))
                .await?
                .into_run()?)
        }
    };
}

run_id_call!(get_run, GetRun);
run_id_call!(kill_run, KillRun);

/// The body of `POST /api/runs/{id}/rerun`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RerunBody {
    /// The node to start from.
    node: String,
}

async fn rerun_workflow(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body: RerunBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid("node", e.to_string()))?;
    ok(st
        .admin(
            &headers,
            AdminCall::RerunWorkflow {
                run_id,
                node: body.node,
            },
        )
        .await?
        .into_run()?)
}

async fn update_job(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (spec, version) = job_in(&body)?;
    if spec.name != name {
        return Err(ApiError::invalid(
            "name",
            format!("{:?} does not match the path's {name:?}", spec.name),
        ));
    }
    let j = st
        .admin(&headers, AdminCall::UpdateJob { spec, version })
        .await?
        .into_job()?;
    ok(j)
}

async fn delete_job(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    st.admin(&headers, AdminCall::DeleteJob(name)).await?;
    ok(json!({}))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TriggerIn {
    #[serde(default)]
    params: String,
}

async fn trigger_job(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let input: TriggerIn = if body.iter().all(u8::is_ascii_whitespace) {
        TriggerIn::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid("params", e.to_string()))?
    };
    let call = AdminCall::TriggerJob {
        name,
        params: (!input.params.is_empty()).then_some(input.params),
    };
    ok(st.admin(&headers, call).await?.into_run()?)
}

// ---- runs and workers ----

#[derive(Deserialize)]
struct RunsQuery {
    #[serde(default)]
    job: String,
    #[serde(default)]
    limit: Option<u32>,
    /// Only runs of this namespace's jobs.
    #[serde(default)]
    namespace: String,
}

async fn recent_runs(
    st: &HttpState,
    headers: &HeaderMap,
    job: String,
    limit: u32,
    namespace: String,
) -> ApiResult<Vec<RunRecord>> {
    let call = AdminCall::ListRuns {
        job,
        limit,
        namespace,
    };
    Ok(st.admin(headers, call).await?.into_runs()?)
}

async fn list_runs(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(50);
    let runs = recent_runs(&st, &headers, q.job, limit, q.namespace).await?;
    ok(json!({ "runs": runs }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    limit: u32,
    #[serde(default)]
    before: String,
}

async fn list_audit(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    let call = AdminCall::ListAudit {
        limit: q.limit,
        before: q.before,
    };
    let entries = st.admin(&headers, call).await?.into_audit()?;
    ok(json!({ "entries": entries }))
}

async fn list_workers(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<GroupQuery>,
) -> ApiResult {
    let call = AdminCall::ListWorkers {
        group: q.group,
        namespace: q.namespace,
    };
    let (workers, leader) = st.admin(&headers, call).await?.into_workers()?;
    ok(json!({ "workers": workers, "leader": leader }))
}

/// p50, p99 and max of `xs` (nulls when empty).
fn spread(mut xs: Vec<i64>) -> Value {
    if xs.is_empty() {
        return json!({ "p50": null, "p99": null, "max": null });
    }
    xs.sort_unstable();
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    json!({ "p50": at(0.5), "p99": at(0.99), "max": xs[xs.len() - 1] })
}

/// Longest window `/api/history` answers, in minutes (what the stores keep).
const HISTORY_MAX_MINUTES: u32 = 60;

/// The charts' series: `?family=<f>&minutes=<1..=60>` (defaults: this deployment's
/// family, 60).
async fn history(
    State(st): State<HttpState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> ApiResult {
    let mut family = st.family.clone();
    let mut minutes = HISTORY_MAX_MINUTES;
    for (k, v) in &q {
        match k.as_str() {
            "family" => {
                limits::check_handler("family", v)?;
                family = v.clone();
            }
            "minutes" => {
                minutes = v
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (1..=HISTORY_MAX_MINUTES).contains(m))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "minutes",
                            format!("{v:?} is not a whole number within 1..={HISTORY_MAX_MINUTES}"),
                        )
                    })?;
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown parameter (known: family, minutes)",
                ));
            }
        }
    }
    let Some(store) = &st.history else {
        return ok(json!({ "available": false }));
    };
    let now = st.clock.now_ms();
    let from = now - i64::from(minutes) * 60_000 - chime_shared::activity::BUCKET_MS;
    let buckets = store.read(from, now + 1).await?;
    let h = chime_shared::activity::History::build(&family, now, minutes, &buckets);
    let mut v = serde_json::to_value(h)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    v["available"] = Value::Bool(true);
    ok(v)
}

async fn overview(State(st): State<HttpState>, headers: HeaderMap) -> ApiResult {
    let current = st.shared.current();
    let (workers, leader) = st
        .admin(
            &headers,
            AdminCall::ListWorkers {
                group: String::new(),
                namespace: String::new(),
            },
        )
        .await?
        .into_workers()?;
    let jobs = st
        .admin(
            &headers,
            AdminCall::ListJobs {
                group: String::new(),
                namespace: String::new(),
            },
        )
        .await?
        .into_jobs()?;
    let runs = recent_runs(&st, &headers, String::new(), 20, String::new()).await?;
    let lags = runs
        .iter()
        .filter(|r| r.cause == "scheduled" && r.fired_at_ms > 0 && r.scheduled_at_ms > 0)
        .map(|r| r.fired_at_ms - r.scheduled_at_ms)
        .collect();
    let queues = match &st.queues {
        None => json!({ "available": false }),
        Some(q) => match tokio::try_join!(q.stats(), q.now_ms()) {
            Ok((s, now)) => json!({
                "available": true,
                "count": s.len(),
                "pending": s.iter().map(|x| x.pending).sum::<u64>(),
                "due_now": s.iter().map(|x| x.due_now).sum::<u64>(),
                "in_flight": s.iter().map(|x| x.in_flight).sum::<u64>(),
                "dead": s.iter().map(|x| x.dead).sum::<u64>(),
                "waiting": s.iter().map(|x| x.waiting).sum::<u64>(),
                "oldest_due_ms": s.iter().filter_map(|x| x.next_due_ms).min(),
                "oldest_due_age_ms": s.iter().map(|x| x.oldest_due_age_ms(now)).max().unwrap_or(0),
            }),
            Err(e) => json!({ "available": false, "reason": e.to_string() }),
        },
    };
    ok(json!({
        "now_ms": st.clock.now_ms(),
        "this": st.this,
        "leader": leader,
        "is_leader": current.engine.is_some(),
        "fence": current.fence,
        "workers": workers,
        "jobs": {
            "total": jobs.len(),
            "paused": jobs.iter().filter(|j| j.spec.paused).count(),
        },
        "queues": queues,
        "recent_runs": runs,
        "trigger_lag_ms": spread(lags),
    }))
}

// ---- queues ----

fn store(st: &HttpState) -> ApiResult<&Arc<dyn DelayStore>> {
    st.queues.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this coordinator has no delay store configured ([queue] and [redis])",
        )
    })
}

async fn queues(State(st): State<HttpState>) -> ApiResult {
    let Some(q) = &st.queues else {
        return ok(json!({
            "available": false,
            "reason": "this coordinator has no delay store configured",
        }));
    };
    let stats = q.stats().await?;
    let layout = q.layout();
    ok(json!({
        "available": true,
        "now_ms": q.now_ms().await?,
        "count": layout.count,
        "layout": layout,
        "queues": stats,
        "waiting_by_handler": q.waiting_by_handler().await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueIn {
    items: Vec<ItemSpec>,
}

/// Producers in any language: enqueue items over HTTP (same checks and limits as
/// every other producer path).
async fn enqueue(State(st): State<HttpState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let mut de = serde_json::Deserializer::from_slice(&body);
    let input: EnqueueIn = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "items".to_owned()
        } else {
            path
        };
        ApiError::invalid(field, e.into_inner().to_string())
    })?;
    let q = store(&st)?;
    let scope = st.scope(&headers);
    // The producer's `traceparent` header: the items join its trace through this
    // call's span (an unreadable header is ignored, as W3C asks of receivers).
    let parent = call_context(headers.get("traceparent").and_then(|v| v.to_str().ok()));
    let span = enqueue_span(parent, "http");
    let call = span.as_ref().map(|s| s.context).or(parent);
    let now = q.now_ms().await?;
    let mut items = Vec::with_capacity(input.items.len());
    for (index, i) in input.items.into_iter().enumerate() {
        let mut item = i.into_item(now, &format!("items[{index}]"))?;
        item.traceparent = item.traceparent.or(call);
        items.push(item);
    }
    validate_batch(&items)?;
    scope.check_items(&items)?;
    let n = items.len();
    let result = q.enqueue(items).await;
    end_enqueue_span(
        span,
        n,
        result.as_ref().err().map(|e| e as &dyn std::fmt::Display),
    );
    ok(json!({ "outcomes": result? }))
}

/// One item, by the key it was enqueued with (absent: the id) and its id.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemIn {
    id: String,
    #[serde(default)]
    key: String,
    /// Reschedule only.
    #[serde(default)]
    due_at_ms: Option<i64>,
}

impl ItemIn {
    fn from_body(body: &[u8]) -> ApiResult<Self> {
        serde_json::from_slice(body).map_err(|e| ApiError::invalid("item", e.to_string()))
    }

    fn item_ref(self) -> ApiResult<ItemRef> {
        Ok(ItemRef::checked("item", self.key, self.id)?)
    }
}

async fn get_item(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<ItemIn>,
) -> ApiResult {
    let r = q.item_ref()?;
    match store(&st)?.get(&r).await? {
        Some(v) if st.scope(&headers).allows(&v.item.handler) => ok(v),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("item {:?} (key {:?}) not found", r.id, r.key),
        )),
    }
}

async fn cancel_item(State(st): State<HttpState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let r = ItemIn::from_body(&body)?.item_ref()?;
    st.scope(&headers).check_ref(store(&st)?, &r).await?;
    ok(json!({ "outcome": store(&st)?.cancel(&r).await? }))
}

async fn reschedule_item(
    State(st): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let input = ItemIn::from_body(&body)?;
    let due = input
        .due_at_ms
        .ok_or_else(|| ApiError::invalid("due_at_ms", "missing"))?;
    limits::check_due("due_at_ms", due)?;
    let r = input.item_ref()?;
    st.scope(&headers).check_ref(store(&st)?, &r).await?;
    ok(json!({ "outcome": store(&st)?.reschedule(&r, due).await? }))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn dead_letters(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<LimitQuery>,
) -> ApiResult {
    let limit = q
        .limit
        .unwrap_or(limits::DEFAULT_DEAD_LETTER_LIST)
        .min(limits::MAX_DEAD_LETTER_LIST);
    let items = st.scope(&headers).dead_letters(store(&st)?, limit).await?;
    ok(json!({ "items": items }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeueIn {
    #[serde(default)]
    items: Vec<ItemRefIn>,
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemRefIn {
    #[serde(default)]
    key: String,
    id: String,
}

async fn requeue(State(st): State<HttpState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let input: RequeueIn =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid("items", e.to_string()))?;
    if input.all != input.items.is_empty() {
        return Err(ApiError::invalid("items", "give either items or all: true"));
    }
    let scope = st.scope(&headers);
    if input.all {
        scope.check_requeue_all()?;
    }
    let refs = input
        .items
        .into_iter()
        .enumerate()
        .map(|(n, i)| ItemRef::checked(&format!("items[{n}]"), i.key, i.id))
        .collect::<Result<Vec<_>, _>>()?;
    for r in &refs {
        scope.check_ref(store(&st)?, r).await?;
    }
    let n = store(&st)?
        .requeue_dead(&refs, limits::MAX_REQUEUE_ITEMS)
        .await?;
    let change = crate::audit::requeued(&refs, n);
    st.admin
        .audit()
        .record(&caller(&headers), vec![change])
        .await;
    ok(json!({ "requeued": n }))
}

// ---- config ----

fn source(st: &HttpState) -> ApiResult<&Arc<dyn ConfigSource>> {
    st.config.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this coordinator has no etcd configured",
        )
    })
}

async fn get_config(State(st): State<HttpState>, headers: HeaderMap) -> ApiResult {
    let Some(src) = &st.config else {
        return ok(json!({ "available": false, "reason": "no etcd configured" }));
    };
    // A token limited to namespaces sees the settings of its handlers only.
    let scope = st.scope(&headers);
    let mut snap = src.load().await?;
    snap.entries.retain(|(k, _, _)| scope.allows_setting(k));
    let mut v = serde_json::to_value(live::listing(&snap)).unwrap_or_default();
    v["available"] = Value::Bool(true);
    v["known_keys"] = serde_json::to_value(live::KNOWN_KEYS).unwrap_or_default();
    ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingIn {
    key: String,
    value: String,
}

async fn put_config(State(st): State<HttpState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let input: SettingIn =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid("body", e.to_string()))?;
    let value = input.value.trim();
    // Checked the way every process will check it, so a refused value never
    // reaches etcd from here.
    live::parse(&input.key, Some(value)).map_err(|r| ApiError::invalid(r.key, r.reason))?;
    st.scope(&headers).check_setting(&input.key)?;
    let src = source(&st)?;
    let before = src.get(&input.key).await?.map(|(v, _)| v);
    let revision = src.put(&input.key, value).await?;
    let mut change = Change::new(AuditAction::ConfigSet, &input.key).after(value);
    change.before = before.map(serde_json::Value::String);
    st.admin
        .audit()
        .record(&caller(&headers), vec![change])
        .await;
    ok(json!({ "key": input.key, "value": value, "revision": revision }))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
}

async fn delete_config(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<KeyQuery>,
) -> ApiResult {
    live::parse(&q.key, None).map_err(|r| ApiError::invalid(r.key, r.reason))?;
    st.scope(&headers).check_setting(&q.key)?;
    let src = source(&st)?;
    let Some((before, _)) = src.get(&q.key).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} is not set", q.key),
        ));
    };
    let revision = src.delete(&q.key).await?;
    let change = Change::new(AuditAction::ConfigDelete, &q.key).before(before);
    st.admin
        .audit()
        .record(&caller(&headers), vec![change])
        .await;
    ok(json!({ "key": q.key, "deleted": true, "revision": revision }))
}

// ---- alerts ----

async fn list_alerts(State(st): State<HttpState>) -> ApiResult {
    let firing = match st.admin.runs().load_alert_state().await? {
        Some(json) => serde_json::from_str::<crate::alerts::eval::State>(&json)
            .map(|s| s.firing)
            .unwrap_or_default(),
        None => Default::default(),
    };
    let firing: Vec<Value> = firing
        .into_iter()
        .flat_map(|(rule, subjects)| {
            subjects.into_iter().map(move |(subject, f)| {
                json!({ "rule": rule, "subject": subject, "since_ms": f.since_ms })
            })
        })
        .collect();
    ok(json!({ "rules": st.alerts.all(), "firing": firing }))
}

async fn stored_alert(st: &HttpState, name: &str) -> ApiResult<Option<AlertRule>> {
    let got = st
        .admin
        .jobs()
        .source()
        .get(&crate::alerts::rule::key(name))
        .await?;
    Ok(got.and_then(|(v, _)| serde_json::from_str(&v).ok()))
}

async fn put_alert(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let rule = AlertRule::parse(&body, &st.family)?;
    if rule.name != name {
        return Err(ApiError::invalid(
            "name",
            format!("{:?} does not match the path's {name:?}", rule.name),
        ));
    }
    let before = stored_alert(&st, &name).await?;
    let json =
        serde_json::to_string(&rule).map_err(|e| ApiError::invalid("rule", e.to_string()))?;
    let revision = st
        .admin
        .jobs()
        .source()
        .put(&crate::alerts::rule::key(&name), &json)
        .await?;
    let mut change = Change::new(AuditAction::AlertPut, &name).after(rule.redacted());
    change.before = before.and_then(|b| serde_json::to_value(b.redacted()).ok());
    st.admin
        .audit()
        .record(&caller(&headers), vec![change])
        .await;
    ok(json!({ "rule": rule, "revision": revision }))
}

async fn delete_alert(
    State(st): State<HttpState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let Some(before) = stored_alert(&st, &name).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("alert rule {name:?} not found"),
        ));
    };
    let revision = st
        .admin
        .jobs()
        .source()
        .delete(&crate::alerts::rule::key(&name))
        .await?;
    let change = Change::new(AuditAction::AlertDelete, &name).before(before.redacted());
    st.admin
        .audit()
        .record(&caller(&headers), vec![change])
        .await;
    ok(json!({ "deleted": name, "revision": revision }))
}

/// Sends a test notice to each of a rule's sinks now, and says how each went (the
/// way to check a webhook URL or an SMTP relay before an incident does).
async fn test_alert(State(st): State<HttpState>, Path(name): Path<String>) -> ApiResult {
    let Some(rule) = stored_alert(&st, &name).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("alert rule {name:?} not found"),
        ));
    };
    let sender = Sender::new(crate::alerts::SEND_TIMEOUT)?;
    let now = st.clock.now_ms();
    let notice = Notice {
        id: format!("{name}/test/{now}"),
        rule: name.clone(),
        status: NoticeStatus::Firing,
        condition: rule.condition.kind().to_owned(),
        subject: "test".into(),
        summary: format!("test notice of alert rule {name}"),
        details: "Sent from the chime console or API to check this sink.".into(),
        at_ms: now,
        cluster: st.this.clone(),
    };
    let mut results = Vec::new();
    for sink in &rule.sinks {
        let r = sender.send(sink, &notice).await;
        results.push(json!({
            "sink": sink.kind(),
            "ok": r.is_ok(),
            "error": r.err().map(|e| e.to_string()),
        }));
    }
    ok(json!({ "results": results }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_json_errors_name_the_field() {
        let e = job_in(br#"{"name":"a","group":"g","handler":"h","schedule":{"kind":"cron"}}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedule.expr"), "{e:?}");
        let e = job_in(br#"{"name":"a","handler":"h","schedule":{"kind":"manual"}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("group"), "{e:?}");
        let e = job_in(
            br#"{"name":"a","group":"g","handler":"h","schedule":{"kind":"manual"},"retires":3}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("retires"), "{e:?}");
        let e = job_in(
            br#"{"name":"a","group":"g","handler":"h","schedule":{"kind":"manual"},"retries":"x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("retries"), "{e:?}");
        let e = job_in(br#"{"name":"a","group":"g","handler":"h","schedule":{"kind":"hourly"}}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedule.kind"), "{e:?}");
        let e = job_in(b"[1]").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"), "{e:?}");
        let (spec, version) = job_in(
            br#"{"name":"a","group":"g","handler":"h","schedule":{"kind":"fixed_rate","every_ms":500},
                 "version":7,"next_fire_ms":null,"last_fire_ms":3}"#,
        )
        .unwrap();
        assert_eq!((spec.name.as_str(), version), ("a", 7));
    }

    const ADMIN: &str = "admin-token-0123456789";
    const PRODUCER: &str = "producer-token-0123456789";
    const OPERATOR: &str = "operator-token-0123456789";
    const VIEWER: &str = "viewer-token-0123456789";
    /// An admin of namespace team-a only.
    const TEAM_ADMIN: &str = "team-admin-token-0123456789";

    fn app() -> Router {
        app_with(false)
    }

    /// The router over the test tokens; `metrics_require_token` as configured.
    fn app_with(metrics_require_token: bool) -> Router {
        use chime_shared::auth::Tokens;
        use chime_shared::clock::SystemClock;
        use chime_shared::config::source::MemorySource;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let shared = Arc::new(Shared::default());
        let jobs = crate::store::JobStore::new(Arc::new(MemorySource::default()));
        let runs = Arc::new(crate::store::MemoryRunStore::new(
            crate::store::Retention::default(),
        ));
        let auth = crate::grpc::Auth {
            admin: Some(Arc::new(Tokens::fixed_limited([
                (ADMIN.to_owned(), Role::Admin, None),
                (OPERATOR.to_owned(), Role::Operator, None),
                (VIEWER.to_owned(), Role::Viewer, None),
                (
                    TEAM_ADMIN.to_owned(),
                    Role::Admin,
                    Some(vec!["team-a".to_owned()]),
                ),
            ]))),
            worker: None,
            producer: Some(Arc::new(Tokens::fixed(PRODUCER))),
            metrics_require_token,
        };
        let state = HttpState {
            admin: crate::grpc::admin_api(
                shared.clone(),
                jobs,
                runs,
                clock.clone(),
                &Default::default(),
                None,
            )
            .service(),
            shared,
            queues: None,
            config: None,
            auth,
            alerts: Default::default(),
            family: "default".into(),
            this: "here".into(),
            history: Some(Arc::new(chime_shared::activity::MemoryHistory::new(
                clock.clone(),
            ))),
            clock,
        };
        router(state, Arc::new(|| Box::pin(async { (true, json!({})) })))
    }

    async fn send(
        method: &str,
        path: &str,
        token: Option<&str>,
        body: axum::body::Body,
    ) -> (StatusCode, Value) {
        send_to(app(), method, path, token, body).await
    }

    async fn send_to(
        app: Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: axum::body::Body,
    ) -> (StatusCode, Value) {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let res = app.oneshot(req.body(body).unwrap()).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `/metrics` names every namespace's groups and handlers: with
    /// `metrics_require_token` it takes a viewer token of no namespace.
    #[tokio::test]
    async fn metrics_take_a_cluster_viewer_token_when_asked_to() {
        let get = |token| send_to(app_with(true), "GET", "/metrics", token, Default::default());
        assert_eq!(get(None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(get(Some(PRODUCER)).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(get(Some(TEAM_ADMIN)).await.0, StatusCode::FORBIDDEN);
        for token in [VIEWER, ADMIN] {
            assert_eq!(get(Some(token)).await.0, StatusCode::OK, "{token}");
        }
        // The probes stay open.
        let (code, _) = send_to(app_with(true), "GET", "/livez", None, Default::default()).await;
        assert_eq!(code, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_api_takes_the_token_its_path_asks_for() {
        let empty = axum::body::Body::empty;
        for token in [None, Some(PRODUCER), Some("wrong-token-0123456789")] {
            let (code, b) = send("GET", "/api/jobs", token, empty()).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}");
            assert_eq!(b["error"]["code"], "unauthenticated");
            assert_eq!(
                b["error"]["message"],
                "missing or unknown admin token (Authorization: Bearer <token>)"
            );
        }
        let (code, _) = send("GET", "/api/jobs", Some(ADMIN), empty()).await;
        assert_eq!(code, StatusCode::OK);
        // The item calls: a producer or admin token; past the gate, this replica
        // has no delay store.
        let item = "/api/queues/item?key=k&id=i";
        let (code, b) = send("GET", item, None, empty()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert_eq!(
            b["error"]["message"],
            "missing or unknown producer or admin token (Authorization: Bearer <token>)"
        );
        for token in [PRODUCER, ADMIN] {
            let (code, b) = send("GET", item, Some(token), empty()).await;
            assert_ne!(code, StatusCode::UNAUTHORIZED, "{b}");
        }
        // Open: the console's login check, the files, the probes; unknown API
        // paths are the admin's.
        for path in ["/api/session", "/", "/livez", "/metrics"] {
            let (code, _) = send("GET", path, None, empty()).await;
            assert_eq!(code, StatusCode::OK, "{path}");
        }
        let (code, _) = send("GET", "/api/nothing", None, empty()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        let (code, _) = send("GET", "/api/nothing", Some(ADMIN), empty()).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    /// Every API route, called by a viewer, an operator, an admin and a producer:
    /// each passes the gate exactly when its role reaches the route's, and a known
    /// token refused is 403 `permission_denied` (never 401, which asks for a
    /// login). The routes come from `api_routes`, the list the router serves, so a
    /// new route is in this test by being served.
    #[tokio::test]
    async fn every_route_takes_the_roles_its_rule_names() {
        use axum::body::Body;
        let routes = api_routes();
        assert!(routes.len() >= 30, "{}", routes.len());
        for route in routes {
            let path = route
                .path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "x" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let (need, producer) = match route.who {
                Who::Admin(r) | Who::Cluster(r) => (r, false),
                Who::Producer(r) => (r, true),
            };
            // A token limited to a namespace passes exactly the routes of
            // namespaced things (jobs, runs, workers, items); the rest is
            // cluster-wide.
            let (code, b) = send(
                route.method.as_str(),
                &path,
                Some(TEAM_ADMIN),
                Body::from("{}"),
            )
            .await;
            let what = format!(
                "{} {} as a team admin: {code} {b}",
                route.method, route.path
            );
            if matches!(route.who, Who::Admin(_) | Who::Producer(_)) {
                assert!(
                    code != StatusCode::UNAUTHORIZED && code != StatusCode::FORBIDDEN,
                    "{what}"
                );
            } else {
                assert_eq!(code, StatusCode::FORBIDDEN, "{what}");
                assert!(
                    b["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("cluster-wide")),
                    "{what}"
                );
            }
            for (token, role) in [
                (VIEWER, Some(Role::Viewer)),
                (OPERATOR, Some(Role::Operator)),
                (ADMIN, Some(Role::Admin)),
                (PRODUCER, None),
            ] {
                let body = || Body::from("{}");
                let (code, b) = send(route.method.as_str(), &path, Some(token), body()).await;
                let what = format!("{} {} as {token}: {code} {b}", route.method, route.path);
                let may = match role {
                    Some(r) => r >= need,
                    None => producer,
                };
                if may {
                    assert!(
                        code != StatusCode::UNAUTHORIZED && code != StatusCode::FORBIDDEN,
                        "{what}"
                    );
                } else if role.is_some() {
                    assert_eq!(code, StatusCode::FORBIDDEN, "{what}");
                    assert_eq!(b["error"]["code"], "permission_denied", "{what}");
                } else {
                    assert_eq!(code, StatusCode::UNAUTHORIZED, "{what}");
                }
            }
        }
        // The console learns who it is.
        let (_, b) = send("GET", "/api/session", Some(VIEWER), Body::empty()).await;
        assert_eq!(b["role"], "viewer", "{b}");
        assert_eq!(b["authenticated"], true, "{b}");
        assert!(
            b["name"].as_str().is_some_and(|n| n.starts_with("token-")),
            "{b}"
        );
        let (_, b) = send("GET", "/api/session", Some(PRODUCER), Body::empty()).await;
        assert_eq!(
            (b["authenticated"].clone(), b["role"].clone()),
            (json!(false), Value::Null)
        );
    }

    #[tokio::test]
    async fn history_takes_the_admin_token_and_names_a_bad_parameter() {
        let empty = axum::body::Body::empty;
        let (code, _) = send("GET", "/api/history", None, empty()).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        for (query, field) in [
            ("minutes=0", "minutes"),
            ("minutes=61", "minutes"),
            ("minutes=ten", "minutes"),
            ("family=a%7Cb", "family"),
            ("span=5", "span"),
        ] {
            let (code, b) = send(
                "GET",
                &format!("/api/history?{query}"),
                Some(ADMIN),
                empty(),
            )
            .await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{query}: {b}");
            assert_eq!(b["error"]["field"], field, "{query}");
        }
        let (code, b) = send("GET", "/api/history?minutes=5", Some(ADMIN), empty()).await;
        assert_eq!(code, StatusCode::OK, "{b}");
        assert_eq!(b["available"], true);
        assert_eq!(b["family"], "default");
        assert_eq!(
            b["t"].as_array().map(Vec::len),
            Some(30),
            "5 minutes of 10-s buckets"
        );
        assert_eq!(
            b["minute_t"].as_array().map(Vec::len).map(|n| n >= 5),
            Some(true)
        );
    }

    #[tokio::test]
    async fn bodies_past_the_limit_are_refused_with_413() {
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let (code, _) = send(
            "POST",
            "/api/queues/items",
            Some(ADMIN),
            axum::body::Body::from(big.clone()),
        )
        .await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        // Without a length announced: refused once the limit is read.
        let chunks = big
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>();
        let stream = axum::body::Body::from_stream(tokio_stream::iter(chunks));
        let (code, _) = send("POST", "/api/queues/items", Some(ADMIN), stream).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        // A caller without the token is refused before its body is looked at.
        let (code, _) = send(
            "POST",
            "/api/queues/items",
            None,
            axum::body::Body::from(big),
        )
        .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn spread_of_lags() {
        assert_eq!(
            spread(vec![]),
            json!({ "p50": null, "p99": null, "max": null })
        );
        assert_eq!(
            spread(vec![5, 1, 3]),
            json!({ "p50": 3, "p99": 5, "max": 5 })
        );
    }
}
