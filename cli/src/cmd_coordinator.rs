//! `chime coordinator`: fires jobs and serves the worker gateway and the admin API
//! (gRPC). Job definitions live in etcd (in memory without etcd, for trying it out);
//! run history and fire records in Redis. Stops on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use chime_coordinator::engine::EngineOptions;
use chime_coordinator::grpc::Auth;
use chime_coordinator::leader::ElectionOptions;
use chime_coordinator::store::{JobStore, RedisRunStore, Retention};
use chime_shared::activity::{self, HistoryStore, RedisHistory};
use chime_shared::auth::{SetKind, Tokens};
use chime_shared::clock::SystemClock;
use chime_shared::config::source::{ConfigSource, EtcdSource, MemorySource};
use chime_shared::queue::DelayStore;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::redis_conn::RedisConn;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, AuthSection, CoordinatorConfig};
use crate::{connect_when_up, init_logging, shutdown_signal};

/// `chime coordinator` flags; each overrides the config file and `CHIME_*`.
#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Config file (TOML).
    #[arg(long, env = "CHIME_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long)]
    grpc_addr: Option<String>,
    /// HTTP listen address (console, API, probes, metrics); empty for none.
    #[arg(long)]
    http_addr: Option<String>,
    /// File of admin tokens, one per line.
    #[arg(long)]
    admin_token_file: Option<String>,
    /// File of worker tokens, one per line.
    #[arg(long)]
    worker_token_file: Option<String>,
    /// File of producer tokens (they open only the delay queue), one per line.
    #[arg(long)]
    producer_token_file: Option<String>,
    /// Accept calls without a token where no token file is set (laptops only).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Address workers should use for this coordinator.
    #[arg(long)]
    advertise: Option<String>,
    /// Redis URL.
    #[arg(long)]
    redis_url: Option<String>,
    /// etcd endpoints (comma-separated).
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// Key prefix in Redis.
    #[arg(long)]
    prefix: Option<String>,
    /// Heartbeat interval told to workers, ms.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Leader lease TTL, seconds.
    #[arg(long)]
    election_ttl_s: Option<u64>,
    /// Plan and record scheduled ticks this long before their instant, ms.
    #[arg(long)]
    prepare_ahead_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
}

/// The address workers use: the advertised one, else the bound one with 127.0.0.1
/// for an unspecified host.
pub fn advertise_for(bound: SocketAddr, configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let ip = if bound.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        bound.ip().to_string()
    };
    format!("{ip}:{}", bound.port())
}

/// The token sets of `[auth]`; refuses to run open unless asked to.
pub fn auth(a: &AuthSection) -> Result<Auth> {
    let load = |file: &str, key: &str| -> Result<Option<Arc<Tokens>>> {
        if file.trim().is_empty() {
            if a.allow_unauthenticated {
                return Ok(None);
            }
            anyhow::bail!(
                "invalid auth.{key}: not set. Give a file of tokens (one per line), or set \
                 auth.allow_unauthenticated = true (--allow-unauthenticated, \
                 CHIME_AUTH_ALLOW_UNAUTHENTICATED=true) to run without authentication"
            );
        }
        // Admin tokens may carry a role (viewer, operator, admin); worker tokens
        // open one gate and have none.
        let t = match key {
            "admin_token_file" => Tokens::from_file_with_roles(file.trim()),
            _ => Tokens::from_file_of(file.trim(), SetKind::Worker),
        }
        .with_context(|| format!("auth.{key}"))?;
        Ok(Some(Arc::new(t)))
    };
    let auth = Auth {
        admin: load(&a.admin_token_file, "admin_token_file")?,
        worker: load(&a.worker_token_file, "worker_token_file")?,
        // Optional: without it the queue takes admin tokens only, so an empty file
        // setting never opens anything.
        producer: match a.producer_token_file.trim() {
            "" => None,
            file => Some(Arc::new(
                Tokens::from_file_of(file, SetKind::Producer)
                    .context("auth.producer_token_file")?,
            )),
        },
        metrics_require_token: a.metrics_require_token,
    };
    if auth.admin.is_none() || auth.worker.is_none() {
        warn!("authentication is off for some callers (auth.allow_unauthenticated)");
    }
    Ok(auth)
}

/// Runs the coordinator until a signal.
pub async fn run(args: CoordinatorArgs) -> Result<()> {
    let mut cfg: CoordinatorConfig = config::load(args.config.as_deref(), config::chime_env())?;
    let c = &mut cfg.coordinator;
    if let Some(v) = args.grpc_addr {
        c.grpc_addr = v;
    }
    if let Some(v) = args.http_addr {
        c.http_addr = v;
    }
    if let Some(v) = args.admin_token_file {
        cfg.auth.admin_token_file = v;
    }
    if let Some(v) = args.worker_token_file {
        cfg.auth.worker_token_file = v;
    }
    if let Some(v) = args.producer_token_file {
        cfg.auth.producer_token_file = v;
    }
    if args.allow_unauthenticated {
        cfg.auth.allow_unauthenticated = true;
    }
    let c = &mut cfg.coordinator;
    if let Some(v) = args.advertise {
        c.advertise = v;
    }
    if let Some(v) = args.prefix {
        c.prefix = v;
    }
    if let Some(v) = args.heartbeat_interval_ms {
        c.heartbeat_interval_ms = v;
    }
    if let Some(v) = args.election_ttl_s {
        c.election_ttl_s = v;
    }
    if let Some(v) = args.prepare_ahead_ms {
        c.prepare_ahead_ms = v;
    }
    if let Some(v) = args.redis_url {
        cfg.redis.url = v;
    }
    if let Some(v) = args.etcd_endpoints {
        cfg.etcd.endpoints = v;
    }
    if let Some(v) = args.log_format {
        cfg.log.format = v;
    }
    init_logging(&cfg.log.format, &cfg.log.level);
    let auth = auth(&cfg.auth)?;
    chime_shared::limits::check_handler("coordinator.prefix", &cfg.coordinator.prefix)?;
    let host = chime_worker::default_worker_id();
    let spans = cfg.tracing.start("chime-coordinator", &host)?;
    if !(100..=60_000).contains(&cfg.coordinator.heartbeat_interval_ms) {
        anyhow::bail!("invalid coordinator.heartbeat_interval_ms: must be within 100..=60000");
    }
    let redis_spec = cfg.redis.spec()?;
    let conn = connect_when_up("Redis", &cfg.redis.url, || RedisConn::connect(&redis_spec)).await?;
    let runs = Arc::new(RedisRunStore::new(
        conn.clone(),
        &cfg.coordinator.prefix,
        Retention {
            per_job: cfg.coordinator.history_per_job.max(1),
            max_age_s: cfg.coordinator.history_max_age_s.max(60),
            audit_entries: cfg.coordinator.audit_max_entries.max(1),
            audit_max_age_s: cfg.coordinator.audit_max_age_s.max(60),
        },
    ));
    if !(100..=86_400_000).contains(&cfg.coordinator.min_period_ms) {
        anyhow::bail!("invalid coordinator.min_period_ms: must be within 100..=86400000");
    }
    if !(1..=60).contains(&cfg.coordinator.election_ttl_s) {
        anyhow::bail!("invalid coordinator.election_ttl_s: must be within 1..=60");
    }
    if cfg.coordinator.prepare_ahead_ms > chime_coordinator::engine::MAX_PREPARE_AHEAD_MS {
        anyhow::bail!(
            "invalid coordinator.prepare_ahead_ms: must be within 0..={}",
            chime_coordinator::engine::MAX_PREPARE_AHEAD_MS
        );
    }
    let queues: Arc<dyn DelayStore> =
        Arc::new(RedisStore::open(conn.clone(), cfg.queue.layout()?).await?);
    // The console's charts, under the queue prefix the workers flush to.
    let history: Arc<dyn HistoryStore> =
        Arc::new(RedisHistory::new(conn.clone(), &cfg.queue.layout()?.prefix));
    let (source, etcd): (Arc<dyn ConfigSource>, Option<etcd_client::Client>) = match cfg
        .etcd
        .spec()?
    {
        Some(spec) => {
            let client = connect_when_up("etcd", &cfg.etcd.endpoints, || spec.connect()).await?;
            (
                Arc::new(EtcdSource::new(client.clone(), cfg.etcd.prefix.clone())),
                Some(client),
            )
        }
        None => {
            warn!(
                "no etcd configured: one coordinator, job definitions in memory (lost on restart)"
            );
            (Arc::new(MemorySource::default()), None)
        }
    };
    let listener = tokio::net::TcpListener::bind(&cfg.coordinator.grpc_addr)
        .await
        .with_context(|| {
            format!(
                "binding coordinator.grpc_addr {}",
                cfg.coordinator.grpc_addr
            )
        })?;
    let advertise = advertise_for(listener.local_addr()?, &cfg.coordinator.advertise);
    let http = match cfg.coordinator.http_addr.trim() {
        "" => None,
        addr => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding coordinator.http_addr {addr}"))?,
        ),
    };
    let http_bound = http.as_ref().and_then(|l| l.local_addr().ok());
    info!(grpc = %listener.local_addr()?, http = ?http_bound, advertise = %advertise, "chime coordinator listening");
    let config = etcd.is_some().then(|| source.clone());
    let tls = cfg.tls.server();
    if tls.enabled() {
        tls.check()?;
    } else if !cfg.tls.client_ca_file.is_empty() || !cfg.tls.key_file.is_empty() {
        anyhow::bail!("invalid tls.cert_file: required with tls.key_file or tls.client_ca_file");
    }
    let deps = chime_coordinator::Deps {
        cluster: cfg.coordinator.prefix.clone(),
        family: cfg.queue.family.clone(),
        tls,
        peer_tls: cfg.tls.peer(),
        queues: Some(queues),
        history: Some(history.clone()),
        config,
        auth,
        jobs: JobStore::new(source).with_min_period_ms(cfg.coordinator.min_period_ms),
        runs,
        clock: Arc::new(SystemClock),
        options: EngineOptions {
            heartbeat_interval_ms: cfg.coordinator.heartbeat_interval_ms,
            dead_after_beats: 3,
            advertise: advertise.clone(),
            prepare_ahead_ms: cfg.coordinator.prepare_ahead_ms,
        },
        election: etcd.map(|client| {
            (
                client,
                ElectionOptions {
                    name: format!("{}election/coordinator", cfg.etcd.prefix),
                    advertise,
                    ttl_s: cfg.coordinator.election_ttl_s as i64,
                },
            )
        }),
    };
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    activity::enable();
    let stop_flush = CancellationToken::new();
    let flusher = {
        let stop = stop_flush.clone();
        tokio::spawn(activity::flush(activity::global(), history, async move {
            stop.cancelled().await
        }))
    };
    let served = chime_coordinator::serve(deps, listener, http, stop).await;
    stop_flush.cancel();
    let _ = flusher.await;
    if let Some(e) = spans {
        e.shutdown().await;
    }
    served?;
    info!("chime coordinator stopped");
    Ok(())
}
