//! Traces end to end: a real coordinator and real workers export their spans over
//! OTLP/gRPC to a real receiver (the OpenTelemetry project's generated server,
//! `chime_tests::otlp`), and the spans link up:
//! - producer → `enqueue` (coordinator) → `process <handler>` (worker), for a
//!   `traceparent` in gRPC metadata and in an HTTP header; an item's own
//!   `traceparent` field parents its handler's span directly; an unsampled
//!   context makes no span; a failing handler's span has an error status;
//! - `fire <job>` (coordinator, a root) → `shard <job>` (worker) for each shard;
//! - a coordinator without tracing stores no caller's context (rolling upgrades).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_shared::auth::Bearer;
use chime_tests::otlp::OtlpReceiver;
use chime_tests::{Cluster, PRODUCER_TOKEN, TestDir, wait_until};
use proto as pb;
use serde_json::{Value, json};

const PRODUCER_GRPC: &str = "00-11111111111111111111111111111111-1111111111111111-01";
const PRODUCER_HTTP: &str = "00-22222222222222222222222222222222-2222222222222222-01";
const ITEM_OWN: &str = "00-33333333333333333333333333333333-3333333333333333-01";
const UNSAMPLED: &str = "00-44444444444444444444444444444444-4444444444444444-00";

fn trace_of(tp: &str) -> &str {
    &tp[3..35]
}

fn span_of(tp: &str) -> &str {
    &tp[36..52]
}

type Producer = pb::queue_client::QueueClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A `chime.v1.Queue` client with the producer token.
async fn producer(c: &Cluster) -> Result<Producer> {
    let channel = tonic::transport::Endpoint::from_shared(c.coordinator.clone())?
        .connect()
        .await?;
    Ok(pb::queue_client::QueueClient::with_interceptor(
        channel,
        Bearer::new(Some(PRODUCER_TOKEN))?,
    ))
}

/// The spans of trace `trace` named `name`.
fn named<'a>(spans: &'a [Value], trace: &str, name: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["trace_id"] == trace && s["name"] == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_item_handler_and_fire_shard_spans_are_linked() -> Result<()> {
    let dir = TestDir::new("trace")?;
    let otlp = OtlpReceiver::start(dir.path()).await?;
    let env = [
        ("CHIME_TRACING_OTLP_ENDPOINT", otlp.endpoint.as_str()),
        ("CHIME_TRACING_OTLP_HEADERS", "x-tenant=e2e"),
    ];
    let c = Cluster::start_with_env(1, 2, &env).await?;
    let _queue_worker = c.queue_worker("qw", &[], &env)?;

    // Producers: gRPC with the context in metadata (and one unsampled), an item
    // with its own context, HTTP with the context in a header.
    let mut q = producer(&c).await?;
    let item = |id: &str, handler: &str| pb::NewItem {
        id: id.into(),
        handler: handler.into(),
        max_attempts: 1,
        ..Default::default()
    };
    for (tp, items) in [
        (PRODUCER_GRPC, vec![item("via-grpc", "noop")]),
        (UNSAMPLED, vec![item("unsampled", "noop")]),
        (
            "",
            vec![pb::NewItem {
                traceparent: ITEM_OWN.into(),
                ..item("own-context", "noop")
            }],
        ),
    ] {
        let mut req = tonic::Request::new(pb::EnqueueRequest { items });
        if !tp.is_empty() {
            req.metadata_mut().insert("traceparent", tp.parse()?);
        }
        q.enqueue(req).await?;
    }
    // A malformed item context is refused naming the field; nothing is stored.
    let bad = q
        .enqueue(pb::EnqueueRequest {
            items: vec![pb::NewItem {
                traceparent: "00-nothex".into(),
                ..item("bad-context", "noop")
            }],
        })
        .await
        .expect_err("a malformed traceparent is refused");
    ensure!(
        bad.message().contains("items[0].traceparent"),
        "{}",
        bad.message()
    );
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let resp = reqwest::Client::new()
        .post(format!("{api}/api/queues/items"))
        .bearer_auth(PRODUCER_TOKEN)
        .header("traceparent", PRODUCER_HTTP)
        .json(&json!({ "items": [{ "id": "via-http", "handler": "fail", "max_attempts": 1 }] }))
        .send()
        .await?;
    ensure!(resp.status().is_success(), "{}", resp.text().await?);

    // A job of two shards, fired by hand.
    c.admin(&[
        "job",
        "create",
        "--name",
        "traced",
        "--handler",
        "noop",
        "--manual",
        "--routing",
        "sharding-broadcast",
        "--shards",
        "2",
    ])?;
    let run = c.admin(&["job", "trigger", "traced"])?;
    let run_id = run["run_id"].as_str().context("run_id")?.to_owned();

    let mut spans = Vec::new();
    let fire_and_shards = |spans: &[Value]| -> Option<(Value, Vec<Value>)> {
        let fire = spans
            .iter()
            .find(|s| s["name"] == "fire traced" && s["attributes"]["chime.run_id"] == run_id)?;
        let shards: Vec<Value> = named(spans, fire["trace_id"].as_str()?, "shard traced")
            .into_iter()
            .cloned()
            .collect();
        (shards.len() == 2).then(|| (fire.clone(), shards))
    };
    wait_until(
        "every expected span at the receiver",
        Duration::from_secs(30),
        || {
            spans = otlp.spans();
            let ready = named(&spans, trace_of(PRODUCER_GRPC), "process noop").len() == 1
                && named(&spans, trace_of(PRODUCER_HTTP), "process fail").len() == 1
                && named(&spans, trace_of(ITEM_OWN), "process noop").len() == 1
                && fire_and_shards(&spans).is_some();
            async move { ready }
        },
    )
    .await
    .with_context(|| format!("spans so far: {}", Value::from(otlp.spans())))?;

    // Every span is valid OTLP and came with the configured headers.
    for s in &spans {
        ensure!(s["problems"] == json!([]), "invalid span {s}");
        ensure!(s["headers"]["x-tenant"] == "e2e", "no header on {s}");
        ensure!(s["scope"] == "chime", "{s}");
    }

    // gRPC producer → enqueue (coordinator, SERVER) → process noop (worker, CONSUMER).
    let enq = named(&spans, trace_of(PRODUCER_GRPC), "enqueue");
    ensure!(enq.len() == 1, "one enqueue span: {enq:?}");
    let enq = enq[0];
    ensure!(enq["parent_span_id"] == span_of(PRODUCER_GRPC), "{enq}");
    ensure!(
        enq["service"] == "chime-coordinator" && enq["kind"] == 2,
        "{enq}"
    );
    ensure!(enq["attributes"]["chime.transport"] == "grpc", "{enq}");
    let proc_ = named(&spans, trace_of(PRODUCER_GRPC), "process noop")[0];
    ensure!(proc_["parent_span_id"] == enq["span_id"], "{proc_}");
    ensure!(
        proc_["service"] == "chime-worker" && proc_["kind"] == 5,
        "{proc_}"
    );
    ensure!(
        proc_["attributes"]["messaging.message.id"] == "via-grpc",
        "{proc_}"
    );
    ensure!(proc_["attributes"]["chime.outcome"] == "acked", "{proc_}");
    ensure!(proc_["status_code"] == 0, "{proc_}");

    // HTTP producer → enqueue → process fail, which failed its last attempt.
    let enq = named(&spans, trace_of(PRODUCER_HTTP), "enqueue");
    ensure!(
        enq.len() == 1 && enq[0]["attributes"]["chime.transport"] == "http",
        "{enq:?}"
    );
    ensure!(
        enq[0]["parent_span_id"] == span_of(PRODUCER_HTTP),
        "{enq:?}"
    );
    let failed = named(&spans, trace_of(PRODUCER_HTTP), "process fail")[0];
    ensure!(failed["parent_span_id"] == enq[0]["span_id"], "{failed}");
    ensure!(failed["status_code"] == 2, "an error status: {failed}");
    ensure!(
        failed["attributes"]["chime.outcome"] == "dead_lettered",
        "{failed}"
    );

    // An item's own context: its handler span is the producer span's child, and
    // there is no enqueue span (the call carried no context).
    let own = named(&spans, trace_of(ITEM_OWN), "process noop")[0];
    ensure!(own["parent_span_id"] == span_of(ITEM_OWN), "{own}");
    ensure!(named(&spans, trace_of(ITEM_OWN), "enqueue").is_empty());

    // The unsampled context made no span anywhere.
    ensure!(
        !spans.iter().any(|s| s["trace_id"] == trace_of(UNSAMPLED)),
        "spans of an unsampled trace"
    );

    // fire → shard: a root on the coordinator, one child per shard on the workers.
    let (fire, shards) = fire_and_shards(&spans).context("fire and shards")?;
    ensure!(fire["parent_span_id"] == "", "the fire is a root: {fire}");
    ensure!(
        fire["service"] == "chime-coordinator" && fire["kind"] == 4,
        "{fire}"
    );
    ensure!(fire["attributes"]["chime.status"] == "succeeded", "{fire}");
    let mut indexes: Vec<i64> = Vec::new();
    for s in &shards {
        ensure!(
            s["parent_span_id"] == fire["span_id"],
            "{s} is not the fire's child"
        );
        ensure!(s["service"] == "chime-worker", "{s}");
        ensure!(s["attributes"]["chime.run_id"] == run_id.as_str(), "{s}");
        // The fire's times are the run record's (whole ms), the shard's the
        // worker's clock (ns): within the fire, up to the ms the record rounds.
        let (start, end) = (s["start_ns"].as_u64(), s["end_ns"].as_u64());
        let (fstart, fend) = (fire["start_ns"].as_u64(), fire["end_ns"].as_u64());
        ensure!(
            start >= fstart && end <= fend.map(|e| e + 1_000_000),
            "the shard lies within the fire: {s} {fire}"
        );
        indexes.push(
            s["attributes"]["chime.shard.index"]
                .as_i64()
                .context("index")?,
        );
    }
    indexes.sort();
    ensure!(indexes == [0, 1], "{indexes:?}");
    Ok(())
}

/// A coordinator that exports no traces stores no caller's `traceparent` (so items
/// keep the body format workers before tracing read, whatever producers send), but
/// an item's own `traceparent` field is kept: only new clients set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_tracing_keeps_only_explicit_item_contexts() -> Result<()> {
    use chime_shared::queue::{DelayStore, ItemRef};
    let c = Cluster::start(0).await?;
    let mut q = producer(&c).await?;
    let later = |id: &str, tp: &str| pb::NewItem {
        id: id.into(),
        handler: "noop".into(),
        in_ms: 3_600_000,
        traceparent: tp.into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(pb::EnqueueRequest {
        items: vec![later("from-metadata", ""), later("own", ITEM_OWN)],
    });
    req.metadata_mut()
        .insert("traceparent", PRODUCER_GRPC.parse()?);
    q.enqueue(req).await?;
    let store = c.redis.store("chime", 8).await?;
    let got = |id: &'static str| {
        let store = &store;
        async move {
            store
                .get(&ItemRef::new(id))
                .await?
                .with_context(|| format!("item {id}"))
        }
    };
    ensure!(got("from-metadata").await?.item.traceparent.is_none());
    ensure!(got("own").await?.item.traceparent.map(|t| t.to_string()) == Some(ITEM_OWN.to_owned()));
    Ok(())
}
