//! Process configuration: one struct per process, filled from a TOML file, then
//! `CHIME_*` environment variables, then command-line flags, in that order.
//!
//! Environment variables name a field by its path in upper case joined with `_`:
//! `CHIME_REDIS_URL` sets `redis.url`, `CHIME_CONSUMER_MAX_IN_FLIGHT` sets
//! `consumer.max_in_flight`. Every struct refuses unknown fields, so a typo in a
//! file or a variable is an error naming it, never silently ignored.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use chime_shared::queue::QueueLayout;
use chime_shared::redis_conn::RedisSpec;
use chime_shared::tls::ClientTls;
use chime_worker::ConsumerOptions;

/// Where Redis is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://host:port[/db]`; a comma-separated list means Redis Cluster seeds.
    pub url: String,
    /// Use the cluster protocol even with one seed URL.
    pub cluster: bool,
    /// How long one Redis request may take, in milliseconds.
    pub response_timeout_ms: u64,
    /// `rediss://` URLs: CA of the server certificate (PEM); empty: system roots.
    pub tls_ca_file: String,
    /// `rediss://` URLs: client certificate (PEM), when Redis requires one.
    pub tls_cert_file: String,
    /// Its private key (PEM).
    pub tls_key_file: String,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            response_timeout_ms: 10_000,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl RedisSection {
    /// The connection spec.
    pub fn spec(&self) -> Result<RedisSpec> {
        let mut spec = RedisSpec::parse(&self.url)?.cluster(self.cluster);
        spec.response_timeout_ms = self.response_timeout_ms;
        spec.tls = ClientTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            domain: String::new(),
        };
        Ok(spec)
    }
}

/// Where live settings are (etcd). Without endpoints, a process runs on its own
/// config alone: no live resize, no rate limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSection {
    /// Comma-separated `http://host:port` endpoints; empty means no etcd.
    pub endpoints: String,
    /// Key prefix of the live settings.
    pub prefix: String,
    /// User name, when etcd has authentication on.
    pub user: String,
    /// Password of `user`.
    pub password: String,
    /// `https://` endpoints: CA of the server certificate (PEM); empty: system roots.
    pub tls_ca_file: String,
    /// `https://` endpoints: client certificate (PEM), when etcd requires one.
    pub tls_cert_file: String,
    /// Its private key (PEM).
    pub tls_key_file: String,
}

impl Default for EtcdSection {
    fn default() -> Self {
        Self {
            endpoints: String::new(),
            prefix: chime_shared::config::DEFAULT_PREFIX.into(),
            user: String::new(),
            password: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl EtcdSection {
    /// The connection spec, when endpoints are set.
    pub fn spec(&self) -> Result<Option<chime_shared::etcd::EtcdSpec>> {
        if self.endpoints.trim().is_empty() {
            return Ok(None);
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            bail!(
                "invalid etcd.prefix {:?}: must start and end with '/'",
                self.prefix
            );
        }
        let mut spec = chime_shared::etcd::EtcdSpec::parse(&self.endpoints)?;
        if !self.user.is_empty() {
            spec.user = Some(self.user.clone());
            spec.password = Some(self.password.clone());
        }
        spec.tls = ClientTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            domain: String::new(),
        };
        Ok(Some(spec))
    }
}

/// Which queues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Key prefix of this deployment.
    pub prefix: String,
    /// Queue family.
    pub family: String,
    /// Number of queues N when the family is new (afterwards the layout in Redis,
    /// changed through etcd, decides).
    pub count: u32,
}

impl Default for QueueSection {
    fn default() -> Self {
        Self {
            prefix: "chime".into(),
            family: "default".into(),
            count: 8,
        }
    }
}

impl QueueSection {
    /// The checked layout.
    pub fn layout(&self) -> Result<QueueLayout> {
        Ok(QueueLayout::new(&self.prefix, &self.family, self.count)?)
    }
}

/// Consumer tuning; see `chime_worker::ConsumerOptions` for each field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSection {
    /// Concurrent pollers.
    pub pollers: usize,
    /// Most items per pop.
    pub batch: u32,
    /// Most items held at once (bounds memory).
    pub max_in_flight: usize,
    /// Visibility timeout in milliseconds.
    pub visibility_ms: u64,
    /// Queue lease TTL in milliseconds.
    pub lease_ttl_ms: u64,
    /// Merge window in milliseconds.
    pub merge_window_ms: u64,
    /// Longest idle sleep in milliseconds.
    pub idle_sleep_max_ms: u64,
    /// Drain timeout on shutdown in milliseconds.
    pub drain_timeout_ms: u64,
    /// First retry backoff in milliseconds.
    pub retry_base_ms: u64,
    /// Longest retry backoff in milliseconds.
    pub retry_max_ms: u64,
}

impl Default for ConsumerSection {
    fn default() -> Self {
        let o = ConsumerOptions::default();
        Self {
            pollers: o.pollers,
            batch: o.batch,
            max_in_flight: o.max_in_flight,
            visibility_ms: o.visibility_ms,
            lease_ttl_ms: o.lease_ttl_ms,
            merge_window_ms: o.merge_window_ms,
            idle_sleep_max_ms: o.idle_sleep_max_ms,
            drain_timeout_ms: o.drain_timeout_ms,
            retry_base_ms: o.retry_base_ms,
            retry_max_ms: o.retry_max_ms,
        }
    }
}

impl ConsumerSection {
    /// As SDK options.
    pub fn options(&self) -> ConsumerOptions {
        ConsumerOptions {
            pollers: self.pollers,
            batch: self.batch,
            max_in_flight: self.max_in_flight,
            visibility_ms: self.visibility_ms,
            lease_ttl_ms: self.lease_ttl_ms,
            merge_window_ms: self.merge_window_ms,
            idle_sleep_max_ms: self.idle_sleep_max_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
        }
    }
}

/// The generic worker's built-in handlers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HandlersSection {
    /// Built-in handlers to register (for delayed items and for job shards): any of
    /// `noop`, `log`, `http`, `sleep`, `fail`.
    pub enabled: Vec<String>,
    /// Where the `http` handler POSTs each delivery as JSON.
    pub http_url: String,
    /// Timeout of one `http` POST, in milliseconds.
    pub http_timeout_ms: u64,
    /// When set, every handled delivery appends `id due_ms handled_ms attempt` lines
    /// to this file before it is acknowledged (benchmarks and tests count them).
    pub record_file: String,
}

impl Default for HandlersSection {
    fn default() -> Self {
        Self {
            enabled: vec!["noop".into(), "log".into()],
            http_url: String::new(),
            http_timeout_ms: 5_000,
            record_file: String::new(),
        }
    }
}

/// The worker's coordinator session (job shards).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorLink {
    /// Comma-separated coordinator gRPC endpoints (`http://host:port`); empty: run
    /// no job shards.
    pub endpoints: String,
    /// Worker group.
    pub group: String,
    /// Shards run at once (a routing hint for the coordinator).
    pub capacity: u32,
    /// Labels, `k=v` comma-separated.
    pub labels: String,
    /// On shutdown, how long running shards may finish, ms.
    pub drain_timeout_ms: u64,
    /// When set, every finished shard appends a line to this file (tests, benches).
    pub record_file: String,
    /// File holding the worker token (the first token in it) the coordinator
    /// asks for; empty: connect without one.
    pub token_file: String,
    /// `https://` endpoints: CA of the coordinators' certificate; empty: system roots.
    pub tls_ca_file: String,
    /// Client certificate, when the coordinators require one (mutual TLS).
    pub tls_cert_file: String,
    /// Its private key.
    pub tls_key_file: String,
    /// Name to check the coordinators' certificate against, when not the URL's host.
    pub tls_domain: String,
}

impl CoordinatorLink {
    /// The session's TLS files.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            domain: self.tls_domain.clone(),
        }
    }
}

impl Default for CoordinatorLink {
    fn default() -> Self {
        Self {
            endpoints: String::new(),
            group: "default".into(),
            capacity: 16,
            labels: String::new(),
            drain_timeout_ms: 25_000,
            record_file: String::new(),
            token_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_domain: String::new(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// Filter in `RUST_LOG` syntax (`RUST_LOG` wins when set).
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Traces: spans exported over OTLP/gRPC (see README "Traces").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSection {
    /// OTLP/gRPC receiver of the spans (an OpenTelemetry Collector, Jaeger, Tempo),
    /// `http://host:4317` or `https://…`; empty: no spans are made.
    pub otlp_endpoint: String,
    /// Metadata sent with every export, `key=value,key2=value2` (a vendor's API
    /// key, `authorization=Bearer …`).
    pub otlp_headers: String,
    /// `https://` endpoints: CA of the receiver's certificate (PEM); empty: system
    /// roots.
    pub otlp_tls_ca_file: String,
    /// Client certificate (PEM), when the receiver requires one.
    pub otlp_tls_cert_file: String,
    /// Its private key (PEM).
    pub otlp_tls_key_file: String,
    /// `service.name` of the spans; empty: `chime-coordinator`, `chime-worker`.
    pub service_name: String,
    /// Share of the traces this process starts that are sampled, 0..=1: job fires
    /// on a coordinator. Items and shards follow the `sampled` flag of the context
    /// they come with.
    pub sample_ratio: f64,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_headers: String::new(),
            otlp_tls_ca_file: String::new(),
            otlp_tls_cert_file: String::new(),
            otlp_tls_key_file: String::new(),
            service_name: String::new(),
            sample_ratio: 1.0,
        }
    }
}

impl TracingSection {
    /// Starts the span exporter and installs this process's tracer, when an
    /// endpoint is set. The caller flushes it with `Exporter::shutdown` on exit.
    pub fn start(
        &self,
        default_service: &str,
        instance: &str,
    ) -> Result<Option<chime_shared::trace::otlp::Exporter>> {
        use chime_shared::trace::otlp::{self, OtlpOptions};
        if self.otlp_endpoint.trim().is_empty() {
            return Ok(None);
        }
        let (tracer, exporter) = otlp::start(OtlpOptions {
            endpoint: self.otlp_endpoint.clone(),
            service_name: if self.service_name.is_empty() {
                default_service.to_owned()
            } else {
                self.service_name.clone()
            },
            instance: instance.to_owned(),
            headers: OtlpOptions::parse_headers("tracing.otlp_headers", &self.otlp_headers)?,
            tls: ClientTls {
                ca_file: self.otlp_tls_ca_file.clone(),
                cert_file: self.otlp_tls_cert_file.clone(),
                key_file: self.otlp_tls_key_file.clone(),
                domain: String::new(),
            },
            root_sample_ratio: self.sample_ratio,
        })?;
        chime_shared::trace::install(tracer);
        tracing::info!(endpoint = %self.otlp_endpoint, sample_ratio = self.sample_ratio, "exporting spans over OTLP");
        Ok(Some(exporter))
    }
}

/// `chime worker`'s configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Stable worker id (a pod name); empty means `HOSTNAME`.
    pub worker_id: String,
    /// HTTP listen address of `/livez`, `/readyz` and `/metrics`; empty: none.
    pub http_addr: String,
    /// Redis.
    pub redis: RedisSection,
    /// Live settings.
    pub etcd: EtcdSection,
    /// Queues.
    pub queue: QueueSection,
    /// Consumer tuning.
    pub consumer: ConsumerSection,
    /// Built-in handlers.
    pub handlers: HandlersSection,
    /// The coordinator session.
    pub coordinator: CoordinatorLink,
    /// The delivery service apps subscribe to.
    pub deliveries: DeliveriesSection,
    /// Traces.
    pub tracing: TracingSection,
    /// Logging.
    pub log: LogSection,
}

/// The worker's delivery service (`chime.v1.Deliveries`): apps in any language
/// subscribe handler names and get their due items, while this worker does the
/// queue work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveriesSection {
    /// Listen address; empty: off. A sidecar listens on `127.0.0.1:7071`, a shared
    /// pool behind a Service on `0.0.0.0:7071`.
    pub listen_addr: String,
    /// File of the tokens subscribers present (one per line); empty: the worker's
    /// own token file (`coordinator.token_file`).
    pub token_file: String,
    /// Accept subscribers without a token when no token file is set (a laptop);
    /// otherwise the worker refuses to start the service.
    pub allow_unauthenticated: bool,
    /// Settle timeout of subscriptions that ask for none, ms.
    pub settle_timeout_ms: u32,
    /// TLS certificate chain and key (PEM); empty: plain text.
    pub tls_cert_file: String,
    /// TLS private key (PEM).
    pub tls_key_file: String,
    /// When set, subscribers must present a certificate signed by this CA (mutual
    /// TLS).
    pub tls_client_ca_file: String,
}

impl Default for DeliveriesSection {
    fn default() -> Self {
        Self {
            listen_addr: String::new(),
            token_file: String::new(),
            allow_unauthenticated: false,
            settle_timeout_ms: 30_000,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
        }
    }
}

impl DeliveriesSection {
    /// The listener's TLS files.
    pub fn tls(&self) -> chime_shared::tls::ServerTls {
        chime_shared::tls::ServerTls {
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            client_ca_file: self.tls_client_ca_file.clone(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: String::new(),
            http_addr: "0.0.0.0:9090".into(),
            redis: RedisSection::default(),
            etcd: EtcdSection::default(),
            queue: QueueSection::default(),
            consumer: ConsumerSection::default(),
            handlers: HandlersSection::default(),
            coordinator: CoordinatorLink::default(),
            deliveries: DeliveriesSection::default(),
            tracing: TracingSection::default(),
            log: LogSection::default(),
        }
    }
}

/// Who may call the coordinator. Tokens live in files (a Kubernetes Secret mounted
/// as files), one per line; several lines are several valid tokens, which is how a
/// token rotates without a restart. A changed file is picked up within a second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// File of the admin tokens (console, `chime job|runs|workers`).
    pub admin_token_file: String,
    /// File of the worker tokens (worker sessions). Separate from the admin
    /// tokens, so a worker's token cannot change jobs.
    pub worker_token_file: String,
    /// File of the producer tokens: they open only the delay queue (the
    /// `chime.v1.Queue` gRPC service and the JSON API's item calls), for services that
    /// enqueue and cancel items. Empty: none (admin tokens still open the queue).
    pub producer_token_file: String,
    /// Accept calls without a token where no token file is set. For trying chime
    /// on a laptop; a coordinator with neither refuses to start.
    pub allow_unauthenticated: bool,
    /// `/metrics` on the HTTP port takes an admin token of role viewer or above
    /// and of no namespace (Prometheus: `authorization.credentials_file`). Its
    /// labels name every namespace's worker groups and handlers: leave it off
    /// (open) only where the teams cannot reach the port. Default false.
    pub metrics_require_token: bool,
}

/// TLS of the coordinator's gRPC and HTTP listeners.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Certificate chain (PEM); empty: no TLS.
    pub cert_file: String,
    /// Private key (PEM).
    pub key_file: String,
    /// When set, gRPC clients (workers, CLI, peers) must present a certificate
    /// signed by this CA: mutual TLS. The console's HTTP listener does not ask
    /// browsers for one.
    pub client_ca_file: String,
    /// CA of the other coordinators' certificates, to verify the leader when
    /// forwarding admin calls; empty: `client_ca_file`, else the system roots.
    pub ca_file: String,
}

impl TlsSection {
    /// The listeners' files.
    pub fn server(&self) -> chime_shared::tls::ServerTls {
        chime_shared::tls::ServerTls {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            client_ca_file: self.client_ca_file.clone(),
        }
    }

    /// How this coordinator dials its peers: their CA, and its own certificate
    /// when peers require one. `None` without TLS.
    pub fn peer(&self) -> Option<ClientTls> {
        if self.cert_file.is_empty() {
            return None;
        }
        let mtls = !self.client_ca_file.is_empty();
        Some(ClientTls {
            ca_file: if self.ca_file.is_empty() {
                self.client_ca_file.clone()
            } else {
                self.ca_file.clone()
            },
            cert_file: if mtls {
                self.cert_file.clone()
            } else {
                String::new()
            },
            key_file: if mtls {
                self.key_file.clone()
            } else {
                String::new()
            },
            domain: String::new(),
        })
    }
}

/// `chime coordinator`'s configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Redis (run history, fire records).
    pub redis: RedisSection,
    /// etcd (job definitions, live settings, leader election).
    pub etcd: EtcdSection,
    /// The coordinator itself.
    pub coordinator: CoordinatorSection,
    /// Tokens.
    pub auth: AuthSection,
    /// TLS.
    pub tls: TlsSection,
    /// The delay queues the console shows (same prefix and family as the workers').
    pub queue: QueueSection,
    /// Traces.
    pub tracing: TracingSection,
    /// Logging.
    pub log: LogSection,
}

/// The coordinator's own settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSection {
    /// gRPC listen address (workers and the admin API).
    pub grpc_addr: String,
    /// HTTP listen address (web console, JSON API, `/livez`, `/readyz`,
    /// `/metrics`); empty: no HTTP.
    pub http_addr: String,
    /// Address workers and peers should use for this coordinator (default: the
    /// listen address, with 127.0.0.1 for an unspecified host).
    pub advertise: String,
    /// Key prefix in Redis.
    pub prefix: String,
    /// Heartbeat interval told to workers, ms.
    pub heartbeat_interval_ms: u64,
    /// Runs kept per job.
    pub history_per_job: usize,
    /// Runs older than this are dropped, seconds.
    pub history_max_age_s: u64,
    /// Audit log entries kept (about).
    pub audit_max_entries: usize,
    /// Audit log entries older than this are dropped, seconds.
    pub audit_max_age_s: u64,
    /// Leader lease TTL, seconds: a dead leader is replaced within about this long.
    pub election_ttl_s: u64,
    /// No job may fire more often than this, ms (cron, fixed rate, fixed delay).
    pub min_period_ms: u64,
    /// Scheduled ticks are planned and recorded this long before their instant, so
    /// only the assignments go out at the instant, ms (0..=1000; 0: at the instant).
    pub prepare_ahead_ms: u64,
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        Self {
            grpc_addr: "0.0.0.0:7070".into(),
            http_addr: "0.0.0.0:8080".into(),
            advertise: String::new(),
            prefix: "chime".into(),
            heartbeat_interval_ms: 2_000,
            history_per_job: 200,
            history_max_age_s: 7 * 86_400,
            audit_max_entries: 100_000,
            audit_max_age_s: 90 * 86_400,
            election_ttl_s: 5,
            min_period_ms: 1_000,
            prepare_ahead_ms: chime_coordinator::engine::DEFAULT_PREPARE_AHEAD_MS,
        }
    }
}

/// `chime queue …`'s configuration (producer and operator side).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Redis.
    pub redis: RedisSection,
    /// Live settings.
    pub etcd: EtcdSection,
    /// Queues.
    pub queue: QueueSection,
    /// Coordinator endpoints for `chime job|runs|workers` (comma-separated).
    pub coordinator: String,
    /// Admin token for `chime job|runs|workers` (`CHIME_ADMIN_TOKEN`); prefer
    /// `admin_token_file`.
    pub admin_token: String,
    /// File holding the admin token (the first token in it).
    pub admin_token_file: String,
    /// `https://` coordinators: their CA; empty: system roots.
    pub tls_ca_file: String,
    /// Client certificate, when the coordinators require one.
    pub tls_cert_file: String,
    /// Its private key.
    pub tls_key_file: String,
    /// Name to check the coordinators' certificate against, when not the URL's host.
    pub tls_domain: String,
    /// Logging.
    pub log: LogSection,
}

/// The documented default file of each process (`chime config example <process>`);
/// a test fails when one drifts from the structs above.
pub const EXAMPLES: [(&str, &str); 3] = [
    ("coordinator", include_str!("../config/coordinator.toml")),
    ("worker", include_str!("../config/worker.toml")),
    ("client", include_str!("../config/client.toml")),
];

/// Loads `T` from the optional file, then overlays `CHIME_*` variables from `env`.
pub fn load<T>(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<T>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut value = toml::Value::try_from(T::default()).context("serialising defaults")?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let from_file: toml::Value = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge(&mut value, from_file);
    }
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("CHIME_") else {
            continue;
        };
        if rest == "CONFIG" {
            continue;
        }
        let matched = set_by_env_name(&mut value, rest, &raw)
            .with_context(|| format!("environment variable {name}"))?;
        if !matched {
            // A team's own CHIME_* variable (or a harness's) must not stop the
            // binary; a typo is still visible here. Logging is not set up yet.
            eprintln!(
                "warning: environment variable {name} matches no configuration field; ignored"
            );
        }
    }
    let text = toml::to_string(&value)?;
    toml::from_str(&text).context("invalid configuration")
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Finds the field `name` (upper case, `_`-joined path) and sets it from `raw`,
/// parsed as the type the field already has. Answers whether a field matched; a
/// matched field with a bad value is an error.
fn set_by_env_name(value: &mut toml::Value, name: &str, raw: &str) -> Result<bool> {
    let toml::Value::Table(table) = value else {
        return Ok(false);
    };
    // Longest key first, so `MAX_IN_FLIGHT` is not mistaken for a `MAX` section.
    let mut keys: Vec<String> = table.keys().cloned().collect();
    keys.sort_by_key(|k| std::cmp::Reverse(k.len()));
    for key in keys {
        let upper = key.to_uppercase();
        let Some(slot) = table.get_mut(&key) else {
            continue;
        };
        if name == upper && !slot.is_table() {
            *slot = parse_like(slot, raw).with_context(|| format!("field {key}"))?;
            return Ok(true);
        }
        if let Some(rest) = name.strip_prefix(&format!("{upper}_"))
            && set_by_env_name(slot, rest, raw)?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn parse_like(current: &toml::Value, raw: &str) -> Result<toml::Value> {
    Ok(match current {
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim()
                .parse()
                .with_context(|| format!("{raw:?} is not an integer"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim()
                .parse()
                .with_context(|| format!("{raw:?} is not true or false"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            raw.trim()
                .parse()
                .with_context(|| format!("{raw:?} is not a number"))?,
        ),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    })
}

/// The process environment's `CHIME_*` variables.
pub fn chime_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("CHIME_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Every `a.b.c` key path of a TOML table.
    fn paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let p = format!("{prefix}{k}");
                if v.is_table() {
                    paths(v, &format!("{p}."), out);
                } else {
                    out.push(p);
                }
            }
        }
    }

    fn same_as_defaults<T>(name: &str)
    where
        T: DeserializeOwned + Serialize + Default + PartialEq + std::fmt::Debug,
    {
        let text = EXAMPLES.iter().find(|e| e.0 == name).unwrap().1;
        let parsed: T = toml::from_str(text)
            .unwrap_or_else(|e| panic!("cli/config/{name}.toml does not parse: {e}"));
        assert_eq!(
            parsed,
            T::default(),
            "cli/config/{name}.toml states other values than the defaults in the code"
        );
        let (mut in_file, mut in_code) = (Vec::new(), Vec::new());
        paths(&toml::from_str(text).unwrap(), "", &mut in_file);
        paths(
            &toml::Value::try_from(T::default()).unwrap(),
            "",
            &mut in_code,
        );
        in_file.sort();
        in_code.sort();
        assert_eq!(
            in_file, in_code,
            "cli/config/{name}.toml must list exactly the keys of the code"
        );
    }

    #[test]
    fn example_files_match_the_code() {
        same_as_defaults::<CoordinatorConfig>("coordinator");
        same_as_defaults::<WorkerConfig>("worker");
        same_as_defaults::<ClientConfig>("client");
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = std::env::temp_dir().join(format!("chime-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.toml");
        std::fs::write(
            &f,
            "worker_id = \"a\"\n[consumer]\nbatch = 77\n[queue]\ncount = 4\n",
        )
        .unwrap();
        let cfg: WorkerConfig = load(
            Some(&f),
            env(&[
                ("CHIME_CONSUMER_MAX_IN_FLIGHT", "99"),
                ("CHIME_QUEUE_COUNT", "16"),
                ("CHIME_REDIS_URL", "redis://x:1"),
                ("CHIME_HANDLERS_ENABLED", "noop, http"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.worker_id, "a");
        assert_eq!(cfg.consumer.batch, 77);
        assert_eq!(cfg.consumer.max_in_flight, 99);
        assert_eq!(cfg.queue.count, 16);
        assert_eq!(cfg.redis.url, "redis://x:1");
        assert_eq!(cfg.handlers.enabled, ["noop", "http"]);
        assert_eq!(cfg.consumer.pollers, ConsumerOptions::default().pollers);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_values_are_errors_naming_them_and_unknown_variables_are_ignored() {
        // A team's own CHIME_APP_* or a harness's CHIME_BIN must not stop the binary.
        let cfg = load::<WorkerConfig>(
            None,
            env(&[("CHIME_CONSUMER_BTACH", "1"), ("CHIME_BIN", "x")]),
        )
        .unwrap();
        assert_eq!(cfg, WorkerConfig::default());
        let e = load::<WorkerConfig>(None, env(&[("CHIME_QUEUE_COUNT", "abc")])).unwrap_err();
        assert!(format!("{e:#}").contains("not an integer"), "{e:#}");
        let dir = std::env::temp_dir().join(format!("chime-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("w.toml");
        std::fs::write(&f, "[consumer]\nbatchh = 3\n").unwrap();
        let e = load::<WorkerConfig>(Some(&f), Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("batchh"), "{e:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
