//! The alert evaluator's logic, pure: given the rules, what it saw this tick
//! ([`Observed`]) and its saved [`State`], it decides which alerts start firing,
//! repeat or resolve, and queues one notice per sink for each. No I/O here: the
//! task in `mod.rs` gathers the observations, saves the state (fenced) and
//! delivers the queued notices; tests drive this on plain values.
//!
//! Why the state is what it is:
//! - **Deduplicated**: an alert is keyed by (rule, subject) — a job, a family, a
//!   group — and says "firing" once when it starts, not per failed run.
//! - **Rate-limited**: a rule sends at most [`NOTICES_PER_MINUTE`] notices a
//!   minute; more are dropped and counted, and the alert's state still changes,
//!   so its recovery is told.
//! - **Failover without a storm or a gap**: the state (what fires, the notices not
//!   yet delivered, how far the run events were read) is saved in Redis by the
//!   leader only; a new leader carries on from it, so an alert that fired before
//!   does not fire again, and events saved before the old leader died are read.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::rule::{AlertRule, Condition};
use super::sink::{Notice, NoticeStatus, Sink};
use crate::model::{RunEvent, RunState};

/// Most notices one rule sends a minute.
pub const NOTICES_PER_MINUTE: u32 = 20;
/// After becoming the leader, worker counts wait this long (workers reconnect to
/// a new leader within the adoption grace), so a failover never reads as "no
/// workers".
pub const WORKER_COUNT_GRACE_MS: i64 = 15_000;
/// A notice a sink keeps refusing with a retryable error is dropped after this
/// many attempts (about 17 minutes of backoff).
pub const MAX_ATTEMPTS: u32 = 10;

/// One alert firing now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firing {
    /// When it started, Unix ms.
    pub since_ms: i64,
    /// When it was last told (for `repeat_after_s`).
    pub last_sent_ms: i64,
}

/// A notice waiting for one sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The notice.
    pub notice: Notice,
    /// Where it goes (a copy: the rule may change or go meanwhile).
    pub sink: Sink,
    /// Attempts made.
    pub attempts: u32,
    /// Not before, Unix ms.
    pub next_at_ms: i64,
}

impl Outgoing {
    /// Backoff after a retryable failure: 2 s, 4 s, … up to 5 minutes.
    pub fn retry_later(&mut self, now_ms: i64) {
        self.attempts += 1;
        let delay = 2_000i64.saturating_mul(1 << self.attempts.min(8)) / 2;
        self.next_at_ms = now_ms + delay.min(300_000);
    }
}

/// What the evaluator keeps between ticks and leaders (saved as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Run events read up to this id.
    #[serde(default)]
    pub cursor: String,
    /// Alerts firing: rule → subject → since when.
    #[serde(default)]
    pub firing: BTreeMap<String, BTreeMap<String, Firing>>,
    /// The leader the evaluator last ran under.
    #[serde(default)]
    pub leader: String,
    /// Notices not delivered yet.
    #[serde(default)]
    pub outbox: Vec<Outgoing>,
    /// Per rule: the minute (Unix ms / 60,000) and notices sent in it.
    #[serde(default)]
    pub budget: BTreeMap<String, (i64, u32)>,
    /// Notices made so far (their ids' counter).
    #[serde(default)]
    pub made: u64,
}

/// What one tick saw.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Now, Unix ms.
    pub now_ms: i64,
    /// This leader's address.
    pub me: String,
    /// When this leader's term started, Unix ms.
    pub term_started_ms: i64,
    /// The deployment's name (notices say it).
    pub cluster: String,
    /// The queue family watched.
    pub family: String,
    /// Run events since the cursor, oldest first.
    pub events: Vec<RunEvent>,
    /// Jobs that exist: name → (group, handler).
    pub jobs: HashMap<String, (String, String)>,
    /// For each job an alert fires about: the state of its newest run (`None`:
    /// no run, or the job is gone).
    pub newest: HashMap<String, Option<RunState>>,
    /// Dead letters of the family (`None`: not known this tick).
    pub dead: Option<u64>,
    /// The family's oldest due age, ms (`None`: not known this tick).
    pub lag_ms: Option<u64>,
    /// Live workers per group.
    pub groups: BTreeMap<String, u32>,
}

/// What a tick decided, beside the queued notices: for metrics and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decided {
    /// Notices queued (one per sink).
    pub queued: usize,
    /// Notices dropped by the rate limit.
    pub suppressed: usize,
}

/// One tick: applies `seen` to `state` under `rules`, queuing notices in
/// `state.outbox`, and moves the cursor past the events seen.
pub fn evaluate(rules: &[AlertRule], state: &mut State, seen: &Observed) -> Decided {
    let mut out = Decided::default();
    let now = seen.now_ms;
    // Alerts of rules that are gone or disabled are forgotten without a word.
    state
        .firing
        .retain(|name, _| rules.iter().any(|r| &r.name == name && !r.disabled));
    state
        .budget
        .retain(|name, _| rules.iter().any(|r| &r.name == name));
    let leader_changed = !state.leader.is_empty() && state.leader != seen.me;
    let previous_leader = std::mem::replace(&mut state.leader, seen.me.clone());
    for rule in rules.iter().filter(|r| !r.disabled) {
        let mut t = Tick {
            rule,
            state: &mut *state,
            seen,
            out: &mut out,
        };
        match &rule.condition {
            Condition::RunFailed | Condition::FireSkipped => t.runs(),
            Condition::DeadLetters { above } => {
                if let Some(dead) = seen.dead {
                    let summary = format!(
                        "family {}: {dead} dead letters (more than {above})",
                        seen.family
                    );
                    t.set(&seen.family, dead > *above, &summary, "");
                }
            }
            Condition::QueueLag { above_ms } => {
                if let Some(lag) = seen.lag_ms {
                    let summary = format!(
                        "family {}: the oldest due item has waited {} s (more than {} s)",
                        seen.family,
                        lag / 1000,
                        above_ms / 1000
                    );
                    t.set(&seen.family, lag > *above_ms, &summary, "");
                }
            }
            Condition::WorkersBelow { min } => {
                if now - seen.term_started_ms >= WORKER_COUNT_GRACE_MS {
                    let group = &rule.scope.group;
                    let n = seen.groups.get(group).copied().unwrap_or(0);
                    let summary = format!("group {group}: {n} live workers (fewer than {min})");
                    t.set(group, n < *min, &summary, "");
                }
            }
            Condition::LeaderChanged => {
                if leader_changed {
                    let summary =
                        format!("coordinator {} leads now (was {previous_leader})", seen.me);
                    t.notify("leader", NoticeStatus::Firing, &summary, "");
                }
            }
        }
    }
    if let Some(last) = seen.events.last() {
        state.cursor = last.id.clone();
    }
    out
}

/// One rule's part of a tick.
struct Tick<'a> {
    rule: &'a AlertRule,
    state: &'a mut State,
    seen: &'a Observed,
    out: &'a mut Decided,
}

impl Tick<'_> {
    /// Run and fire conditions: events start alerts per job; a job's newest run
    /// resolves them.
    fn runs(&mut self) {
        let skipped = matches!(self.rule.condition, Condition::FireSkipped);
        for e in &self.seen.events {
            let hit = match e.state {
                RunState::Skipped => skipped,
                RunState::Failed | RunState::TimedOut => !skipped,
                _ => false,
            };
            let covered = match self.seen.jobs.get(&e.job) {
                Some((group, handler)) => self.rule.covers_job(&e.job, group, handler),
                // Deleted since: only a rule naming it still covers it.
                None => self.rule.scope.job == e.job,
            };
            if hit && covered {
                let what = match e.state {
                    RunState::Skipped => "was skipped",
                    RunState::TimedOut => "timed out",
                    _ => "failed",
                };
                let summary = format!("job {}: run {} {what}", e.job, e.run_id);
                self.fire(&e.job, &summary, &e.error);
            }
        }
        let firing: Vec<String> = self
            .state
            .firing
            .get(&self.rule.name)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for job in firing {
            let Some(newest) = self.seen.newest.get(&job) else {
                continue;
            };
            let resolved = match newest {
                None => Some(format!("job {job}: gone")),
                Some(RunState::Succeeded) if !skipped => {
                    Some(format!("job {job}: its newest run succeeded"))
                }
                Some(s) if skipped && *s != RunState::Skipped => {
                    Some(format!("job {job}: its newest fire ran"))
                }
                _ => None,
            };
            if let Some(summary) = resolved {
                self.resolve(&job, &summary);
            }
        }
    }

    /// A state condition: firing while `on`.
    fn set(&mut self, subject: &str, on: bool, summary: &str, details: &str) {
        if on {
            self.fire(subject, summary, details);
        } else {
            self.resolve(subject, summary);
        }
    }

    /// Starts (or repeats) the alert on `subject`.
    fn fire(&mut self, subject: &str, summary: &str, details: &str) {
        let now = self.seen.now_ms;
        let repeat_ms =
            i64::try_from(self.rule.repeat_after_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let alerts = self.state.firing.entry(self.rule.name.clone()).or_default();
        match alerts.get_mut(subject) {
            None => {
                alerts.insert(
                    subject.to_owned(),
                    Firing {
                        since_ms: now,
                        last_sent_ms: now,
                    },
                );
            }
            Some(f) if repeat_ms > 0 && now - f.last_sent_ms >= repeat_ms => {
                f.last_sent_ms = now;
            }
            Some(_) => return,
        }
        self.notify(subject, NoticeStatus::Firing, summary, details);
    }

    /// Ends the alert on `subject`, if it fires.
    fn resolve(&mut self, subject: &str, summary: &str) {
        let Some(alerts) = self.state.firing.get_mut(&self.rule.name) else {
            return;
        };
        if alerts.remove(subject).is_none() {
            return;
        }
        if alerts.is_empty() {
            self.state.firing.remove(&self.rule.name);
        }
        if self.rule.notify_resolved {
            self.notify(subject, NoticeStatus::Resolved, summary, "");
        }
    }

    /// Queues a notice for each of the rule's sinks, within the rule's budget.
    fn notify(&mut self, subject: &str, status: NoticeStatus, summary: &str, details: &str) {
        let now = self.seen.now_ms;
        let minute = now / 60_000;
        let budget = self
            .state
            .budget
            .entry(self.rule.name.clone())
            .or_insert((minute, 0));
        if budget.0 != minute {
            *budget = (minute, 0);
        }
        if budget.1 >= NOTICES_PER_MINUTE {
            self.out.suppressed += self.rule.sinks.len();
            return;
        }
        budget.1 += 1;
        self.state.made += 1;
        let status_name = match status {
            NoticeStatus::Firing => "firing",
            NoticeStatus::Resolved => "resolved",
        };
        let notice = Notice {
            id: format!(
                "{}/{subject}/{status_name}/{now}-{}",
                self.rule.name, self.state.made
            ),
            rule: self.rule.name.clone(),
            status,
            condition: self.rule.condition.kind().to_owned(),
            subject: subject.to_owned(),
            summary: summary.to_owned(),
            details: if self.rule.description.is_empty() {
                details.to_owned()
            } else if details.is_empty() {
                self.rule.description.clone()
            } else {
                format!("{details}\n{}", self.rule.description)
            },
            at_ms: now,
            cluster: self.seen.cluster.clone(),
        };
        for sink in &self.rule.sinks {
            self.state.outbox.push(Outgoing {
                notice: notice.clone(),
                sink: sink.clone(),
                attempts: 0,
                next_at_ms: now,
            });
            self.out.queued += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, condition: Condition) -> AlertRule {
        AlertRule {
            name: name.into(),
            description: String::new(),
            condition,
            scope: Default::default(),
            sinks: vec![Sink::Slack {
                url: "http://127.0.0.1:9/slack".into(),
            }],
            repeat_after_s: 0,
            notify_resolved: true,
            disabled: false,
        }
    }

    fn seen(now_ms: i64) -> Observed {
        Observed {
            now_ms,
            me: "c1:7070".into(),
            term_started_ms: 0,
            cluster: "chime".into(),
            family: "default".into(),
            ..Default::default()
        }
    }

    fn event(id: u64, job: &str, state: RunState) -> RunEvent {
        RunEvent {
            id: format!("1-{id}"),
            job: job.into(),
            run_id: format!("r{id}"),
            state,
            at_ms: 1,
            error: "boom".into(),
        }
    }

    fn statuses(st: &State) -> Vec<(String, NoticeStatus)> {
        st.outbox
            .iter()
            .map(|o| (o.notice.subject.clone(), o.notice.status))
            .collect()
    }

    #[test]
    fn a_failing_job_fires_once_and_resolves_on_success() {
        let rules = [rule("f", Condition::RunFailed)];
        let mut st = State::default();
        let mut s = seen(100_000);
        s.jobs.insert("j".into(), ("g".into(), "h".into()));
        s.events = vec![
            event(1, "j", RunState::Failed),
            event(2, "j", RunState::TimedOut),
        ];
        s.newest.insert("j".into(), Some(RunState::TimedOut));
        evaluate(&rules, &mut st, &s);
        assert_eq!(statuses(&st), [("j".into(), NoticeStatus::Firing)]);
        assert_eq!(st.cursor, "1-2");
        assert!(st.outbox[0].notice.summary.contains("r1 failed"));
        // More failures: nothing new. A success resolves it once.
        st.outbox.clear();
        s.events = vec![event(3, "j", RunState::Failed)];
        evaluate(&rules, &mut st, &s);
        assert!(st.outbox.is_empty());
        s.events.clear();
        s.newest.insert("j".into(), Some(RunState::Succeeded));
        evaluate(&rules, &mut st, &s);
        evaluate(&rules, &mut st, &s);
        assert_eq!(statuses(&st), [("j".into(), NoticeStatus::Resolved)]);
        assert!(st.firing.is_empty());
    }

    #[test]
    fn scope_and_kinds_select_events() {
        let mut scoped = rule("g", Condition::RunFailed);
        scoped.scope.group = "billing".into();
        let rules = [scoped, rule("s", Condition::FireSkipped)];
        let mut st = State::default();
        let mut s = seen(1_000);
        s.jobs.insert("a".into(), ("billing".into(), "h".into()));
        s.jobs.insert("b".into(), ("ops".into(), "h".into()));
        s.events = vec![
            event(1, "a", RunState::Failed),
            event(2, "b", RunState::Failed),
            event(3, "b", RunState::Skipped),
        ];
        evaluate(&rules, &mut st, &s);
        let fired: Vec<(String, String)> = st
            .outbox
            .iter()
            .map(|o| (o.notice.rule.clone(), o.notice.subject.clone()))
            .collect();
        assert_eq!(fired, [("g".into(), "a".into()), ("s".into(), "b".into())]);
    }

    #[test]
    fn state_conditions_fire_on_crossing_and_repeat_when_asked() {
        let mut lag = rule("lag", Condition::QueueLag { above_ms: 5_000 });
        lag.repeat_after_s = 60;
        let rules = [lag, rule("dead", Condition::DeadLetters { above: 0 })];
        let mut st = State::default();
        let mut s = seen(0);
        s.lag_ms = Some(1_000);
        s.dead = Some(0);
        evaluate(&rules, &mut st, &s);
        assert!(st.outbox.is_empty());
        s.lag_ms = Some(9_000);
        s.dead = Some(2);
        evaluate(&rules, &mut st, &s);
        assert_eq!(st.outbox.len(), 2);
        s.now_ms = 30_000;
        evaluate(&rules, &mut st, &s);
        assert_eq!(st.outbox.len(), 2, "no repeat before 60 s");
        s.now_ms = 61_000;
        evaluate(&rules, &mut st, &s);
        assert_eq!(
            st.outbox.len(),
            3,
            "the lag alert repeats, dead letters do not"
        );
        // Unknown this tick: nothing changes.
        s.lag_ms = None;
        s.dead = None;
        evaluate(&rules, &mut st, &s);
        assert_eq!(st.firing.len(), 2);
        s.lag_ms = Some(0);
        s.dead = Some(0);
        evaluate(&rules, &mut st, &s);
        assert!(st.firing.is_empty());
        assert_eq!(
            st.outbox[3..]
                .iter()
                .map(|o| o.notice.status)
                .collect::<Vec<_>>(),
            [NoticeStatus::Resolved, NoticeStatus::Resolved]
        );
    }

    #[test]
    fn worker_counts_wait_out_a_new_leader_s_grace() {
        let mut r = rule("w", Condition::WorkersBelow { min: 2 });
        r.scope.group = "g".into();
        let rules = [r];
        let mut st = State::default();
        let mut s = seen(10_000);
        s.term_started_ms = 0;
        evaluate(&rules, &mut st, &s);
        assert!(st.outbox.is_empty(), "inside the grace");
        s.now_ms = WORKER_COUNT_GRACE_MS + 1;
        s.groups.insert("g".into(), 1);
        evaluate(&rules, &mut st, &s);
        assert_eq!(statuses(&st), [("g".into(), NoticeStatus::Firing)]);
    }

    #[test]
    fn a_new_leader_is_told_once_and_a_failover_does_not_repeat_alerts() {
        let rules = [
            rule("lead", Condition::LeaderChanged),
            rule("dead", Condition::DeadLetters { above: 0 }),
        ];
        let mut st = State::default();
        let mut s = seen(1_000);
        s.dead = Some(3);
        evaluate(&rules, &mut st, &s);
        assert_eq!(
            statuses(&st),
            [("default".into(), NoticeStatus::Firing)],
            "first leader: no change told"
        );
        // The saved state goes to the next leader.
        let mut next: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        next.outbox.clear();
        s.me = "c2:7070".into();
        evaluate(&rules, &mut next, &s);
        evaluate(&rules, &mut next, &s);
        assert_eq!(statuses(&next), [("leader".into(), NoticeStatus::Firing)]);
    }

    #[test]
    fn a_rule_s_notices_are_rate_limited() {
        let rules = [rule("f", Condition::RunFailed)];
        let mut st = State::default();
        let mut s = seen(0);
        s.events = (0..30)
            .map(|i| event(i, &format!("j{i}"), RunState::Failed))
            .collect();
        for e in &s.events {
            s.jobs.insert(e.job.clone(), ("g".into(), "h".into()));
        }
        let d = evaluate(&rules, &mut st, &s);
        assert_eq!((d.queued, d.suppressed), (NOTICES_PER_MINUTE as usize, 10));
        assert_eq!(
            st.firing["f"].len(),
            30,
            "the state still knows every alert"
        );
    }

    #[test]
    fn retries_back_off() {
        let mut o = Outgoing {
            notice: Notice {
                id: "x".into(),
                rule: "r".into(),
                status: NoticeStatus::Firing,
                condition: "run_failed".into(),
                subject: "j".into(),
                summary: String::new(),
                details: String::new(),
                at_ms: 0,
                cluster: String::new(),
            },
            sink: Sink::Slack {
                url: "http://x".into(),
            },
            attempts: 0,
            next_at_ms: 0,
        };
        o.retry_later(0);
        assert_eq!((o.attempts, o.next_at_ms), (1, 2_000));
        o.retry_later(0);
        assert_eq!(o.next_at_ms, 4_000);
        for _ in 0..10 {
            o.retry_later(0);
        }
        assert_eq!(
            o.next_at_ms, 256_000,
            "capped by the exponent, under 5 minutes"
        );
    }
}
