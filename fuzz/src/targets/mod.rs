//! The fuzz targets, one module each, and what they share: outcome signals and the
//! schedule checks every target that reaches a valid job runs.
//!
//! The schedule checks hold [`Compiled`] to what the engine relies on: a validated
//! job compiles; `next_after(t)` is strictly after `t` and within the job's
//! start/end bounds, also when chained from its own answers (the engine re-arms a
//! job from the tick it just fired, so an answer at or before `t` would fire again at
//! once); `ticks_between` is strictly increasing, within its window and its limit;
//! `min_gap_ms` (the store's floor check) answers.

pub mod config_value;
pub mod cron;
pub mod item_codec;
pub mod proto;
pub mod schedule_json;
pub mod worker_session;

use chime_coordinator::model::{JobSpec, Schedule};
use chime_coordinator::schedule::{Compiled, min_gap_ms};
use chime_shared::queue::fnv1a64;

/// Instants the coordinator evaluates schedules from, Unix ms: "now"-like times, the
/// DST changes of 2026 in Europe (last Sunday of March/October, 01:00Z), the US
/// (second Sunday of March, first of November) and Australia (first Sunday of April
/// and October), leap-day eves, the edge of croner's search range (year 4999) and
/// chime's latest due time (year 9999). Start and end bounds of the job come on top,
/// through `next_after` itself.
pub const INSTANTS: [i64; 14] = [
    0,
    1_700_000_000_000,
    1_767_225_600_000,   // 2026-01-01T00:00:00Z
    1_774_745_999_000,   // 2026-03-29T00:59:59Z, EU spring forward - 1 s
    1_792_888_200_000,   // 2026-10-25T00:30:00Z, 02:30 CEST: inside the EU fall-back overlap
    1_772_953_199_000,   // 2026-03-08T06:59:59Z, US spring forward - 1 s (Eastern)
    1_793_511_000_000,   // 2026-11-01T05:30:00Z, 01:30 EDT: inside the US overlap
    1_775_318_399_000,   // 2026-04-04T15:59:59Z, Sydney fall back - 1 s
    1_791_043_199_000,   // 2026-10-03T15:59:59Z, Sydney spring forward - 1 s
    1_709_164_799_000,   // 2024-02-28T23:59:59Z, leap day eve
    4_107_499_200_000,   // 2100-02-28T12:00:00Z, no leap day
    95_617_583_999_000,  // 4999-12-31T23:59:59Z, croner's last searched year
    253_402_300_799_999, // 9999-12-31T23:59:59.999Z, MAX_DUE_AT_MS
    -1,
];

/// Hashes the parts of an outcome into a signal.
pub fn signal(parts: &[&str]) -> u64 {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
        buf.push(0);
    }
    fnv1a64(&buf)
}

/// A coarse class of an error message: quoted text (often the input itself) dropped,
/// digit runs folded, cut short, so that signals count kinds of errors rather than
/// every distinct input.
pub fn coarse(msg: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut last_digit = false;
    for c in msg.chars() {
        if let Some(q) = quote {
            // Debug-quoted input escapes its quotes (`\"`): skip the escaped char.
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '`' | '\'' => {
                quote = Some(c);
                out.push('_');
            }
            '0'..='9' => {
                if !last_digit {
                    out.push('#');
                }
            }
            _ => out.push(c),
        }
        last_digit = c.is_ascii_digit();
        if out.len() >= 64 {
            break;
        }
    }
    out
}

/// A bucket of a count, for signals: 0, 1, 2-3, 4-7, ...
pub fn bucket(n: usize) -> String {
    (usize::BITS - n.leading_zeros()).to_string()
}

/// A job around `schedule` with every other field at its default.
pub fn job_with(schedule: Schedule) -> JobSpec {
    JobSpec::new("fuzz", "g", "h", schedule)
}

/// Ticks `ticks_between` is asked for; the engine asks for 10,000 at startup, which
/// would make every execution slow without finding more.
const TICK_LIMIT: usize = 8;
/// Samples of `min_gap_ms`; the store uses 512 for the same reason as above.
const GAP_SAMPLES: usize = 16;

/// Compiles a job that passed `JobSpec::validate` and checks what the engine relies
/// on (see the module doc). Answers a signal of what it saw; panics on a broken
/// invariant.
pub fn check_schedule(job: &JobSpec) -> String {
    let c = match Compiled::of(job) {
        Ok(c) => c,
        Err(e) => panic!(
            "a validated schedule does not compile: {e} ({:?})",
            job.schedule
        ),
    };
    let mut found = 0;
    for &t in &INSTANTS {
        let Some(n) = c.next_after(job, t) else {
            continue;
        };
        found += 1;
        assert!(
            n > t,
            "next_after({t}) = {n} is not after it ({:?}, start {}, end {})",
            job.schedule,
            job.start_at_ms,
            job.end_at_ms
        );
        if job.end_at_ms != 0 {
            assert!(
                n <= job.end_at_ms,
                "next_after({t}) = {n} is past end_at_ms {} ({:?})",
                job.end_at_ms,
                job.schedule
            );
        }
        if job.start_at_ms > 0 {
            assert!(
                n >= job.start_at_ms,
                "next_after({t}) = {n} is before start_at_ms {} ({:?})",
                job.start_at_ms,
                job.schedule
            );
        }
    }
    // The engine re-arms a job from the tick it just fired: chain a few answers.
    for start in [INSTANTS[2], INSTANTS[4]] {
        let mut t = start;
        for _ in 0..4 {
            let Some(n) = c.next_after(job, t) else {
                break;
            };
            assert!(
                n > t,
                "next_after({t}) = {n} is not after it, chained from {start} ({:?}, start {}, end {})",
                job.schedule,
                job.start_at_ms,
                job.end_at_ms
            );
            t = n;
        }
    }
    // The engine's startup catch-up: ticks since the last fire (a day ago) until now,
    // across a DST change.
    let mut ticks = 0;
    for (from, to) in [
        (INSTANTS[3] - 86_400_000, INSTANTS[3] + 3_600_000),
        (INSTANTS[4] - 3_600_000, INSTANTS[4] + 86_400_000),
    ] {
        let (got, more) = c.ticks_between(job, from, to, TICK_LIMIT);
        assert!(
            got.len() <= TICK_LIMIT,
            "ticks_between answered {} ticks, limit {TICK_LIMIT}",
            got.len()
        );
        assert!(
            !more || got.len() == TICK_LIMIT,
            "ticks_between says there are more after only {} ticks",
            got.len()
        );
        let mut prev = from;
        for &t in &got {
            assert!(
                t > prev && t <= to,
                "ticks_between({from}, {to}) = {got:?} is not increasing within the window ({:?})",
                job.schedule
            );
            prev = t;
        }
        ticks += got.len();
    }
    // The store's floor check on create, from "now".
    let gap = match min_gap_ms(job, INSTANTS[2], GAP_SAMPLES) {
        Ok(g) => g.map_or("none".to_owned(), |g| bucket(g as usize)),
        Err(e) => panic!(
            "min_gap_ms fails on a validated job: {e} ({:?})",
            job.schedule
        ),
    };
    format!("next={found} ticks={} gap={gap}", bucket(ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_drops_quoted_text_and_digits() {
        assert_eq!(coarse(r#"x "a\"b" y 'c' z"#), "x _ y _ z");
        assert_eq!(
            coarse("invalid schedule.expr: \"61 * * * *\": Component error: 61 > 59"),
            "invalid schedule.expr: _: Component error: # > #"
        );
    }

    #[test]
    fn buckets_grow_by_powers_of_two() {
        assert_eq!(bucket(0), "0");
        assert_eq!(bucket(1), "1");
        assert_eq!(bucket(3), "2");
        assert_eq!(bucket(4), "3");
    }
}
