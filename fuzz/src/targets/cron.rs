//! Target `cron`: cron expressions and time zones, as a job's schedule carries them.
//!
//! Input: text (lossy UTF-8) `<expr>|<time zone>` (no `|`: UTC). It goes through
//! `schedule::validate`; a valid schedule is compiled and evaluated from the
//! instants of [`super::INSTANTS`] (DST changes, far dates) by
//! [`super::check_schedule`].

use chime_coordinator::CoordError;
use chime_coordinator::model::Schedule;
use chime_coordinator::schedule;

use super::{check_schedule, coarse, job_with, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "cron",
    about: "cron expression and time zone: validate, compile, next fire times across DST and far dates",
    run,
    dictionary,
};

/// Splits an input into the expression and the zone.
pub fn split(input: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(input);
    match text.split_once('|') {
        Some((expr, tz)) => (expr.to_owned(), tz.to_owned()),
        None => (text.into_owned(), String::new()),
    }
}

fn run(input: &[u8]) -> u64 {
    let (expr, time_zone) = split(input);
    let s = Schedule::Cron { expr, time_zone };
    match schedule::validate(&s) {
        Err(CoordError::InvalidArgument { field, reason }) => {
            signal(&["invalid", &field, &coarse(&reason)])
        }
        Err(e) => panic!("validate answered a non-argument error: {e}"),
        Ok(()) => {
            let seen = check_schedule(&job_with(s));
            signal(&["ok", &seen])
        }
    }
}

/// Time zones with unusual rules: half-hour and 45-minute offsets, DST at midnight,
/// negative DST, +14, zones that dropped DST, and aliases.
pub const ZONES: &[&str] = &[
    "UTC",
    "Etc/UTC",
    "Europe/Paris",
    "Europe/Berlin",
    "Europe/London",
    "Europe/Dublin",
    "America/New_York",
    "America/Havana",
    "America/Santiago",
    "America/St_Johns",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Asia/Tehran",
    "Asia/Gaza",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "Pacific/Apia",
    "Africa/Casablanca",
    "Antarctica/Troll",
    "Etc/GMT+12",
    "Etc/GMT-14",
    "US/Pacific",
];

const TOKENS: &[&str] = &[
    " ",
    "*",
    "*/",
    "/",
    ",",
    "-",
    "L",
    "W",
    "LW",
    "#",
    "?",
    "+",
    "@",
    "5L",
    "1#5",
    "15W",
    "L-3",
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
    "@reboot",
    "JAN",
    "FEB",
    "MAR",
    "APR",
    "MAY",
    "JUN",
    "JUL",
    "AUG",
    "SEP",
    "OCT",
    "NOV",
    "DEC",
    "MON",
    "TUE",
    "WED",
    "THU",
    "FRI",
    "SAT",
    "SUN",
    "0",
    "1",
    "2",
    "7",
    "12",
    "13",
    "23",
    "24",
    "29",
    "30",
    "31",
    "32",
    "59",
    "60",
    "1970",
    "2026",
    "4999",
    "5000",
    "|",
    "\t",
    "\u{a0}",
    "ß",
    "ﬀ",
];

fn dictionary() -> Vec<Vec<u8>> {
    TOKENS
        .iter()
        .chain(ZONES)
        .map(|t| t.as_bytes().to_vec())
        .collect()
}
