//! The delay queue over gRPC (`chime.v1.Queue`), as a producer in another language
//! would use it: a real coordinator on real Redis and etcd, a real `chime worker`
//! consuming the queues. Enqueue (created, duplicate), get, reschedule, cancel,
//! counts, dead letters and requeue; the JSON API's get, reschedule and cancel on the
//! same items; every refusal names its field and stores nothing; the producer token
//! opens the queue and nothing else, the worker token not even that.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chime_shared::auth::Bearer;
use chime_tests::{
    ADMIN_TOKEN, Cluster, PRODUCER_TOKEN, WORKER_TOKEN, http, read_records, spawn_worker,
    wait_until,
};
use pb::queue_client::QueueClient;
use proto as pb;
use serde_json::json;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = QueueClient<InterceptedService<Channel, Bearer>>;

async fn client(c: &Cluster, token: &str) -> Result<Client> {
    let channel = tonic::transport::Endpoint::from_shared(c.coordinator.clone())?
        .connect()
        .await?;
    Ok(QueueClient::with_interceptor(
        channel,
        Bearer::new(Some(token))?,
    ))
}

fn item(id: &str, key: &str, handler: &str) -> pb::NewItem {
    pb::NewItem {
        id: id.into(),
        key: key.into(),
        handler: handler.into(),
        ..Default::default()
    }
}

fn iref(key: &str, id: &str) -> pb::ItemRef {
    pb::ItemRef {
        key: key.into(),
        id: id.into(),
    }
}

async fn state(q: &mut Client, key: &str, id: &str) -> Result<Option<pb::ItemView>> {
    match q.get_item(iref(key, id)).await {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

/// An `InvalidArgument` whose `chime-field` metadata names `field`.
fn names_field(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) -> Result<()> {
    let s = r.err().context("accepted")?;
    ensure!(s.code() == Code::InvalidArgument, "{s:?}");
    let got = s
        .metadata()
        .get("chime-field")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(got == field, "expected field {field}, got {got:?}: {s:?}");
    Ok(())
}

#[tokio::test]
async fn a_producer_over_grpc_enqueues_finds_moves_cancels_and_requeues() -> Result<()> {
    let c = Cluster::start(0).await?;
    let (mut worker, records) = spawn_worker(
        c.dir.path(),
        "queue-worker",
        &c.redis,
        "chime",
        &[
            "--handlers",
            "noop,fail",
            "--etcd-endpoints",
            &c.etcd.endpoint,
        ],
        &[("CHIME_CONSUMER_RETRY_BASE_MS", "50")],
    )?;
    let mut q = client(&c, ADMIN_TOKEN).await?;

    // The worker token opens nothing here.
    let mut stranger = client(&c, WORKER_TOKEN).await?;
    let e = stranger
        .enqueue(pb::EnqueueRequest {
            items: vec![item("x", "", "noop")],
        })
        .await
        .expect_err("the worker token enqueued");
    ensure!(e.code() == Code::Unauthenticated, "{e:?}");

    // The producer token opens the queue (gRPC and the JSON API's item calls) and
    // nothing else.
    let mut producer = client(&c, PRODUCER_TOKEN).await?;
    let out = producer
        .enqueue(pb::EnqueueRequest {
            items: vec![pb::NewItem {
                in_ms: 3_600_000,
                ..item("from-producer", "", "noop")
            }],
        })
        .await?
        .into_inner();
    ensure!(
        out.outcomes == [pb::EnqueueOutcome::Created as i32],
        "{out:?}"
    );
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    let (code, b) = http(
        "POST",
        &format!("{api}/api/queues/item/cancel"),
        Some(PRODUCER_TOKEN),
        Some(json!({ "id": "from-producer" })),
    )
    .await?;
    ensure!(code == 200 && b["outcome"] == "cancelled", "{code} {b}");
    // Dead letters are a producer's as over gRPC; the rest is the admins'.
    let (code, b) = http(
        "GET",
        &format!("{api}/api/queues/dead"),
        Some(PRODUCER_TOKEN),
        None,
    )
    .await?;
    ensure!(code == 200, "the producer's dead letters: {code} {b}");
    for path in ["/api/jobs", "/api/queues", "/api/config"] {
        let (code, b) = http("GET", &format!("{api}{path}"), Some(PRODUCER_TOKEN), None).await?;
        ensure!(code == 401, "the producer token opened {path}: {code} {b}");
    }
    let channel = tonic::transport::Endpoint::from_shared(c.coordinator.clone())?
        .connect()
        .await?;
    let mut admin = pb::admin_client::AdminClient::with_interceptor(
        channel,
        Bearer::new(Some(PRODUCER_TOKEN))?,
    );
    let e = admin
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect_err("the producer token listed jobs");
    ensure!(e.code() == Code::Unauthenticated, "{e:?}");

    // Refusals name the field; one bad item refuses the whole batch.
    let big = pb::NewItem {
        payload: vec![b'x'; 64 * 1024 + 1],
        ..item("too-big", "", "noop")
    };
    names_field(
        q.enqueue(pb::EnqueueRequest {
            items: vec![item("fine", "", "noop"), big],
        })
        .await,
        "items[1].payload",
    )?;
    names_field(
        q.enqueue(pb::EnqueueRequest {
            items: vec![pb::NewItem {
                due_at_ms: 1,
                in_ms: 1,
                ..item("both", "", "noop")
            }],
        })
        .await,
        "items[0].in_ms",
    )?;
    names_field(
        q.enqueue(pb::EnqueueRequest {
            items: vec![item("h", "", "bad handler")],
        })
        .await,
        "items[0].handler",
    )?;
    names_field(
        q.enqueue(pb::EnqueueRequest { items: vec![] }).await,
        "items",
    )?;
    names_field(q.get_item(iref("", "")).await, "item.id")?;
    ensure!(
        state(&mut q, "", "fine").await?.is_none(),
        "a refused batch stored an item"
    );

    // Enqueue: a reminder for user 42 an hour ahead, and one due in 60 s.
    let now = q
        .queue_stats(pb::QueueStatsRequest {})
        .await?
        .into_inner()
        .now_ms;
    let later = pb::NewItem {
        due_at_ms: now + 3_600_000,
        payload: b"{\"coupon\":7}".to_vec(),
        merge_key: "coupons".into(),
        ..item("remind-7", "user-42", "noop")
    };
    let soon = pb::NewItem {
        in_ms: 60_000,
        ..item("remind-8", "user-42", "noop")
    };
    let out = q
        .enqueue(pb::EnqueueRequest {
            items: vec![later.clone(), soon],
        })
        .await?
        .into_inner();
    let created = pb::EnqueueOutcome::Created as i32;
    let duplicate = pb::EnqueueOutcome::Duplicate as i32;
    ensure!(out.outcomes == [created, created], "{out:?}");
    // Idempotent on the id while the item exists.
    let again = q
        .enqueue(pb::EnqueueRequest { items: vec![later] })
        .await?
        .into_inner();
    ensure!(again.outcomes == [duplicate], "{again:?}");

    let v = state(&mut q, "user-42", "remind-7")
        .await?
        .context("remind-7 not found")?;
    ensure!(
        v.state == pb::ItemState::Pending as i32
            && v.due_at_ms == now + 3_600_000
            && v.payload == b"{\"coupon\":7}"
            && v.merge_key == "coupons"
            && v.max_attempts == 3
            && v.key == "user-42",
        "{v:?}"
    );
    // The JSON API sees and moves the same item.
    let (code, b) = http(
        "GET",
        &format!("{api}/api/queues/item?key=user-42&id=remind-7"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(code == 200 && b["item"]["id"] == "remind-7", "{code} {b}");
    let (code, b) = http(
        "POST",
        &format!("{api}/api/queues/item/reschedule"),
        Some(ADMIN_TOKEN),
        Some(json!({ "key": "user-42", "id": "remind-7", "due_at_ms": now + 7_200_000 })),
    )
    .await?;
    ensure!(code == 200 && b["outcome"] == "rescheduled", "{code} {b}");
    let v = state(&mut q, "user-42", "remind-7")
        .await?
        .context("moved")?;
    ensure!(v.due_at_ms == now + 7_200_000, "{v:?}");
    let (code, b) = http(
        "POST",
        &format!("{api}/api/queues/item/cancel"),
        Some(ADMIN_TOKEN),
        Some(json!({ "id": "never-enqueued" })),
    )
    .await?;
    ensure!(code == 200 && b["outcome"] == "not_found", "{code} {b}");
    let (code, b) = http(
        "GET",
        &format!("{api}/api/queues/item?id="),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(
        code == 400 && b["error"]["field"] == "item.id",
        "{code} {b}"
    );

    let stats = q.queue_stats(pb::QueueStatsRequest {}).await?.into_inner();
    let pending: u64 = stats.queues.iter().map(|s| s.pending).sum();
    ensure!(stats.count > 0 && pending == 2, "{stats:?}");

    // Reschedule remind-8 to now: the worker fires it.
    let r = q
        .reschedule_item(pb::RescheduleItemRequest {
            item: Some(iref("user-42", "remind-8")),
            due_at_ms: now,
        })
        .await?
        .into_inner();
    ensure!(
        r.outcome == pb::RescheduleOutcome::Rescheduled as i32,
        "{r:?}"
    );
    wait_until("remind-8 fired", Duration::from_secs(15), || async {
        read_records(&records).iter().any(|r| r.id == "remind-8")
    })
    .await?;
    // The handler writes its record before the worker acks the item: gone once
    // the ack lands, not necessarily at the record.
    wait_until("remind-8 acked", Duration::from_secs(15), || {
        let mut q = q.clone();
        async move { matches!(state(&mut q, "user-42", "remind-8").await, Ok(None)) }
    })
    .await?;
    // Fired: the id may be enqueued again (re-subscribe); cancel it this time.
    let re = q
        .enqueue(pb::EnqueueRequest {
            items: vec![pb::NewItem {
                in_ms: 3_600_000,
                ..item("remind-8", "user-42", "noop")
            }],
        })
        .await?
        .into_inner();
    ensure!(re.outcomes == [created], "{re:?}");

    // Cancel: once, then it is gone.
    for id in ["remind-7", "remind-8"] {
        let r = q.cancel_item(iref("user-42", id)).await?.into_inner();
        ensure!(r.outcome == pb::CancelOutcome::Cancelled as i32, "{r:?}");
    }
    let r = q
        .cancel_item(iref("user-42", "remind-7"))
        .await?
        .into_inner();
    ensure!(r.outcome == pb::CancelOutcome::NotFound as i32, "{r:?}");
    ensure!(state(&mut q, "user-42", "remind-7").await?.is_none());

    // An item for a handler no worker has waits for one, no attempt counted.
    q.enqueue(pb::EnqueueRequest {
        items: vec![item("stray", "", "nobody")],
    })
    .await?;
    wait_until("stray waiting", Duration::from_secs(15), || async {
        let mut q = q.clone();
        state(&mut q, "", "stray").await.is_ok_and(|v| {
            v.is_some_and(|v| v.state == pb::ItemState::Waiting as i32 && v.attempts == 0)
        })
    })
    .await?;
    let stats = q.queue_stats(pb::QueueStatsRequest {}).await?.into_inner();
    ensure!(
        stats.waiting_by_handler.get("nobody") == Some(&1)
            && stats.queues.iter().map(|c| c.waiting).sum::<u64>() == 1,
        "{stats:?}"
    );

    // Dead letters: an item whose handler fails, one attempt.
    q.enqueue(pb::EnqueueRequest {
        items: vec![pb::NewItem {
            max_attempts: 1,
            ..item("orphan", "", "fail")
        }],
    })
    .await?;
    wait_until("orphan dead-lettered", Duration::from_secs(15), || async {
        let mut q = q.clone();
        q.list_dead_letters(pb::ListDeadLettersRequest { limit: 0 })
            .await
            .is_ok_and(|l| l.into_inner().items.iter().any(|i| i.id == "orphan"))
    })
    .await?;
    let dead = state(&mut q, "", "orphan").await?.context("orphan gone")?;
    ensure!(
        dead.state == pb::ItemState::Dead as i32 && dead.last_error.contains("failing on purpose"),
        "{dead:?}"
    );
    names_field(
        q.requeue_dead_letters(pb::RequeueDeadLettersRequest {
            items: vec![],
            all: false,
        })
        .await,
        "items",
    )?;
    // With no worker left, the requeued item stays where requeue put it.
    worker.kill9();
    let n = q
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            items: vec![iref("", "orphan")],
            all: false,
        })
        .await?
        .into_inner();
    ensure!(n.requeued == 1, "{n:?}");
    let back = state(&mut q, "", "orphan")
        .await?
        .context("requeued orphan")?;
    ensure!(
        back.state == pb::ItemState::Pending as i32 && back.attempts == 0,
        "{back:?}"
    );
    Ok(())
}

/// A producer token limited to some handlers (`handlers=` in its line), the way its
/// holder might try to reach past it: it enqueues items of its handlers only (a
/// batch naming another is refused whole, naming the item's field, and nothing is
/// stored); another handler's item is not found to it for get, cancel, reschedule
/// and requeue, over gRPC and the JSON API alike, and stays as it was; a requeue of
/// every dead letter is refused; the unscoped producer token still reaches all.
#[tokio::test]
async fn a_producer_token_scoped_to_handlers_touches_only_their_items() -> Result<()> {
    const SCOPED: &str = "scoped-producer-token-0123456789";
    let c = Cluster::start(0).await?;
    std::fs::write(
        c.dir.path().join("producer.token"),
        format!("{PRODUCER_TOKEN}\n{SCOPED} coupons handlers=coupon.remind,coupon.expire\n"),
    )?;
    let api = format!("http://127.0.0.1:{}", c.http_ports[0]);
    wait_until(
        "the coordinator to take the scoped token",
        Duration::from_secs(20),
        || async {
            let url = format!("{api}/api/queues/item?id=nothing");
            matches!(http("GET", &url, Some(SCOPED), None).await, Ok((404, _)))
        },
    )
    .await?;
    let mut all = client(&c, PRODUCER_TOKEN).await?;
    let mut scoped = client(&c, SCOPED).await?;
    let later = |id: &str, handler: &str| pb::NewItem {
        in_ms: 3_600_000,
        ..item(id, "", handler)
    };
    // Another team's item, enqueued by the unscoped token.
    all.enqueue(pb::EnqueueRequest {
        items: vec![later("sms-1", "sms.send")],
    })
    .await?;

    // Its own handlers: fine.
    let out = scoped
        .enqueue(pb::EnqueueRequest {
            items: vec![later("c-1", "coupon.remind"), later("c-2", "coupon.expire")],
        })
        .await?
        .into_inner();
    ensure!(out.outcomes.len() == 2, "{out:?}");
    // A batch naming another handler: refused whole, naming the field.
    let e = scoped
        .enqueue(pb::EnqueueRequest {
            items: vec![later("c-3", "coupon.remind"), later("sms-2", "sms.send")],
        })
        .await
        .expect_err("a scoped token enqueued another handler's item");
    ensure!(
        e.code() == Code::PermissionDenied && e.message().contains("items[1].handler"),
        "{e:?}"
    );
    ensure!(
        state(&mut all, "", "c-3").await?.is_none(),
        "nothing of the batch is stored"
    );
    let (code, b) = http(
        "POST",
        &format!("{api}/api/queues/items"),
        Some(SCOPED),
        Some(json!({"items": [{"id": "sms-3", "handler": "sms.send", "in_ms": 3_600_000}]})),
    )
    .await?;
    ensure!(
        code == 403 && b["error"]["code"] == "permission_denied",
        "{code} {b}"
    );
    ensure!(state(&mut all, "", "sms-3").await?.is_none());

    // Another handler's item does not exist for it: get, reschedule, cancel,
    // requeue, over both edges.
    ensure!(
        state(&mut scoped, "", "c-1").await?.is_some(),
        "its own item"
    );
    ensure!(
        state(&mut scoped, "", "sms-1").await?.is_none(),
        "another's item"
    );
    let e = scoped
        .cancel_item(iref("", "sms-1"))
        .await
        .expect_err("cancelled another handler's item");
    ensure!(e.code() == Code::NotFound, "{e:?}");
    let e = scoped
        .reschedule_item(pb::RescheduleItemRequest {
            item: Some(iref("", "sms-1")),
            due_at_ms: 4_102_444_800_000,
        })
        .await
        .expect_err("rescheduled another handler's item");
    ensure!(e.code() == Code::NotFound, "{e:?}");
    for (method, path, body) in [
        ("GET", "/api/queues/item?id=sms-1".to_owned(), None),
        (
            "POST",
            "/api/queues/item/cancel".into(),
            Some(json!({"id": "sms-1"})),
        ),
        (
            "POST",
            "/api/queues/item/reschedule".into(),
            Some(json!({"id": "sms-1", "due_at_ms": 4_102_444_800_000_i64})),
        ),
    ] {
        let (code, b) = http(method, &format!("{api}{path}"), Some(SCOPED), body).await?;
        ensure!(code == 404, "{method} {path}: {code} {b}");
    }
    let e = scoped
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            items: vec![iref("", "sms-1")],
            all: false,
        })
        .await
        .expect_err("requeued another handler's item");
    ensure!(e.code() == Code::NotFound, "{e:?}");
    let e = scoped
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            items: vec![],
            all: true,
        })
        .await
        .expect_err("a scoped token requeued every dead letter");
    ensure!(e.code() == Code::PermissionDenied, "{e:?}");
    let sms = state(&mut all, "", "sms-1")
        .await?
        .context("the other team's item is still there")?;
    ensure!(
        sms.state == pb::ItemState::Pending as i32 && sms.due_at_ms > 0,
        "unchanged: {sms:?}"
    );
    // Its own: cancel works.
    scoped.cancel_item(iref("", "c-2")).await?;
    ensure!(
        state(&mut all, "", "c-2").await?.is_none(),
        "its own item cancelled"
    );
    Ok(())
}
