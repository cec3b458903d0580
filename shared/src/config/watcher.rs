//! The one config watcher every process uses: initial load, then a watch from the
//! loaded revision; after a disconnect it resumes from the last revision it saw, so
//! no update is missed; after a compaction it reloads. A refused value is logged with
//! its key and reason, counted in `chime_config_rejected_total`, and the last good
//! value stays in force.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::follow::{Followed, follow};
use super::source::{Change, ConfigSource, Snapshot};
use super::{LiveConfig, parse};
use crate::telemetry as m;

/// A running watcher: read the current config with [`ConfigHandle::current`], or
/// await changes on [`ConfigHandle::subscribe`].
#[derive(Debug, Clone)]
pub struct ConfigHandle {
    rx: watch::Receiver<Arc<LiveConfig>>,
    /// For a fixed config: the sender, kept so receivers never see "closed".
    _fixed: Option<Arc<watch::Sender<Arc<LiveConfig>>>>,
}

impl ConfigHandle {
    /// A handle on a fixed config (no watching); for processes without etcd.
    pub fn fixed(config: LiveConfig) -> Self {
        let (tx, rx) = watch::channel(Arc::new(config));
        Self {
            rx,
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<LiveConfig> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every applied change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<LiveConfig>> {
        self.rx.clone()
    }
}

/// Loads the config (retrying until the source answers), then keeps it current in a
/// background task until `shutdown` fires.
pub async fn start(
    source: Arc<dyn ConfigSource>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (ConfigHandle, JoinHandle<()>) {
    let mut delay = Duration::from_millis(100);
    let snapshot = loop {
        match source.load().await {
            Ok(s) => break s,
            Err(e) => {
                warn!(error = %e, "cannot load live config; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {},
                    _ = shutdown.cancelled() => break Snapshot::default(),
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut config = LiveConfig::default();
    let revision = fold_snapshot(&mut config, &snapshot);
    info!(
        revision,
        // Settings only: jobs, alert rules and audit entries share the prefix.
        settings = snapshot
            .entries
            .iter()
            .filter(|(k, _, _)| !super::is_internal(k))
            .count(),
        "live config loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(config));
    let task = tokio::spawn(run(source, tx, revision, shutdown));
    (ConfigHandle { rx, _fixed: None }, task)
}

/// Replaces `config` with a snapshot's content; answers the snapshot's revision.
fn fold_snapshot(config: &mut LiveConfig, snapshot: &Snapshot) -> i64 {
    let mut fresh = LiveConfig::default();
    for (key, value, rev) in snapshot
        .entries
        .iter()
        .filter(|e| !super::is_internal(&e.0))
    {
        // A value refused now keeps the value in force before the reload, if any.
        match parse(key, Some(value)) {
            Ok(s) => {
                fresh.apply(s, *rev);
            }
            Err(r) => {
                reject(&r.key, &r.reason);
                carry_over(&mut fresh, config, key);
            }
        }
    }
    fresh.revision = snapshot.revision;
    *config = fresh;
    snapshot.revision
}

/// Keeps the old value of `key` (which failed to parse) in `fresh`.
fn carry_over(fresh: &mut LiveConfig, old: &LiveConfig, key: &str) {
    let parts: Vec<&str> = key.split('/').collect();
    if let [section, subject, field] = parts[..] {
        match (section, field) {
            ("queues", _) => {
                if let Some(f) = old.families.get(subject) {
                    let slot = fresh.families.entry(subject.to_owned()).or_default();
                    match field {
                        "count" => slot.count = f.count,
                        "visibility_ms" => slot.visibility_ms = f.visibility_ms,
                        "merge_window_ms" => slot.merge_window_ms = f.merge_window_ms,
                        _ => {}
                    }
                }
            }
            ("handlers", _) => {
                if let Some(h) = old.handlers.get(subject) {
                    let slot = fresh.handlers.entry(subject.to_owned()).or_default();
                    match field {
                        "rate_per_s" => slot.rate_per_s = h.rate_per_s,
                        "concurrency" => slot.concurrency = h.concurrency,
                        "budget" => slot.budget = h.budget.clone(),
                        _ => {}
                    }
                }
            }
            ("budgets", "rate_per_s") => {
                if let Some(b) = old.budgets.get(subject) {
                    fresh
                        .budgets
                        .entry(subject.to_owned())
                        .or_default()
                        .rate_per_s = b.rate_per_s;
                }
            }
            _ => {}
        }
    }
}

fn reject(key: &str, reason: &str) {
    warn!(
        key,
        reason, "config value refused; the last good value stays in force"
    );
    metrics::counter!(m::CONFIG_REJECTED, "key" => key.to_owned()).increment(1);
}

/// What one change did to the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// A setting changed.
    Changed,
    /// A setting was written with the value it had.
    Same,
    /// A bad value or an unknown key: refused (logged and counted).
    Refused,
    /// Not a setting (a job, an alert rule, the election): none of ours.
    Internal,
}

/// Applies one change; answers whether the config changed.
fn apply(config: &mut LiveConfig, change: &Change) -> bool {
    apply_one(config, change) == Applied::Changed
}

fn apply_one(config: &mut LiveConfig, change: &Change) -> Applied {
    let (key, value, revision) = match change {
        Change::Put {
            key,
            value,
            revision,
        } => (key, Some(value.as_str()), *revision),
        Change::Delete { key, revision } => (key, None, *revision),
    };
    config.revision = config.revision.max(revision);
    // A job or an alert rule written under the same prefix is not a setting (it
    // used to be refused here, as a warning and a `config_rejected` count on every
    // worker for every job change).
    if super::is_internal(key) {
        return Applied::Internal;
    }
    match parse(key, value) {
        Ok(setting) => {
            let before = config.clone();
            config.apply(setting, revision);
            let changed = {
                let mut a = before;
                a.revision = config.revision;
                a != *config
            };
            if changed {
                info!(
                    key,
                    value = value.unwrap_or("<deleted>"),
                    revision,
                    "config change applied"
                );
                metrics::counter!(m::CONFIG_APPLIED).increment(1);
                Applied::Changed
            } else {
                Applied::Same
            }
        }
        Err(r) => {
            reject(&r.key, &r.reason);
            Applied::Refused
        }
    }
}

async fn run(
    source: Arc<dyn ConfigSource>,
    tx: watch::Sender<Arc<LiveConfig>>,
    last: i64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut config = (**tx.borrow()).clone();
    follow(source, last, "config", shutdown, |f| {
        match f {
            Followed::Changes(changes) => {
                let mut changed = false;
                for c in &changes {
                    changed |= apply(&mut config, c);
                }
                if changed {
                    tx.send_replace(Arc::new(config.clone()));
                }
            }
            Followed::Reloaded(s) => {
                fold_snapshot(&mut config, &s);
                tx.send_replace(Arc::new(config.clone()));
            }
        }
        std::future::ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_alert_rules_under_the_prefix_are_not_settings() {
        let mut config = LiveConfig::default();
        for key in ["jobs/nightly", "alerts/lag", "election/coordinator/1"] {
            let put = Change::Put {
                key: key.into(),
                value: "{}".into(),
                revision: 4,
            };
            assert_eq!(apply_one(&mut config, &put), Applied::Internal, "{key}");
        }
        assert_eq!(
            config,
            LiveConfig {
                revision: 4,
                ..LiveConfig::default()
            }
        );
        let count = Change::Put {
            key: "queues/default/count".into(),
            value: "8".into(),
            revision: 5,
        };
        assert_eq!(apply_one(&mut config, &count), Applied::Changed);
        assert_eq!(apply_one(&mut config, &count), Applied::Same);
        let bad = Change::Put {
            key: "queues/default/counts".into(),
            value: "8".into(),
            revision: 6,
        };
        assert_eq!(apply_one(&mut config, &bad), Applied::Refused);
    }
}
