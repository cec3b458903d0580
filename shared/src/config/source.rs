//! Where live settings are stored: [`EtcdSource`] in production, [`MemorySource`] for
//! `chime dev` and tests. Both pass one conformance suite (`chime-tests`).
//!
//! Keys are relative to the source's prefix. A watch delivers every change after a
//! given revision, in order; it ends (with an error) when the connection drops, and
//! the caller resumes from the last revision it saw, so no change is missed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use crate::error::Result;

#[cfg(feature = "etcd")]
pub use super::etcd_source::EtcdSource;

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `key` was set to `value` at `revision`.
    Put {
        /// Relative key.
        key: String,
        /// New value.
        value: String,
        /// Revision of the write.
        revision: i64,
    },
    /// `key` was deleted at `revision`.
    Delete {
        /// Relative key.
        key: String,
        /// Revision of the deletion.
        revision: i64,
    },
}

impl Change {
    /// Revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMsg {
    /// Changes, in revision order.
    Changes(Vec<Change>),
    /// Nothing changed under the prefix up to this revision (progress notification).
    Progress(i64),
    /// The requested revision was compacted away: reload everything.
    Compacted,
}

/// Everything under the prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `(relative key, value, revision of its last write)`.
    pub entries: Vec<(String, String, i64)>,
    /// The store's revision when read.
    pub revision: i64,
}

/// A stream of watch messages; an `Err` (then the end) means the watch broke.
pub type WatchRx = mpsc::Receiver<Result<WatchMsg>>;

/// What a conditional write expects of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key's last write must be this revision.
    Revision(i64),
    /// Whatever the key holds (no condition): a write that goes with conditional
    /// ones in one transaction.
    Any,
}

/// A store of live settings.
#[async_trait]
pub trait ConfigSource: Send + Sync + std::fmt::Debug {
    /// Reads everything under the prefix.
    async fn load(&self) -> Result<Snapshot>;

    /// Reads everything under the prefix, handing each entry (relative key, value,
    /// revision of its last write) to `each` as it is read, and answers the revision
    /// read at. A source that reads in pages never holds the whole prefix: a reader
    /// that decodes as it goes (100,000 job definitions) keeps no second copy of it.
    async fn load_each(
        &self,
        each: &mut (dyn for<'e> FnMut(&'e str, &'e str, i64) + Send),
    ) -> Result<i64> {
        let snap = self.load().await?;
        for (k, v, rev) in &snap.entries {
            each(k, v, *rev);
        }
        Ok(snap.revision)
    }
    /// Watches changes with revision > `after`.
    async fn watch(&self, after: i64) -> Result<WatchRx>;
    /// Writes `value` at `key`; answers the revision.
    async fn put(&self, key: &str, value: &str) -> Result<i64>;
    /// Deletes `key`; answers the revision.
    async fn delete(&self, key: &str) -> Result<i64>;
    /// One key's value and the revision of its last write.
    async fn get(&self, key: &str) -> Result<Option<(String, i64)>>;
    /// Every key (relative to the prefix) under `sub` (itself relative, ending in
    /// `/`), with its value and the revision of its last write, in key order, and
    /// the revision read at: a read of one small section without loading the
    /// whole prefix.
    async fn list_under(&self, sub: &str) -> Result<Snapshot> {
        let mut snap = self.load().await?;
        snap.entries.retain(|(k, _, _)| k.starts_with(sub));
        Ok(snap)
    }
    /// Writes every `(key, value)` and deletes every key of `deletes` in one
    /// transaction, only if each written key is as its `Expect` says; answers the
    /// revision of the transaction, or `None` when a condition failed (nothing
    /// written or deleted). An etcd transaction holds at most 128 operations by
    /// default (`--max-txn-ops`).
    async fn commit(
        &self,
        writes: &[(String, String, Expect)],
        deletes: &[String],
    ) -> Result<Option<i64>>;

    /// Writes every `(key, value)` in one transaction, only if each key is as its
    /// `Expect` says; answers the revision of the write, or `None` when a condition
    /// failed (nothing written).
    async fn put_if_all(&self, writes: &[(String, String, Expect)]) -> Result<Option<i64>> {
        self.commit(writes, &[]).await
    }

    /// Writes `value` at `key` only if the key is as `expect` says; answers the
    /// revision of the write, or `None` when the condition failed (nothing written).
    async fn put_if(&self, key: &str, value: &str, expect: Expect) -> Result<Option<i64>> {
        self.put_if_all(&[(key.to_owned(), value.to_owned(), expect)])
            .await
    }
}

#[derive(Debug, Default)]
struct MemState {
    entries: BTreeMap<String, (String, i64)>,
    revision: i64,
    history: Vec<Change>,
}

/// Settings in memory, with etcd's revision semantics.
#[derive(Debug, Clone)]
pub struct MemorySource {
    state: Arc<Mutex<MemState>>,
    tx: broadcast::Sender<Change>,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            tx: broadcast::channel(1024).0,
        }
    }
}

impl MemorySource {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, change: impl FnOnce(i64) -> Change) -> i64 {
        let mut st = self.lock();
        st.revision += 1;
        let c = change(st.revision);
        match &c {
            Change::Put {
                key,
                value,
                revision,
            } => {
                st.entries.insert(key.clone(), (value.clone(), *revision));
            }
            Change::Delete { key, .. } => {
                st.entries.remove(key);
            }
        }
        st.history.push(c.clone());
        let rev = st.revision;
        // Sent under the lock so watchers see changes in revision order.
        let _ = self.tx.send(c);
        rev
    }
}

#[async_trait]
impl ConfigSource for MemorySource {
    async fn load(&self) -> Result<Snapshot> {
        let st = self.lock();
        Ok(Snapshot {
            entries: st
                .entries
                .iter()
                .map(|(k, (v, r))| (k.clone(), v.clone(), *r))
                .collect(),
            revision: st.revision,
        })
    }

    async fn watch(&self, after: i64) -> Result<WatchRx> {
        // Subscribe before replaying so nothing falls between replay and live changes.
        let (backlog, mut live) = {
            let st = self.lock();
            let backlog: Vec<Change> = st
                .history
                .iter()
                .filter(|c| c.revision() > after)
                .cloned()
                .collect();
            (backlog, self.tx.subscribe())
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = after;
            if !backlog.is_empty() {
                last = backlog.last().map_or(after, Change::revision);
                if tx.send(Ok(WatchMsg::Changes(backlog))).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(c) if c.revision() > last => {
                        last = c.revision();
                        if tx.send(Ok(WatchMsg::Changes(vec![c]))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(WatchMsg::Compacted)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64> {
        let (key, value) = (key.to_owned(), value.to_owned());
        Ok(self.record(|revision| Change::Put {
            key,
            value,
            revision,
        }))
    }

    async fn delete(&self, key: &str) -> Result<i64> {
        let key = key.to_owned();
        Ok(self.record(|revision| Change::Delete { key, revision }))
    }

    async fn get(&self, key: &str) -> Result<Option<(String, i64)>> {
        Ok(self.lock().entries.get(key).cloned())
    }

    async fn commit(
        &self,
        writes: &[(String, String, Expect)],
        deletes: &[String],
    ) -> Result<Option<i64>> {
        // Check and write under one lock so no other write slips in between.
        let mut st = self.lock();
        let ok = writes.iter().all(|(key, _, expect)| {
            let current = st.entries.get(key).map(|e| e.1);
            match expect {
                Expect::Absent => current.is_none(),
                Expect::Revision(r) => current == Some(*r),
                Expect::Any => true,
            }
        });
        if !ok {
            return Ok(None);
        }
        // One transaction: one revision for every write, as etcd does.
        st.revision += 1;
        let revision = st.revision;
        let puts = writes.iter().map(|(key, value, _)| {
            st.entries.insert(key.clone(), (value.clone(), revision));
            Change::Put {
                key: key.clone(),
                value: value.clone(),
                revision,
            }
        });
        let puts: Vec<Change> = puts.collect();
        let mut changes = puts;
        for key in deletes {
            // As etcd: deleting a key that is not there is no event.
            if st.entries.remove(key).is_some() {
                changes.push(Change::Delete {
                    key: key.clone(),
                    revision,
                });
            }
        }
        for c in changes {
            st.history.push(c.clone());
            let _ = self.tx.send(c);
        }
        Ok(Some(revision))
    }
}
