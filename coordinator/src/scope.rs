//! Which items a producer token may touch: a producer token limited to some
//! handlers (`handlers=` in its line, `chime_shared::auth`) enqueues, finds,
//! cancels, reschedules, lists and requeues only items of those handlers. Both
//! queue edges (gRPC `chime.v1.Queue` and the JSON API's item calls) ask this one
//! type, so they cannot disagree.
//!
//! An item outside the scope is answered as if it did not exist (not found, left
//! out of a listing): a scoped token learns nothing of other handlers' items. An
//! enqueue naming another handler is refused as a whole, naming the item's field,
//! and nothing of the batch is stored.

use std::collections::BTreeSet;
use std::sync::Arc;

use chime_shared::auth::Access;
use chime_shared::queue::{DelayStore, ItemRef, ItemView, NewItem};

use crate::error::CoordError;
use crate::grpc::Auth;

/// The handlers a caller may touch (`None`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerScope {
    handlers: Option<BTreeSet<String>>,
    /// The token's name, for refusals.
    who: String,
}

impl HandlerScope {
    /// The scope of the caller presenting `header` (`Authorization` value): a
    /// producer token's handlers; anyone else (an admin token, no auth) is
    /// unlimited. Only callers past the queue's gate get here.
    pub fn of(auth: &Auth, header: Option<&str>) -> Self {
        match Access::tokens(auth.producer.clone()).identify(header) {
            Some(who) => Self {
                handlers: who.handlers.map(|h| h.into_iter().collect()),
                who: who.name,
            },
            None => Self::default(),
        }
    }

    /// Whether items of `handler` are in the scope.
    pub fn allows(&self, handler: &str) -> bool {
        self.handlers.as_ref().is_none_or(|h| h.contains(handler))
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
        if self.handlers.is_none() {
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

    /// A requeue of every dead letter: only an unlimited caller may; a scoped one
    /// names the items (each checked).
    pub fn check_requeue_all(&self) -> Result<(), CoordError> {
        match self.handlers {
            None => Ok(()),
            Some(_) => Err(CoordError::PermissionDenied(format!(
                "all: token {} may requeue only items of {}; name them in items",
                self.who,
                self.list()
            ))),
        }
    }

    fn list(&self) -> String {
        self.handlers
            .as_ref()
            .map(|h| h.iter().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    }
}
