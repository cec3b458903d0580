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
//! Architecture invariant: settings written straight to etcd (`etcdctl put`,
//! `chime config set`) are not seen here; only changes made through a coordinator
//! are recorded.

use std::sync::Arc;

use chime_shared::auth::{Tokens, bearer};
use chime_shared::clock::Clock;
use serde_json::Value;
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
