//! Tests of the fuzz targets and the engine: every committed seed runs clean, the
//! generated seeds match their committed files, a short fixed-seed run of every
//! target finds nothing, the engine catches (and reports) a planted panic and a slow
//! execution, and the committed crash inputs still reproduce.

use std::time::Duration;

use chime_fuzz::engine::{self, FailureKind, Limit, Options};
use chime_fuzz::{TARGETS, Target};

fn seeds(t: &Target) -> Vec<Vec<u8>> {
    engine::load_corpus(&chime_fuzz::corpus_root().join(t.name)).expect("the seed corpus reads")
}

fn short(execs: u64) -> Options {
    Options {
        seed: 1,
        limit: Limit::Executions(execs),
        // Debug builds on a busy CI machine: only a real loop should count as a hang.
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

#[test]
fn every_target_has_seeds_and_every_seed_runs_clean() {
    for t in &TARGETS {
        let seeds = seeds(t);
        assert!(
            (5..=60).contains(&seeds.len()),
            "{}: {} seeds",
            t.name,
            seeds.len()
        );
        for s in &seeds {
            if let Err(f) = engine::replay(t, s, Duration::from_secs(5)) {
                panic!(
                    "{}: seed {} fails: {:?} {} at {:?}",
                    t.name,
                    engine::escape(s, 200),
                    f.kind,
                    f.message,
                    f.location
                );
            }
        }
    }
}

#[test]
fn generated_seeds_are_committed() {
    let root = chime_fuzz::corpus_root();
    for s in chime_fuzz::seeds::generated() {
        let path = root.join(s.target).join(&s.file);
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == s.bytes,
            "{} is stale or missing: run `cargo run -p chime-fuzz -- --write-seeds`",
            path.display()
        );
    }
}

#[test]
fn a_short_fixed_seed_run_of_every_target_passes() {
    for t in &TARGETS {
        let seeds = seeds(t);
        // A smoke test (worker_session runs ~300 executions a second in a debug
        // build); the real runs are `chime-fuzz --seconds N`.
        let execs = seeds.len() as u64 + 500;
        let r = engine::fuzz(t, &seeds, &short(execs));
        assert_eq!(r.executions, execs);
        assert!(
            r.failures.is_empty(),
            "{}: {}",
            t.name,
            serde_json::to_string(&r.json()).unwrap()
        );
        assert!(
            r.outcomes > 1,
            "{}: the target always answers the same",
            t.name
        );
    }
}

/// A planted bug: panics on inputs containing `BUG` (a three-byte pattern no seed
/// has, found only by mutation).
fn planted(input: &[u8]) -> u64 {
    if input.windows(3).any(|w| w == b"BUG") {
        let v: Vec<u8> = Vec::new();
        // Index out of bounds: a panic from std, like the ones chime could hit.
        return u64::from(v[input.len()]);
    }
    input.len() as u64
}

const PLANTED: Target = Target {
    name: "planted",
    about: "panics on BUG",
    run: planted,
    dictionary: || vec![b"B".to_vec(), b"U".to_vec(), b"G".to_vec()],
};

#[test]
fn the_engine_finds_a_planted_panic_and_reports_it() {
    let dir = std::env::temp_dir().join(format!("chime-fuzz-test-{}", std::process::id()));
    let opts = Options {
        artifacts: Some(dir.clone()),
        ..short(200_000)
    };
    let r = engine::fuzz(&PLANTED, &[b"hello world".to_vec()], &opts);
    assert_eq!(r.failures.len(), 1, "{}", r.json());
    let f = &r.failures[0];
    assert_eq!(f.kind, FailureKind::Panic);
    assert!(f.message.contains("index out of bounds"), "{}", f.message);
    assert!(
        f.location.as_deref().unwrap().contains("fuzz.rs"),
        "{:?}",
        f.location
    );
    assert!(f.input.windows(3).any(|w| w == b"BUG"));
    assert!(r.executions < 200_000, "stops at the first crash");
    // The input is on disk, and replays to the same panic with a backtrace.
    let saved = std::fs::read(f.artifact.as_ref().unwrap()).unwrap();
    assert_eq!(saved, f.input);
    let again = engine::replay(&PLANTED, &saved, Duration::from_secs(5)).unwrap_err();
    assert_eq!(again.location, f.location);
    assert!(again.backtrace.is_some());
    // Same seed, same run.
    let r2 = engine::fuzz(&PLANTED, &[b"hello world".to_vec()], &short(200_000));
    assert_eq!(r2.executions, r.executions);
    assert_eq!(r2.failures[0].input, f.input);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keep_going_records_each_panic_location_once() {
    fn two_bugs(input: &[u8]) -> u64 {
        match input.first() {
            Some(b'a') => panic!("first bug"),
            Some(b'b') => panic!("second bug"),
            _ => 0,
        }
    }
    let t = Target {
        name: "two",
        about: "two panics",
        run: two_bugs,
        dictionary: Vec::new,
    };
    let opts = Options {
        keep_going: true,
        ..short(5_000)
    };
    let r = engine::fuzz(&t, &[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], &opts);
    assert_eq!(r.executions, 5_000, "keeps going");
    let mut msgs: Vec<&str> = r.failures.iter().map(|f| f.message.as_str()).collect();
    msgs.sort_unstable();
    assert_eq!(msgs, ["first bug", "second bug"]);
}

#[test]
fn a_slow_execution_is_a_hang() {
    fn slow(input: &[u8]) -> u64 {
        if input == b"slow" {
            std::thread::sleep(Duration::from_millis(300));
        }
        0
    }
    let t = Target {
        name: "slow",
        about: "sleeps",
        run: slow,
        dictionary: Vec::new,
    };
    let opts = Options {
        timeout: Duration::from_millis(100),
        ..short(10)
    };
    let r = engine::fuzz(&t, &[b"fast".to_vec(), b"slow".to_vec()], &opts);
    assert_eq!(r.failures.len(), 1);
    assert_eq!(r.failures[0].kind, FailureKind::Hang);
    assert_eq!(r.failures[0].input, b"slow");
}

/// Every committed crash input (`crash-*`) still makes its target panic: when one
/// stops, the bug was fixed and the input belongs in the seed corpus instead. Hang
/// inputs (`hang-*`) are not replayed here: each costs its full duration (seconds).
/// Some crashes are overflow checks, which only debug builds (`cargo test`) have.
#[test]
fn committed_crash_inputs_still_reproduce() {
    for t in &TARGETS {
        let dir = chime_fuzz::crashes_root().join(t.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("crash-"))
            })
            .collect();
        paths.sort();
        for input in paths.iter().map(|p| std::fs::read(p).unwrap()) {
            let r = engine::replay(t, &input, Duration::from_secs(5));
            assert!(
                r.is_err(),
                "{}: {} no longer fails: move it to fuzz/corpus/{}/",
                t.name,
                engine::escape(&input, 200),
                t.name
            );
        }
    }
}
