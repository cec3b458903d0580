//! Target `config_value`: live settings as operators write them into etcd.
//!
//! Input: text (lossy UTF-8) `<key>\n<value>` (no newline: the whole input is the
//! key, with an empty value). Checks what `chime_shared::config` documents: a
//! rejection names the key; whether a key is known does not depend on its value; an
//! accepted value lies in the key's documented range; `LiveConfig::apply` and
//! `listing` fold it in (internal sections left out, every other entry either in
//! force or refused).

use chime_shared::config::source::Snapshot;
use chime_shared::config::{self, LiveConfig, MAX_RATE_PER_S, Setting};
use chime_shared::limits;

use super::{coarse, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "config_value",
    about: "etcd live-config key and value: parse, ranges, apply, listing",
    run,
    dictionary,
};

/// Splits an input into key and value.
pub fn split(input: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(input);
    match text.split_once('\n') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None => (text.into_owned(), String::new()),
    }
}

/// Checks a setting against the ranges of the module's table; answers its kind.
fn check_range(s: &Setting) -> &'static str {
    let int = |v: Option<u64>, lo: u64, hi: u64, what: &str| {
        if let Some(v) = v {
            assert!((lo..=hi).contains(&v), "{what} {v} outside {lo}..={hi}");
        }
    };
    let rate = |v: Option<f64>, what: &str| {
        if let Some(v) = v {
            assert!(
                v.is_finite() && (0.001..=MAX_RATE_PER_S).contains(&v),
                "{what} {v} outside 0.001..={MAX_RATE_PER_S}"
            );
        }
    };
    // Families and budgets have plain names; a handler's may carry a namespace
    // (`payments/charge`).
    let name = |n: &str, what: &str| {
        let checked = match what {
            "handler" => limits::check_qualified(what, n),
            _ => limits::check_handler(what, n),
        };
        if let Err(e) = checked {
            panic!("accepted a setting for a bad {what} {n:?}: {e}");
        }
    };
    match s {
        Setting::QueueCount(f, v) => {
            name(f, "family");
            int(v.map(u64::from), 1, 4096, "count");
            "count"
        }
        Setting::Visibility(f, v) => {
            name(f, "family");
            int(*v, 100, 86_400_000, "visibility_ms");
            "visibility"
        }
        Setting::MergeWindow(f, v) => {
            name(f, "family");
            int(*v, 0, 86_400_000, "merge_window_ms");
            "merge"
        }
        Setting::HandlerRate(h, v) => {
            name(h, "handler");
            rate(*v, "handler rate");
            "handler_rate"
        }
        Setting::HandlerConcurrency(h, v) => {
            name(h, "handler");
            int(v.map(u64::from), 1, 100_000, "concurrency");
            "concurrency"
        }
        Setting::HandlerBudget(h, v) => {
            name(h, "handler");
            if let Some(b) = v {
                name(b, "budget");
            }
            "budget"
        }
        Setting::BudgetRate(b, v) => {
            name(b, "budget");
            rate(*v, "budget rate");
            "budget_rate"
        }
    }
}

fn run(input: &[u8]) -> u64 {
    let (key, value) = split(input);
    let put = config::parse(&key, Some(&value));
    let delete = config::parse(&key, None);
    if let Err(r) = &put {
        assert_eq!(r.key, key, "a rejection names another key");
        assert!(!r.reason.is_empty(), "a rejection without a reason");
    }
    if let Err(r) = &delete {
        assert_eq!(r.key, key, "a rejection names another key");
    }
    assert!(
        put.is_err() || delete.is_ok(),
        "value {value:?} accepted for key {key:?} whose deletion is refused: {delete:?}"
    );
    let mut live = LiveConfig::default();
    let mut what = "refused";
    if let Ok(s) = &put {
        what = check_range(s);
        live.apply(s.clone(), 7);
        assert_eq!(live.revision, 7, "apply did not advance the revision");
    }
    if let Ok(s) = &delete {
        check_range(s);
        live.apply(s.clone(), 5);
        let expected = if put.is_ok() { 7 } else { 5 };
        assert_eq!(live.revision, expected, "apply moved the revision back");
    }
    let listing = config::listing(&Snapshot {
        entries: vec![(key.clone(), value.clone(), 3)],
        revision: 3,
    });
    if config::is_internal(&key) {
        assert!(
            listing.entries.is_empty() && listing.refused.is_empty(),
            "internal key {key:?} listed"
        );
    } else {
        assert_eq!(listing.entries.len(), 1, "key {key:?} not listed");
        assert_eq!(
            listing.refused.len(),
            usize::from(put.is_err()),
            "key {key:?}: refused iff parse refuses"
        );
    }
    let reason = match (&put, &delete) {
        (Err(r), _) | (_, Err(r)) => coarse(&r.reason),
        _ => String::new(),
    };
    signal(&[
        what,
        &reason,
        if delete.is_ok() { "key ok" } else { "key bad" },
    ])
}

const TOKENS: &[&str] = &[
    "queues/",
    "handlers/",
    "budgets/",
    "jobs/",
    "election/",
    "/count",
    "/visibility_ms",
    "/merge_window_ms",
    "/rate_per_s",
    "/concurrency",
    "/budget",
    "default",
    "push",
    "a.b:c-d_e",
    "/",
    "//",
    "\n",
    " ",
    "\t",
    "\r",
    "\u{0}",
    "\u{85}",
    "\u{a0}",
    "\u{3000}",
    "０",
    "١",
    "+",
    "-",
    ".",
    "e",
    "E",
    "0.001",
    "0.0009999",
    "1000000",
    "1000000.0000001",
    "1e6",
    "1e-3",
    "NaN",
    "nan",
    "inf",
    "infinity",
    "-inf",
    "4096",
    "4097",
    "100000",
    "100001",
    "86400000",
    "86400001",
    "99",
    "100",
    "0x10",
    "1_000",
    "18446744073709551616",
];

fn dictionary() -> Vec<Vec<u8>> {
    TOKENS.iter().map(|t| t.as_bytes().to_vec()).collect()
}
