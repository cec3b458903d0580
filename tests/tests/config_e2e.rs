//! Live config: the config-source conformance cases on memory and a real etcd, the
//! watcher (bad values refused and counted, resume after an etcd restart).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_shared::config::source::{Change, ConfigSource, EtcdSource, MemorySource, WatchMsg};
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
