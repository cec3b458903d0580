//! Target `proto`: every protobuf message a coordinator decodes.
//!
//! One input is decoded as each of them: `WorkerMessage` (the worker gateway's
//! inbound stream), the admin requests (`CreateJobRequest`, `UpdateJobRequest`,
//! `JobRef`, `TriggerJobRequest`, `ListJobsRequest`, `ListRunsRequest`, `RunId`,
//! `ListWorkersRequest`), and the admin answers a follower decodes when it forwards
//! a call to the leader (`Job`, `Run`, `DeleteJobResponse`, `ListJobsResponse`,
//! `ListRunsResponse`, `ListWorkersResponse`, `WorkerInfo`), and the delay-queue
//! requests (`EnqueueRequest`, `ItemRef`, `RescheduleItemRequest`,
//! `ListDeadLettersRequest`, `RequeueDeadLettersRequest`). A decoded message must
//! re-encode to bytes of its `encoded_len` that decode to the same message. Jobs go
//! through `job_from_proto` / `job_view` and then the `schedule_json` target's checks
//! (round trips, validate, compile, next fire times); runs and workers through
//! `run_from_proto` / `worker_from_proto`; queue requests through `items_from_proto` /
//! `ref_from_proto`, whose accepted items must pass every item check. A chime
//! worker's delivery service decodes `SubscribeRequest`: each goes through the
//! one conversion (`delivery::wire`) into a real `Hub`, which must accept only valid
//! subscriptions, bound what it keeps (errors cut, retry delays capped), and answer
//! settlements and extensions of deliveries it never sent with a refusal.

use std::fmt::Debug;

use chime_coordinator::CoordError;
use chime_coordinator::grpc::queue::{items_from_proto, ref_from_proto};
use chime_coordinator::grpc::{
    job_from_proto, job_view, run_from_proto, run_to_proto, worker_from_proto,
};
use prost::Message;
use proto as pb;

use super::schedule_json::check_job;
use super::{bucket, coarse, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "proto",
    about: "gRPC messages a coordinator or a delivery service decodes: worker stream, admin, queue and subscriber requests, forwarded answers",
    run,
    dictionary,
};

/// Decodes `input` as `M`; checks the re-encoding.
fn decode<M: Message + Default + PartialEq + Debug>(input: &[u8], what: &str) -> Option<M> {
    let m = M::decode(input).ok()?;
    let bytes = m.encode_to_vec();
    assert_eq!(
        bytes.len(),
        m.encoded_len(),
        "{what}: encoded_len disagrees with the encoding"
    );
    match M::decode(bytes.as_slice()) {
        Ok(back) => assert_eq!(back, m, "{what} changed through encode/decode"),
        Err(e) => panic!("{what}: a re-encoded message does not decode: {e}"),
    }
    Some(m)
}

/// A job from the wire: conversion, the view clients print, then the job checks.
fn on_job(j: pb::Job) -> String {
    if let Err(e) = job_view(j.clone()) {
        assert!(
            matches!(e, CoordError::InvalidArgument { .. }),
            "job_view answered a non-argument error: {e}"
        );
    }
    match job_from_proto(j) {
        Ok((spec, version)) => format!("job {}", check_job(&spec, version)),
        Err(CoordError::InvalidArgument { field, reason }) => {
            format!("job refused {field} {}", coarse(&reason))
        }
        Err(e) => panic!("job_from_proto answered a non-argument error: {e}"),
    }
}

/// A run from the wire: the domain form, whose proto form converts back to itself.
fn on_run(r: pb::Run) {
    let domain = run_from_proto(r);
    let again = run_from_proto(run_to_proto(&domain));
    assert_eq!(again, domain, "a run changed through its proto form");
}

fn run(input: &[u8]) -> u64 {
    let mut decoded = 0usize;
    let mut worker = "none";
    if let Some(m) = decode::<pb::WorkerMessage>(input, "WorkerMessage") {
        decoded += 1;
        use pb::worker_message::Kind;
        worker = match m.kind {
            None => "empty",
            Some(Kind::Register(_)) => "register",
            Some(Kind::Heartbeat(_)) => "heartbeat",
            Some(Kind::RunStarted(_)) => "started",
            Some(Kind::RunLog(_)) => "log",
            Some(Kind::RunResult(r)) => match pb::RunStatus::try_from(r.status) {
                Ok(_) => "result",
                Err(_) => "result-unknown-status",
            },
            Some(Kind::Draining(_)) => "draining",
        };
    }
    let mut job = String::new();
    let created = decode::<pb::CreateJobRequest>(input, "CreateJobRequest").map(|r| r.job);
    let updated = decode::<pb::UpdateJobRequest>(input, "UpdateJobRequest").map(|r| r.job);
    // The two requests have the same wire form: check their job once.
    assert_eq!(
        created, updated,
        "CreateJobRequest and UpdateJobRequest disagree"
    );
    if let Some(j) = created {
        decoded += 1;
        if let Some(j) = j {
            job = on_job(j);
        }
    }
    if let Some(j) = decode::<pb::Job>(input, "Job") {
        decoded += 1;
        let seen = on_job(j);
        if job.is_empty() {
            job = seen;
        }
    }
    decoded += usize::from(decode::<pb::JobRef>(input, "JobRef").is_some());
    decoded += usize::from(decode::<pb::TriggerJobRequest>(input, "TriggerJobRequest").is_some());
    decoded += usize::from(decode::<pb::ListJobsRequest>(input, "ListJobsRequest").is_some());
    decoded += usize::from(decode::<pb::ListRunsRequest>(input, "ListRunsRequest").is_some());
    decoded += usize::from(decode::<pb::RunId>(input, "RunId").is_some());
    decoded += usize::from(decode::<pb::ListWorkersRequest>(input, "ListWorkersRequest").is_some());
    decoded += usize::from(decode::<pb::DeleteJobResponse>(input, "DeleteJobResponse").is_some());
    if let Some(r) = decode::<pb::Run>(input, "Run") {
        decoded += 1;
        on_run(r);
    }
    if let Some(l) = decode::<pb::ListRunsResponse>(input, "ListRunsResponse") {
        decoded += 1;
        l.runs.into_iter().for_each(on_run);
    }
    if let Some(l) = decode::<pb::ListJobsResponse>(input, "ListJobsResponse") {
        decoded += 1;
        for j in l.jobs {
            let _ = job_view(j);
        }
    }
    if let Some(l) = decode::<pb::ListWorkersResponse>(input, "ListWorkersResponse") {
        decoded += 1;
        for w in l.workers {
            let _ = worker_from_proto(w);
        }
    }
    if let Some(w) = decode::<pb::WorkerInfo>(input, "WorkerInfo") {
        decoded += 1;
        let _ = worker_from_proto(w);
    }
    let queue = queue_requests(input, &mut decoded);
    let delivery = match decode::<pb::SubscribeRequest>(input, "SubscribeRequest") {
        Some(m) => {
            decoded += 1;
            on_subscribe_request(m)
        }
        None => "none",
    };
    signal(&[worker, &job, queue, delivery, &bucket(decoded)])
}

/// One message of a subscriber's stream, into a real hub.
fn on_subscribe_request(m: pb::SubscribeRequest) -> &'static str {
    use chime_shared::Error;
    use chime_worker::delivery::{self, Hub, HubOptions, SubscribeSpec, Verdict, wire};
    use pb::subscribe_request::Kind;
    let hub = Hub::new(HubOptions {
        worker_id: "fuzz".into(),
        family: "default".into(),
        settle_timeout_ms: 30_000,
    });
    let valid = SubscribeSpec {
        handlers: vec!["h".into()],
        credit: 4,
        name: "fuzz".into(),
        settle_timeout_ms: 0,
    };
    let Ok((sub, _out)) = hub.subscribe(valid) else {
        panic!("a valid subscription was refused");
    };
    match m.kind {
        None => "sub-empty",
        Some(Kind::Subscribe(s)) => {
            let spec = wire::spec_from_proto(s, "peer".into());
            match hub.subscribe(spec.clone()) {
                Ok((other, _o)) => {
                    assert!(
                        spec.handlers
                            .iter()
                            .all(|h| chime_shared::limits::check_qualified("h", h).is_ok())
                            && (1..=delivery::MAX_CREDIT).contains(&spec.credit),
                        "accepted a bad subscription: {spec:?}"
                    );
                    for h in &spec.handlers {
                        assert!(hub.serves(h), "a subscribed handler is not served: {h}");
                    }
                    hub.unsubscribe(&other);
                    "subscribe-ok"
                }
                Err(Error::InvalidArgument { field, .. }) => {
                    assert!(field.starts_with("subscribe"), "refusal names {field}");
                    "subscribe-invalid"
                }
                Err(e) => panic!("subscribe failed with a non-input error: {e}"),
            }
        }
        Some(Kind::Settle(s)) => {
            let verdicts = wire::verdicts_from_proto(s);
            for (_, v) in &verdicts {
                if let Verdict::Fail {
                    error,
                    retry_after_ms,
                } = v
                {
                    assert!(error.len() <= delivery::MAX_ERROR_BYTES, "error kept uncut");
                    assert!(
                        retry_after_ms.is_none_or(|ms| ms <= delivery::MAX_RETRY_AFTER_MS),
                        "retry delay kept uncapped"
                    );
                }
            }
            let n = verdicts.len();
            let refused = hub.settle(&sub, verdicts);
            assert_eq!(refused.len(), n, "settled a delivery never sent");
            "settle"
        }
        Some(Kind::Extend(e)) => {
            let refused = sub.extend(&e.delivery_ids, e.extend_ms);
            assert_eq!(
                refused.len(),
                e.delivery_ids.len(),
                "extended a delivery never sent"
            );
            "extend"
        }
        Some(Kind::Credit(c)) => {
            let ok = hub.set_credit(&sub, c.credit).is_ok();
            assert_eq!(
                ok,
                (1..=delivery::MAX_CREDIT).contains(&c.credit),
                "credit {}",
                c.credit
            );
            if ok { "credit-ok" } else { "credit-invalid" }
        }
        Some(Kind::Drain(_)) => {
            hub.drain(&sub);
            assert!(!hub.serves("h"), "a draining subscriber still serves");
            "drain"
        }
    }
}

/// The store's clock in queue checks: a fixed instant, so runs replay.
const NOW_MS: i64 = 1_767_225_600_000;

/// The delay-queue requests: what the edge accepts must be what the stores accept.
fn queue_requests(input: &[u8], decoded: &mut usize) -> &'static str {
    let mut outcome = "none";
    if let Some(r) = decode::<pb::EnqueueRequest>(input, "EnqueueRequest") {
        *decoded += 1;
        let n = r.items.len();
        outcome = match items_from_proto(r, NOW_MS, None) {
            Ok(items) => {
                assert_eq!(items.len(), n, "an accepted batch lost or gained items");
                for it in &items {
                    if let Err(e) = it.validate() {
                        panic!("accepted an item the store refuses: {e}");
                    }
                }
                "enqueue-ok"
            }
            Err(CoordError::InvalidArgument { .. }) => "enqueue-invalid",
            Err(e) => panic!("enqueue conversion failed with a non-input error: {e}"),
        };
    }
    if let Some(r) = decode::<pb::ItemRef>(input, "ItemRef") {
        *decoded += 1;
        if let Ok(r) = ref_from_proto(Some(r), "item") {
            assert!(
                !r.id.is_empty() && !r.key.is_empty(),
                "an empty reference was accepted"
            );
        }
    }
    if let Some(r) = decode::<pb::RescheduleItemRequest>(input, "RescheduleItemRequest") {
        *decoded += 1;
        let _ = ref_from_proto(r.item, "item");
    }
    *decoded += usize::from(
        decode::<pb::ListDeadLettersRequest>(input, "ListDeadLettersRequest").is_some(),
    );
    if let Some(r) = decode::<pb::RequeueDeadLettersRequest>(input, "RequeueDeadLettersRequest") {
        *decoded += 1;
        for (i, item) in r.items.into_iter().enumerate() {
            let _ = ref_from_proto(Some(item), &format!("items[{i}]"));
        }
    }
    outcome
}

/// A varint, as the wire has it.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn dictionary() -> Vec<Vec<u8>> {
    let mut d = Vec::new();
    // Field keys of fields 1..=24 in the wire types chime's messages use (varint,
    // length-delimited), plus the unused fixed ones.
    for field in 1u64..=24 {
        for wire in [0u64, 1, 2, 5] {
            d.push(varint(field << 3 | wire));
        }
    }
    for v in [
        0u64,
        1,
        2,
        7,
        10,
        11,
        99,
        100,
        127,
        128,
        300,
        16_384,
        0x7fff_ffff,
        0xffff_ffff,
        0x1_0000_0000,
        253_402_300_799_999,
        8_210_266_876_799_999,
        i64::MAX as u64,
        i64::MIN as u64,
        u64::MAX,
    ] {
        d.push(varint(v));
    }
    // An over-long varint, and a length that runs past the end.
    d.push(vec![0x80; 11]);
    d.push(vec![0xff, 0xff, 0xff, 0xff, 0x0f]);
    for s in [
        "*/5 * * * * *",
        "0 0 2 * * *",
        "Europe/Paris",
        "Asia/Tokyo",
        "job",
        "h",
        "g",
        "\u{0}",
        "\u{1}",
    ] {
        let mut t = varint(s.len() as u64);
        t.extend_from_slice(s.as_bytes());
        d.push(t);
    }
    // Invalid UTF-8 inside a string field.
    d.push(vec![0x02, 0xc3, 0x28]);
    d
}

/// Seeds for [`crate::seeds`]: one encoded message of every decoded type (several
/// for jobs and worker messages).
pub fn seed_messages() -> Vec<(String, Vec<u8>)> {
    use pb::worker_message::Kind as W;
    let rr = |run_id: &str, shard_index, attempt| pb::RunRef {
        run_id: run_id.into(),
        shard_index,
        attempt,
    };
    // Zero bytes: every message type, all fields at their defaults.
    let mut out: Vec<(String, Vec<u8>)> = vec![("empty".into(), Vec::new())];
    {
        use pb::subscribe_request::Kind as S;
        let sub = |k: S| pb::SubscribeRequest { kind: Some(k) }.encode_to_vec();
        out.push((
            "subscriber-subscribe".into(),
            sub(S::Subscribe(pb::Subscribe {
                handlers: vec!["coupon.remind".into(), "push".into()],
                credit: 64,
                subscriber: "app-1:42".into(),
                settle_timeout_ms: 30_000,
            })),
        ));
        out.push((
            "subscriber-settle".into(),
            sub(S::Settle(pb::Settle {
                acks: vec![1, 2, 3],
                failures: vec![pb::Failure {
                    delivery_id: 4,
                    error: "provider answered 503".into(),
                    retry_after_ms: Some(200),
                }],
                releases: vec![5],
            })),
        ));
        out.push((
            "subscriber-extend".into(),
            sub(S::Extend(pb::Extend {
                delivery_ids: vec![7, 8],
                extend_ms: 60_000,
            })),
        ));
        out.push((
            "subscriber-credit".into(),
            sub(S::Credit(pb::Credit { credit: 128 })),
        ));
        out.push(("subscriber-drain".into(), sub(S::Drain(pb::Drain {}))));
    }
    let worker = |k: W| pb::WorkerMessage { kind: Some(k) }.encode_to_vec();
    out.push((
        "worker-register".into(),
        worker(W::Register(pb::Register {
            worker_id: "w1".into(),
            group: "g".into(),
            handlers: vec!["h".into(), "report".into()],
            capacity: 4,
            labels: [("zone".to_owned(), "eu-1".to_owned())]
                .into_iter()
                .collect(),
            running: vec![rr("r-1", 0, 1)],
        })),
    ));
    out.push((
        "worker-heartbeat".into(),
        worker(W::Heartbeat(pb::Heartbeat {
            running: vec![rr("r-1", 0, 1), rr("r-2", 3, 2)],
        })),
    ));
    out.push((
        "worker-started".into(),
        worker(W::RunStarted(pb::RunStarted {
            run: Some(rr("r-1", 0, 1)),
            started_at_ms: 1_700_000_000_000,
        })),
    ));
    out.push((
        "worker-log".into(),
        worker(W::RunLog(pb::RunLog {
            run: Some(rr("r-1", 0, 1)),
            line: "working".into(),
            at_ms: 1_700_000_000_001,
        })),
    ));
    for (name, status) in [
        ("succeeded", pb::RunStatus::Succeeded),
        ("failed", pb::RunStatus::Failed),
        ("cancelled", pb::RunStatus::Cancelled),
    ] {
        out.push((
            format!("worker-result-{name}"),
            worker(W::RunResult(pb::RunResult {
                run: Some(rr("r-1", 0, 1)),
                status: status as i32,
                output: "ok".into(),
                error: if name == "failed" {
                    "boom".into()
                } else {
                    String::new()
                },
                started_at_ms: 1_700_000_000_000,
                finished_at_ms: 1_700_000_001_000,
            })),
        ));
    }
    out.push((
        "worker-draining".into(),
        worker(W::Draining(pb::Draining {})),
    ));

    let job = |name: &str, kind: pb::schedule::Kind| pb::Job {
        name: name.into(),
        group: "g".into(),
        handler: "h".into(),
        schedule: Some(pb::Schedule { kind: Some(kind) }),
        ..Default::default()
    };
    let schedules = [
        (
            "cron",
            pb::schedule::Kind::Cron(pb::CronSchedule {
                expr: "*/5 * * * * *".into(),
                time_zone: String::new(),
            }),
        ),
        (
            "cron-paris",
            pb::schedule::Kind::Cron(pb::CronSchedule {
                expr: "0 30 2 * * *".into(),
                time_zone: "Europe/Paris".into(),
            }),
        ),
        (
            "fixed-rate",
            pb::schedule::Kind::FixedRate(pb::FixedRate { every_ms: 1_000 }),
        ),
        (
            "fixed-delay",
            pb::schedule::Kind::FixedDelay(pb::FixedDelay { delay_ms: 5_000 }),
        ),
        (
            "once",
            pb::schedule::Kind::Once(pb::Once {
                at_ms: 1_800_000_000_000,
            }),
        ),
        ("manual", pb::schedule::Kind::Manual(pb::Manual {})),
    ];
    for (name, kind) in schedules {
        out.push((
            format!("create-{name}"),
            pb::CreateJobRequest {
                job: Some(job(name, kind.clone())),
            }
            .encode_to_vec(),
        ));
        out.push((format!("job-{name}"), job(name, kind).encode_to_vec()));
    }
    let full = pb::Job {
        name: "nightly".into(),
        group: "batch".into(),
        handler: "report".into(),
        schedule: Some(pb::Schedule {
            kind: Some(pb::schedule::Kind::Cron(pb::CronSchedule {
                expr: "0 0 2 * * *".into(),
                time_zone: "America/New_York".into(),
            })),
        }),
        routing: pb::Routing::ShardingBroadcast as i32,
        shard_count: 2,
        shard_params: vec!["a".into(), "b".into()],
        hash_param: String::new(),
        params: "{\"x\":1}".into(),
        overlap: pb::Overlap::BufferOne as i32,
        misfire: pb::Misfire::FireAll as i32,
        catch_up_window_ms: 3_600_000,
        timeout_ms: 60_000,
        retries: 3,
        retry_backoff_ms: 1_000,
        children: vec!["cleanup".into()],
        paused: true,
        start_at_ms: 1_700_000_000_000,
        end_at_ms: 1_900_000_000_000,
        jitter_ms: 500,
        next_fire_ms: 1_767_232_800_000,
        last_fire_ms: 1_767_146_400_000,
        version: 42,
        created_at_ms: 1_690_000_000_000,
        workflow_json: String::new(),
    };
    let flow = pb::Job {
        name: "pipeline".into(),
        group: "batch".into(),
        handler: String::new(),
        routing: pb::Routing::RoundRobin as i32,
        shard_count: 0,
        shard_params: vec![],
        children: vec![],
        paused: false,
        workflow_json: r#"{"nodes":[{"name":"count","handler":"log"},{"name":"push","handler":"log","after":[{"node":"count"}]},{"name":"report","handler":"log","after":[{"node":"push","when":"always"}]}]}"#.into(),
        ..full.clone()
    };
    out.push((
        "create-workflow".into(),
        pb::CreateJobRequest { job: Some(flow) }.encode_to_vec(),
    ));
    let item = |id: &str, key: &str, due_at_ms, in_ms| pb::NewItem {
        id: id.into(),
        key: key.into(),
        handler: "push".into(),
        due_at_ms,
        in_ms,
        payload: b"{\"coupon\":7}".to_vec(),
        max_attempts: 0,
        merge_key: String::new(),
        traceparent: String::new(),
    };
    out.push((
        "enqueue".into(),
        pb::EnqueueRequest {
            items: vec![
                item("r-1", "user-42", 1_767_225_660_000, 0),
                pb::NewItem {
                    merge_key: "coupon".into(),
                    max_attempts: 5,
                    ..item("r-2", "user-42", 0, 60_000)
                },
                item("r-3", "", 0, 0),
            ],
        }
        .encode_to_vec(),
    ));
    out.push((
        "item-ref".into(),
        pb::ItemRef {
            key: "user-42".into(),
            id: "r-1".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "reschedule".into(),
        pb::RescheduleItemRequest {
            item: Some(pb::ItemRef {
                key: "user-42".into(),
                id: "r-1".into(),
            }),
            due_at_ms: 1_767_225_700_000,
        }
        .encode_to_vec(),
    ));
    out.push((
        "requeue".into(),
        pb::RequeueDeadLettersRequest {
            items: vec![pb::ItemRef {
                key: String::new(),
                id: "r-3".into(),
            }],
            all: false,
        }
        .encode_to_vec(),
    ));
    out.push((
        "update-full".into(),
        pb::UpdateJobRequest {
            job: Some(full.clone()),
        }
        .encode_to_vec(),
    ));
    out.push(("job-full".into(), full.clone().encode_to_vec()));
    out.push((
        "job-ref".into(),
        pb::JobRef {
            name: "nightly".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "trigger".into(),
        pb::TriggerJobRequest {
            name: "nightly".into(),
            params: "{\"y\":2}".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "list-jobs".into(),
        pb::ListJobsRequest {
            group: "g".into(),
            namespace: "team-a".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "list-runs".into(),
        pb::ListRunsRequest {
            job: "nightly".into(),
            limit: 20,
            namespace: "team-a".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "run-id".into(),
        pb::RunId {
            run_id: "r-1".into(),
        }
        .encode_to_vec(),
    ));
    out.push((
        "list-workers".into(),
        pb::ListWorkersRequest {
            group: "g".into(),
            namespace: String::new(),
        }
        .encode_to_vec(),
    ));
    let run = pb::Run {
        run_id: "r-1".into(),
        fire_id: "nightly@1767232800000".into(),
        job: "nightly".into(),
        cause: "scheduled".into(),
        scheduled_at_ms: 1_767_232_800_000,
        fired_at_ms: 1_767_232_800_010,
        finished_at_ms: 1_767_232_860_000,
        state: pb::RunState::Succeeded as i32,
        params: "{\"x\":1}".into(),
        shards: vec![pb::Shard {
            index: 0,
            total: 2,
            worker_id: "w1".into(),
            attempt: 1,
            state: pb::RunState::Succeeded as i32,
            started_at_ms: 1_767_232_800_020,
            finished_at_ms: 1_767_232_860_000,
            output: "done".into(),
            error: String::new(),
            log_tail: vec!["line 1".into(), "line 2".into()],
            shard_params: "a".into(),
            failures: 0,
        }],
        parent_run_id: String::new(),
        note: String::new(),
        fence: 7,
        nodes_json: String::new(),
    };
    out.push(("run".into(), run.encode_to_vec()));
    out.push((
        "list-runs-response".into(),
        pb::ListRunsResponse { runs: vec![run] }.encode_to_vec(),
    ));
    out.push((
        "list-jobs-response".into(),
        pb::ListJobsResponse { jobs: vec![full] }.encode_to_vec(),
    ));
    let info = pb::WorkerInfo {
        worker_id: "w1".into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 4,
        running: 1,
        labels: [("zone".to_owned(), "eu-1".to_owned())]
            .into_iter()
            .collect(),
        connected_at_ms: 1_767_232_000_000,
        last_heartbeat_ms: 1_767_232_800_000,
        draining: false,
    };
    out.push(("worker-info".into(), info.encode_to_vec()));
    out.push((
        "list-workers-response".into(),
        pb::ListWorkersResponse {
            workers: vec![info],
            leader: "10.0.0.1:7000".into(),
        }
        .encode_to_vec(),
    ));
    out
}
