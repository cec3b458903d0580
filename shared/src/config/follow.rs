//! Following a [`ConfigSource`] for as long as a process runs: the one resume loop
//! behind the live-config watcher and the coordinator's job watcher. A watch that
//! breaks (etcd restarted, connection dropped) is reopened after the last revision
//! seen, so no change is missed or applied twice; one that reports a compaction (the
//! revisions it would resume from are gone) is replaced by a full reload, and the
//! follower is told so, because a reload can also mean deletions it never saw.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::source::{Change, ConfigSource, Snapshot, WatchMsg};

/// What a follower is told, in revision order.
#[derive(Debug)]
pub enum Followed {
    /// Changes after the last revision seen.
    Changes(Vec<Change>),
    /// Everything under the prefix, read after a compaction: the follower's state
    /// must become exactly this (keys missing here were deleted meanwhile).
    Reloaded(Snapshot),
}

/// Retries start here and double up to [`MAX_RETRY`] while the store stays away.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Follows `source` from after revision `last` until `shutdown`, calling `on` with
/// each batch and waiting for it before the next (so the follower sees changes in
/// order). `what` names the follower in logs.
pub async fn follow<F, Fut>(
    source: Arc<dyn ConfigSource>,
    mut last: i64,
    what: &'static str,
    shutdown: CancellationToken,
    mut on: F,
) where
    F: FnMut(Followed) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut delay = FIRST_RETRY;
    loop {
        let mut rx = tokio::select! {
            w = source.watch(last) => match w {
                Ok(rx) => rx,
                Err(e) => {
                    warn!(watch = what, error = %e, last_revision = last, "watch failed; retrying");
                    if !pause(&mut delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = shutdown.cancelled() => return,
            };
            match msg {
                Some(Ok(WatchMsg::Changes(changes))) => {
                    delay = FIRST_RETRY;
                    for c in &changes {
                        last = last.max(c.revision());
                    }
                    on(Followed::Changes(changes)).await;
                }
                Some(Ok(WatchMsg::Progress(rev))) => {
                    delay = FIRST_RETRY;
                    last = last.max(rev);
                }
                Some(Ok(WatchMsg::Compacted)) => {
                    warn!(
                        watch = what,
                        last_revision = last,
                        "history compacted; reloading"
                    );
                    match source.load().await {
                        Ok(s) => {
                            last = s.revision;
                            on(Followed::Reloaded(s)).await;
                        }
                        Err(e) => warn!(watch = what, error = %e, "reload failed; retrying"),
                    }
                    break;
                }
                Some(Err(e)) => {
                    warn!(watch = what, error = %e, last_revision = last, "watch broke; resuming");
                    break;
                }
                None => break,
            }
        }
        if !pause(&mut delay, &shutdown).await {
            return;
        }
    }
}

/// Waits `delay` (then doubles it, capped); false when shut down meanwhile.
async fn pause(delay: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*delay) => {},
        _ = shutdown.cancelled() => return false,
    }
    *delay = (*delay * 2).min(MAX_RETRY);
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::source::{Expect, WatchRx};
    use crate::error::{Error, Result};

    /// A source whose watches follow a script: each `watch(after)` call checks
    /// `after` and plays the next list of messages (then ends the stream).
    #[derive(Debug)]
    struct Scripted {
        watches: Mutex<Vec<(i64, Vec<Result<WatchMsg>>)>>,
        calls: Mutex<Vec<i64>>,
        shutdown: CancellationToken,
    }

    #[async_trait]
    impl ConfigSource for Scripted {
        async fn load(&self) -> Result<Snapshot> {
            Ok(Snapshot {
                entries: vec![("jobs/b".into(), "2".into(), 9)],
                revision: 9,
            })
        }
        async fn watch(&self, after: i64) -> Result<WatchRx> {
            self.calls.lock().unwrap().push(after);
            let mut w = self.watches.lock().unwrap();
            if w.is_empty() {
                self.shutdown.cancel();
                return Err(Error::Unavailable("script over".into()));
            }
            let (expect, msgs) = w.remove(0);
            assert_eq!(after, expect, "resumed from the wrong revision");
            let (tx, rx) = mpsc::channel(16);
            for m in msgs {
                tx.try_send(m).unwrap();
            }
            Ok(rx)
        }
        async fn put(&self, _: &str, _: &str) -> Result<i64> {
            unreachable!()
        }
        async fn delete(&self, _: &str) -> Result<i64> {
            unreachable!()
        }
        async fn get(&self, _: &str) -> Result<Option<(String, i64)>> {
            unreachable!()
        }
        async fn commit(
            &self,
            _: &[(String, String, Expect)],
            _: &[String],
        ) -> Result<Option<i64>> {
            unreachable!()
        }
    }

    fn put(key: &str, revision: i64) -> Change {
        Change::Put {
            key: key.into(),
            value: "1".into(),
            revision,
        }
    }

    /// A broken watch resumes after the last revision seen (changes and progress
    /// alike); a compaction reloads and resumes after the snapshot's revision.
    #[tokio::test]
    async fn resumes_after_the_last_revision_and_reloads_after_compaction() {
        let shutdown = CancellationToken::new();
        let source = Arc::new(Scripted {
            watches: Mutex::new(vec![
                (
                    3,
                    vec![
                        Ok(WatchMsg::Changes(vec![put("jobs/a", 4), put("jobs/a", 5)])),
                        Err(Error::Unavailable("connection reset".into())),
                    ],
                ),
                (5, vec![Ok(WatchMsg::Progress(7))]), // then the stream ends
                (7, vec![Ok(WatchMsg::Compacted)]),
                (9, vec![]),
            ]),
            calls: Mutex::new(Vec::new()),
            shutdown: shutdown.clone(),
        });
        let mut seen = Vec::new();
        follow(source.clone(), 3, "test", shutdown, |f| {
            seen.push(match f {
                Followed::Changes(c) => format!("changes {}", c.len()),
                Followed::Reloaded(s) => format!("reloaded at {}", s.revision),
            });
            std::future::ready(())
        })
        .await;
        assert_eq!(seen, ["changes 2", "reloaded at 9"]);
        // The fifth call found the script over and shut the follower down.
        assert_eq!(*source.calls.lock().unwrap(), [3, 5, 7, 9, 9]);
    }
}
