//! A follower's copy of the job definitions, kept current while it follows, so that
//! the moment it is elected its engine starts from memory instead of listing etcd.
//!
//! Why: with many jobs defined, listing them is a large part of a new leader's start
//! (about 0.6 s for 100,000 jobs on a 2-core machine, etcd 3.4 walking its whole
//! range once per page), and every millisecond of it is added to the failover.
//!
//! The copy is a snapshot at a revision: listed once, then moved forward by the same
//! resumable watch as the engine's own job watcher ([`follow`]), a compaction
//! replacing it whole. Handing it over ([`WarmJobs::take`]) stops the watch first, so
//! the copy is exactly the jobs at its revision; the engine's job watcher then
//! resumes from that revision, as it would after its own list, so a change made
//! while the copy was handed over is applied once, by the engine. A copy that is not
//! loaded yet (the follower has just started, or etcd is away) is no copy: the
//! engine lists as before.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chime_shared::config::follow::{Followed, follow};
use chime_shared::config::source::Change;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::store::{JobStore, JobsAt, StoredJob};

/// The jobs at `revision`.
#[derive(Debug, Default)]
struct Copy {
    jobs: BTreeMap<String, StoredJob>,
    revision: i64,
}

impl Copy {
    fn apply(&mut self, f: Followed) {
        match f {
            Followed::Changes(changes) => {
                for c in changes {
                    self.revision = self.revision.max(c.revision());
                    match c {
                        Change::Put {
                            key,
                            value,
                            revision,
                        } => {
                            let Some(name) = key.strip_prefix("jobs/") else {
                                continue;
                            };
                            match JobStore::decode(&value, revision) {
                                Ok(job) => {
                                    self.jobs.insert(name.to_owned(), job);
                                }
                                // Left out, as a list leaves it out; the engine logs it
                                // when it watches the key itself.
                                Err(e) => debug!(job = name, error = %e, "unreadable job"),
                            }
                        }
                        Change::Delete { key, .. } => {
                            if let Some(name) = key.strip_prefix("jobs/") {
                                self.jobs.remove(name);
                            }
                        }
                    }
                }
            }
            Followed::Reloaded(snapshot) => {
                self.revision = snapshot.revision;
                self.jobs = JobStore::jobs_in(&snapshot)
                    .into_iter()
                    .map(|j| (j.spec.name.clone(), j))
                    .collect();
            }
        }
    }
}

/// A follower's warm copy of the jobs; see the module doc.
#[derive(Debug)]
pub struct WarmJobs {
    /// `None` until the first list lands, and again once taken. A std mutex: it is
    /// never held across an await.
    copy: Arc<Mutex<Option<Copy>>>,
    /// Stops the list-and-watch task.
    stop: CancellationToken,
}

/// Retries of the first list while etcd is away.
const LIST_RETRY: Duration = Duration::from_secs(1);

impl WarmJobs {
    /// Starts keeping a copy of `jobs` until [`take`](Self::take), the value being
    /// dropped, or `shutdown`.
    pub fn spawn(jobs: JobStore, shutdown: &CancellationToken) -> Self {
        let copy: Arc<Mutex<Option<Copy>>> = Arc::default();
        let stop = shutdown.child_token();
        let (task_copy, task_stop) = (copy.clone(), stop.clone());
        tokio::spawn(async move {
            let revision = loop {
                let listed = tokio::select! {
                    l = jobs.list() => l,
                    _ = task_stop.cancelled() => return,
                };
                match listed {
                    Ok((list, revision)) => {
                        let jobs = list.into_iter().map(|j| (j.spec.name.clone(), j)).collect();
                        let mut guard = task_copy.lock().unwrap_or_else(|p| p.into_inner());
                        // Taken meanwhile: the copy would only hold memory.
                        if task_stop.is_cancelled() {
                            return;
                        }
                        *guard = Some(Copy { jobs, revision });
                        break revision;
                    }
                    Err(e) => {
                        warn!(error = %e, "a follower cannot list the jobs; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(LIST_RETRY) => {}
                            _ = task_stop.cancelled() => return,
                        }
                    }
                }
            };
            follow(jobs.source(), revision, "warm jobs", task_stop, move |f| {
                if let Some(c) = task_copy.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    c.apply(f);
                }
                std::future::ready(())
            })
            .await;
        });
        Self { copy, stop }
    }

    /// Stops following and answers the jobs and the revision they are current at,
    /// or `None` when the copy was not loaded yet.
    pub fn take(self) -> Option<JobsAt> {
        self.stop.cancel();
        let copy = self.copy.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        Some((copy.jobs.into_values().collect(), copy.revision))
    }
}

impl Drop for WarmJobs {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chime_shared::config::source::{ConfigSource, MemorySource};

    use super::*;

    fn job(name: &str) -> String {
        let spec = crate::model::JobSpec::new(
            name,
            "g",
            "h",
            crate::model::Schedule::FixedRate { every_ms: 60_000 },
        );
        serde_json::to_string(&spec).unwrap()
    }

    async fn wait_for(warm: &WarmJobs, names: &[&str]) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let have: Vec<String> = warm
                .copy
                .lock()
                .unwrap()
                .as_ref()
                .map(|c| c.jobs.keys().cloned().collect())
                .unwrap_or_default();
            if have == names {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_copy_follows_puts_and_deletes_and_is_taken_at_its_revision() {
        let kv: Arc<dyn ConfigSource> = Arc::new(MemorySource::default());
        kv.put("jobs/a", &job("a")).await.unwrap();
        kv.put("jobs/b", &job("b")).await.unwrap();
        kv.put("config/x", "1").await.unwrap();
        let shutdown = CancellationToken::new();
        let warm = WarmJobs::spawn(JobStore::new(kv.clone()), &shutdown);
        assert!(wait_for(&warm, &["a", "b"]).await, "the first list");
        kv.put("jobs/c", &job("c")).await.unwrap();
        kv.delete("jobs/a").await.unwrap();
        assert!(
            wait_for(&warm, &["b", "c"]).await,
            "a put and a delete followed"
        );
        let (jobs, revision) = warm.take().expect("a loaded copy");
        let names: Vec<&str> = jobs.iter().map(|j| j.spec.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        // The copy is the jobs at its revision: a list at that revision agrees.
        let (listed, now) = JobStore::new(kv.clone()).list().await.unwrap();
        assert_eq!(revision, now, "nothing changed since the delete");
        assert_eq!(listed, jobs);
    }

    #[tokio::test]
    async fn a_copy_not_loaded_yet_is_no_copy() {
        let kv: Arc<dyn ConfigSource> = Arc::new(MemorySource::default());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let warm = WarmJobs::spawn(JobStore::new(kv), &shutdown);
        assert!(warm.take().is_none());
    }
}
