//! The queue layout of a family: how many queues items are placed over, and which
//! older layouts are still draining after a resize.
//!
//! Each resize starts a new **epoch**. Producers place items by the current epoch's
//! count; an item enqueued under an older epoch may still sit in its old home until
//! the resize's movers bring it to its current home, so lookups (get, cancel,
//! reschedule) and duplicate checks also look in the homes of the draining epochs.
//! When every queue is found clean (nothing misplaced), the draining epochs retire.
//! ARCHITECTURE.md argues why nothing is lost, doubled or fired early.

use serde::{Deserialize, Serialize};

use super::queue_for;

/// A family's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Current epoch (1 for the first layout).
    pub epoch: u64,
    /// Number of queues items are placed over now.
    pub count: u32,
    /// Revision of the config change that set `count` (etcd's mod revision; 0 when
    /// seeded from a process's own config).
    pub revision: i64,
    /// Older `(epoch, count)` pairs whose items may not all have moved yet, oldest
    /// first.
    pub draining: Vec<(u64, u32)>,
}

impl Layout {
    /// The first layout of a family.
    pub fn initial(count: u32) -> Self {
        Self {
            epoch: 1,
            count,
            revision: 0,
            draining: Vec::new(),
        }
    }

    /// A resize is in progress.
    pub fn in_transition(&self) -> bool {
        !self.draining.is_empty()
    }

    /// Queues consumers must poll: every queue of every live epoch.
    pub fn poll_count(&self) -> u32 {
        self.draining
            .iter()
            .map(|d| d.1)
            .chain([self.count])
            .max()
            .unwrap_or(self.count)
    }

    /// Where an item with routing key `key` belongs now.
    pub fn home(&self, key: &str) -> u32 {
        queue_for(key, self.count)
    }

    /// Every queue an item with `key` may be in: its homes under the draining epochs,
    /// oldest first, then its current home last (each queue once, at its last place).
    /// Items only ever move towards their current home, so a lookup that walks this
    /// list in order cannot miss an item that moves during the walk.
    pub fn homes(&self, key: &str) -> Vec<u32> {
        let all: Vec<u32> = self
            .draining
            .iter()
            .map(|&(_, n)| queue_for(key, n))
            .chain([self.home(key)])
            .collect();
        let mut out = Vec::with_capacity(all.len());
        for (i, q) in all.iter().enumerate() {
            if !all[i + 1..].contains(q) {
                out.push(*q);
            }
        }
        out
    }
}

/// Keeps `store`'s layout in step with the live config of `family` until
/// `shutdown`: applies each queue count as it changes, and re-reads the layout every
/// two seconds (another process may have applied a change first). For processes that
/// place items but run no worker (producers, benchmarks); workers do this in their
/// own config loop.
pub async fn follow(
    store: std::sync::Arc<dyn super::DelayStore>,
    config: crate::config::watcher::ConfigHandle,
    family: String,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut rx = config.subscribe();
    let mut applied = None;
    loop {
        let count = rx.borrow_and_update().family(&family).count;
        if let Some((n, rev)) = count
            && count != applied
        {
            match store.apply_layout(n, rev).await {
                Ok(l) => {
                    applied = count;
                    tracing::info!(
                        epoch = l.epoch,
                        count = l.count,
                        revision = rev,
                        applied_at_ms = crate::clock::system_now_ms(),
                        "queue layout applied"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "applying the queue count failed"),
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                let _ = store.refresh_layout().await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_end_with_current_and_are_unique() {
        let l = Layout {
            epoch: 3,
            count: 16,
            revision: 9,
            draining: vec![(1, 8), (2, 3)],
        };
        assert_eq!(l.poll_count(), 16);
        for i in 0..1_000 {
            let k = format!("k{i}");
            let h = l.homes(&k);
            assert_eq!(*h.last().unwrap(), l.home(&k));
            let mut d = h.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), h.len());
        }
        assert_eq!(Layout::initial(4).homes("x"), vec![queue_for("x", 4)]);
        assert!(!Layout::initial(4).in_transition());
    }
}
