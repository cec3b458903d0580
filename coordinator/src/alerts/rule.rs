//! Alert rules: what to watch (a condition), on what (a scope), and where to say
//! it (sinks). Stored as JSON under `<prefix>alerts/<name>`, written by the console,
//! the JSON API or `chime alert put` (which check them the way this module does, so
//! a bad rule never reaches etcd from there); a bad rule written straight to etcd is
//! skipped by the evaluator and named in its log.

use serde::{Deserialize, Serialize};

use super::sink::Sink;
use crate::error::{CoordError, Result};

/// Most sinks one rule notifies.
pub const MAX_SINKS: usize = 10;
/// Longest queue lag a rule may wait for, ms (7 days).
pub const MAX_LAG_MS: u64 = 7 * 86_400_000;
/// Shortest repeat interval of a rule that repeats, s.
pub const MIN_REPEAT_S: u64 = 60;

/// The key of rule `name` under the deployment's prefix.
pub fn key(name: &str) -> String {
    format!("alerts/{name}")
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Unique name (a job-name-like short name).
    pub name: String,
    /// What it is for, shown with its notices.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// What fires it.
    pub condition: Condition,
    /// What it watches (empty fields: everything the condition covers).
    #[serde(default)]
    pub scope: Scope,
    /// Where its notices go (1 to 10).
    pub sinks: Vec<Sink>,
    /// While it keeps firing, say so again this often, s (0: once; else at least 60).
    #[serde(default)]
    pub repeat_after_s: u64,
    /// Also say when it resolves.
    #[serde(default = "yes")]
    pub notify_resolved: bool,
    /// Kept but not evaluated.
    #[serde(default)]
    pub disabled: bool,
}

fn yes() -> bool {
    true
}

/// What fires a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// A run of a job in scope failed or timed out after its retries. Resolves when
    /// the job's newest finished run succeeded (or the job is gone).
    RunFailed,
    /// A fire of a job in scope was skipped (overlap or misfire policy, a fire
    /// missed while no leader ran). Resolves when a later fire ran.
    FireSkipped,
    /// The queue family holds more than `above` dead letters (0: any).
    DeadLetters {
        /// Dead letters tolerated.
        #[serde(default)]
        above: u64,
    },
    /// The family's oldest due item has waited longer than `above_ms`.
    QueueLag {
        /// Lag tolerated, ms.
        above_ms: u64,
    },
    /// The group has fewer than `min` live workers.
    WorkersBelow {
        /// Workers wanted.
        min: u32,
    },
    /// A new coordinator became the leader (a notice only: nothing to resolve).
    LeaderChanged,
}

impl Condition {
    /// Its `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Condition::RunFailed => "run_failed",
            Condition::FireSkipped => "fire_skipped",
            Condition::DeadLetters { .. } => "dead_letters",
            Condition::QueueLag { .. } => "queue_lag",
            Condition::WorkersBelow { .. } => "workers_below",
            Condition::LeaderChanged => "leader_changed",
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// One job (run and fire conditions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job: String,
    /// The jobs of one group (run and fire conditions), or the group whose workers
    /// are counted (`workers_below`, required there).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The jobs running one handler (run and fire conditions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handler: String,
    /// The queue family (queue conditions; empty: the one the coordinators serve).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
}

impl AlertRule {
    /// Parses and checks a rule's JSON; errors name the field (`condition.above_ms`,
    /// `sinks[1].url`, …).
    pub fn parse(json: &[u8], family: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_slice(json);
        let rule: AlertRule = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "rule".to_owned() } else { path };
            CoordError::invalid(field, e.into_inner())
        })?;
        rule.check(family)?;
        Ok(rule)
    }

    /// Checks every field; `family` is the queue family the coordinators serve.
    pub fn check(&self, family: &str) -> Result<()> {
        chime_shared::limits::check_handler("name", &self.name)?;
        if self.description.len() > 1_000 {
            return Err(CoordError::invalid("description", "at most 1,000 bytes"));
        }
        let s = &self.scope;
        for (field, v) in [
            ("scope.job", &s.job),
            ("scope.group", &s.group),
            ("scope.handler", &s.handler),
            ("scope.family", &s.family),
        ] {
            if !v.is_empty() {
                chime_shared::limits::check_handler(field, v)?;
            }
        }
        let unused = |fields: &[(&str, &String)]| -> Result<()> {
            match fields.iter().find(|(_, v)| !v.is_empty()) {
                Some((f, _)) => Err(CoordError::invalid(
                    *f,
                    format!("{} does not use this scope", self.condition.kind()),
                )),
                None => Ok(()),
            }
        };
        match &self.condition {
            Condition::RunFailed | Condition::FireSkipped => {
                unused(&[("scope.family", &s.family)])?;
            }
            Condition::DeadLetters { above } => {
                unused(&[
                    ("scope.job", &s.job),
                    ("scope.group", &s.group),
                    ("scope.handler", &s.handler),
                ])?;
                if *above > 1_000_000_000 {
                    return Err(CoordError::invalid(
                        "condition.above",
                        "at most 1,000,000,000",
                    ));
                }
            }
            Condition::QueueLag { above_ms } => {
                unused(&[
                    ("scope.job", &s.job),
                    ("scope.group", &s.group),
                    ("scope.handler", &s.handler),
                ])?;
                if !(1_000..=MAX_LAG_MS).contains(above_ms) {
                    return Err(CoordError::invalid(
                        "condition.above_ms",
                        format!("must be within 1000..={MAX_LAG_MS}"),
                    ));
                }
            }
            Condition::WorkersBelow { min } => {
                unused(&[
                    ("scope.job", &s.job),
                    ("scope.handler", &s.handler),
                    ("scope.family", &s.family),
                ])?;
                if s.group.is_empty() {
                    return Err(CoordError::invalid(
                        "scope.group",
                        "workers_below counts the workers of one group: name it",
                    ));
                }
                if !(1..=10_000).contains(min) {
                    return Err(CoordError::invalid(
                        "condition.min",
                        "must be within 1..=10000",
                    ));
                }
            }
            Condition::LeaderChanged => unused(&[
                ("scope.job", &s.job),
                ("scope.group", &s.group),
                ("scope.handler", &s.handler),
                ("scope.family", &s.family),
            ])?,
        }
        // The coordinators watch one family: a rule on another could never fire.
        if !s.family.is_empty() && s.family != family {
            return Err(CoordError::invalid(
                "scope.family",
                format!("this cluster's coordinators watch family {family:?}"),
            ));
        }
        if self.sinks.is_empty() || self.sinks.len() > MAX_SINKS {
            return Err(CoordError::invalid(
                "sinks",
                format!("1 to {MAX_SINKS} sinks"),
            ));
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            sink.check(&format!("sinks[{i}]"))?;
        }
        if self.repeat_after_s != 0 && !(MIN_REPEAT_S..=7 * 86_400).contains(&self.repeat_after_s) {
            return Err(CoordError::invalid(
                "repeat_after_s",
                format!("0 (never) or within {MIN_REPEAT_S}..=604800"),
            ));
        }
        Ok(())
    }

    /// The rule as shown to readers: sinks without their secrets.
    pub fn redacted(&self) -> Self {
        let mut r = self.clone();
        r.sinks = r.sinks.iter().map(Sink::redacted).collect();
        r
    }

    /// Whether a job (`name`, `group`, `handler`) is in this rule's scope.
    pub fn covers_job(&self, name: &str, group: &str, handler: &str) -> bool {
        let s = &self.scope;
        (s.job.is_empty() || s.job == name)
            && (s.group.is_empty() || s.group == group)
            && (s.handler.is_empty() || s.handler == handler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> serde_json::Value {
        serde_json::json!({ "kind": "webhook", "url": "http://127.0.0.1:9/hook" })
    }

    fn parse(v: serde_json::Value) -> Result<AlertRule> {
        AlertRule::parse(v.to_string().as_bytes(), "default")
    }

    fn field(v: serde_json::Value) -> String {
        match parse(v) {
            Err(CoordError::InvalidArgument { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn good_rules_parse_with_their_defaults() {
        let r = parse(serde_json::json!({
            "name": "lag", "condition": { "kind": "queue_lag", "above_ms": 5000 },
            "sinks": [hook()],
        }))
        .unwrap();
        assert_eq!(r.condition, Condition::QueueLag { above_ms: 5000 });
        assert!(r.notify_resolved && !r.disabled && r.repeat_after_s == 0);
        let r = parse(serde_json::json!({
            "name": "coupon", "condition": { "kind": "run_failed" },
            "scope": { "group": "billing", "handler": "sync" }, "sinks": [hook()],
        }))
        .unwrap();
        assert!(r.covers_job("a", "billing", "sync"));
        assert!(!r.covers_job("a", "billing", "other"));
        assert!(!r.covers_job("a", "ops", "sync"));
    }

    #[test]
    fn bad_rules_name_their_field() {
        let base = |cond: serde_json::Value, scope: serde_json::Value| serde_json::json!({ "name": "r", "condition": cond, "scope": scope, "sinks": [hook()] });
        let none = serde_json::json!({});
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "queue_lag", "above_ms": 10 }),
                none.clone()
            )),
            "condition.above_ms"
        );
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "sometimes" }),
                none.clone()
            )),
            "condition.kind"
        );
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "workers_below", "min": 2 }),
                none.clone()
            )),
            "scope.group"
        );
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "dead_letters" }),
                serde_json::json!({ "job": "j" })
            )),
            "scope.job"
        );
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "dead_letters" }),
                serde_json::json!({ "family": "other" })
            )),
            "scope.family"
        );
        assert_eq!(
            field(base(
                serde_json::json!({ "kind": "run_failed" }),
                serde_json::json!({ "jobs": "j" })
            )),
            "scope.jobs"
        );
        let mut r = base(serde_json::json!({ "kind": "run_failed" }), none.clone());
        r["sinks"] = serde_json::json!([]);
        assert_eq!(field(r.clone()), "sinks");
        r["sinks"] = serde_json::json!([hook(), { "kind": "webhook", "url": "ftp://x" }]);
        assert_eq!(field(r.clone()), "sinks[1].url");
        r["sinks"] = serde_json::json!([hook()]);
        r["repeat_after_s"] = serde_json::json!(5);
        assert_eq!(field(r.clone()), "repeat_after_s");
        r["repeat_after_s"] = serde_json::json!(0);
        r["name"] = serde_json::json!("bad name");
        assert_eq!(field(r), "name");
    }
}
