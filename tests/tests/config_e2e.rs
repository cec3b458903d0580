//! Live config: the config-source conformance cases on memory and a real etcd, the
//! watcher (bad values refused and counted, resume after an etcd restart).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_shared::config::source::{
    Change, ConfigSource, EtcdSource, Expect, MemorySource, WatchMsg,
};
use chime_shared::config::watcher::{self, ConfigHandle};
use chime_tests::{EtcdServer, wait_until};
use tokio_util::sync::CancellationToken;

async fn next_changes(rx: &mut chime_shared::config::source::WatchRx) -> Result<Vec<Change>> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no watch message within 10 s")?
            .context("watch ended")??;
        match msg {
            WatchMsg::Changes(c) => return Ok(c),
            WatchMsg::Progress(_) => continue,
            WatchMsg::Compacted => bail!("unexpected compaction"),
        }
    }
}

/// Load, put, delete, and a watch that sees every change after a revision, in order.
async fn source_round_trip(src: Arc<dyn ConfigSource>) -> Result<()> {
    let r0 = src.load().await?.revision;
    let r1 = src.put("queues/default/count", "4").await?;
    let r2 = src.put("handlers/push/rate_per_s", "10").await?;
    let r3 = src.delete("queues/default/count").await?;
    ensure!(
        r0 < r1 && r1 < r2 && r2 < r3,
        "revisions {r0} {r1} {r2} {r3}"
    );
    let snap = src.load().await?;
    ensure!(snap.revision >= r3);
    let keys: Vec<&str> = snap.entries.iter().map(|e| e.0.as_str()).collect();
    ensure!(keys == ["handlers/push/rate_per_s"], "{keys:?}");
    let mut rx = src.watch(r0).await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(next_changes(&mut rx).await?);
    }
    ensure!(
        got[0]
            == Change::Put {
                key: "queues/default/count".into(),
                value: "4".into(),
                revision: r1
            },
        "{got:?}"
    );
    ensure!(
        got[2]
            == Change::Delete {
                key: "queues/default/count".into(),
                revision: r3
            },
        "{got:?}"
    );
    // Resuming from the last seen revision gets exactly what came after.
    drop(rx);
    let r4 = src.put("budgets/apns/rate_per_s", "100").await?;
    let mut rx = src.watch(r3).await?;
    let got = next_changes(&mut rx).await?;
    ensure!(got.len() == 1 && got[0].revision() == r4, "{got:?}");

    // Conditional writes: all of them in one revision, or none.
    let absent = |k: &str, v: &str| (k.to_owned(), v.to_owned(), Expect::Absent);
    let r5 = src
        .put_if_all(&[absent("jobs/a", "1"), absent("jobs/b", "2")])
        .await?
        .context("both keys were absent")?;
    ensure!(r5 > r4, "{r5} after {r4}");
    ensure!(src.get("jobs/b").await? == Some(("2".into(), r5)));
    let taken = src
        .put_if_all(&[absent("jobs/c", "3"), absent("jobs/a", "x")])
        .await?;
    ensure!(taken.is_none(), "a write over a taken key: {taken:?}");
    ensure!(src.get("jobs/c").await?.is_none(), "a refused batch wrote");
    ensure!(src.get("jobs/a").await? == Some(("1".into(), r5)));
    let stale = src.put_if("jobs/a", "y", Expect::Revision(r5 - 1)).await?;
    ensure!(stale.is_none(), "a stale revision wrote: {stale:?}");
    let r6 = src
        .put_if("jobs/a", "y", Expect::Revision(r5))
        .await?
        .context("the current revision was refused")?;
    ensure!(src.get("jobs/a").await? == Some(("y".into(), r6)) && r6 > r5);

    // A commit writes and deletes in one revision (a refused one does neither);
    // `Any` puts whatever the key holds.
    let refused = src
        .commit(
            &[
                absent("jobs/a", "z"),
                ("audit/x/1".into(), "e".into(), Expect::Any),
            ],
            &["jobs/b".into()],
        )
        .await?;
    ensure!(refused.is_none(), "a commit over a taken key: {refused:?}");
    ensure!(
        src.get("jobs/b").await?.is_some(),
        "a refused commit deleted"
    );
    ensure!(
        src.get("audit/x/1").await?.is_none(),
        "a refused commit wrote"
    );
    let r7 = src
        .commit(
            &[
                ("jobs/a".into(), "w".into(), Expect::Revision(r6)),
                ("audit/x/1".into(), "e1".into(), Expect::Any),
                ("audit/x/2".into(), "e2".into(), Expect::Any),
            ],
            &["jobs/b".into()],
        )
        .await?
        .context("the commit was refused")?;
    ensure!(src.get("jobs/b").await?.is_none(), "not deleted");
    ensure!(src.get("jobs/a").await? == Some(("w".into(), r7)));
    let mut rx = src.watch(r6).await?;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.extend(next_changes(&mut rx).await?);
    }
    ensure!(
        got.iter().all(|c| c.revision() == r7),
        "one revision: {got:?}"
    );
    ensure!(
        got.contains(&Change::Delete {
            key: "jobs/b".into(),
            revision: r7
        }),
        "{got:?}"
    );
    let under = src.list_under("audit/x/").await?;
    ensure!(under.revision >= r7, "read at {}", under.revision);
    ensure!(
        under.entries
            == [
                ("audit/x/1".to_owned(), "e1".to_owned(), r7),
                ("audit/x/2".to_owned(), "e2".to_owned(), r7)
            ],
        "{under:?}"
    );
    ensure!(src.list_under("audit/y/").await?.entries.is_empty());
    Ok(())
}

#[tokio::test]
async fn memory_source_round_trip() -> Result<()> {
    source_round_trip(Arc::new(MemorySource::default())).await
}

#[tokio::test]
async fn etcd_source_round_trip() -> Result<()> {
    let etcd = EtcdServer::start().await?;
    source_round_trip(Arc::new(EtcdSource::new(etcd.client().await?, "/chime/"))).await
}

async fn wait_count(h: &ConfigHandle, want: Option<u32>) -> Result<()> {
    wait_until("the config to apply", Duration::from_secs(10), || async {
        h.current().family("default").count.map(|c| c.0) == want
    })
    .await
}

/// Bad values are refused, the last good value stays, and the metric counts each.
async fn bad_values_refused(src: Arc<dyn ConfigSource>) -> Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    src.put("queues/default/count", "6").await?;
    let stop = CancellationToken::new();
    let (h, _task) = watcher::start(src.clone(), stop.clone()).await;
    wait_count(&h, Some(6)).await?;
    for bad in ["0", "-1", "abc", "99999999999"] {
        src.put("queues/default/count", bad).await?;
    }
    // A later good write to another key proves the bad ones were all processed.
    src.put("handlers/push/concurrency", "3").await?;
    wait_until("the later write", Duration::from_secs(10), || async {
        h.current().handler("push").concurrency == Some(3)
    })
    .await?;
    ensure!(
        h.current().family("default").count.map(|c| c.0) == Some(6),
        "last good value lost"
    );
    let text = metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("chime_config_rejected_total{key=\"queues/default/count\"}"))
        .with_context(|| format!("no rejection metric in:\n{text}"))?;
    ensure!(line.ends_with(" 4"), "{line}");
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn memory_watcher_refuses_bad_values() -> Result<()> {
    bad_values_refused(Arc::new(MemorySource::default())).await
}

#[tokio::test]
async fn etcd_watcher_refuses_bad_values() -> Result<()> {
    let etcd = EtcdServer::start().await?;
    bad_values_refused(Arc::new(EtcdSource::new(etcd.client().await?, "/chime/"))).await
}

/// etcd stopped and started again under a running watcher: what is written after it
/// comes back, before the watcher reconnects, is applied once it does.
#[tokio::test]
async fn watcher_resumes_after_etcd_restart() -> Result<()> {
    let mut etcd = EtcdServer::start().await?;
    let src = Arc::new(EtcdSource::new(etcd.client().await?, "/chime/"));
    src.put("queues/default/count", "3").await?;
    let stop = CancellationToken::new();
    let (h, _task) = watcher::start(src.clone(), stop.clone()).await;
    wait_count(&h, Some(3)).await?;
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.start_again().await?;
    // Written right away, while the watcher is still reconnecting.
    let writer = EtcdSource::new(etcd.client().await?, "/chime/");
    writer.put("queues/default/count", "9").await?;
    let last = writer.put("handlers/push/rate_per_s", "50").await?;
    wait_count(&h, Some(9)).await?;
    wait_until("every change", Duration::from_secs(10), || async {
        h.current().revision >= last && h.current().handler("push").rate_per_s == Some(50.0)
    })
    .await?;
    stop.cancel();
    Ok(())
}

/// A source over etcd whose watches the test can cut and hold back: the stand-in
/// for a coordinator that lost its etcd connection for longer than the history it
/// would resume from survived.
#[derive(Debug)]
struct Cuttable {
    inner: Arc<EtcdSource>,
    /// Watches opened so far.
    opened: std::sync::atomic::AtomicUsize,
    /// Cancelling it ends the open watch with an error.
    cut: std::sync::Mutex<CancellationToken>,
    /// New watches wait while this is false.
    open: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl ConfigSource for Cuttable {
    async fn load(&self) -> chime_shared::error::Result<chime_shared::config::source::Snapshot> {
        self.inner.load().await
    }
    async fn watch(
        &self,
        after: i64,
    ) -> chime_shared::error::Result<chime_shared::config::source::WatchRx> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        let mut inner = self.inner.watch(after).await?;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let cut = self.cut.lock().expect("cut lock").clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inner.recv() => match m {
                        Some(m) => if tx.send(m).await.is_err() { return },
                        None => return,
                    },
                    _ = cut.cancelled() => {
                        let _ = tx.send(Err(chime_shared::error::Error::Unavailable("cut by the test".into()))).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
    async fn put(&self, key: &str, value: &str) -> chime_shared::error::Result<i64> {
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &str) -> chime_shared::error::Result<i64> {
        self.inner.delete(key).await
    }
    async fn get(&self, key: &str) -> chime_shared::error::Result<Option<(String, i64)>> {
        self.inner.get(key).await
    }
    async fn commit(
        &self,
        writes: &[(String, String, chime_shared::config::source::Expect)],
        deletes: &[String],
    ) -> chime_shared::error::Result<Option<i64>> {
        self.inner.commit(writes, deletes).await
    }
}

/// The coordinator's job watcher loses etcd while a job is deleted and another
/// created, and etcd compacts the history it would resume from: it reloads, and the
/// engine then holds exactly the stored jobs (the deleted one gone, the new one there).
#[tokio::test]
async fn job_watcher_reloads_deletions_after_compaction() -> Result<()> {
    use chime_coordinator::engine::{self, EngineOptions};
    use chime_coordinator::model::{JobSpec, Schedule};
    use chime_coordinator::store::{JobStore, MemoryRunStore, Retention};
    use chime_shared::clock::Clock;
    use std::sync::atomic::Ordering;

    let etcd = EtcdServer::start().await?;
    let inner = Arc::new(EtcdSource::new(etcd.client().await?, "/chime/"));
    let src = Arc::new(Cuttable {
        inner,
        opened: 0.into(),
        cut: std::sync::Mutex::new(CancellationToken::new()),
        open: tokio::sync::watch::Sender::new(true),
    });
    let jobs = JobStore::new(src.clone());
    let every = |name: &str| JobSpec::new(name, "g", "h", Schedule::FixedRate { every_ms: 60_000 });
    let now = chime_shared::clock::SystemClock.now_ms();
    jobs.create(every("kept"), now).await?;
    jobs.create(every("deleted"), now).await?;
    let stop = CancellationToken::new();
    let (h, _task) = engine::start(
        jobs.clone(),
        Arc::new(MemoryRunStore::new(Retention::default())),
        Arc::new(chime_shared::clock::SystemClock),
        EngineOptions::default(),
        engine::Term {
            fence: 1,
            handover: None,
            warm: None,
        },
        CancellationToken::new(),
        stop.clone(),
    )
    .await?;
    let names = || async {
        let mut n: Vec<String> = h.states().await.unwrap_or_default().into_keys().collect();
        n.sort();
        n
    };
    ensure!(names().await == ["deleted", "kept"], "{:?}", names().await);
    wait_until("the job watch opened", Duration::from_secs(10), || async {
        src.opened.load(Ordering::SeqCst) >= 1
    })
    .await?;

    // Cut the watch and hold it back while the jobs change and etcd compacts.
    src.open.send_replace(false);
    src.cut.lock().unwrap().cancel();
    jobs.delete("deleted").await?;
    jobs.create(every("created"), now).await?;
    let mut client = etcd.client().await?;
    let rev = client
        .get("/chime/jobs/created", None)
        .await?
        .header()
        .context("no header")?
        .revision();
    client.compact(rev, None).await?;
    *src.cut.lock().unwrap() = CancellationToken::new();
    src.open.send_replace(true);

    wait_until(
        "the engine holds exactly the stored jobs",
        Duration::from_secs(15),
        || async { names().await == ["created", "kept"] },
    )
    .await?;
    ensure!(
        src.opened.load(Ordering::SeqCst) >= 2,
        "the watch was never reopened"
    );
    stop.cancel();
    Ok(())
}

/// A snapshot of several pages of the etcd source's load and over 9 MB (more than
/// a gRPC client decodes in one message by default: one range read of it fails),
/// and a key just past its prefix, which must not be read: every key comes back
/// once, at one revision. Values of 1 KB, then 3 KB: the page sized from the
/// first one's bytes per key comes back too big, and is read again at half size.
async fn a_large_snapshot_loads_whole(src: Arc<dyn ConfigSource>) -> Result<()> {
    const KEYS: usize = 5_345;
    let (small, big) = ("x".repeat(1_000), "x".repeat(3_000));
    let mut last = 0;
    let all: Vec<(String, String, Expect)> = (0..KEYS)
        .map(|i| {
            let pad = if (1_000..3_000).contains(&i) {
                &big
            } else {
                &small
            };
            (
                format!("jobs/j{i:05}"),
                format!("v{i}-{pad}"),
                Expect::Absent,
            )
        })
        .collect();
    // One transaction per 100 keys (etcd caps the operations of one).
    for chunk in all.chunks(100) {
        last = src
            .put_if_all(chunk)
            .await?
            .context("the keys were absent")?;
    }
    let snap = src.load().await?;
    ensure!(snap.revision >= last, "revision {} < {last}", snap.revision);
    ensure!(snap.entries.len() == KEYS, "{} keys", snap.entries.len());
    let mut keys: Vec<&str> = snap.entries.iter().map(|(k, _, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    ensure!(keys.len() == KEYS, "a key came back twice");
    ensure!(
        snap.entries.iter().all(|(k, v, _)| k
            .strip_prefix("jobs/j")
            .and_then(|n| n.parse::<usize>().ok())
            == v.strip_prefix('v')
                .and_then(|n| n.split('-').next()?.parse().ok())),
        "a value under the wrong key"
    );
    Ok(())
}

#[tokio::test]
async fn memory_source_loads_a_large_snapshot_whole() -> Result<()> {
    a_large_snapshot_loads_whole(Arc::new(MemorySource::default())).await
}

#[tokio::test]
async fn etcd_source_loads_a_large_snapshot_whole() -> Result<()> {
    let etcd = EtcdServer::start().await?;
    let client = etcd.client().await?;
    // A neighbour just past the prefix ("/chime0" sorts after "/chime/…").
    let mut c = client.clone();
    c.put("/chime0/other", "x", None).await?;
    a_large_snapshot_loads_whole(Arc::new(EtcdSource::new(client, "/chime/"))).await
}
