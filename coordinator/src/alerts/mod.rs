//! Alerts: rules kept live in etcd (`<prefix>alerts/<name>`, [`rule`]), evaluated
//! on the leader ([`eval`], once a second), notices delivered to webhooks, Slack,
//! DingTalk, Feishu/Lark and email ([`sink`]).
//!
//! Every coordinator follows the rules (so the console reads them anywhere); only
//! the leader evaluates. What it reads each tick: run events (runs that failed,
//! timed out or were skipped, appended to Redis in the same script as the run's
//! final save, so none is lost to a crash), the newest run of each job an alert is
//! about, the queue family's dead letters and oldest due age, and the live workers
//! per group. Its state — what fires, the notices not delivered yet, how far the
//! events were read — is saved in Redis under the leader's fencing token before
//! anything is sent, and a new leader carries on from it: no alert fires twice
//! because of a failover, and none is lost (a notice whose delivery succeeded just
//! before the leader died can be sent again: receivers dedupe on the notice id).
//!
//! Delivery never blocks scheduling: it runs on this task, not the engine's, each
//! attempt bounded by [`SEND_TIMEOUT`]; a sink that fails is retried with backoff
//! (up to [`eval::MAX_ATTEMPTS`]) and counted in `chime_alert_notices_total`.

pub mod eval;
pub mod rule;
pub mod sink;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chime_shared::clock::Clock;
use chime_shared::config::follow::{Followed, follow};
use chime_shared::config::source::{Change, ConfigSource};
use chime_shared::queue::DelayStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Shared;
use crate::error::CoordError;
use crate::store::{JobStore, RunStore};
use eval::{Observed, State};
use rule::AlertRule;
use sink::Sender;

/// How often the leader evaluates.
pub const TICK: Duration = Duration::from_secs(1);
/// One delivery attempt's bound.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Run events read per tick at most (the rest next tick).
const EVENTS_PER_TICK: usize = 1_000;
/// How far back a cluster's very first evaluation reads run events, ms.
const FIRST_LOOK_BACK_MS: i64 = 60_000;

/// The rules every coordinator follows, by name (bad ones are skipped, logged).
#[derive(Debug, Clone, Default)]
pub struct Rules(Arc<RwLock<BTreeMap<String, AlertRule>>>);

impl Rules {
    /// Every rule, by name.
    pub fn all(&self) -> Vec<AlertRule> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn apply(&self, key: &str, value: Option<&str>, family: &str) {
        let Some(name) = key.strip_prefix("alerts/") else {
            return;
        };
        let mut rules = self.0.write().unwrap_or_else(|p| p.into_inner());
        match value.map(|v| AlertRule::parse(v.as_bytes(), family)) {
            None => {
                rules.remove(name);
            }
            Some(Ok(r)) if r.name == name => {
                rules.insert(name.to_owned(), r);
            }
            Some(Ok(r)) => {
                warn!(key, rule = %r.name, "alert rule stored under another name; skipped");
                rules.remove(name);
            }
            Some(Err(e)) => {
                warn!(key, error = %e, "alert rule is not valid; skipped");
                rules.remove(name);
            }
        }
    }
}

/// What the alerts task needs.
#[derive(Debug, Clone)]
pub struct AlertsDeps {
    /// Who leads (the task evaluates only on the leader).
    pub shared: Arc<Shared>,
    /// Jobs (and the source the rules live in).
    pub jobs: JobStore,
    /// Run history, run events and the saved state.
    pub runs: Arc<dyn RunStore>,
    /// The delay store (`None`: queue conditions never fire).
    pub queues: Option<Arc<dyn DelayStore>>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The deployment's name, in every notice.
    pub cluster: String,
    /// The queue family `queues` serves.
    pub family: String,
}

/// Loads and follows the rules in `jobs`' source into `rules` until `stop`.
pub async fn follow_rules(
    source: Arc<dyn ConfigSource>,
    rules: Rules,
    family: String,
    stop: CancellationToken,
) {
    let from = loop {
        match source.load().await {
            Ok(snap) => {
                for (k, v, _) in &snap.entries {
                    rules.apply(k, Some(v), &family);
                }
                break snap.revision;
            }
            Err(e) => {
                warn!(error = %e, "cannot load alert rules; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    follow(source, from, "alert rules", stop, |f| {
        match f {
            Followed::Changes(changes) => {
                for c in changes {
                    match c {
                        Change::Put { key, value, .. } => rules.apply(&key, Some(&value), &family),
                        Change::Delete { key, .. } => rules.apply(&key, None, &family),
                    }
                }
            }
            Followed::Reloaded(snap) => {
                rules.0.write().unwrap_or_else(|p| p.into_inner()).clear();
                for (k, v, _) in &snap.entries {
                    rules.apply(k, Some(v), &family);
                }
            }
        }
        async {}
    })
    .await;
}

/// The leader's state for its term.
struct Term {
    fence: i64,
    started_ms: i64,
    state: State,
}

/// Evaluates and delivers on the leader, once a [`TICK`], until `stop`.
pub async fn run(deps: AlertsDeps, rules: Rules, stop: CancellationToken) {
    let sender = match Sender::new(SEND_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot build the alert sender; alerts are off");
            return;
        }
    };
    let mut term: Option<Term> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let c = deps.shared.current();
        if c.engine.is_none() {
            term = None;
            continue;
        }
        if term.as_ref().is_none_or(|t| t.fence != c.fence) {
            match load(&deps, c.fence).await {
                Ok(t) => {
                    info!(fence = c.fence, firing = t.state.firing.values().map(BTreeMap::len).sum::<usize>(), undelivered = t.state.outbox.len(), cursor = %t.state.cursor, "alert evaluator carrying on from the saved state");
                    term = Some(t);
                }
                Err(e) => {
                    warn!(error = %e, "cannot load the alert state; retrying");
                    continue;
                }
            }
        }
        let Some(t) = term.as_mut() else { continue };
        let rules = rules.all();
        if let Err(e) = step(&deps, &sender, &rules, t, &c.leader).await {
            match e {
                CoordError::Conflict(_) => {
                    info!("a newer leader saves the alert state now; stopping here");
                    term = None;
                }
                e => warn!(error = %e, "alert evaluation failed; next tick"),
            }
        }
    }
}

async fn load(deps: &AlertsDeps, fence: i64) -> crate::Result<Term> {
    let state = match deps.runs.load_alert_state().await? {
        Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
            warn!(error = %e, "saved alert state is unreadable; starting afresh");
            State::default()
        }),
        // A cluster's first evaluation (or its first with alerts): the last minute's
        // events count, so what failed while the first leader was starting is
        // told; older ones are history, not news.
        None => State {
            cursor: format!("{}-0", (deps.clock.now_ms() - FIRST_LOOK_BACK_MS).max(0)),
            ..State::default()
        },
    };
    Ok(Term {
        fence,
        started_ms: deps.clock.now_ms(),
        state,
    })
}

/// One tick: observe, decide, save, deliver, save.
async fn step(
    deps: &AlertsDeps,
    sender: &Sender,
    rules: &[AlertRule],
    t: &mut Term,
    me: &str,
) -> crate::Result<()> {
    let seen = observe(deps, rules, &t.state, t.started_ms, me).await?;
    let before = t.state.clone();
    let queued_before = t.state.outbox.len();
    let decided = eval::evaluate(rules, &mut t.state, &seen);
    for o in &t.state.outbox[queued_before..] {
        info!(rule = %o.notice.rule, subject = %o.notice.subject, status = ?o.notice.status, sink = o.sink.kind(), summary = %o.notice.summary, "alert notice queued");
    }
    if decided.suppressed > 0 {
        metrics::counter!(chime_shared::telemetry::ALERT_NOTICES, "outcome" => "suppressed")
            .increment(decided.suppressed as u64);
        warn!(
            suppressed = decided.suppressed,
            "alert notices over a rule's rate limit were dropped"
        );
    }
    if t.state != before {
        save(deps, t).await?;
    }
    deliver(deps, sender, t).await
}

async fn save(deps: &AlertsDeps, t: &Term) -> crate::Result<()> {
    let json =
        serde_json::to_string(&t.state).map_err(|e| CoordError::Unavailable(e.to_string()))?;
    if deps.runs.save_alert_state(t.fence, &json).await? {
        Ok(())
    } else {
        Err(CoordError::Conflict("deposed".into()))
    }
}

/// Gathers what the rules need this tick.
async fn observe(
    deps: &AlertsDeps,
    rules: &[AlertRule],
    state: &State,
    term_started_ms: i64,
    me: &str,
) -> crate::Result<Observed> {
    use rule::Condition as C;
    let wants = |f: fn(&C) -> bool| rules.iter().any(|r| !r.disabled && f(&r.condition));
    let mut seen = Observed {
        now_ms: deps.clock.now_ms(),
        me: me.to_owned(),
        term_started_ms,
        cluster: deps.cluster.clone(),
        family: deps.family.clone(),
        ..Observed::default()
    };
    seen.events = deps.runs.run_events(&state.cursor, EVENTS_PER_TICK).await?;
    let run_rules = wants(|c| matches!(c, C::RunFailed | C::FireSkipped));
    if run_rules {
        // The jobs events are about (their group and handler, for scopes).
        let names: std::collections::BTreeSet<&str> =
            seen.events.iter().map(|e| e.job.as_str()).collect();
        for name in names {
            match deps.jobs.get(name).await {
                Ok(j) => {
                    seen.jobs.insert(
                        name.to_owned(),
                        (j.spec.group.clone(), j.spec.handler.clone()),
                    );
                }
                Err(CoordError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // The newest run of each job an alert fires about.
        let firing: std::collections::BTreeSet<&String> = rules
            .iter()
            .filter(|r| matches!(r.condition, C::RunFailed | C::FireSkipped))
            .filter_map(|r| state.firing.get(&r.name))
            .flat_map(|m| m.keys())
            .collect();
        for job in firing {
            let newest = match deps.jobs.get(job).await {
                Err(CoordError::NotFound(_)) => None,
                Err(e) => return Err(e),
                Ok(_) => deps.runs.list_runs(job, 1).await?.first().map(|r| r.state),
            };
            seen.newest.insert(job.clone(), newest);
        }
    }
    if let Some(q) = &deps.queues
        && wants(|c| matches!(c, C::DeadLetters { .. } | C::QueueLag { .. }))
    {
        // A store that does not answer this tick changes no alert (None).
        if let Ok((stats, now)) = tokio::try_join!(q.stats(), q.now_ms()) {
            seen.dead = Some(stats.iter().map(|s| s.dead).sum());
            seen.lag_ms = Some(
                stats
                    .iter()
                    .map(|s| s.oldest_due_age_ms(now))
                    .max()
                    .unwrap_or(0),
            );
        }
    }
    if wants(|c| matches!(c, C::WorkersBelow { .. }))
        && let Some(e) = deps.shared.current().engine
    {
        let mut groups: BTreeMap<String, u32> = BTreeMap::new();
        for w in e.workers().await? {
            *groups.entry(w.group).or_insert(0) += 1;
        }
        seen.groups = groups;
    }
    Ok(seen)
}

/// Sends every notice that is due, all at once (one slow sink delays no other
/// beyond [`SEND_TIMEOUT`]), then saves what is left.
async fn deliver(deps: &AlertsDeps, sender: &Sender, t: &mut Term) -> crate::Result<()> {
    let now = deps.clock.now_ms();
    let due: Vec<usize> = (0..t.state.outbox.len())
        .filter(|&i| t.state.outbox[i].next_at_ms <= now)
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    let mut sends = tokio::task::JoinSet::new();
    for &i in &due {
        let (sender, o) = (sender.clone(), t.state.outbox[i].clone());
        sends.spawn(async move { (i, sender.send(&o.sink, &o.notice).await) });
    }
    let mut results = Vec::with_capacity(due.len());
    while let Some(r) = sends.join_next().await {
        if let Ok(r) = r {
            results.push(r);
        }
    }
    let mut done: HashMap<usize, ()> = HashMap::new();
    for (i, r) in results {
        let o = &mut t.state.outbox[i];
        let kind = o.sink.kind();
        let outcome = match r {
            Ok(()) => {
                done.insert(i, ());
                "sent"
            }
            Err(e) if e.retryable() && o.attempts + 1 < eval::MAX_ATTEMPTS => {
                warn!(sink = kind, rule = %o.notice.rule, attempt = o.attempts + 1, error = %e, "alert notice not delivered; retrying");
                o.retry_later(now);
                "retried"
            }
            Err(e) => {
                warn!(sink = kind, rule = %o.notice.rule, attempts = o.attempts + 1, error = %e, "alert notice dropped");
                done.insert(i, ());
                "dropped"
            }
        };
        metrics::counter!(chime_shared::telemetry::ALERT_NOTICES, "sink" => kind, "outcome" => outcome)
            .increment(1);
    }
    let mut i = 0;
    t.state.outbox.retain(|_| {
        let keep = !done.contains_key(&i);
        i += 1;
        keep
    });
    save(deps, t).await
}
