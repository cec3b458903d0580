//! Unit tests of the engine's core on virtual time, without servers: every promise
//! of the engine as a test of the pure machine (with the memory run store behind
//! its requests). The structural invariants (`testkit::check`) and the capacity
//! check run after every step of every test.

use std::collections::{BTreeMap, BTreeSet};

use super::machine::{Answer, Effect, Input, Machine};
use super::testkit::{Rig, T0, opts, ready};
use super::workers::{EndReason, ToWorker, WorkerHello};
use super::{ShardKey, ShardOutcome};
use crate::error::CoordError;
use crate::model::{JobSpec, Misfire, Overlap, Routing, RunRecord, RunState, Schedule};
use crate::store::{FireRecord, MemoryRunStore, Retention, RunStore};

fn job(name: &str, schedule: Schedule) -> JobSpec {
    let mut j = JobSpec::new(name, "g", "h", schedule);
    j.created_at_ms = T0;
    j
}

fn every_second(name: &str) -> JobSpec {
    job(
        name,
        Schedule::Cron {
            expr: "* * * * * *".into(),
            time_zone: String::new(),
        },
    )
}

fn manual(name: &str) -> JobSpec {
    job(name, Schedule::Manual)
}

fn once(name: &str, at: i64) -> JobSpec {
    job(name, Schedule::Once { at_ms: at })
}

fn fid(job: &str, at: i64) -> String {
    format!("{job}@{at}")
}

/// Records `fire_id` of `job` at `at` in `store` as another leader would.
fn record_elsewhere(store: &MemoryRunStore, fence: i64, job: &str, at: i64, state: RunState) {
    let run = RunRecord {
        run_id: fid(job, at),
        fire_id: fid(job, at),
        job: job.into(),
        cause: "scheduled".into(),
        scheduled_at_ms: at,
        fired_at_ms: at,
        finished_at_ms: at,
        state,
        params: String::new(),
        shards: Vec::new(),
        parent_run_id: String::new(),
        note: String::new(),
        fence,
        nodes: Vec::new(),
    };
    let fires = [FireRecord {
        fire_id: fid(job, at),
        job: job.into(),
        at,
        run,
    }];
    ready(store.record_fires(fence, &fires)).unwrap();
}

#[test]
fn nothing_goes_out_before_its_instant_and_each_fire_id_once() {
    let mut r = Rig::new(opts());
    let mut jittered = every_second("jittered");
    jittered.jitter_ms = 400;
    let mut rate = job("rate", Schedule::FixedRate { every_ms: 700 });
    rate.created_at_ms = T0 + 3;
    r.start(vec![every_second("cron"), jittered, rate]);
    r.join("w1", 100);
    // Recorded ahead, not sent: the tick of T0 + 1 s is in the store at + 760 ms.
    let cron_sent = |r: &Rig| -> Vec<i64> {
        r.assigns("w1")
            .into_iter()
            .filter(|(_, a)| a.job == "cron")
            .map(|(at, _)| at)
            .collect()
    };
    r.advance(760);
    assert!(r.stored(&fid("cron", T0 + 1_000)).is_some());
    assert!(cron_sent(&r).is_empty());
    r.advance(240);
    assert_eq!(cron_sent(&r), vec![T0 + 1_000]);
    for _ in 0..20 {
        r.live_for(1_000);
        r.succeed_all();
    }
    let all = r.all_assigns();
    let mut ids = BTreeSet::new();
    for (at, _, a) in &all {
        assert!(*at >= a.scheduled_at_ms, "{a:?} sent at {at}");
        assert!(ids.insert(a.fire_id.clone()), "{} sent twice", a.fire_id);
        if a.job == "cron" {
            assert_eq!(
                *at, a.scheduled_at_ms,
                "prepared fires go out at the instant"
            );
        }
    }
    for j in ["cron", "jittered", "rate"] {
        assert!(
            all.iter().filter(|(_, _, a)| a.job == j).count() >= 19,
            "{j}"
        );
    }
}

#[test]
fn a_fire_recorded_by_another_leader_is_not_sent() {
    let mut r = Rig::new(opts());
    r.start(vec![every_second("tick")]);
    r.join("w1", 10);
    // Another coordinator (same fence: say a restarted single coordinator)
    // records the tick of T0 + 2 s before this one prepares it.
    record_elsewhere(&r.store, 1, "tick", T0 + 2_000, RunState::Succeeded);
    r.live_for(3_000);
    let ids: Vec<String> = r
        .assigns("w1")
        .into_iter()
        .map(|(_, a)| a.fire_id)
        .collect();
    assert_eq!(ids, vec![fid("tick", T0 + 1_000), fid("tick", T0 + 3_000)]);
}

/// A job every second whose runs never end (nobody reports), under `overlap`.
fn overlapping(overlap: Overlap) -> Rig {
    let mut r = Rig::new(opts());
    let mut j = every_second("o");
    j.overlap = overlap;
    r.start(vec![j]);
    r.join("w1", 10);
    r
}

#[test]
fn overlap_allow_runs_both() {
    let mut r = overlapping(Overlap::Allow);
    r.live_for(2_000);
    assert_eq!(r.assigns("w1").len(), 2);
}

#[test]
fn overlap_skip_records_the_later_fire_skipped() {
    let mut r = overlapping(Overlap::Skip);
    r.live_for(2_000);
    assert_eq!(r.assigns("w1").len(), 1);
    let skipped = r.stored(&fid("o", T0 + 2_000)).unwrap();
    assert_eq!(skipped.state, RunState::Skipped);
    assert!(skipped.note.contains("still going"), "{skipped:?}");
}

#[test]
fn overlap_buffer_one_keeps_one_and_starts_it_when_the_run_ends() {
    let mut r = overlapping(Overlap::BufferOne);
    r.live_for(3_000);
    assert_eq!(r.assigns("w1").len(), 1);
    assert_eq!(
        r.stored(&fid("o", T0 + 3_000)).unwrap().state,
        RunState::Skipped
    );
    let first = r.assigns("w1")[0].1.key.clone();
    r.succeed("w1", &first);
    r.advance(0);
    let sent = r.assigns("w1");
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[1].1.fire_id, fid("o", T0 + 2_000));
    assert!(
        sent[1].1.scheduled_at_ms < sent[1].0,
        "buffered: later than its instant"
    );
}

#[test]
fn overlap_cancel_running_covers_the_old_run() {
    let mut r = overlapping(Overlap::CancelRunning);
    r.live_for(2_000);
    let sent = r.assigns("w1");
    assert_eq!(sent.len(), 2);
    assert_eq!(r.cancels("w1"), vec![sent[0].1.key.clone()]);
    let old = r.stored(&fid("o", T0 + 1_000)).unwrap();
    assert_eq!(old.state, RunState::Cancelled);
    assert!(old.note.contains("covered"), "{old:?}");
}

/// A leader starting at T0 whose jobs last fired 10 s before.
fn missed(policy: Misfire, window_ms: u64) -> Rig {
    let store = MemoryRunStore::new(Retention::default());
    record_elsewhere(&store, 1, "m", T0 - 10_000, RunState::Succeeded);
    let mut r = Rig::on(store, opts(), 2, T0);
    let mut j = every_second("m");
    j.misfire = policy;
    j.catch_up_window_ms = window_ms;
    r.start(vec![j]);
    r.join("w1", 100);
    r
}

fn states(r: &Rig, ticks: impl Iterator<Item = i64>) -> Vec<RunState> {
    ticks
        .map(|t| {
            r.stored(&fid("m", t))
                .map_or(RunState::Pending, |x| x.state)
        })
        .collect()
}

#[test]
fn misfire_skip_reports_every_missed_tick() {
    let r = missed(Misfire::Skip, 0);
    assert!(r.assigns("w1").is_empty());
    let s = states(&r, (1..=10).map(|i| T0 - 10_000 + i * 1_000));
    assert!(s.iter().all(|x| *x == RunState::Skipped), "{s:?}");
}

#[test]
fn misfire_fire_once_fires_the_latest_and_skips_the_rest() {
    let r = missed(Misfire::FireOnce, 0);
    let sent = r.assigns("w1");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1.fire_id, fid("m", T0));
    let s = states(&r, (1..10).map(|i| T0 - 10_000 + i * 1_000));
    assert!(s.iter().all(|x| *x == RunState::Skipped), "{s:?}");
}

#[test]
fn misfire_fire_all_fires_the_ticks_in_the_window() {
    let r = missed(Misfire::FireAll, 3_000);
    let fired: BTreeSet<String> = r
        .assigns("w1")
        .into_iter()
        .map(|(_, a)| a.fire_id)
        .collect();
    let want: BTreeSet<String> = (0..4).map(|i| fid("m", T0 - i * 1_000)).collect();
    assert_eq!(fired, want);
    let s = states(&r, (1..=6).map(|i| T0 - 10_000 + i * 1_000));
    assert!(s.iter().all(|x| *x == RunState::Skipped), "{s:?}");
}

/// A broadcast of 4 shards on w1..w4.
fn broadcast(r: &mut Rig) -> RunRecord {
    let mut j = manual("b");
    j.routing = Routing::ShardingBroadcast;
    j.shard_count = 4;
    r.start(vec![j]);
    for w in ["w1", "w2", "w3", "w4"] {
        r.join(w, 10);
    }
    r.trigger("b").unwrap()
}

#[test]
fn a_dead_workers_shard_goes_to_another_keeping_its_index() {
    let mut r = Rig::new(opts());
    let run = broadcast(&mut r);
    let on_w3 = run
        .shards
        .iter()
        .find(|s| s.worker_id == "w3")
        .unwrap()
        .index;
    // w3 stops beating: after 3 missed beats it is dead and its shard moves.
    r.live_for_but(5_000, &["w3"]);
    assert!(r.ended.contains(&("w3".into(), EndReason::DeclaredDead)));
    let moved: Vec<_> = r
        .all_assigns()
        .into_iter()
        .filter(|(_, w, a)| w != "w3" && a.key.attempt == 2)
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].2.key.shard, on_w3);
    assert_eq!(moved[0].2.shard_total, 4);
    r.succeed_all();
    let done = r.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    let idx: Vec<u32> = done.shards.iter().map(|s| s.index).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert!(done.shards.iter().all(|s| s.worker_id != "w3"));
}

/// Every `Assign` carries the instant by which the worker must start it: the
/// earliest the engine could give the shard to another worker, one heartbeat
/// interval after sending it (heartbeats leaving it out), or sooner when the
/// worker is about to be declared dead. A worker that reads it later (a stalled
/// stream) leaves it unstarted, so the shard never runs on two workers.
#[test]
fn an_assignment_must_start_before_the_engine_could_give_it_away() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a"), manual("b")]);
    r.join("w1", 10);
    let joined = r.now;
    r.trigger("a").unwrap();
    let (at, a) = r.assigns("w1").pop().unwrap();
    assert_eq!(a.start_by_ms, at + 1_000, "one interval after sending");
    // Silent for 2.5 s: declared dead at 3 s, so a shard sent now must start
    // within the half second left.
    r.advance(2_500);
    r.trigger("b").unwrap();
    let (at, b) = r.assigns("w1").pop().unwrap();
    assert_eq!(at, joined + 2_500);
    assert_eq!(b.start_by_ms, joined + 3_000, "the worker's dead line");
}

#[test]
fn a_closed_session_hands_its_shards_over_at_once() {
    let mut r = Rig::new(opts());
    let run = broadcast(&mut r);
    let s = r.session("w2");
    r.input(Input::Closed {
        worker: "w2".into(),
        session: s,
    });
    assert!(r.ended.contains(&("w2".into(), EndReason::WorkerClosed)));
    let moved = r.stored(&run.run_id);
    assert!(moved.is_some());
    let now_on: BTreeSet<String> = r.m.runs.active[&run.run_id]
        .shards
        .iter()
        .map(|s| s.worker_id.clone())
        .collect();
    assert!(!now_on.contains("w2"), "{now_on:?}");
}

#[test]
fn jobs_firing_in_lockstep_spread_over_the_workers() {
    // Forty round-robin jobs on the same second: before each job's round robin
    // started at an offset of its own, every one of them picked the same worker
    // each second (the whole second on one worker).
    let mut r = Rig::new(opts());
    r.start((0..40).map(|i| every_second(&format!("j{i}"))).collect());
    for w in ["w1", "w2", "w3", "w4"] {
        r.join(w, 100);
    }
    r.advance(1_000);
    for w in ["w1", "w2", "w3", "w4"] {
        let n = r.assigns(w).len();
        assert!(
            (1..=20).contains(&n),
            "{w} got {n} of the second's 40 fires"
        );
    }
}

#[test]
fn a_job_busy_at_a_long_leads_look_is_looked_at_again_before_its_instant() {
    // Prepared 800 ms ahead: at T0 + 1.2 s the run of T0 + 1 s still goes, so the
    // tick of T0 + 2 s is looked at again 250 ms before its instant, when that
    // run has ended: recorded ahead and sent at the instant, not recorded then.
    let mut r = Rig::new(super::EngineOptions {
        prepare_ahead_ms: 800,
        ..opts()
    });
    r.start(vec![every_second("busy")]);
    r.join("w1", 10);
    r.advance(1_000);
    let first = r.assigns("w1");
    assert_eq!(first.len(), 1, "{first:?}");
    r.advance(300);
    let next = fid("busy", T0 + 2_000);
    assert!(r.stored(&next).is_none(), "prepared while its job was busy");
    // The run ends at T0 + 1.5 s; the second look (T0 + 1.75 s) records the tick.
    r.advance(200);
    r.succeed("w1", &first[0].1.key);
    r.advance(260);
    assert!(r.stored(&next).is_some(), "not recorded at the second look");
    assert_eq!(r.assigns("w1").len(), 1, "sent before its instant");
    r.advance(240);
    let sent: Vec<i64> = r.assigns("w1").iter().map(|(at, _)| *at).collect();
    assert_eq!(sent, vec![T0 + 1_000, T0 + 2_000]);
}

/// A job firing once at T0 + 1 s, prepared at T0 + 750 ms, on workers w1 and w2.
fn prepared() -> (Rig, String) {
    let mut r = Rig::new(opts());
    r.start(vec![once("p", T0 + 1_000)]);
    r.join("w1", 10);
    r.join("w2", 10);
    r.advance(800);
    let id = fid("p", T0 + 1_000);
    assert!(r.stored(&id).is_some(), "recorded ahead");
    assert!(r.all_assigns().is_empty());
    (r, id)
}

#[test]
fn prepared_fire_of_a_paused_job_is_skipped_at_the_instant() {
    let (mut r, id) = prepared();
    let mut j = once("p", T0 + 1_000);
    j.paused = true;
    r.put(j);
    r.advance(500);
    assert!(r.all_assigns().is_empty());
    let run = r.stored(&id).unwrap();
    assert_eq!(run.state, RunState::Skipped);
    assert!(run.note.contains("paused"), "{run:?}");
}

#[test]
fn prepared_fire_killed_before_its_instant_never_goes_out() {
    let (mut r, id) = prepared();
    assert_eq!(r.kill(&id).unwrap().state, RunState::Cancelled);
    r.advance(500);
    assert!(r.all_assigns().is_empty());
    assert_eq!(r.stored(&id).unwrap().state, RunState::Cancelled);
}

#[test]
fn prepared_fire_whose_worker_left_goes_to_another_at_the_instant() {
    let (mut r, id) = prepared();
    let planned = r.m.runs.prepared[&id].shards[0].worker_id.clone();
    let session = r.session(&planned);
    r.input(Input::Closed {
        worker: planned.clone(),
        session,
    });
    r.advance(199);
    assert!(r.all_assigns().is_empty());
    r.advance(1);
    let sent = r.all_assigns();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, T0 + 1_000);
    assert_ne!(sent[0].1, planned);
}

#[test]
fn prepared_fire_planned_before_any_worker_goes_to_one_that_came_by_its_instant() {
    // Right after an election the next tick is prepared before the workers are
    // back; they are back by its instant, so it goes out then, not a round later.
    let mut r = Rig::new(opts());
    r.start(vec![once("p", T0 + 1_000)]);
    r.advance(800);
    assert!(r.stored(&fid("p", T0 + 1_000)).is_some(), "recorded ahead");
    r.join("w1", 10);
    r.advance(200);
    let sent = r.all_assigns();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, T0 + 1_000);
}

#[test]
fn prepared_fire_of_a_deposed_leader_is_not_sent() {
    let (mut r, id) = prepared();
    assert!(ready(r.store.install_fence(2)).unwrap().installed());
    r.advance(500);
    assert!(r.lost, "the leader learns it lost the lead");
    assert!(r.all_assigns().is_empty());
    // The run stays recorded, for the next leader.
    assert_eq!(r.stored(&id).unwrap().state, RunState::Running);
}

#[test]
fn store_failures_delay_fires_and_never_double_them() {
    // The record ahead fails: the tick fires the ordinary way at its instant.
    let mut r = Rig::new(opts());
    r.start(vec![once("p", T0 + 1_000)]);
    r.join("w1", 10);
    r.fail_records = 1;
    r.advance(800);
    assert!(r.stored(&fid("p", T0 + 1_000)).is_none());
    r.advance(200);
    assert_eq!(r.assigns("w1").len(), 1);
    // The fence check at the instant fails: asked again 100 ms later.
    let mut r = Rig::new(opts());
    r.start(vec![once("p", T0 + 1_000)]);
    r.join("w1", 10);
    r.fail_fences = 1;
    r.advance(1_000);
    assert!(r.assigns("w1").is_empty());
    r.advance(100);
    let sent = r.assigns("w1");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, T0 + 1_100);
    // A manual fire that cannot be recorded is refused, and not sent.
    r.put(manual("m"));
    r.fail_records = 1;
    assert!(matches!(r.trigger("m"), Err(CoordError::Unavailable(_))));
    assert_eq!(r.assigns("w1").len(), 1);
}

#[test]
fn adopted_shard_stays_with_the_worker_that_reports_it() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a")]);
    r.join("w1", 10);
    let run = r.trigger("a").unwrap();
    let key = r.assigns("w1")[0].1.key.clone();
    // The leader dies; the next one adopts the run.
    let mut next = Rig::on(r.store.clone(), opts(), 2, r.now + 1_000);
    next.start(vec![manual("a")]);
    next.join_with(WorkerHello {
        worker_id: "w1".into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 10,
        labels: BTreeMap::new(),
        running: vec![key.clone()],
    })
    .unwrap();
    next.join("w2", 10);
    next.live_for(10_000);
    assert!(next.all_assigns().is_empty(), "kept where it runs");
    next.succeed("w1", &key);
    assert_eq!(next.stored(&run.run_id).unwrap().state, RunState::Succeeded);
}

#[test]
fn adopted_shard_nobody_reports_is_taken_over_after_the_grace() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a")]);
    r.join("w1", 10);
    let run = r.trigger("a").unwrap();
    let start = r.now + 1_000;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![manual("a")]);
    next.join("w1", 10);
    next.join("w2", 10);
    // Grace: the 5 s a worker takes to notice a frozen leader (more than 3
    // heartbeats of 1 s) + 2 s.
    next.live_for(6_900);
    assert!(next.all_assigns().is_empty());
    next.live_for(200);
    let sent = next.all_assigns();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, start + 7_000);
    assert_eq!((sent[0].1.as_str(), sent[0].2.key.attempt), ("w2", 2));
    next.succeed_all();
    assert_eq!(next.stored(&run.run_id).unwrap().state, RunState::Succeeded);
}

#[test]
fn adopted_shards_wait_for_workers_that_could_not_reach_the_new_leader() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a")]);
    r.join("w1", 10);
    let run = r.trigger("a").unwrap();
    let key = r.assigns("w1")[0].1.key.clone();
    // w1 finishes; its result never reaches the leader, which dies. The workers
    // know only the dead coordinator: none reaches the next leader for 10 s.
    let start = r.now + 1_000;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![manual("a")]);
    next.advance(10_000);
    next.join("w2", 10);
    next.live_for(3_000);
    assert!(
        next.all_assigns().is_empty(),
        "w1 gets the grace to come back"
    );
    next.join("w1", 10);
    next.succeed("w1", &key);
    next.live_for(10_000);
    assert!(next.all_assigns().is_empty(), "{:?}", next.all_assigns());
    assert_eq!(next.stored(&run.run_id).unwrap().state, RunState::Succeeded);
}

#[test]
fn adopted_prepared_fire_goes_out_once_after_the_grace_and_its_instant() {
    let (r, id) = prepared();
    let start = r.now;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![once("p", T0 + 1_000)]);
    next.join("w1", 10);
    next.join("w2", 10);
    next.live_for(10_000);
    let sent = next.all_assigns();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].0 >= start + 5_000 && sent[0].0 >= T0 + 1_000);
    assert_eq!(sent[0].2.fire_id, id);
    assert!(r.all_assigns().is_empty(), "the first leader never sent it");
}

#[test]
fn handed_over_prepared_fire_goes_out_at_its_instant_once() {
    let (mut r, id) = prepared();
    assert!(r.hand_over());
    let start = r.now + 50;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![once("p", T0 + 1_000)]);
    next.join("w1", 10);
    next.join("w2", 10);
    next.live_for(10_000);
    let sent = next.all_assigns();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, T0 + 1_000, "at its instant, not after the grace");
    assert_eq!(sent[0].2.fire_id, id);
    assert!(r.all_assigns().is_empty(), "the first leader never sent it");
}

#[test]
fn handed_over_every_second_job_misses_no_tick_and_doubles_none() {
    let mut r = Rig::new(opts());
    r.start(vec![every_second("s")]);
    r.join("w1", 10);
    r.live_for(2_850);
    r.succeed_all();
    // Stops 150 ms before T0 + 3 s, whose fire is prepared (unsent).
    assert!(r.hand_over());
    let mut next = Rig::on(r.store.clone(), opts(), 2, r.now + 100);
    next.start(vec![every_second("s")]);
    next.join("w1", 10);
    for _ in 0..40 {
        next.live_for(100);
        next.succeed_all();
    }
    let mut at: Vec<i64> = r
        .all_assigns()
        .iter()
        .chain(next.all_assigns().iter())
        .map(|(_, _, a)| a.scheduled_at_ms)
        .collect();
    at.sort();
    let ticks: Vec<i64> = (1..=6).map(|k| T0 + k * 1_000).collect();
    assert_eq!(at, ticks, "each tick once");
    for (sent, _, a) in next.all_assigns() {
        assert_eq!(sent, a.scheduled_at_ms, "on time");
    }
}

#[test]
fn handed_over_shard_waiting_for_a_worker_is_placed_at_once() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a")]);
    let run = r.trigger("a").unwrap();
    assert!(r.all_assigns().is_empty(), "no worker yet");
    assert!(r.hand_over());
    let start = r.now + 100;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![manual("a")]);
    next.join("w1", 10);
    let sent = next.all_assigns();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, start);
    assert_eq!(sent[0].2.key.run_id, run.run_id);
}

#[test]
fn handed_over_running_shard_still_waits_for_its_worker_and_is_never_doubled() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("a")]);
    r.join("w1", 10);
    let run = r.trigger("a").unwrap();
    let key = r.assigns("w1")[0].1.key.clone();
    assert!(r.hand_over());
    let start = r.now + 100;
    let mut next = Rig::on(r.store.clone(), opts(), 2, start);
    next.start(vec![manual("a")]);
    // w1 comes back late (after w2) with the shard: it stays with w1.
    next.join("w2", 10);
    next.live_for(1_000);
    next.join_with(WorkerHello {
        worker_id: "w1".into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 10,
        labels: BTreeMap::new(),
        running: vec![key.clone()],
    })
    .unwrap();
    next.live_for(10_000);
    assert!(next.all_assigns().is_empty(), "{:?}", next.all_assigns());
    next.succeed("w1", &key);
    assert_eq!(next.stored(&run.run_id).unwrap().state, RunState::Succeeded);
}

#[test]
fn a_note_is_taken_once_and_only_by_the_next_leader() {
    let (mut r, _) = prepared();
    // A leader whose token is no longer the newest leaves no note.
    let store = r.store.clone();
    assert!(ready(store.install_fence(2)).unwrap().installed());
    assert!(!r.hand_over());
    // The next leader takes the note of the one it follows, once.
    assert!(ready(store.hand_over(2, &["x".into()])).unwrap());
    assert_eq!(
        ready(store.install_fence(3)).unwrap(),
        crate::store::FenceInstall::HandedOver {
            unsent: vec!["x".into()]
        }
    );
    assert_eq!(
        ready(store.install_fence(4)).unwrap(),
        crate::store::FenceInstall::Installed
    );
    // A note of an older leader is no hand-over to a later one.
    assert!(ready(store.hand_over(4, &[])).unwrap());
    assert!(ready(store.install_fence(5)).unwrap().installed());
    assert!(ready(store.hand_over(5, &[])).unwrap());
    assert_eq!(
        ready(store.install_fence(3)).unwrap(),
        crate::store::FenceInstall::Refused
    );
    assert_eq!(
        ready(store.install_fence(6)).unwrap(),
        crate::store::FenceInstall::HandedOver { unsent: vec![] }
    );
}

#[test]
fn a_full_worker_gets_no_shard_until_it_has_room() {
    let mut r = Rig::new(opts());
    let mut j = manual("c");
    j.routing = Routing::First;
    r.start(vec![j]);
    r.join("w1", 1);
    r.join("w2", 1);
    let a = r.trigger("c").unwrap();
    let b = r.trigger("c").unwrap();
    let c = r.trigger("c").unwrap();
    assert_eq!(a.shards[0].worker_id, "w1");
    assert_eq!(
        b.shards[0].worker_id, "w2",
        "w1 is full: the next with room"
    );
    assert_eq!(
        c.shards[0].state,
        RunState::Pending,
        "everyone is full: it waits"
    );
    let first = r.assigns("w1")[0].1.key.clone();
    r.succeed("w1", &first);
    r.advance(0);
    let sent = r.assigns("w1");
    assert_eq!(sent.len(), 2, "room again: the waiting shard goes at once");
    assert_eq!(sent[1].1.key.run_id, c.run_id);
}

#[test]
fn a_broadcast_never_exceeds_capacities() {
    let mut r = Rig::new(opts());
    let mut j = manual("b");
    j.routing = Routing::ShardingBroadcast;
    j.shard_count = 5;
    r.start(vec![j]);
    r.join("w1", 2);
    r.join("w2", 1);
    let run = r.trigger("b").unwrap();
    let placed = run
        .shards
        .iter()
        .filter(|s| s.state == RunState::Running)
        .count();
    assert_eq!(placed, 3);
    assert_eq!(r.assigns("w1").len(), 2);
    assert_eq!(r.assigns("w2").len(), 1);
    // As shards end, the waiting ones go out; the run completes.
    for _ in 0..3 {
        r.succeed_all();
        r.advance(0);
    }
    assert_eq!(r.stored(&run.run_id).unwrap().state, RunState::Succeeded);
}

#[test]
fn capacity_zero_is_refused_naming_the_field() {
    let mut r = Rig::new(opts());
    r.start(vec![]);
    let e = r
        .join_with(WorkerHello {
            worker_id: "w1".into(),
            group: "g".into(),
            handlers: vec![],
            capacity: 0,
            labels: BTreeMap::new(),
            running: vec![],
        })
        .unwrap_err();
    assert!(
        matches!(&e, CoordError::InvalidArgument { field, .. } if field == "register.capacity"),
        "{e}"
    );
}

#[test]
fn a_shard_missing_from_two_heartbeats_is_taken_over() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("hb")]);
    r.join("w1", 10);
    let run = r.trigger("hb").unwrap();
    r.join("w2", 10);
    let beat = |r: &mut Rig, w: &str, running: Vec<ShardKey>| {
        let session = r.session(w);
        r.input(Input::Heartbeat {
            worker: w.into(),
            session,
            running,
        });
    };
    // Within the first interval a missing shard is not counted (the assignment may
    // still be on its way), nor is a single miss.
    beat(&mut r, "w1", vec![]);
    r.advance(1_000);
    beat(&mut r, "w1", vec![]);
    assert_eq!(r.all_assigns().len(), 1);
    r.advance(1_000);
    beat(&mut r, "w1", vec![]);
    let sent = r.all_assigns();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[1].1.as_str(), sent[1].2.key.attempt), ("w2", 2));
    assert_eq!(sent[1].2.key.run_id, run.run_id);
}

#[test]
fn a_listed_shard_stays() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("hb")]);
    r.join("w1", 10);
    r.trigger("hb").unwrap();
    r.join("w2", 10);
    r.live_for(10_000);
    assert_eq!(r.all_assigns().len(), 1);
}

#[test]
fn every_session_end_says_why() {
    let mut r = Rig::new(opts());
    r.start(vec![manual("d")]);
    r.join("w1", 10);
    r.join("w1", 10);
    assert_eq!(r.ended, vec![("w1".into(), EndReason::Replaced)]);
    r.trigger("d").unwrap();
    let s = r.session("w1");
    r.input(Input::Draining {
        worker: "w1".into(),
        session: s,
    });
    assert_eq!(r.ended.len(), 1, "still runs a shard: not drained yet");
    r.succeed_all();
    assert_eq!(r.ended[1], ("w1".into(), EndReason::Drained));
    r.join("w2", 10);
    r.advance(5_000);
    assert_eq!(r.ended[2], ("w2".into(), EndReason::DeclaredDead));
}

#[test]
fn a_timed_out_shard_is_cancelled_and_retried_elsewhere() {
    let mut r = Rig::new(opts());
    let mut j = manual("t");
    j.timeout_ms = 500;
    j.retries = 1;
    j.retry_backoff_ms = 200;
    r.start(vec![j]);
    r.join("w1", 10);
    let run = r.trigger("t").unwrap();
    r.join("w2", 10);
    r.advance(500);
    assert_eq!(r.cancels("w1").len(), 1);
    r.advance(200);
    let retry = r.assigns("w2");
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].1.key.attempt, 2);
    r.report("w2", &retry[0].1.key, ShardOutcome::Failed("boom".into()));
    let done = r.stored(&run.run_id).unwrap();
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.shards[0].failures, 2);
}

#[test]
fn a_successful_run_fires_its_children() {
    let mut r = Rig::new(opts());
    let mut parent = manual("parent");
    parent.children = vec!["child".into()];
    r.start(vec![parent, manual("child")]);
    r.join("w1", 10);
    let run = r.trigger("parent").unwrap();
    r.succeed_all();
    let child = r.assigns("w1").into_iter().find(|(_, a)| a.job == "child");
    let child = child.expect("the child fired");
    let stored = r.stored(&child.1.key.run_id).unwrap();
    assert_eq!(
        (stored.cause.as_str(), stored.parent_run_id.as_str()),
        ("child", run.run_id.as_str())
    );
}

#[test]
fn inputs_arriving_during_a_store_request_wait_for_its_answer() {
    let mut m = Machine::new(opts(), 1, 1);
    let store = MemoryRunStore::new(Retention::default());
    assert!(ready(store.install_fence(1)).unwrap().installed());
    let spec = manual("w");
    let effects = m.step(
        T0,
        Input::Start {
            jobs: vec![crate::store::StoredJob { spec, version: 1 }],
            last: Default::default(),
            active: vec![],
            handover: None,
            ahead: Default::default(),
            ended_nodes: vec![],
        },
    );
    assert!(effects.is_empty());
    let hello = WorkerHello {
        worker_id: "w1".into(),
        group: "g".into(),
        handlers: vec!["h".into()],
        capacity: 4,
        labels: BTreeMap::new(),
        running: vec![],
    };
    m.step(T0, Input::Register(1, hello));
    let effects = m.step(T0, Input::Trigger(2, "w".into(), None));
    let Some(Effect::Request(super::machine::Request::Record { fence, fires })) = effects.last()
    else {
        panic!("{effects:?}");
    };
    assert!(m.is_waiting());
    let session = m.workers.live["w1"].session;
    // The worker closes while the fire is being recorded: nothing happens yet.
    let held = m.step(
        T0 + 5,
        Input::Closed {
            worker: "w1".into(),
            session,
        },
    );
    assert!(held.is_empty(), "{held:?}");
    let answer = ready(store.record_fires(*fence, fires)).map_err(|e| e.to_string());
    let after = m.step(T0 + 10, Input::Answer(Answer::Record(answer)));
    // In order: the assignment to w1, the trigger's answer, then the close.
    let kinds: Vec<&str> = after
        .iter()
        .map(|e| match e {
            Effect::Send {
                msg: ToWorker::Assign(_),
                ..
            } => "assign",
            Effect::Reply(2, _) => "reply",
            Effect::End { .. } => "end",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, vec!["assign", "reply", "end"], "{after:?}");
    assert!(!m.is_waiting());
}

#[test]
fn a_big_batch_goes_out_in_slices_each_before_the_next_is_made() {
    let mut r = Rig::new(opts());
    r.start(
        (0..120)
            .map(|i| once(&format!("j{i}"), T0 + 1_000))
            .collect(),
    );
    r.join("w1", 1_000);
    r.advance(999);
    assert_eq!(r.m.runs.prepared.len(), 120);
    // By hand from here: the instant comes, the fence is checked...
    r.now = T0 + 1_000;
    let effects = r.m.step(r.now, Input::Timers);
    let Some(Effect::Request(request)) = effects.into_iter().last() else {
        panic!("the fence check first");
    };
    let answer = r.answer(request);
    // ...then each step answers one slice of assignments, the rest still to come.
    let mut slices = Vec::new();
    let mut effects = r.m.step(r.now, Input::Answer(answer));
    loop {
        let sent = effects
            .iter()
            .filter(|e| matches!(e, Effect::Send { .. }))
            .count();
        slices.push(sent);
        if !r.m.busy() {
            break;
        }
        effects = r.m.step(r.now, Input::Continue);
    }
    assert_eq!(slices, vec![50, 50, 20]);
}

#[test]
fn ticks_the_store_could_not_record_follow_the_misfire_policy_once_it_records_again() {
    // Redis is down for three ticks: they cannot be recorded, so they are neither
    // fired nor in the history then. Once a record succeeds again, the job's
    // misfire policy (fire-once, the default) handles them as a new leader handles
    // missed ticks: the latest fires, the others are reported skipped — never
    // silently missing (found by `chime bench chaos --seed 5`).
    let mut r = Rig::new(opts());
    r.start(vec![every_second("e")]);
    r.join("w1", 10);
    r.advance(1_500);
    r.fail_records = 1_000_000;
    for _ in 0..6 {
        r.advance(500);
        r.beat_all_but(&[]);
    }
    let outage: Vec<i64> = (1..=3).map(|i| T0 + 1_000 + i * 1_000).collect();
    for t in &outage {
        assert!(r.stored(&fid("e", *t)).is_none(), "{t} is not recorded");
    }
    r.fail_records = 0;
    for _ in 0..4 {
        r.advance(500);
        r.beat_all_but(&[]);
    }
    let states: Vec<Option<RunState>> = outage
        .iter()
        .map(|t| r.stored(&fid("e", *t)).map(|x| x.state))
        .collect();
    assert!(states.iter().all(Option::is_some), "{states:?}");
    let skipped = states
        .iter()
        .filter(|s| **s == Some(RunState::Skipped))
        .count();
    assert_eq!(skipped, outage.len() - 1, "{states:?}");
    let fired: Vec<String> = r
        .assigns("w1")
        .into_iter()
        .map(|(_, a)| a.fire_id)
        .filter(|f| outage.iter().any(|t| *f == fid("e", *t)))
        .collect();
    assert_eq!(
        fired,
        vec![fid("e", outage[2])],
        "the latest fires, late: {states:?} {:?}",
        r.all_assigns()
            .iter()
            .map(|(t, _, a)| (*t, a.fire_id.clone()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_record_the_store_applied_but_whose_answer_was_lost_still_fires_once() {
    // The store applies a record, but its answer is lost (a timeout, a cut
    // connection): the engine sees a failure. The tick is recorded as in
    // progress and was never sent; recorded again, the store calls it a
    // duplicate. It was this leader's own record, so the fire goes out (once),
    // and ends, instead of staying in progress forever (found by `chime bench
    // chaos --seed 7`: a whole second of ticks, never run nor reported).
    let mut r = Rig::new(opts());
    r.start(vec![every_second("e")]);
    r.join("w1", 10);
    r.advance(1_500);
    r.lose_answers = 1;
    for _ in 0..8 {
        r.advance(500);
        r.beat_all_but(&[]);
        r.succeed_all();
    }
    for i in 1..=4 {
        let id = fid("e", T0 + i * 1_000);
        let run = r.stored(&id).unwrap_or_else(|| panic!("{id} recorded"));
        assert_eq!(run.state, RunState::Succeeded, "{id}: {run:?}");
        let sent = r
            .assigns("w1")
            .iter()
            .filter(|(_, a)| a.fire_id == id)
            .count();
        assert_eq!(sent, 1, "{id} went out once");
    }
}

#[test]
fn ticks_the_store_missed_are_recorded_in_the_same_request_as_the_next_tick() {
    // A job's newest recorded instant is where a new leader looks for missed
    // ticks: were the next tick recorded alone, a crash before the older ones
    // were reported would lose them. So the first record after an outage carries
    // them, ahead of the new tick.
    let mut r = Rig::new(opts());
    r.start(vec![every_second("e")]);
    r.join("w1", 10);
    r.advance(1_500);
    r.fail_records = 1_000_000;
    for _ in 0..6 {
        r.advance(500);
        r.beat_all_but(&[]);
    }
    let outage: Vec<String> = (2..=4).map(|i| fid("e", T0 + i * 1_000)).collect();
    r.fail_records = 0;
    let before = r.recorded.len();
    r.advance(500);
    let first = r.recorded[before..]
        .iter()
        .find(|ids| ids.iter().any(|id| !outage.contains(id)))
        .cloned()
        .expect("a record after the outage");
    let newest = first
        .iter()
        .position(|id| !outage.contains(id))
        .unwrap_or(0);
    assert!(
        outage.iter().all(|id| first[..newest].contains(id)),
        "the outage's ticks ride ahead of the new tick: {first:?}"
    );
    // Fire-once: the latest missed tick fires, the others are reported skipped.
    let states: Vec<Option<RunState>> = outage
        .iter()
        .map(|id| r.stored(id).map(|x| x.state))
        .collect();
    assert_eq!(
        states[..2],
        [Some(RunState::Skipped), Some(RunState::Skipped)],
        "{states:?}"
    );
    assert!(
        states[2].is_some_and(|s| s != RunState::Skipped),
        "{states:?}"
    );
}
