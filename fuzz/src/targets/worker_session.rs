//! Target `worker_session`: what the coordinator's engine does with a worker's
//! inbound stream, past protobuf decoding (which the `proto` target covers).
//!
//! Each execution starts a fresh engine (memory job and run stores, a manual clock)
//! on a current-thread tokio runtime, puts two manual jobs (one plain, one sharded
//! three ways with retries and a timeout), registers worker `w1`, triggers both and
//! collects the shard assignments the engine sends. Then it replays the input as the
//! gateway would:
//!
//! ```text
//! input    = [ "{" job-json 0xff ] message*
//! message  = length-delimited WorkerMessage   (at most 64)
//! ```
//!
//! An optional leading job (console JSON, `http::job_in`) that passes validation is
//! put into the engine too, with whatever schedule it has. A `RunRef` whose run id is
//! `$<c>` is rewritten to assignment `c % n` (its shard and attempt too, when the
//! message leaves them 0), so that mutated messages hit real runs. The manual clock
//! advances 700 ms after each message (deadlines, retries and dead-worker sweeps come
//! due), and a minute at the end. The engine task must not die (a panic inside it is
//! reported as this execution's panic), and every call must be answered.

use std::sync::Arc;
use std::time::Duration;

use chime_coordinator::engine::workers_api::{ToWorker, WorkerHello};
use chime_coordinator::engine::{self, EngineOptions, ShardKey};
use chime_coordinator::grpc::outcome_from_proto;
use chime_coordinator::http::job_in;
use chime_coordinator::model::{JobSpec, Routing, Schedule};
use chime_coordinator::store::{JobStore, MemoryRunStore, Retention, StoredJob};
use chime_shared::clock::{Clock, ManualClock};
use chime_shared::config::source::MemorySource;
use chime_shared::queue::fnv1a64;
use pb::worker_message::Kind as In;
use prost::Message;
use proto as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{bucket, job_with, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "worker_session",
    about: "a worker's message stream driven into a real engine (memory stores, manual clock)",
    run,
    dictionary,
};

/// Most messages replayed per execution.
const MAX_MESSAGES: usize = 64;
/// The clock's start: 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
/// Clock steps: per message, and at the end.
const STEP_MS: i64 = 700;
const END_MS: i64 = 60_000;

/// Splits an input into the optional job JSON and the message bytes.
pub fn split(input: &[u8]) -> (Option<&[u8]>, &[u8]) {
    if input.first() == Some(&b'{')
        && let Some(i) = input.iter().position(|b| *b == 0xff)
    {
        return (Some(&input[..i]), &input[i + 1..]);
    }
    (None, input)
}

/// Decodes the length-delimited messages of an input (stops at the first that does
/// not decode).
pub fn messages(mut bytes: &[u8]) -> Vec<pb::WorkerMessage> {
    let mut out = Vec::new();
    while !bytes.is_empty() && out.len() < MAX_MESSAGES {
        match pb::WorkerMessage::decode_length_delimited(&mut bytes) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    out
}

fn base_jobs() -> Vec<JobSpec> {
    let plain = JobSpec {
        name: "plain".into(),
        retries: 1,
        timeout_ms: 1_000,
        ..job_with(Schedule::Manual)
    };
    let sharded = JobSpec {
        name: "sharded".into(),
        routing: Routing::ShardingBroadcast,
        shard_count: 3,
        shard_params: vec!["a".into(), "b".into(), "c".into()],
        retries: 2,
        retry_backoff_ms: 500,
        timeout_ms: 2_000,
        children: vec!["plain".into()],
        ..job_with(Schedule::Manual)
    };
    // Fires every second whatever the input does: its last fire at the end shows
    // that the engine's timers still run (no worker runs its handler).
    let canary = JobSpec {
        name: "canary".into(),
        handler: "canary".into(),
        created_at_ms: T0,
        ..job_with(Schedule::FixedRate { every_ms: 1_000 })
    };
    vec![plain, sharded, canary]
}

fn hello(worker_id: &str) -> WorkerHello {
    WorkerHello {
        worker_id: worker_id.into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 4,
        labels: Default::default(),
        running: Vec::new(),
    }
}

/// Rewrites a `$<c>` run ref to a known assignment.
fn resolve(r: Option<pb::RunRef>, known: &[ShardKey]) -> Option<ShardKey> {
    let r = r?;
    let mut k = ShardKey {
        run_id: r.run_id,
        shard: r.shard_index,
        attempt: r.attempt,
    };
    if let Some(c) = k.run_id.strip_prefix('$')
        && !known.is_empty()
    {
        let i = c.bytes().next().map_or(0, usize::from) % known.len();
        let real = &known[i];
        k.run_id = real.run_id.clone();
        if k.shard == 0 && k.attempt == 0 {
            k.shard = real.shard;
            k.attempt = real.attempt;
        }
    }
    Some(k)
}

fn keys(r: Vec<pb::RunRef>, known: &[ShardKey]) -> Vec<ShardKey> {
    r.into_iter()
        .filter_map(|r| resolve(Some(r), known))
        .collect()
}

/// Collects what the engine sent the worker so far.
fn drain(rx: &mut mpsc::Receiver<ToWorker>, known: &mut Vec<ShardKey>, sent: &mut usize) {
    while let Ok(m) = rx.try_recv() {
        *sent += 1;
        if let ToWorker::Assign(a) = m
            && known.len() < 64
        {
            known.push(a.key);
        }
    }
}

/// What one session did, for the signal.
struct Seen {
    messages: usize,
    sent: usize,
    extra_job: &'static str,
    refused: usize,
}

/// Starts an engine, drives it with `input`, and checks that it survived.
async fn session(input: &[u8], stop: &CancellationToken) -> Result<Seen, String> {
    let clock = ManualClock::new(T0);
    let jobs = JobStore::new(Arc::new(MemorySource::default()));
    let (handle, task) = engine::start(
        jobs,
        Arc::new(MemoryRunStore::new(Retention::default())),
        Arc::new(clock.clone()),
        EngineOptions::default(),
        engine::Term {
            fence: 1,
            handover: None,
            warm: None,
        },
        CancellationToken::new(),
        stop.clone(),
    )
    .await
    .map_err(|e| format!("the engine does not start: {e}"))?;
    let out = drive(input, &handle, &clock, &task).await;
    if task.is_finished() {
        // The engine task died: a panic inside it is re-raised here, where the fuzzer
        // catches it (the panic hook already recorded its message and location).
        return match task.await {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ => Err("the engine task ended".into()),
        };
    }
    out
}

/// Replays `input` into a running engine (see the module doc).
async fn drive(
    input: &[u8],
    handle: &engine::EngineHandle,
    clock: &ManualClock,
    task: &tokio::task::JoinHandle<()>,
) -> Result<Seen, String> {
    let (job_json, rest) = split(input);
    let fail = |what: &str, e: chime_coordinator::CoordError| format!("{what}: {e}");
    for spec in base_jobs() {
        handle
            .job_put(StoredJob { spec, version: 1 })
            .await
            .map_err(|e| fail("job_put", e))?;
    }
    let mut extra_job = "none";
    if let Some(json) = job_json {
        extra_job = "refused";
        if let Ok((mut spec, _)) = job_in(json)
            // Under its own name: it must not replace the jobs the checks rely on.
            && {
                spec.name = "extra".into();
                spec.validate().is_ok()
            }
        {
            spec.created_at_ms = T0;
            extra_job = "put";
            handle
                .job_put(StoredJob { spec, version: 2 })
                .await
                .map_err(|e| fail("job_put", e))?;
        }
    }
    let (tx, mut rx) = mpsc::channel::<ToWorker>(4096);
    let mut worker = "w1".to_owned();
    let mut sess = handle
        .register(hello(&worker), tx)
        .await
        .map_err(|e| fail("register", e))?
        .session;
    for name in ["plain", "sharded"] {
        handle
            .trigger(name, None)
            .await
            .map_err(|e| fail("trigger", e))?;
    }
    let mut known = Vec::new();
    let mut sent = 0;
    let mut refused = 0;
    // A barrier: the engine answers in order, so everything before it is done.
    handle.workers().await.map_err(|e| fail("workers", e))?;
    drain(&mut rx, &mut known, &mut sent);

    let msgs = messages(rest);
    let n = msgs.len();
    for m in msgs {
        let r = match m.kind {
            Some(In::Register(reg)) => {
                // A new session, as when the worker reconnects (the gateway takes the
                // first message of a stream as its Register).
                let hello = WorkerHello {
                    worker_id: reg.worker_id,
                    group: reg.group,
                    handlers: reg.handlers,
                    capacity: reg.capacity.max(1),
                    labels: reg.labels.into_iter().collect(),
                    running: keys(reg.running, &known),
                };
                let (tx, new_rx) = mpsc::channel::<ToWorker>(4096);
                let id = hello.worker_id.clone();
                match handle.register(hello, tx).await {
                    Ok(a) => {
                        worker = id;
                        sess = a.session;
                        rx = new_rx;
                        Ok(())
                    }
                    Err(e) => {
                        refused += 1;
                        // A refused registration answers the caller; the engine lives.
                        handle.workers().await.map(|_| ()).map_err(|_| e)
                    }
                }
            }
            Some(In::Heartbeat(h)) => {
                handle
                    .heartbeat(&worker, sess, keys(h.running, &known))
                    .await
            }
            Some(In::RunStarted(s)) => match resolve(s.run, &known) {
                Some(k) => handle.started(&worker, sess, k, s.started_at_ms).await,
                None => Ok(()),
            },
            Some(In::RunLog(l)) => match resolve(l.run, &known) {
                Some(k) => handle.log(k, l.line).await,
                None => Ok(()),
            },
            Some(In::RunResult(r)) => {
                // The gateway's own mapping of a status.
                let (run, outcome) = outcome_from_proto(r);
                match resolve(run, &known) {
                    Some(k) => handle.result(&worker, sess, k, outcome).await,
                    None => Ok(()),
                }
            }
            Some(In::Draining(_)) => handle.draining(&worker, sess).await,
            None => Ok(()),
        };
        r.map_err(|e| fail("a worker message", e))?;
        clock.advance(STEP_MS);
        handle.workers().await.map_err(|e| fail("workers", e))?;
        drain(&mut rx, &mut known, &mut sent);
        if task.is_finished() {
            break;
        }
    }
    handle
        .closed(&worker, sess)
        .await
        .map_err(|e| fail("closed", e))?;
    clock.advance(END_MS);
    handle.workers().await.map_err(|e| fail("workers", e))?;
    // The engine sleeps on tokio's clock until its next timer and then reads the
    // manual one; everything is due by now, but only a turn of tokio's timer driver
    // (a real millisecond) wakes it. Then the canary must have fired.
    let mut fired = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The engine's timer woke in the same turn of the driver: let it run before
        // asking, since it serves calls before timers and would answer first.
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        let states = handle.states().await.map_err(|e| fail("states", e))?;
        fired = states.get("canary").and_then(|c| c.last_fire_ms);
        if fired.is_some() {
            break;
        }
    }
    if fired.is_none() {
        return Err(format!(
            "the engine's timers stalled: job canary (fixed rate, every 1 s) never fired in {} s",
            (clock.now_ms() - T0) / 1_000
        ));
    }
    for k in known.iter().take(4) {
        match handle.kill(&k.run_id).await {
            Ok(_) | Err(chime_coordinator::CoordError::NotFound(_)) => {}
            Err(e) => return Err(fail("kill", e)),
        }
    }
    handle.workers().await.map_err(|e| fail("workers", e))?;
    Ok(Seen {
        messages: n,
        sent,
        extra_job,
        refused,
    })
}

fn run(input: &[u8]) -> u64 {
    // The engine draws jitter, routing and run ids from fastrand's thread RNG: seed it
    // from the input so an input replays the same way.
    fastrand::seed(fnv1a64(input));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a tokio runtime: {e}"),
    };
    let stop = CancellationToken::new();
    let out = rt.block_on(async {
        // Every call is answered at once; a call not answered in 5 s means the engine
        // is stuck.
        tokio::time::timeout(Duration::from_secs(5), session(input, &stop)).await
    });
    stop.cancel();
    drop(rt);
    match out {
        Err(_) => panic!("the engine did not answer within 5 s"),
        Ok(Err(e)) => panic!("{e}"),
        Ok(Ok(s)) => signal(&[
            &bucket(s.messages),
            &bucket(s.sent),
            s.extra_job,
            &bucket(s.refused),
        ]),
    }
}

fn dictionary() -> Vec<Vec<u8>> {
    let mut d: Vec<Vec<u8>> = ["$\u{0}", "$\u{1}", "$\u{2}", "$\u{3}", "w1", "w2", "g", "h"]
        .iter()
        .map(|s| {
            let mut t = vec![s.len() as u8];
            t.extend_from_slice(s.as_bytes());
            t
        })
        .collect();
    d.push(vec![0xff]);
    for m in seed_messages() {
        d.push(m.encode_length_delimited_to_vec());
    }
    d
}

fn rr(c: u8, shard_index: u32, attempt: u32) -> Option<pb::RunRef> {
    Some(pb::RunRef {
        run_id: format!("${}", char::from(c)),
        shard_index,
        attempt,
    })
}

/// One message of every kind, aimed at assignment 0 or 1.
pub fn seed_messages() -> Vec<pb::WorkerMessage> {
    let m = |k: In| pb::WorkerMessage { kind: Some(k) };
    let result = |c, status: pb::RunStatus, error: &str| {
        m(In::RunResult(pb::RunResult {
            run: rr(c, 0, 0),
            status: status as i32,
            output: "out".into(),
            error: error.into(),
            started_at_ms: T0,
            finished_at_ms: T0 + 10,
        }))
    };
    vec![
        m(In::RunStarted(pb::RunStarted {
            run: rr(0, 0, 0),
            started_at_ms: T0,
        })),
        m(In::RunLog(pb::RunLog {
            run: rr(0, 0, 0),
            line: "working".into(),
            at_ms: T0,
        })),
        m(In::Heartbeat(pb::Heartbeat {
            running: vec![
                rr(0, 0, 0).unwrap_or_default(),
                rr(1, 0, 0).unwrap_or_default(),
            ],
        })),
        result(0, pb::RunStatus::Succeeded, ""),
        result(1, pb::RunStatus::Failed, "boom"),
        result(2, pb::RunStatus::Cancelled, "draining"),
        m(In::Draining(pb::Draining {})),
        m(In::Register(pb::Register {
            worker_id: "w1".into(),
            group: "g".into(),
            handlers: vec!["h".into()],
            capacity: 2,
            labels: Default::default(),
            running: vec![rr(1, 0, 0).unwrap_or_default()],
        })),
    ]
}

/// Seeds for [`crate::seeds`]: message sequences (and one with a scheduled job).
pub fn seed_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let enc = |ms: &[pb::WorkerMessage]| -> Vec<u8> {
        ms.iter()
            .flat_map(|m| m.encode_length_delimited_to_vec())
            .collect()
    };
    let all = seed_messages();
    let [
        started,
        log,
        beat,
        ok,
        failed,
        cancelled,
        draining,
        register,
    ] = &all[..]
    else {
        return Vec::new();
    };
    let mut with_job =
        br#"{"name":"tick","group":"g","handler":"h","schedule":{"kind":"fixed_rate","every_ms":1000},"timeout_ms":500,"retries":1}"#
            .to_vec();
    with_job.push(0xff);
    with_job.extend(enc(&[beat.clone(), beat.clone(), ok.clone()]));
    vec![
        ("nothing", Vec::new()),
        (
            "happy-path",
            enc(&[started.clone(), log.clone(), beat.clone(), ok.clone()]),
        ),
        (
            "fail-and-retry",
            enc(&[started.clone(), failed.clone(), beat.clone(), beat.clone()]),
        ),
        ("hand-back", enc(&[draining.clone(), cancelled.clone()])),
        (
            "reconnect",
            enc(&[register.clone(), beat.clone(), ok.clone(), failed.clone()]),
        ),
        ("silent", enc(std::slice::from_ref(log))),
        ("every-kind", enc(&all)),
        ("scheduled-job", with_job),
    ]
}
