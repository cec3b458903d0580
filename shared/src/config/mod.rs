//! Live configuration: settings operators change while chime runs, kept in etcd under
//! one prefix (default `/chime/`), each a plain value `etcdctl put` can write.
//!
//! | key (under the prefix) | value | meaning |
//! |---|---|---|
//! | `queues/<family>/count` | 1..=4096 | number of queues N of a family |
//! | `queues/<family>/visibility_ms` | 100..=86400000 | visibility timeout |
//! | `queues/<family>/merge_window_ms` | 0..=86400000 | merge window |
//! | `handlers/<name>/rate_per_s` | 0.001..=1000000 | global rate limit of a handler (items/s) |
//! | `handlers/<name>/concurrency` | 1..=100000 | per-worker concurrency of a handler |
//! | `handlers/<name>/budget` | a budget name | shares that budget with other handlers |
//! | `budgets/<name>/rate_per_s` | 0.001..=1000000 | a rate shared equally by its handlers |
//!
//! [`parse`] turns one key and value into a [`Setting`] or a [`Rejection`] naming the
//! key and the reason; [`LiveConfig::apply`] folds settings in. A rejected value
//! leaves the last good one in force. [`watcher`] keeps a [`LiveConfig`] current from
//! a [`source::ConfigSource`] (etcd, or memory for `chime dev` and tests).

#[cfg(feature = "etcd")]
mod etcd_source;
pub mod follow;
pub mod source;
pub mod watcher;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::limits;

/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/chime/";

/// Live settings of one queue family.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FamilyConfig {
    /// Number of queues N, with the etcd revision that set it (resizes are ordered by
    /// it).
    pub count: Option<(u32, i64)>,
    /// Visibility timeout override.
    pub visibility_ms: Option<u64>,
    /// Merge window override.
    pub merge_window_ms: Option<u64>,
}

/// Live settings of one handler.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HandlerConfig {
    /// Global rate limit, items per second.
    pub rate_per_s: Option<f64>,
    /// Per-worker concurrency.
    pub concurrency: Option<u32>,
    /// Budget shared with other handlers.
    pub budget: Option<String>,
}

/// A rate shared by several handlers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BudgetConfig {
    /// Items per second for all its handlers together.
    pub rate_per_s: Option<f64>,
}

/// Every live setting, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveConfig {
    /// Queue families.
    pub families: BTreeMap<String, FamilyConfig>,
    /// Handlers.
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// Budgets.
    pub budgets: BTreeMap<String, BudgetConfig>,
    /// The store revision this view reflects.
    pub revision: i64,
}

/// One parsed setting: where it goes and its value (`None` = deleted, back to the
/// default).
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// `queues/<family>/count`
    QueueCount(String, Option<u32>),
    /// `queues/<family>/visibility_ms`
    Visibility(String, Option<u64>),
    /// `queues/<family>/merge_window_ms`
    MergeWindow(String, Option<u64>),
    /// `handlers/<name>/rate_per_s`
    HandlerRate(String, Option<f64>),
    /// `handlers/<name>/concurrency`
    HandlerConcurrency(String, Option<u32>),
    /// `handlers/<name>/budget`
    HandlerBudget(String, Option<String>),
    /// `budgets/<name>/rate_per_s`
    BudgetRate(String, Option<f64>),
}

/// Why a key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The key, relative to the prefix.
    pub key: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for Rejection {}

/// Largest rate accepted, items/s.
pub const MAX_RATE_PER_S: f64 = 1_000_000.0;

fn int_in(key: &str, raw: &str, lo: u64, hi: u64) -> Result<u64, Rejection> {
    let reject = |reason: String| Rejection {
        key: key.to_owned(),
        reason,
    };
    let v: u64 = raw
        .trim()
        .parse()
        .map_err(|_| reject(format!("{raw:?} is not a whole number in {lo}..={hi}")))?;
    if !(lo..=hi).contains(&v) {
        return Err(reject(format!("{v} is outside {lo}..={hi}")));
    }
    Ok(v)
}

fn rate(key: &str, raw: &str) -> Result<f64, Rejection> {
    let reject = |reason: String| Rejection {
        key: key.to_owned(),
        reason,
    };
    let v: f64 = raw
        .trim()
        .parse()
        .map_err(|_| reject(format!("{raw:?} is not a number of items per second")))?;
    if !v.is_finite() || !(0.001..=MAX_RATE_PER_S).contains(&v) {
        return Err(reject(format!(
            "{raw} is outside 0.001..={MAX_RATE_PER_S} items per second (delete the key for no limit)"
        )));
    }
    Ok(v)
}

fn name(key: &str, what: &str, raw: &str) -> Result<String, Rejection> {
    limits::check_handler(what, raw).map_err(|e| Rejection {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(raw.to_owned())
}

/// Top-level sections under the prefix that hold chime's own state (job
/// definitions, alert rules, leader election, what each `chime apply --set`
/// applied), not settings; the config watcher
/// skips them, in its first load and in every change after it.
pub const INTERNAL_SECTIONS: [&str; 5] = ["jobs", "alerts", "election", "applied", "audit"];

/// Whether `key` (relative to the prefix) belongs to an internal section.
pub fn is_internal(key: &str) -> bool {
    INTERNAL_SECTIONS
        .iter()
        .any(|s| key.strip_prefix(s).is_some_and(|r| r.starts_with('/')))
}

/// The handler a setting's key is about (`handlers/push/concurrency` → `push`,
/// `handlers/payments/charge/rate_per_s` → `payments/charge`); `None` for the
/// keys of families and budgets, which are cluster-wide. The key is not checked.
pub fn handler_of_key(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('/').collect();
    match parts[..] {
        ["handlers", h, _] => Some(h.to_owned()),
        ["handlers", ns, h, _] => Some(format!("{ns}/{h}")),
        _ => None,
    }
}

/// Parses one key (relative to the prefix) and its value; `value = None` is a
/// deletion. Unknown keys and bad values are rejections naming the key.
pub fn parse(key: &str, value: Option<&str>) -> Result<Setting, Rejection> {
    let reject = |reason: &str| Rejection {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let parts: Vec<&str> = key.split('/').collect();
    // A handler's name may carry a namespace (`handlers/payments/charge/concurrency`
    // sets `payments/charge`); other sections' names do not.
    let (section, subject, field) = match parts[..] {
        [section, subject, field] => (section, name(key, "name", subject)?, field),
        ["handlers", ns, handler, field] => {
            let qualified = format!("{ns}/{handler}");
            limits::check_qualified("name", &qualified).map_err(|e| Rejection {
                key: key.to_owned(),
                reason: e.to_string(),
            })?;
            ("handlers", qualified, field)
        }
        _ => {
            return Err(reject(
                "unknown key: expected <section>/<name>/<field> (handlers/<namespace>/<name>/<field> for a namespaced handler)",
            ));
        }
    };
    let s = |f: &dyn Fn(&str) -> Result<Setting, Rejection>, none: Setting| match value {
        Some(v) => f(v),
        None => Ok(none),
    };
    match (section, field) {
        ("queues", "count") => s(
            &|v| {
                Ok(Setting::QueueCount(
                    subject.clone(),
                    Some(int_in(key, v, 1, 4096)? as u32),
                ))
            },
            Setting::QueueCount(subject.clone(), None),
        ),
        ("queues", "visibility_ms") => s(
            &|v| {
                Ok(Setting::Visibility(
                    subject.clone(),
                    Some(int_in(key, v, 100, 86_400_000)?),
                ))
            },
            Setting::Visibility(subject.clone(), None),
        ),
        ("queues", "merge_window_ms") => s(
            &|v| {
                Ok(Setting::MergeWindow(
                    subject.clone(),
                    Some(int_in(key, v, 0, 86_400_000)?),
                ))
            },
            Setting::MergeWindow(subject.clone(), None),
        ),
        ("handlers", "rate_per_s") => s(
            &|v| Ok(Setting::HandlerRate(subject.clone(), Some(rate(key, v)?))),
            Setting::HandlerRate(subject.clone(), None),
        ),
        ("handlers", "concurrency") => s(
            &|v| {
                Ok(Setting::HandlerConcurrency(
                    subject.clone(),
                    Some(int_in(key, v, 1, 100_000)? as u32),
                ))
            },
            Setting::HandlerConcurrency(subject.clone(), None),
        ),
        ("handlers", "budget") => s(
            &|v| {
                Ok(Setting::HandlerBudget(
                    subject.clone(),
                    Some(name(key, "budget", v.trim())?),
                ))
            },
            Setting::HandlerBudget(subject.clone(), None),
        ),
        ("budgets", "rate_per_s") => s(
            &|v| Ok(Setting::BudgetRate(subject.clone(), Some(rate(key, v)?))),
            Setting::BudgetRate(subject.clone(), None),
        ),
        _ => Err(reject(
            "unknown key: known are queues/<family>/{count,visibility_ms,merge_window_ms}, \
             handlers/[<namespace>/]<name>/{rate_per_s,concurrency,budget}, budgets/<name>/rate_per_s",
        )),
    }
}

impl LiveConfig {
    /// Folds one setting in; `revision` is the store revision that wrote it.
    pub fn apply(&mut self, setting: Setting, revision: i64) {
        match setting {
            Setting::QueueCount(f, v) => {
                self.families.entry(f).or_default().count = v.map(|n| (n, revision))
            }
            Setting::Visibility(f, v) => self.families.entry(f).or_default().visibility_ms = v,
            Setting::MergeWindow(f, v) => self.families.entry(f).or_default().merge_window_ms = v,
            Setting::HandlerRate(h, v) => self.handlers.entry(h).or_default().rate_per_s = v,
            Setting::HandlerConcurrency(h, v) => {
                self.handlers.entry(h).or_default().concurrency = v
            }
            Setting::HandlerBudget(h, v) => self.handlers.entry(h).or_default().budget = v,
            Setting::BudgetRate(b, v) => self.budgets.entry(b).or_default().rate_per_s = v,
        }
        self.revision = self.revision.max(revision);
    }

    /// The settings of `family` (defaults when none are set).
    pub fn family(&self, family: &str) -> FamilyConfig {
        self.families.get(family).cloned().unwrap_or_default()
    }

    /// The settings of handler `name`.
    pub fn handler(&self, name: &str) -> HandlerConfig {
        self.handlers.get(name).cloned().unwrap_or_default()
    }
}

/// A key pattern operators can set, for help texts and the console.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KnownKey {
    /// The key, with `<family>`/`<name>` placeholders.
    pub pattern: &'static str,
    /// Accepted values.
    pub range: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Every settable key (the table at the top of this module, as data).
pub const KNOWN_KEYS: [KnownKey; 7] = [
    KnownKey {
        pattern: "queues/<family>/count",
        range: "1..=4096",
        doc: "number of queues N of a family; changing it resizes live, nothing lost or doubled",
    },
    KnownKey {
        pattern: "queues/<family>/visibility_ms",
        range: "100..=86400000",
        doc: "how long a popped item stays invisible before it is delivered again",
    },
    KnownKey {
        pattern: "queues/<family>/merge_window_ms",
        range: "0..=86400000",
        doc: "items with one merge key due within this window fire as one",
    },
    KnownKey {
        pattern: "handlers/<name>/rate_per_s",
        range: "0.001..=1000000",
        doc: "global rate limit of a handler across every worker (items/s)",
    },
    KnownKey {
        pattern: "handlers/<name>/concurrency",
        range: "1..=100000",
        doc: "items of this handler running at once on one worker",
    },
    KnownKey {
        pattern: "handlers/<name>/budget",
        range: "a budget name",
        doc: "the handler shares that budget's rate with the other handlers in it",
    },
    KnownKey {
        pattern: "budgets/<name>/rate_per_s",
        range: "0.001..=1000000",
        doc: "a rate shared equally by the handlers in the budget (items/s)",
    },
];

/// One stored setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Key, relative to the prefix.
    pub key: String,
    /// Value as stored.
    pub value: String,
    /// Revision of its last write.
    pub revision: i64,
}

/// A stored value the processes refuse (they keep the previous good one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Key.
    pub key: String,
    /// Value as stored.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

/// Every setting of a snapshot, what the processes refuse, and what is in force.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    /// The store revision read.
    pub revision: i64,
    /// Every stored setting.
    pub entries: Vec<Entry>,
    /// Stored values that are refused.
    pub refused: Vec<Refused>,
    /// The settings in force.
    pub in_force: LiveConfig,
}

/// Lists the settings of `snapshot` (internal sections left out).
pub fn listing(snapshot: &source::Snapshot) -> Listing {
    let mut out = Listing {
        revision: snapshot.revision,
        entries: Vec::new(),
        refused: Vec::new(),
        in_force: LiveConfig::default(),
    };
    for (k, v, rev) in snapshot.entries.iter().filter(|e| !is_internal(&e.0)) {
        out.entries.push(Entry {
            key: k.clone(),
            value: v.clone(),
            revision: *rev,
        });
        match parse(k, Some(v)) {
            Ok(s) => out.in_force.apply(s, *rev),
            Err(r) => out.refused.push(Refused {
                key: r.key,
                value: v.clone(),
                reason: r.reason,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_separates_refused_values() {
        let snap = source::Snapshot {
            entries: vec![
                ("queues/default/count".into(), "16".into(), 5),
                ("queues/default/visibility_ms".into(), "-3".into(), 6),
                ("jobs/nightly".into(), "{}".into(), 7),
            ],
            revision: 7,
        };
        let l = listing(&snap);
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.refused.len(), 1);
        assert_eq!(l.refused[0].key, "queues/default/visibility_ms");
        assert_eq!(l.in_force.family("default").count, Some((16, 5)));
    }

    #[test]
    fn parses_every_key() {
        assert_eq!(
            parse("queues/default/count", Some("16")),
            Ok(Setting::QueueCount("default".into(), Some(16)))
        );
        assert_eq!(
            parse("handlers/push/rate_per_s", Some("250.5")),
            Ok(Setting::HandlerRate("push".into(), Some(250.5)))
        );
        assert_eq!(
            parse("handlers/push/budget", Some(" apns ")),
            Ok(Setting::HandlerBudget("push".into(), Some("apns".into())))
        );
        assert_eq!(
            parse("queues/default/count", None),
            Ok(Setting::QueueCount("default".into(), None))
        );
        assert_eq!(
            handler_of_key("handlers/push/concurrency").as_deref(),
            Some("push")
        );
        assert_eq!(
            handler_of_key("handlers/payments/charge/budget").as_deref(),
            Some("payments/charge")
        );
        assert_eq!(handler_of_key("queues/default/count"), None);
        assert_eq!(handler_of_key("budgets/apns/rate_per_s"), None);
        // A namespaced handler's settings: four parts.
        assert_eq!(
            parse("handlers/payments/charge/concurrency", Some("4")),
            Ok(Setting::HandlerConcurrency(
                "payments/charge".into(),
                Some(4)
            ))
        );
    }

    #[test]
    fn refuses_bad_values_naming_the_key() {
        for (k, v) in [
            ("queues/default/count", "0"),
            ("queues/default/count", "-1"),
            ("queues/default/count", "abc"),
            ("queues/default/count", "99999999999"),
            ("queues/default/count", "4097"),
            ("queues/default/visibility_ms", "5"),
            ("handlers/push/rate_per_s", "0"),
            ("handlers/push/rate_per_s", "NaN"),
            ("handlers/push/rate_per_s", "1e12"),
            ("handlers/push/concurrency", "0"),
            ("handlers/push/budget", "has space"),
            ("queues/default/colour", "red"),
            ("queues/bad name/count", "4"),
            ("queues/payments/orders/count", "4"),
            ("handlers/default/charge/concurrency", "4"),
            ("handlers/Pay ments/charge/concurrency", "4"),
            ("handlers/a/b/c/concurrency", "4"),
            ("stray", "1"),
        ] {
            let r = parse(k, Some(v)).expect_err(k);
            assert_eq!(r.key, k);
            assert!(!r.reason.is_empty());
        }
    }

    #[test]
    fn apply_keeps_revision_of_count() {
        let mut c = LiveConfig::default();
        c.apply(Setting::QueueCount("default".into(), Some(3)), 7);
        c.apply(Setting::HandlerRate("h".into(), Some(5.0)), 9);
        assert_eq!(c.family("default").count, Some((3, 7)));
        assert_eq!(c.revision, 9);
        c.apply(Setting::QueueCount("default".into(), None), 10);
        assert_eq!(c.family("default").count, None);
    }
}
