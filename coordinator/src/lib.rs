//! `chime-coordinator`: fires jobs and hands their shards to workers; several
//! replicas elect one leader through etcd.
//!
//! - [`model`]: jobs, runs, shards (the domain; no generated types).
//! - [`workflow`]: DAGs of jobs (definition, checks, the pure rules of a run).
//! - [`schedule`]: cron (seconds, time zones, DST), fixed rate/delay, once, manual.
//! - [`store`]: job definitions (etcd or memory), run history, fire records and the
//!   fencing token (Redis or memory).
//! - [`engine`]: the one task that owns scheduling state on the leader.
//! - [`leader`]: election and fencing.
//! - [`admin`]: the admin service in domain terms (jobs, runs, workers), which
//!   forwards to the leader from a follower; the gRPC and HTTP edges both wrap it.
//! - [`audit`]: who changed what and when (token names, before and after).
//! - [`grpc`]: the worker gateway, the admin API and the delay-queue API, thin
//!   adapters; followers send workers to the leader.
//!
//! [`serve`] is what the binary calls: it takes a bound listener, built stores and
//! a shutdown token. Architecture invariant: nothing here reads config files, binds
//! ports by itself or installs a logger.

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod http;
pub mod leader;
pub mod model;
pub mod schedule;
pub mod scope;
pub mod store;
pub mod warm;
pub mod workflow;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chime_shared::clock::Clock;
use chime_shared::config::source::ConfigSource;
use chime_shared::queue::DelayStore;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use error::{CoordError, Result};

use engine::EngineHandle;
use leader::Role;
use store::Preloaded;

/// What a coordinator needs to run.
#[derive(Clone)]
pub struct Deps {
    /// Job definitions.
    pub jobs: store::JobStore,
    /// Run history and fire records.
    pub runs: Arc<dyn store::RunStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Engine settings (`advertise` is this coordinator's address).
    pub options: engine::EngineOptions,
    /// Leader election; `None` runs a single coordinator that always leads.
    pub election: Option<(etcd_client::Client, leader::ElectionOptions)>,
    /// The delay store, for the console's queue pages and the queue gauges the
    /// leader samples (`None`: neither).
    pub queues: Option<Arc<dyn DelayStore>>,
    /// Live settings, for the console's config page (`None`: not shown).
    pub config: Option<Arc<dyn ConfigSource>>,
    /// Who may call the admin API and open worker sessions.
    pub auth: grpc::Auth,
    /// TLS of both listeners (off when no certificate is given).
    pub tls: chime_shared::tls::ServerTls,
    /// TLS to reach the leader when forwarding admin calls (set with `tls`).
    pub peer_tls: Option<chime_shared::tls::ClientTls>,
    /// The deployment's name (`coordinator.prefix`), which alert notices carry.
    pub cluster: String,
    /// The queue family `queues` serves (queue alert rules are checked against it).
    pub family: String,
    /// The last hour of activity the console charts (`None`: no charts). The
    /// binary flushes this process's recorder into it; the leader's sampler sets
    /// the gauges.
    pub history: Option<Arc<dyn chime_shared::activity::HistoryStore>>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("options", &self.options)
            .field("election", &self.election.as_ref().map(|e| &e.1))
            .finish_non_exhaustive()
    }
}

/// Who leads, as the gRPC edge sees it.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// The engine, on the leader.
    pub engine: Option<EngineHandle>,
    /// The leader's address (ours when leading; empty while unknown).
    pub leader: String,
    /// The leader's fencing token (0 when not leading).
    pub fence: i64,
}

/// Shared by the gRPC services and the leadership loop.
#[derive(Debug, Default)]
pub struct Shared {
    current: RwLock<Current>,
    /// Bumped on every change of `current`, so a caller can wait for the next one
    /// (see [`Shared::leader_named`]) instead of polling.
    changes: watch::Sender<u64>,
    /// This coordinator's advertised address.
    this: String,
    /// Shutting down: nobody is held for a leader any more.
    closing: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// State for a coordinator advertised as `this` (`host:port`), not leading yet.
    pub fn new(this: impl Into<String>) -> Self {
        Self {
            this: this.into(),
            ..Self::default()
        }
    }

    /// Who leads now.
    pub fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, c: Current) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = c;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Shutting down: a held `Register` is answered now (this coordinator is
    /// about to stop serving; the worker asks another).
    fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Who leads, once that is worth telling a worker: at once when this
    /// coordinator leads or names another leader; while it knows none, or names
    /// itself (a restarted coordinator reads its own stale key from its previous
    /// life until that lease runs out), it waits up to `patience` for a change.
    ///
    /// Why wait: during an election every answer a follower can give is wrong, and
    /// a worker told "nobody" or "me" retries after a pause. Holding the question
    /// until the election settles answers it the moment a leader exists, which is
    /// what keeps a failover close to the lease TTL.
    pub async fn leader_named(&self, patience: Duration) -> Current {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let c = self.current();
            let settled = c.engine.is_some()
                || !(c.leader.is_empty() || c.leader == self.this)
                || self.closing.load(std::sync::atomic::Ordering::SeqCst);
            if settled
                || tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_err()
            {
                return c;
            }
        }
    }
}

/// How often the leader samples queue depths into the gauges.
const QUEUE_SAMPLE: Duration = Duration::from_secs(5);

/// Runs a coordinator until `shutdown` is cancelled: gRPC (worker gateway, admin
/// API, health, reflection) on `grpc_listener`, and when given, HTTP (console, JSON
/// API, `/livez`, `/readyz`, `/metrics`) on `http_listener`. A leader hands
/// leadership over on the way out.
pub async fn serve(
    deps: Deps,
    grpc_listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<()> {
    let shared = Arc::new(Shared::new(deps.options.advertise.clone()));
    // Every replica exports the leader gauge from its start (0 until it leads), so
    // "no leader" is a 0 everywhere rather than a series that is missing.
    metrics::gauge!(chime_shared::telemetry::IS_LEADER).set(0.0);
    let admin = grpc::admin_api(
        shared.clone(),
        deps.jobs.clone(),
        deps.runs.clone(),
        deps.clock.clone(),
        &deps.auth,
        deps.peer_tls.clone(),
    );
    let (grpc_tls, http_tls) = if deps.tls.enabled() {
        (Some(deps.tls.tonic()?), Some(deps.tls.rustls(false)?))
    } else {
        (None, None)
    };
    let queue =
        grpc::queue::QueueApi::new(deps.queues.clone(), Some(admin.service().audit().clone()))
            .scoped_by(deps.auth.clone());
    let server = grpc::server(
        shared.clone(),
        admin.clone(),
        queue,
        deps.auth.clone(),
        grpc_tls,
    )
    .await?;
    // TCP_NODELAY: a small message (a fire, a cancel) written while the previous
    // one is unacknowledged would otherwise wait for the peer's delayed ACK.
    let incoming =
        tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let stop_grpc = CancellationToken::new();
    let grpc_stop = stop_grpc.clone();
    let grpc = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async move { grpc_stop.cancelled().await })
            .await
    });
    // HTTP stops with gRPC, after leadership is handed over, so probes and the
    // console keep answering during the hand-over.
    let family = deps.family.clone();
    let alert_rules = alerts::Rules::default();
    let http = http_listener.map(|l| {
        let state = http::HttpState {
            alerts: alert_rules.clone(),
            family: family.clone(),
            admin: admin.service(),
            shared: shared.clone(),
            queues: deps.queues.clone(),
            config: deps.config.clone(),
            auth: deps.auth.clone(),
            this: deps.options.advertise.clone(),
            clock: deps.clock.clone(),
            history: deps.history.clone(),
        };
        let router = http::router(state, readiness(shared.clone(), deps.clone()));
        tokio::spawn(chime_shared::ops::serve(
            l,
            router,
            http_tls,
            stop_grpc.clone(),
        ))
    });
    if let Some(q) = deps.queues.clone() {
        tokio::spawn(sample_queues(q, shared.clone(), stop_grpc.clone()));
    }
    // Every replica follows the alert rules (the console reads them anywhere); the
    // evaluator acts only while this replica leads.
    tokio::spawn(alerts::follow_rules(
        deps.jobs.source(),
        alert_rules.clone(),
        family.clone(),
        stop_grpc.clone(),
    ));
    tokio::spawn(alerts::run(
        alerts::AlertsDeps {
            shared: shared.clone(),
            jobs: deps.jobs.clone(),
            runs: deps.runs.clone(),
            queues: deps.queues.clone(),
            clock: deps.clock.clone(),
            cluster: deps.cluster.clone(),
            family: family.clone(),
        },
        alert_rules.clone(),
        stop_grpc.clone(),
    ));
    let resign = Arc::new(Notify::new());
    let election_stop = CancellationToken::new();
    // Without an election this coordinator always leads; the sender is held until
    // the function returns, because a dropped sender reads as "leadership over".
    let (_always, always_leader) = watch::channel(Role::Leader { fence: 1 });
    let (mut roles, election) = match &deps.election {
        Some((client, opts)) => {
            let (roles, task) = leader::spawn(
                client.clone(),
                opts.clone(),
                resign.clone(),
                election_stop.clone(),
            );
            (roles, Some(task))
        }
        None => (always_leader, None),
    };
    let mut engine: Option<(
        CancellationToken,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        EngineHandle,
    )> = None;
    // A follower's copy of the jobs, handed to its engine when it is elected (only
    // where there is an election: a lone coordinator leads from the start).
    let mut warm: Option<warm::WarmJobs> = None;
    loop {
        let role = roles.borrow_and_update().clone();
        match role {
            Role::Leader { fence } if engine.is_none() => {
                match start_engine(&deps, fence, warm.take().and_then(warm::WarmJobs::take)).await {
                    Ok((handle, stop, lost, task)) => {
                        shared.set(Current {
                            engine: Some(handle.clone()),
                            leader: deps.options.advertise.clone(),
                            fence,
                        });
                        engine = Some((stop, lost, task, handle));
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot start as leader; resigning");
                        resign.notify_one();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            Role::Leader { .. } => {}
            Role::Follower { leader } => {
                if let Some((stop, _, task, _)) = engine.take() {
                    info!("no longer the leader: stopping the engine");
                    stop.cancel();
                    let _ = task.await;
                }
                if warm.is_none() && deps.election.is_some() {
                    warm = Some(warm::WarmJobs::spawn(
                        deps.jobs.clone(),
                        deps.clock.clone(),
                        &shutdown,
                    ));
                }
                shared.set(Current {
                    engine: None,
                    leader,
                    fence: 0,
                });
            }
        }
        let lost = engine.as_ref().map(|e| e.1.clone()).unwrap_or_default();
        tokio::select! {
            r = roles.changed() => if r.is_err() { break },
            _ = lost.cancelled(), if engine.is_some() => {
                // A newer leader fenced us out: stop now, then campaign again.
                if let Some((stop, _, task, _)) = engine.take() {
                    stop.cancel();
                    let _ = task.await;
                }
                shared.set(Current { engine: None, leader: String::new(), fence: 0 });
                resign.notify_one();
            }
            _ = shutdown.cancelled() => break,
        }
    }
    // Shutdown: stop firing and hand the runs over (the next leader takes them at
    // once), give up leadership, then stop serving.
    shared.close();
    if let Some((stop, _, task, handle)) = engine.take() {
        let _ = handle.hand_over().await;
        stop.cancel();
        let _ = task.await;
    }
    shared.set(Current::default());
    election_stop.cancel();
    // Wait for the resignation: the successor's campaign returns the moment our key
    // is gone. Bounded (resign and revoke are 2 s each) for an etcd that is away;
    // the key then goes with the lease TTL.
    if let Some(task) = election {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    stop_grpc.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    match grpc.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CoordError::Unavailable(format!("grpc server: {e}"))),
        Err(e) => Err(CoordError::Unavailable(format!("grpc server task: {e}"))),
    }
}

/// Ready when the leader is known (this replica or another) and the run store
/// answers: a replica that cannot reach Redis or has no leader cannot serve.
fn readiness(shared: Arc<Shared>, deps: Deps) -> chime_shared::ops::Readiness {
    Arc::new(move || {
        let shared = shared.clone();
        let runs = deps.runs.clone();
        let advertise = deps.options.advertise.clone();
        Box::pin(async move {
            let c = shared.current();
            let store = runs.ping().await;
            // A follower that finds its own address in the leader key (a previous
            // run of it, restarted before its lease expired) has no leader to
            // forward to yet.
            let leader_known =
                c.engine.is_some() || (!c.leader.is_empty() && c.leader != advertise);
            let ok = leader_known && store.is_ok();
            let details = serde_json::json!({
                "leader": c.leader,
                "is_leader": c.engine.is_some(),
                "run_store": match &store { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
            });
            (ok, details)
        })
    })
}

/// On the leader, samples every queue's depth, in-flight, dead-letter,
/// waiting-for-a-handler counts and oldest due age into gauges (one sampler per cluster, so the sums add up).
async fn sample_queues(q: Arc<dyn DelayStore>, shared: Arc<Shared>, stop: CancellationToken) {
    use chime_shared::{activity, telemetry as m};
    let mut tick = tokio::time::interval(QUEUE_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if shared.current().engine.is_none() {
            continue;
        }
        // The store's clock, read with the counts: the age is Redis time minus the
        // earliest due score, as the pops see it.
        match tokio::try_join!(q.stats(), q.now_ms()) {
            Ok((stats, now)) => {
                for s in &stats {
                    let queue = s.queue.to_string();
                    metrics::gauge!(m::QUEUE_OLDEST_DUE_AGE, "queue" => queue.clone())
                        .set(s.oldest_due_age_ms(now) as f64 / 1000.0);
                    metrics::gauge!(m::QUEUE_DEPTH, "queue" => queue.clone()).set(s.pending as f64);
                    metrics::gauge!(m::QUEUE_IN_FLIGHT, "queue" => queue.clone())
                        .set(s.in_flight as f64);
                    metrics::gauge!(m::QUEUE_DEAD, "queue" => queue.clone()).set(s.dead as f64);
                    metrics::gauge!(m::QUEUE_WAITING, "queue" => queue).set(s.waiting as f64);
                }
                // The console's charts: the family's sums, and live workers.
                let depth = stats.iter().map(|s| s.pending).sum::<u64>();
                let age = stats
                    .iter()
                    .map(|s| s.oldest_due_age_ms(now))
                    .max()
                    .unwrap_or(0);
                activity::gauge(q.family(), activity::Gauge::Depth, depth as i64);
                activity::gauge(q.family(), activity::Gauge::OldestDueAgeMs, age as i64);
                if let Some(engine) = shared.current().engine
                    && let Ok(w) = engine.workers().await
                {
                    activity::gauge("", activity::Gauge::Workers, w.len() as i64);
                }
            }
            Err(e) => warn!(error = %e, "cannot sample queue depths"),
        }
    }
}

type Started = (
    EngineHandle,
    CancellationToken,
    CancellationToken,
    tokio::task::JoinHandle<()>,
);

/// Installs the fence, then starts the engine (from `warm`, a follower's copy of the
/// jobs and its revision, when there is one).
async fn start_engine(deps: &Deps, fence: i64, warm: Option<Preloaded>) -> Result<Started> {
    let installed = deps.runs.install_fence(fence).await?;
    if !installed.installed() {
        return Err(CoordError::Conflict(format!(
            "a newer fencing token than {fence} is installed"
        )));
    }
    let handover = installed.hand_over();
    let handed_over = handover.is_some();
    let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
    let (handle, task) = engine::start(
        deps.jobs.clone(),
        deps.runs.clone(),
        deps.clock.clone(),
        deps.options.clone(),
        engine::Term {
            fence,
            handover,
            warm,
        },
        lost.clone(),
        stop.clone(),
    )
    .await?;
    info!(fence, handed_over, "leading: engine started");
    // The leader records what the CLI changed straight in etcd (its entries wait
    // in the inbox), for as long as it leads.
    tokio::spawn(audit::follow_inbox(
        deps.jobs.source(),
        deps.runs.clone(),
        stop.clone(),
    ));
    metrics::gauge!(chime_shared::telemetry::IS_LEADER).set(1.0);
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let _ = task.await;
        let _ = stop2;
        metrics::gauge!(chime_shared::telemetry::IS_LEADER).set(0.0);
    });
    Ok((handle, stop, lost, task))
}

#[cfg(test)]
mod tests {
    //! Real time, short spans (tokio's paused clock would need its `test-util`
    //! feature, which would build tokio and everything above it twice in CI).
    use super::*;

    fn follower(leader: &str) -> Current {
        Current {
            engine: None,
            leader: leader.into(),
            fence: 0,
        }
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_worker_is_told_of_another_leader_at_once() {
        let shared = Shared::new("me:1");
        shared.set(follower("other:2"));
        let c = tokio::time::timeout(Duration::from_secs(1), shared.leader_named(PATIENCE))
            .await
            .expect("answered without waiting");
        assert_eq!(c.leader, "other:2");
    }

    #[tokio::test]
    async fn no_leader_or_a_stale_self_holds_the_answer_until_the_election_settles() {
        for stale in ["", "me:1"] {
            let shared = Arc::new(Shared::new("me:1"));
            shared.set(follower(stale));
            let (held, mut answered) = tokio::sync::oneshot::channel();
            let s = shared.clone();
            tokio::spawn(async move {
                let _ = held.send(s.leader_named(PATIENCE).await);
            });
            // No news (the same stale answer again) does not end the hold.
            tokio::time::sleep(Duration::from_millis(100)).await;
            shared.set(follower(stale));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                answered.try_recv().is_err(),
                "stale {stale:?}: answered early"
            );
            shared.set(follower("winner:3"));
            let c = tokio::time::timeout(Duration::from_secs(1), answered)
                .await
                .expect("answered once a leader is named")
                .unwrap();
            assert_eq!(c.leader, "winner:3", "stale {stale:?}");
        }
    }

    #[tokio::test]
    async fn the_hold_ends_with_its_patience() {
        let shared = Shared::new("me:1");
        shared.set(follower("me:1"));
        let t = std::time::Instant::now();
        let c = shared.leader_named(Duration::from_millis(200)).await;
        assert_eq!(c.leader, "me:1");
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}
