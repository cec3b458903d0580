//! Which items a caller may touch: a producer token limited to some handlers
//! (`handlers=` in its line, `chime_shared::auth`) or to namespaces (`ns=`), or an
//! admin token limited to namespaces, enqueues, finds, cancels, reschedules, lists
//! and requeues only items in its scope. An item's namespace is its handler's
//! (`payments/charge` is of `payments`; a bare handler of `default`). Both queue
//! edges (gRPC `chime.v1.Queue` and the JSON API's item and dead-letter calls) ask
//! this one type, so they cannot disagree.
//!
//! An item outside the scope is answered as if it did not exist (not found, left
//! out of a listing): a scoped token learns nothing of other handlers' items. An
//! enqueue naming another handler is refused as a whole, naming the item's field,
//! and nothing of the batch is stored.

use std::collections::BTreeSet;
use std::sync::Arc;

use chime_shared::auth::Access;
use chime_shared::limits::{self, namespace_of};
use chime_shared::queue::{DelayStore, ItemRef, ItemView, NewItem};

use crate::error::CoordError;
use crate::grpc::Auth;

/// The handlers and namespaces a caller may touch (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerScope {
    handlers: Option<BTreeSet<String>>,
    namespaces: Option<BTreeSet<String>>,
    /// The token's name, for refusals.
    who: String,
}

impl HandlerScope {
    /// The scope of the caller presenting `header` (`Authorization` value): a
    /// producer token's handlers and namespaces, an admin token's namespaces;
    /// anyone else (no auth) is unlimited. Only callers past the queue's gate get
    /// here.
    pub fn of(auth: &Auth, header: Option<&str>) -> Self {
        // The queue gate's own token sets: one look-up over both.
        match Access::tokens(auth.admin.clone())
            .or(auth.producer.clone())
            .identify(header)
        {
            Some(who) => Self {
                handlers: who.handlers.map(|h| h.into_iter().collect()),
                namespaces: who.namespaces.map(|n| n.into_iter().collect()),
                who: who.name,
            },
            None => Self::default(),
        }
    }

    /// Whether the scope is limited at all.
    fn limited(&self) -> bool {
        self.handlers.is_some() || self.namespaces.is_some()
    }

    /// Whether items of `handler` are in the scope: one of its handlers, if it
    /// names some, and of one of its namespaces, if it names some.
    pub fn allows(&self, handler: &str) -> bool {
        self.handlers.as_ref().is_none_or(|h| h.contains(handler))
            && self
                .namespaces
                .as_ref()
                .is_none_or(|n| n.contains(namespace_of(handler)))
    }

    /// Whether a live setting is in the scope: an unlimited caller reaches every
    /// one; a limited caller only those of its handlers (`handlers/<handler>/…`,
    /// the handler's namespace in its scope), never a family's or a budget's,
    /// which are cluster-wide.
    pub fn allows_setting(&self, key: &str) -> bool {
        !self.limited()
            || chime_shared::config::handler_of_key(key).is_some_and(|h| self.allows(&h))
    }

    /// A change of the setting at `key`: refused outside the scope, naming it.
    pub fn check_setting(&self, key: &str) -> Result<(), CoordError> {
        match self.allows_setting(key) {
            true => Ok(()),
            false => Err(CoordError::PermissionDenied(format!(
                "key: token {} may set only the settings of handlers of {}, not {key:?}",
                self.who,
                self.list()
            ))),
        }
    }

    /// An enqueue: every item's handler in the scope, or the batch is refused
    /// naming the first item outside it.
    pub fn check_items(&self, items: &[NewItem]) -> Result<(), CoordError> {
        match items.iter().position(|i| !self.allows(&i.handler)) {
            None => Ok(()),
            Some(i) => Err(CoordError::PermissionDenied(format!(
                "items[{i}].handler: token {} may enqueue only items of {}",
                self.who,
                self.list()
            ))),
        }
    }

    /// A call on one item: it must exist and be in the scope (outside it, it is
    /// not found, as if it did not exist).
    pub async fn check_ref(
        &self,
        store: &Arc<dyn DelayStore>,
        r: &ItemRef,
    ) -> Result<(), CoordError> {
        if !self.limited() {
            return Ok(());
        }
        match store.get(r).await.map_err(CoordError::from)? {
            Some(v) if self.allows(&v.item.handler) => Ok(()),
            _ => Err(CoordError::NotFound(format!(
                "item {:?} (key {:?})",
                r.id, r.key
            ))),
        }
    }

    /// A listing, without the items outside the scope.
    pub fn filter(&self, mut items: Vec<ItemView>) -> Vec<ItemView> {
        items.retain(|v| self.allows(&v.item.handler));
        items
    }

    /// The first `limit` dead letters in the scope. A limited scope reads the most
    /// one listing may ([`limits::MAX_DEAD_LETTER_LIST`]) and keeps its own, so
    /// other teams' dead letters do not crowd them out of the limit.
    pub async fn dead_letters(
        &self,
        store: &Arc<dyn DelayStore>,
        limit: usize,
    ) -> Result<Vec<ItemView>, CoordError> {
        let read = match self.limited() {
            true => limits::MAX_DEAD_LETTER_LIST.max(limit),
            false => limit,
        };
        let mut items = self.filter(store.dead_letters(read).await?);
        items.truncate(limit);
        Ok(items)
    }

    /// A requeue of every dead letter: only an unlimited caller may; a scoped one
    /// names the items (each checked).
    pub fn check_requeue_all(&self) -> Result<(), CoordError> {
        match self.limited() {
            false => Ok(()),
            true => Err(CoordError::PermissionDenied(format!(
                "all: token {} may requeue only items of {}; name them in items",
                self.who,
                self.list()
            ))),
        }
    }

    /// What the scope holds, for refusals: `handlers a, b` and/or `namespaces c`.
    fn list(&self) -> String {
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        let parts: Vec<String> = [
            self.handlers
                .as_ref()
                .map(|h| format!("handlers {}", join(h))),
            self.namespaces
                .as_ref()
                .map(|n| format!("namespaces {}", join(n))),
        ]
        .into_iter()
        .flatten()
        .collect();
        parts.join(" in ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(handlers: Option<&[&str]>, namespaces: Option<&[&str]>) -> HandlerScope {
        let set = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        HandlerScope {
            handlers: handlers.map(set),
            namespaces: namespaces.map(set),
            who: "t".into(),
        }
    }

    #[test]
    fn a_scope_allows_its_handlers_in_its_namespaces() {
        let any = scope(None, None);
        assert!(any.allows("payments/charge") && any.allows("noop"));
        assert!(any.check_requeue_all().is_ok());
        let ns = scope(None, Some(&["payments"]));
        assert!(ns.allows("payments/charge"));
        assert!(!ns.allows("search/index") && !ns.allows("noop"));
        let default = scope(None, Some(&["default"]));
        assert!(default.allows("noop") && !default.allows("payments/charge"));
        // Both: the handler must be listed and of a listed namespace.
        let both = scope(Some(&["payments/charge", "noop"]), Some(&["payments"]));
        assert!(both.allows("payments/charge"));
        assert!(!both.allows("noop") && !both.allows("payments/refund"));
        let e = both.check_requeue_all().unwrap_err().to_string();
        assert!(
            e.contains("handlers noop, payments/charge in namespaces payments"),
            "{e}"
        );
        let items = [
            NewItem::new("i1", "payments/charge", 0),
            NewItem::new("i2", "noop", 0),
        ];
        let e = both.check_items(&items).unwrap_err().to_string();
        assert!(e.contains("items[1].handler"), "{e}");
    }

    /// A team's dead letters behind many of another team's still fill its
    /// listing's limit.
    #[tokio::test]
    async fn a_team_s_dead_letters_are_not_crowded_out_by_others() {
        use chime_shared::clock::SystemClock;
        use chime_shared::queue::memory_store::MemoryStore;
        use chime_shared::queue::{Outcome, PopOptions, Settlement};
        let store: Arc<dyn DelayStore> = Arc::new(MemoryStore::new(1, Arc::new(SystemClock)));
        let now = store.now_ms().await.unwrap();
        // Others' first, then the team's one (dead letters list by when they died,
        // then by id: all die at once here, and "team" sorts after "o…").
        let mut items: Vec<NewItem> = (0..5)
            .map(|i| NewItem::new(format!("o{i}"), "noop", now - 10).max_attempts(1))
            .collect();
        items.push(NewItem::new("team", "payments/charge", now).max_attempts(1));
        store.enqueue(items).await.unwrap();
        let lease = store.claim(0, 5_000).await.unwrap().expect("the queue");
        let popped = store.pop(&lease, PopOptions::default()).await.unwrap();
        for d in popped.deliveries {
            let fail = d
                .items
                .iter()
                .map(|c| Settlement {
                    id: c.item.id.clone(),
                    token: c.token,
                    outcome: Outcome::Retry {
                        delay_ms: 0,
                        error: "boom".into(),
                    },
                })
                .collect();
            store.settle(d.queue, fail).await.unwrap();
        }
        assert_eq!(store.dead_letters(100).await.unwrap().len(), 6);
        let team = scope(None, Some(&["payments"]));
        let got = team.dead_letters(&store, 2).await.unwrap();
        let ids: Vec<&str> = got.iter().map(|v| v.item.id.as_str()).collect();
        assert_eq!(ids, ["team"]);
        // An unlimited caller reads just its limit: others' two, not the team's
        // (which a read of the limit alone would have missed).
        let all = scope(None, None).dead_letters(&store, 2).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|v| v.item.id != "team"), "{all:?}");
    }
}
