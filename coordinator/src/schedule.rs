//! When a job fires next. Cron schedules are parsed once ([`Compiled`]) and
//! evaluated in the job's IANA time zone with croner, which follows Vixie cron across
//! DST changes (a tick in a spring-forward gap fires once at the first valid time; a
//! tick in a fall-back overlap fires once). Times are Unix milliseconds throughout.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use crate::error::{CoordError, Result};
use crate::model::{JobSpec, MAX_PERIOD_MS, MIN_PERIOD_MS, Schedule};

/// A schedule ready to evaluate.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// A cron expression (its parse is in [`cron_of`]'s cache) and its zone.
    Cron { expr: Arc<str>, tz: Tz },
    /// Fixed rate: period and anchor.
    Rate { every_ms: i64, anchor_ms: i64 },
    /// Fixed delay: computed from run ends by the engine.
    Delay { delay_ms: i64 },
    /// One instant.
    Once(i64),
    /// Never by itself.
    Manual,
}

/// Refuses list syntax croner accepts but cannot schedule: an empty element
/// (`0 , * * * *`, `1,,2`) makes it search forever for a matching minute.
fn check_cron_lists(expr: &str) -> Result<()> {
    for (i, field) in expr.split_whitespace().enumerate() {
        if field.split(',').any(str::is_empty) {
            return Err(CoordError::invalid(
                "schedule.expr",
                format!("{expr:?}: field {} has an empty list element", i + 1),
            ));
        }
    }
    Ok(())
}

/// At most this many parsed expressions are kept (about 5.3 KB each, so about 22 MB).
const CRON_CACHE_CAP: usize = 4096;

/// Parsed cron expressions, shared by every job on the same expression.
///
/// Why jobs do not each keep their parse: croner gives every parsed expression a
/// table of one byte per year up to 5000, 5,001 bytes, so a coordinator holding
/// 100,000 cron jobs held 511 MB of them. A job keeps its expression; its next
/// tick looks the parse up here, a hash lookup, or a parse of a few µs when the
/// expression fell out. Jobs on one expression (the common case: every minute,
/// every hour) share one parse; bounded, so 100,000 distinct expressions cost at
/// most `CRON_CACHE_CAP` parses of memory and re-parse when they fire.
struct CronCache {
    /// Each parse and the `clock` of its last use.
    map: HashMap<Arc<str>, (Arc<Cron>, u64)>,
    clock: u64,
}

/// A process-wide cache behind a mutex: the engine's thread is nearly its only
/// user (API validation is the other), so the lock is uncontended; parses happen
/// outside it.
static CRONS: LazyLock<Mutex<CronCache>> = LazyLock::new(|| {
    Mutex::new(CronCache {
        map: HashMap::new(),
        clock: 0,
    })
});

/// Drops every cached parse (and its memory: about 5.4 KB each). A follower calls
/// it after planning its jobs ahead (see `crate::warm`): it has no ticks to look up,
/// and the parses would otherwise sit in its memory when it is elected.
pub fn drop_cached_parses() {
    let mut c = CRONS.lock().unwrap_or_else(PoisonError::into_inner);
    c.map = HashMap::new();
}

/// The parse of `expr`, from the cache or parsed (and cached) now.
fn cron_of(expr: &str) -> Result<Arc<Cron>> {
    {
        let mut c = CRONS.lock().unwrap_or_else(PoisonError::into_inner);
        c.clock += 1;
        let now = c.clock;
        if let Some((cron, used)) = c.map.get_mut(expr) {
            *used = now;
            return Ok(Arc::clone(cron));
        }
    }
    // Errors are not cached: a bad expression is refused where it comes in, so it
    // is rarely seen twice.
    let cron = Arc::new(parse_cron(expr)?);
    let mut c = CRONS.lock().unwrap_or_else(PoisonError::into_inner);
    if c.map.len() >= CRON_CACHE_CAP {
        // Drop the older half at once: O(cap) every cap/2 inserts, O(1) each.
        let mut uses: Vec<u64> = c.map.values().map(|(_, used)| *used).collect();
        let (_, cut, _) = uses.select_nth_unstable(CRON_CACHE_CAP / 2);
        let cut = *cut;
        c.map.retain(|_, (_, used)| *used > cut);
    }
    let now = c.clock;
    c.map.insert(Arc::from(expr), (Arc::clone(&cron), now));
    Ok(cron)
}

fn parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Optional).build()
}

/// [`parse_cron`]'s quick way, for a valid expression of 5 or 6 fields without a
/// nickname; `None` for any other.
fn quick_parse(expr: &str) -> Option<Cron> {
    let fields = expr.split_whitespace().count();
    if expr.contains('@') || !(5..=6).contains(&fields) {
        return None;
    }
    let one_year = if fields == 5 {
        format!("0 {expr} 2000")
    } else {
        format!("{expr} 2000")
    };
    let mut cron = parser().parse(&one_year).ok()?;
    cron.pattern.years = EVERY_YEAR.pattern.years.clone();
    Some(cron)
}

/// A parse whose year field is `*`: its year component is copied (see
/// [`parse_cron`]); croner does not export the component's type.
static EVERY_YEAR: LazyLock<Cron> =
    LazyLock::new(|| parser().parse("* * * * * * *").expect("a valid expression"));

/// Parses `expr` as croner would, in about a fifth of croner's time.
///
/// Why: croner fills an omitted year field (`*`) by setting 3,031 bits one call at
/// a time, about 80 % of a parse; 100,000 distinct expressions took 1.3 s of a new
/// leader's start. An expression of 5 or 6 fields without a nickname is parsed
/// with a one-year field instead (after croner's own default of `0` seconds for 5
/// fields), then that component is replaced by a copy of the `*` component parsed
/// once: the same parse (a unit test compares them component by component). Any
/// other expression, and any error, goes through croner unchanged, so error texts
/// are croner's for what the user wrote.
fn parse_cron(expr: &str) -> Result<Cron> {
    check_cron_lists(expr)?;
    if let Some(cron) = quick_parse(expr) {
        return Ok(cron);
    }
    parser()
        .parse(expr)
        .map_err(|e| CoordError::invalid("schedule.expr", format!("{expr:?}: {e}")))
}

fn parse_tz(tz: &str) -> Result<Tz> {
    if tz.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(tz).map_err(|_| {
        CoordError::invalid(
            "schedule.time_zone",
            format!("{tz:?} is not an IANA time zone"),
        )
    })
}

/// A fixed period within `MIN_PERIOD_MS..=MAX_PERIOD_MS` (the ceiling keeps tick
/// arithmetic far from overflow).
fn period(field: &str, ms: u64) -> Result<()> {
    if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&ms) {
        return Err(CoordError::invalid(
            field,
            format!("{ms} is outside {MIN_PERIOD_MS}..={MAX_PERIOD_MS} ms"),
        ));
    }
    Ok(())
}

/// Checks a schedule; errors name the field.
pub fn validate(s: &Schedule) -> Result<()> {
    match s {
        Schedule::Cron { expr, time_zone } => {
            let cron = cron_of(expr)?;
            let tz = parse_tz(time_zone)?;
            // Must fire at all (e.g. not "0 0 30 2 *").
            let probe = tz
                .timestamp_millis_opt(0)
                .single()
                .unwrap_or_else(|| Tz::UTC.timestamp_millis_opt(0).unwrap());
            if cron.find_next_occurrence(&probe, false).is_err() {
                return Err(CoordError::invalid(
                    "schedule.expr",
                    format!("{expr:?} never fires"),
                ));
            }
            Ok(())
        }
        Schedule::FixedRate { every_ms } => period("schedule.every_ms", *every_ms),
        Schedule::FixedDelay { delay_ms } => period("schedule.delay_ms", *delay_ms),
        Schedule::Once { at_ms } => {
            chime_shared::limits::check_due("schedule.at_ms", *at_ms).map_err(CoordError::from)
        }
        _ => Ok(()),
    }
}

/// The shortest gap between two fires of `job`'s schedule: its period for fixed
/// rate and delay, and for cron the shortest gap among its next `samples` ticks
/// after `from_ms` (a cron expression's gaps repeat, so a few hundred ticks find the
/// shortest in practice). `None` for one-shot and manual jobs.
pub fn min_gap_ms(job: &JobSpec, from_ms: i64, samples: usize) -> Result<Option<u64>> {
    Ok(match &job.schedule {
        Schedule::FixedRate { every_ms } => Some(*every_ms),
        Schedule::FixedDelay { delay_ms } => Some(*delay_ms),
        Schedule::Once { .. } | Schedule::Manual => None,
        Schedule::Cron { .. } => {
            let c = Compiled::of(job)?;
            let mut best: Option<u64> = None;
            let mut prev = match c.raw_next(from_ms) {
                Some(t) => t,
                None => return Ok(None),
            };
            for _ in 0..samples {
                let Some(t) = c.raw_next(prev) else { break };
                let gap = (t - prev).max(0) as u64;
                best = Some(best.map_or(gap, |b| b.min(gap)));
                prev = t;
            }
            best
        }
    })
}

/// How a job stood before a change, as far as [`plan`] needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Before {
    /// Its last fire (the engine's, or the stored trigger state at startup).
    pub last_fire: Option<i64>,
    /// It was paused.
    pub was_paused: bool,
    /// `Some` when the job existed: its armed next tick.
    pub existing_next: Option<Option<i64>>,
}

/// What adding a job computes from its definition alone: no machine state but the
/// time and [`Before`], so a leader's start computes it for many jobs at once (see
/// `engine::jobs::plan_all`), and a follower ahead of its election (see
/// [`Planned`]); most of it is parsing cron expressions.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The schedule, compiled.
    pub compiled: Compiled,
    /// Ticks missed since the last fire (startup only).
    pub misfired: Vec<i64>,
    /// The next tick (none when paused, ended or never again).
    pub next_fire: Option<i64>,
}

/// Validates and compiles `spec`, and finds its missed ticks (at `startup`) and its
/// next one.
pub fn plan(spec: &JobSpec, now: i64, startup: bool, before: Before) -> Result<Plan> {
    // Jobs reach the store through the API (validated) or `etcdctl put` (not):
    // validate again, so a hand-written job cannot take the engine down.
    spec.validate()?;
    let compiled = Compiled::of(spec)?;
    let Before {
        last_fire,
        was_paused,
        existing_next,
    } = before;
    let mut plan = Plan {
        compiled,
        misfired: Vec::new(),
        next_fire: None,
    };
    if spec.paused {
        return Ok(plan);
    }
    // A resumed job starts from now; at startup, missed ticks are misfires: since the
    // last fire, or since its creation if it never fired (else a leader dying before
    // a new job's first tick would make the ticks until the next leader vanish
    // without a trace).
    let from = match (startup, last_fire) {
        (true, Some(l)) if !was_paused => l,
        (true, None) if spec.created_at_ms > 0 => spec.created_at_ms,
        _ => now.max(last_fire.unwrap_or(i64::MIN)),
    };
    if startup && from < now {
        let (ticks, more) = plan.compiled.ticks_between(spec, from, now, 10_000);
        plan.misfired = ticks;
        if more {
            tracing::warn!(job = %spec.name, "more than 10,000 missed ticks; the oldest are dropped");
        }
    }
    plan.next_fire = match (&plan.compiled, existing_next) {
        (Compiled::Delay { delay_ms }, None) => Some(now.max(spec.start_at_ms) + delay_ms),
        (Compiled::Delay { .. }, Some(next)) => next,
        _ => plan
            .compiled
            .next_after(spec, now.max(last_fire.unwrap_or(i64::MIN))),
    };
    Ok(plan)
}

/// A [`plan`] made ahead, for a start at a later instant: by a follower for its jobs
/// as new at startup and never fired ([`Before`] empty), at `at_ms`.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The job's version it was made for.
    pub version: i64,
    /// When.
    pub at_ms: i64,
    /// The plan.
    pub plan: Plan,
}

impl Planned {
    /// Plans `spec` (at `version`) now, as a start would for a job that never fired;
    /// `None` for an invalid job (the start will say why).
    pub fn ahead(spec: &JobSpec, version: i64, now_ms: i64) -> Option<Self> {
        let plan = plan(spec, now_ms, true, Before::default()).ok()?;
        Some(Self {
            version,
            at_ms: now_ms,
            plan,
        })
    }

    /// This plan (moved out), if it is what [`plan`] would answer for `spec` at
    /// `version`, as new at a start at `now_ms` with no last fire. It is when nothing about the job
    /// changed and no tick came between: its ticks missed since creation are the same,
    /// and its next tick (after `at_ms`) is also the first after `now_ms`. A delay
    /// schedule's first tick counts from the start itself, so it is planned again.
    pub fn reuse(
        &self,
        spec: &JobSpec,
        version: i64,
        last: Option<i64>,
        now_ms: i64,
    ) -> Option<Plan> {
        let unchanged = self.version == version && last.is_none() && self.at_ms <= now_ms;
        let still_ahead = spec.paused || self.plan.next_fire.is_some_and(|t| t > now_ms);
        let timeless = !matches!(self.plan.compiled, Compiled::Delay { .. });
        (unchanged && still_ahead && timeless).then(|| self.plan.clone())
    }
}

impl Compiled {
    /// Compiles a (validated) job's schedule.
    pub fn of(job: &JobSpec) -> Result<Self> {
        Ok(match &job.schedule {
            Schedule::Cron { expr, time_zone } => {
                // Parsed here so a bad expression is refused now, not at its tick.
                cron_of(expr)?;
                Compiled::Cron {
                    expr: Arc::from(expr.as_str()),
                    tz: parse_tz(time_zone)?,
                }
            }
            Schedule::FixedRate { every_ms } => Compiled::Rate {
                every_ms: (*every_ms).max(1) as i64,
                anchor_ms: if job.start_at_ms > 0 {
                    job.start_at_ms
                } else {
                    job.created_at_ms
                },
            },
            Schedule::FixedDelay { delay_ms } => Compiled::Delay {
                delay_ms: *delay_ms as i64,
            },
            Schedule::Once { at_ms } => Compiled::Once(*at_ms),
            Schedule::Manual => Compiled::Manual,
        })
    }

    /// The first tick strictly after `after_ms`, ignoring the job's bounds.
    fn raw_next(&self, after_ms: i64) -> Option<i64> {
        match self {
            Compiled::Cron { expr, tz } => {
                // Parsed when the job was compiled, so this parse (if the cache
                // dropped it) succeeds.
                let cron = cron_of(expr).ok()?;
                let at: DateTime<Tz> = Utc
                    .timestamp_millis_opt(after_ms)
                    .single()?
                    .with_timezone(tz);
                cron.find_next_occurrence(&at, false)
                    .ok()
                    .map(|t| t.timestamp_millis())
            }
            Compiled::Rate {
                every_ms,
                anchor_ms,
            } => {
                if after_ms < *anchor_ms {
                    Some(*anchor_ms)
                } else {
                    // Checked: a stored job from before the bounds existed must not
                    // take the engine down.
                    let steps = (after_ms.checked_sub(*anchor_ms)? / every_ms).checked_add(1)?;
                    anchor_ms.checked_add(steps.checked_mul(*every_ms)?)
                }
            }
            Compiled::Once(at) => (*at > after_ms).then_some(*at),
            Compiled::Delay { .. } | Compiled::Manual => None,
        }
    }

    /// The first tick of `job` strictly after `after_ms`, within its start/end bounds.
    pub fn next_after(&self, job: &JobSpec, after_ms: i64) -> Option<i64> {
        let from = if job.start_at_ms > 0 {
            after_ms.max(job.start_at_ms - 1)
        } else {
            after_ms
        };
        let t = self.raw_next(from)?;
        (job.end_at_ms == 0 || t <= job.end_at_ms).then_some(t)
    }

    /// Every tick in `(from_ms, to_ms]`, at most `limit` of them (oldest first), and
    /// whether there were more.
    pub fn ticks_between(
        &self,
        job: &JobSpec,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> (Vec<i64>, bool) {
        let mut out = Vec::new();
        let mut t = from_ms;
        while let Some(n) = self.next_after(job, t) {
            if n > to_ms {
                return (out, false);
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(n);
            t = n;
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::job;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn cron(expr: &str, tz: &str) -> JobSpec {
        JobSpec {
            schedule: Schedule::Cron {
                expr: expr.into(),
                time_zone: tz.into(),
            },
            ..job("c")
        }
    }

    /// Inputs the fuzzer found (fuzz/corpus: formerly crashes and hangs).
    #[test]
    fn fuzz_finds_are_refused() {
        for expr in [
            "0 , * * * *",
            "0 0 , * * *",
            ", 0 2 * * *",
            "1,,2 * * * * *",
            "0 1, * * *",
        ] {
            let e = validate(&Schedule::Cron {
                expr: expr.into(),
                time_zone: String::new(),
            })
            .unwrap_err();
            assert!(e.to_string().contains("empty list element"), "{expr}: {e}");
        }
        for every_ms in [1u64 << 63, i64::MAX as u64, MAX_PERIOD_MS + 1] {
            assert!(validate(&Schedule::FixedRate { every_ms }).is_err());
            assert!(validate(&Schedule::FixedDelay { delay_ms: every_ms }).is_err());
        }
        let far = JobSpec {
            start_at_ms: 8_210_266_876_799_999,
            ..cron("0 0 0 * * *", "Asia/Tokyo")
        };
        assert!(far.validate().is_err());
        // A stored job past the checks still cannot overflow the rate arithmetic.
        let c = Compiled::Rate {
            every_ms: i64::MAX,
            anchor_ms: 1,
        };
        assert_eq!(c.raw_next(i64::MAX - 1), None);
    }

    /// The quick parse is croner's parse: every component equal, and the same
    /// ticks (which also covers the flags croner keeps to itself).
    #[test]
    fn the_quick_parse_is_crons_own() {
        let t0 = ms("2026-02-27T13:14:15Z");
        for expr in [
            "* * * * *",
            "*/5 * * * *",
            "0 9-17/2 * * MON-FRI",
            "30 2 L * ?",
            "0 0 15W * *",
            "0 12 ? * 5#2",
            "0 0 0 * * 5L",
            "0 0 1 JAN,JUL *",
            "0 0 13 * +FRI",
            "15 10 * * 7",
            "0 0 29 2 *",
            "*/15 * * * * *",
            "5 6 7 8 6 *",
            "0 0 12 1 1 * 2030",
            "@daily",
            "0 0 1-7 * SUN",
        ] {
            let quick = parse_cron(expr).unwrap();
            let full = parser().parse(expr).unwrap();
            let fields = expr.split_whitespace().count();
            assert_eq!(
                quick_parse(expr).is_some(),
                fields < 7 && !expr.starts_with('@')
            );
            let (q, f) = (&quick.pattern, &full.pattern);
            assert_eq!(
                [
                    &q.seconds,
                    &q.minutes,
                    &q.hours,
                    &q.days,
                    &q.months,
                    &q.days_of_week,
                    &q.years
                ],
                [
                    &f.seconds,
                    &f.minutes,
                    &f.hours,
                    &f.days,
                    &f.months,
                    &f.days_of_week,
                    &f.years
                ],
                "{expr}"
            );
            let (mut a, mut b) = (
                Utc.timestamp_millis_opt(t0).unwrap(),
                Utc.timestamp_millis_opt(t0).unwrap(),
            );
            for _ in 0..50 {
                let (x, y) = (
                    quick.find_next_occurrence(&a, false).ok(),
                    full.find_next_occurrence(&b, false).ok(),
                );
                assert_eq!(x, y, "{expr}");
                let Some(x) = x else { break };
                (a, b) = (x, x);
            }
        }
        // Errors are croner's, for what was written.
        let e = parse_cron("0 0 32 * *").unwrap_err().to_string();
        let f = parser().parse("0 0 32 * *").unwrap_err().to_string();
        assert!(e.contains(&f), "{e} / {f}");
    }

    #[test]
    fn jobs_on_one_expression_share_its_parse() {
        let a = Compiled::of(&cron("7 7 7 * * *", "")).unwrap();
        let b = Compiled::of(&cron("7 7 7 * * *", "Asia/Tokyo")).unwrap();
        let (Compiled::Cron { expr: a, .. }, Compiled::Cron { expr: b, .. }) = (a, b) else {
            panic!("not cron");
        };
        assert!(Arc::ptr_eq(&cron_of(&a).unwrap(), &cron_of(&b).unwrap()));
    }

    /// More distinct expressions than the cache holds: it stays bounded, and a job
    /// whose parse was dropped still finds its next tick (parsed again).
    #[test]
    fn the_parse_cache_is_bounded_and_a_dropped_parse_comes_back() {
        let first = cron("0 0 0 * * *", "");
        let c = Compiled::of(&first).unwrap();
        for h in 0..3 {
            for m in 0..60 {
                for s in 0..60 {
                    cron_of(&format!("{s} {m} {h} 1 1 *")).unwrap();
                }
            }
        }
        let len = CRONS.lock().unwrap().map.len();
        assert!(len <= CRON_CACHE_CAP, "{len} parses kept");
        let t0 = ms("2026-01-01T12:00:00Z");
        assert_eq!(c.next_after(&first, t0), Some(ms("2026-01-02T00:00:00Z")));
    }

    #[test]
    fn min_gap_of_each_kind() {
        let t0 = ms("2026-03-01T00:00:00Z");
        let gap = |j: &JobSpec| min_gap_ms(j, t0, 512).unwrap();
        assert_eq!(gap(&cron("*/15 * * * * *", "")), Some(15_000));
        assert_eq!(gap(&cron("0 0 * * * *", "")), Some(3_600_000));
        // Twice a day, one second apart: the shortest gap is the one that counts.
        assert_eq!(gap(&cron("0,1 0 3 * * *", "")), Some(1_000));
        let rate = JobSpec {
            schedule: Schedule::FixedRate { every_ms: 250 },
            ..job("r")
        };
        assert_eq!(gap(&rate), Some(250));
        let manual = JobSpec {
            schedule: Schedule::Manual,
            ..job("m")
        };
        assert_eq!(gap(&manual), None);
    }

    #[test]
    fn cron_with_seconds_in_utc() {
        let j = cron("*/15 * * * * *", "");
        let c = Compiled::of(&j).unwrap();
        let t0 = ms("2026-01-01T00:00:07Z");
        assert_eq!(c.next_after(&j, t0), Some(ms("2026-01-01T00:00:15Z")));
        assert_eq!(
            c.next_after(&j, ms("2026-01-01T00:00:15Z")),
            Some(ms("2026-01-01T00:00:30Z"))
        );
        let (ticks, more) = c.ticks_between(&j, t0, ms("2026-01-01T00:01:00Z"), 10);
        assert_eq!(ticks.len(), 4);
        assert!(!more);
    }

    #[test]
    fn dst_spring_forward_and_fall_back_in_berlin() {
        // 02:30 local does not exist on 2026-03-29 in Europe/Berlin: fires once, at 03:00.
        let j = cron("0 30 2 * * *", "Europe/Berlin");
        let c = Compiled::of(&j).unwrap();
        let next = c.next_after(&j, ms("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(next, ms("2026-03-29T01:00:00Z"), "03:00 CEST = 01:00Z");
        // 02:30 happens twice on 2026-10-25: fires once.
        let a = c.next_after(&j, ms("2026-10-24T12:00:00Z")).unwrap();
        let b = c.next_after(&j, a).unwrap();
        assert_eq!(a, ms("2026-10-25T00:30:00Z"), "first 02:30 (CEST)");
        assert_eq!(b, ms("2026-10-26T01:30:00Z"), "next day, CET");
    }

    #[test]
    fn fixed_rate_aligns_on_anchor_and_bounds_apply() {
        let mut j = JobSpec {
            schedule: Schedule::FixedRate { every_ms: 1_000 },
            ..job("r")
        };
        j.created_at_ms = 10_500;
        let c = Compiled::of(&j).unwrap();
        assert_eq!(c.next_after(&j, 0), Some(10_500));
        assert_eq!(c.next_after(&j, 10_500), Some(11_500));
        assert_eq!(c.next_after(&j, 11_499), Some(11_500));
        j.end_at_ms = 12_000;
        assert_eq!(c.next_after(&j, 11_500), None);
        let once = JobSpec {
            schedule: Schedule::Once { at_ms: 5_000 },
            ..job("o")
        };
        let c = Compiled::of(&once).unwrap();
        assert_eq!(c.next_after(&once, 4_999), Some(5_000));
        assert_eq!(c.next_after(&once, 5_000), None);
    }

    #[test]
    fn bad_schedules_name_the_field() {
        for (s, f) in [
            (
                Schedule::Cron {
                    expr: "nope".into(),
                    time_zone: String::new(),
                },
                "schedule.expr",
            ),
            (
                Schedule::Cron {
                    expr: "0 0 30 2 *".into(),
                    time_zone: String::new(),
                },
                "schedule.expr",
            ),
            (
                Schedule::Cron {
                    expr: "* * * * *".into(),
                    time_zone: "Nowhere/X".into(),
                },
                "schedule.time_zone",
            ),
            (Schedule::FixedRate { every_ms: 0 }, "schedule.every_ms"),
            (Schedule::FixedDelay { delay_ms: 1 }, "schedule.delay_ms"),
            (Schedule::Once { at_ms: -1 }, "schedule.at_ms"),
        ] {
            match validate(&s) {
                Err(CoordError::InvalidArgument { field, .. }) => assert_eq!(field, f, "{s:?}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }
}
