//! The audit log: every change of jobs, runs (kills), live settings and dead
//! letters says who made it (the name of the token presented, never the token),
//! when, what, and the state before and after. Entries live with the run history
//! ([`RunStore::append_audit`]: a Redis stream under `{<prefix>:sched}:audit`, or
//! memory for `chime dev`), trimmed by count and age ([`crate::store::Retention`]).
//!
//! A change is recorded where it is carried out: admin calls on the leader (a
//! follower forwards the caller's token, and the leader names it), settings and
//! dead-letter requeues on the coordinator that served the call. Recording happens
//! after the change succeeded and never undoes it: a failed write is logged and
//! counted (`chime_audit_write_errors_total`), because refusing a kill or a pause
//! because Redis hiccuped would be worse than a gap in the log.
//!
//! Changes the CLI makes straight to etcd (`chime apply`, `chime alert apply`,
//! `chime config set`) go with an entry in the **inbox** (`audit/inbox/<ms>-<rand>`
//! under the deployment's prefix), written in the same etcd transaction as the
//! change: a change is never in etcd without its entry. The leader moves inbox
//! entries into the log ([`follow_inbox`]): appended first, deleted after, so an
//! entry is never lost; a leader that dies between the two leaves it for the next,
//! which records it again (at least once).
//!
//! Architecture invariant: a raw `etcdctl put` is not seen here; only changes made
//! through a coordinator or the chime CLI are recorded.

use std::sync::Arc;

use chime_shared::auth::{Tokens, bearer};
use chime_shared::clock::Clock;
use chime_shared::config::follow::{Followed, follow};
use chime_shared::config::source::{Change as KvChange, ConfigSource, Expect};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admin::Caller;
use crate::error::{CoordError, Result};
use crate::model::{AuditAction, AuditEntry};
use crate::store::RunStore;

/// Most entries one listing answers; 0 asks for the default.
pub const MAX_AUDIT_LISTED: u32 = 1_000;
const DEFAULT_AUDIT_LISTED: u32 = 100;

/// Who a caller is, for entries made on a cluster without admin tokens.
pub const ANONYMOUS: &str = "anonymous";

/// One change about to be recorded.
#[derive(Debug, Clone)]
pub struct Change {
    /// What was done.
    pub action: AuditAction,
    /// To what.
    pub target: String,
    /// Before.
    pub before: Option<Value>,
    /// After.
    pub after: Option<Value>,
}

impl Change {
    /// `action` on `target`, with no before or after yet.
    pub fn new(action: AuditAction, target: impl Into<String>) -> Self {
        Self {
            action,
            target: target.into(),
            before: None,
            after: None,
        }
    }

    /// With the state before, as JSON.
    pub fn before(mut self, v: impl serde::Serialize) -> Self {
        self.before = serde_json::to_value(v).ok();
        self
    }

    /// With the state after, as JSON.
    pub fn after(mut self, v: impl serde::Serialize) -> Self {
        self.after = serde_json::to_value(v).ok();
        self
    }
}

/// The change of a dead-letter requeue: which items (`all` when none was named)
/// and how many went back.
pub fn requeued(refs: &[chime_shared::queue::ItemRef], n: usize) -> Change {
    let items: Vec<String> = refs.iter().map(|r| format!("{}/{}", r.key, r.id)).collect();
    Change::new(AuditAction::DeadLettersRequeue, "dead letters").after(serde_json::json!({
        "items": if items.is_empty() { Value::from("all") } else { Value::from(items) },
        "requeued": n,
    }))
}

/// Records and lists audit entries (cheap to clone).
#[derive(Clone)]
pub struct Audit {
    runs: Arc<dyn RunStore>,
    clock: Arc<dyn Clock>,
    /// The token sets a change can come with: admin, then producer (requeues go
    /// through the queue API, which producer tokens open too).
    admin: Option<Arc<Tokens>>,
    producer: Option<Arc<Tokens>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    /// The log in `runs`, naming callers from these token sets (`None`: not
    /// configured).
    pub fn new(
        runs: Arc<dyn RunStore>,
        clock: Arc<dyn Clock>,
        admin: Option<Arc<Tokens>>,
        producer: Option<Arc<Tokens>>,
    ) -> Self {
        Self {
            runs,
            clock,
            admin,
            producer,
        }
    }

    /// The name of `caller`'s token; [`ANONYMOUS`] when it presented none that is
    /// known (only possible where the API is open).
    pub fn who(&self, caller: &Caller) -> String {
        let token = caller.authorization.as_deref().and_then(bearer);
        token
            .and_then(|t| {
                [&self.admin, &self.producer]
                    .into_iter()
                    .flatten()
                    .find_map(|set| set.name_of(t))
            })
            .unwrap_or_else(|| ANONYMOUS.to_owned())
    }

    /// Records `changes`, made by `caller`, in one write. Never fails: see the
    /// module docs.
    pub async fn record(&self, caller: &Caller, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let who = self.who(caller);
        let at_ms = self.clock.now_ms();
        let entries: Vec<AuditEntry> = changes
            .into_iter()
            .map(|c| AuditEntry {
                id: String::new(),
                at_ms,
                who: who.clone(),
                action: c.action.name().to_owned(),
                target: c.target,
                before: c.before,
                after: c.after,
            })
            .collect();
        if let Err(e) = self.runs.append_audit(&entries).await {
            metrics::counter!(chime_shared::telemetry::AUDIT_WRITE_ERRORS)
                .increment(entries.len() as u64);
            warn!(error = %e, entries = entries.len(), first = %entries[0].action, "cannot write the audit log; the change stands");
        }
    }

    /// Entries, newest first: at most `limit` (0: 100; at most 1,000), older than
    /// the entry `before` when not empty.
    pub async fn list(&self, limit: u32, before: &str) -> Result<Vec<AuditEntry>> {
        let limit = match limit {
            0 => DEFAULT_AUDIT_LISTED,
            n if n > MAX_AUDIT_LISTED => {
                return Err(CoordError::invalid(
                    "limit",
                    format!("at most {MAX_AUDIT_LISTED}"),
                ));
            }
            n => n,
        };
        let before = (!before.is_empty()).then_some(before);
        self.runs.list_audit(limit as usize, before).await
    }
}

/// Where changes made straight to etcd leave their audit entries (relative to the
/// deployment's prefix; an internal section, skipped by the config watchers).
pub const INBOX: &str = "audit/inbox/";

/// Most inbox keys moved in one round: their deletions are one etcd transaction,
/// which holds 128 operations by default.
const INBOX_ROUND: usize = 100;

/// The inbox write that goes in the same transaction as changes made straight to
/// etcd: `(key, JSON array of the entries, Expect::Absent)`, one key per
/// transaction (so the audit adds one operation to it, not one per change). Keys
/// sort by time.
pub fn inbox_write(entries: &[AuditEntry]) -> Result<(String, String, Expect)> {
    let at_ms = entries.first().map_or(0, |e| e.at_ms.max(0));
    let key = format!("{INBOX}{at_ms:013}-{:016x}", fastrand::u64(..));
    let json =
        serde_json::to_string(entries).map_err(|e| CoordError::Unavailable(e.to_string()))?;
    Ok((key, json, Expect::Absent))
}

/// The entry of `change` made by `who` at `at_ms`, for [`inbox_write`].
pub fn entry_of(change: Change, who: impl Into<String>, at_ms: i64) -> AuditEntry {
    AuditEntry {
        id: String::new(),
        at_ms,
        who: who.into(),
        action: change.action.name().to_owned(),
        target: change.target,
        before: change.before,
        after: change.after,
    }
}

/// Moves every inbox entry into the log, oldest first; answers how many entries.
/// Appended before deleted: a failure between the two leaves entries that the
/// next drain appends again, never a change without its entry. An unreadable key
/// (not a JSON array of audit entries) is logged and deleted.
pub async fn drain_inbox(source: &dyn ConfigSource, runs: &dyn RunStore) -> Result<usize> {
    let mut moved = 0;
    loop {
        let listed = source.list_under(INBOX).await?;
        if listed.entries.is_empty() {
            return Ok(moved);
        }
        let round = &listed.entries[..listed.entries.len().min(INBOX_ROUND)];
        let mut entries = Vec::with_capacity(round.len());
        for (key, value, _) in round {
            match serde_json::from_str::<Vec<AuditEntry>>(value) {
                Ok(es) => entries.extend(es),
                Err(e) => warn!(key, error = %e, "dropping an unreadable audit inbox entry"),
            }
        }
        runs.append_audit(&entries).await?;
        let keys: Vec<String> = round.iter().map(|(k, _, _)| k.clone()).collect();
        source.commit(&[], &keys).await?;
        moved += entries.len();
    }
}

/// While `stop` is not cancelled (this replica leads): drains the inbox at once,
/// then again after every entry written to it. A failed drain is retried (the
/// store or etcd away) until it succeeds, so entries wait in etcd, never vanish.
pub async fn follow_inbox(
    source: Arc<dyn ConfigSource>,
    runs: Arc<dyn RunStore>,
    stop: CancellationToken,
) {
    let drain = {
        let (source, runs, stop) = (source.clone(), runs.clone(), stop.clone());
        move || {
            let (source, runs, stop) = (source.clone(), runs.clone(), stop.clone());
            async move {
                let mut delay = std::time::Duration::from_millis(200);
                loop {
                    match drain_inbox(source.as_ref(), runs.as_ref()).await {
                        Ok(_) => return,
                        Err(e) => warn!(error = %e, "moving the audit inbox failed; retrying"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    };
    // Where to follow from: the revision of a read of the inbox (entries written
    // after it come as changes; the drain below takes those before it).
    let from = loop {
        match source.list_under(INBOX).await {
            Ok(s) => break s.revision,
            Err(e) => warn!(error = %e, "reading the audit inbox failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    };
    drain().await;
    follow(source, from, "audit inbox", stop, move |f| {
        let wanted = match &f {
            Followed::Changes(cs) => cs
                .iter()
                .any(|c| matches!(c, KvChange::Put { key, .. } if key.starts_with(INBOX))),
            Followed::Reloaded(_) => true,
        };
        let drain = drain.clone();
        async move {
            if wanted {
                drain().await;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chime_shared::config::source::MemorySource;

    use super::*;
    use crate::store::{MemoryRunStore, Retention};

    /// Entries made later sort later (inbox keys start with their time).
    fn change(target: &str) -> AuditEntry {
        static AT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1_000);
        entry_of(
            Change::new(AuditAction::ConfigSet, target).after("1"),
            "cli:ops@host",
            AT.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        )
    }

    async fn logged(runs: &dyn RunStore) -> Vec<String> {
        let mut t: Vec<String> = runs
            .list_audit(100, None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.target)
            .collect();
        t.reverse();
        t
    }

    #[tokio::test]
    async fn inbox_entries_move_into_the_log_once_and_leave_the_inbox() {
        let kv = MemorySource::default();
        let runs = MemoryRunStore::new(Retention::default());
        // Two transactions' entries, and one key that is no audit entry at all.
        let first = inbox_write(&[change("a"), change("b")]).unwrap();
        let second = inbox_write(&[change("c")]).unwrap();
        kv.put_if_all(&[first]).await.unwrap().unwrap();
        kv.put_if_all(&[second]).await.unwrap().unwrap();
        kv.put(&format!("{INBOX}junk"), "not json").await.unwrap();

        assert_eq!(drain_inbox(&kv, &runs).await.unwrap(), 3);
        assert_eq!(logged(&runs).await, ["a", "b", "c"]);
        assert!(kv.list_under(INBOX).await.unwrap().entries.is_empty());
        // Nothing left: a second drain records nothing twice.
        assert_eq!(drain_inbox(&kv, &runs).await.unwrap(), 0);
        assert_eq!(logged(&runs).await.len(), 3);
    }

    #[tokio::test]
    async fn the_leader_moves_entries_left_before_it_led_and_written_while_it_leads() {
        let kv: Arc<dyn ConfigSource> = Arc::new(MemorySource::default());
        let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new(Retention::default()));
        kv.put_if_all(&[inbox_write(&[change("before")]).unwrap()])
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(follow_inbox(kv.clone(), runs.clone(), stop.clone()));
        kv.put_if_all(&[inbox_write(&[change("while")]).unwrap()])
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while logged(runs.as_ref()).await.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not moved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(logged(runs.as_ref()).await, ["before", "while"]);
        stop.cancel();
        task.await.unwrap();
    }
}
