//! Target `schedule_json`: a job as the console's HTTP API receives it.
//!
//! Input: a request body for `http::job_in` (serde of every job field and schedule
//! kind, with the API's error naming). A parsed job must survive the two encodings
//! it is stored and forwarded in: its JSON form (etcd) and its proto form (the
//! console calls the admin API with it). A job that passes `JobSpec::validate` is
//! compiled and evaluated by [`super::check_schedule`].

use chime_coordinator::CoordError;
use chime_coordinator::engine::TriggerState;
use chime_coordinator::grpc::{job_from_proto, job_to_proto};
use chime_coordinator::http::job_in;
use chime_coordinator::model::{JobSpec, Schedule};
use chime_coordinator::store::StoredJob;

use super::{check_schedule, coarse, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "schedule_json",
    about: "console job JSON: job_in, JSON and proto round trips, validate, compile, next fire times",
    run,
    dictionary,
};

fn kind(s: &Schedule) -> &'static str {
    match s {
        Schedule::Cron { .. } => "cron",
        Schedule::FixedRate { .. } => "fixed_rate",
        Schedule::FixedDelay { .. } => "fixed_delay",
        Schedule::Once { .. } => "once",
        Schedule::Manual => "manual",
    }
}

/// Checks a parsed job: round trips, then validation and the schedule checks.
/// Shared with the `proto` target, whose jobs arrive the other way.
pub fn check_job(spec: &JobSpec, version: i64) -> String {
    // Stored form: the store writes `serde_json::to_string(&spec)` and reads it back.
    let text = match serde_json::to_string(spec) {
        Ok(t) => t,
        Err(e) => panic!("a parsed job does not serialize: {e}"),
    };
    match serde_json::from_str::<JobSpec>(&text) {
        Ok(back) => assert_eq!(&back, spec, "job changed through its stored JSON {text}"),
        Err(e) => panic!("a stored job does not read back: {e}: {text}"),
    }
    // Proto form, both ways.
    let stored = StoredJob {
        spec: spec.clone(),
        version,
    };
    match job_from_proto(job_to_proto(&stored, TriggerState::default())) {
        Ok((back, v)) => {
            assert_eq!(&back, spec, "job changed through its proto form");
            assert_eq!(v, version, "version changed through the proto form");
        }
        Err(e) => panic!("a job's own proto form is refused: {e}"),
    }
    match spec.validate() {
        Err(CoordError::InvalidArgument { field, reason }) => {
            format!(
                "{} invalid {field} {}",
                kind(&spec.schedule),
                coarse(&reason)
            )
        }
        Err(e) => panic!("validate answered a non-argument error: {e}"),
        Ok(()) => format!("{} valid {}", kind(&spec.schedule), check_schedule(spec)),
    }
}

fn run(input: &[u8]) -> u64 {
    match job_in(input) {
        // The error's fields are private; its Debug form names the field.
        Err(e) => signal(&["refused", &coarse(&format!("{e:?}"))]),
        Ok((spec, version)) => signal(&["parsed", &check_job(&spec, version)]),
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "false",
    "\\u0000",
    "\\ud800",
    "\\u00e9",
    "\\n",
    "\"kind\":",
    "\"cron\"",
    "\"fixed_rate\"",
    "\"fixed_delay\"",
    "\"once\"",
    "\"manual\"",
    "\"expr\":",
    "\"time_zone\":",
    "\"every_ms\":",
    "\"delay_ms\":",
    "\"at_ms\":",
    "\"name\":",
    "\"group\":",
    "\"handler\":",
    "\"schedule\":",
    "\"routing\":",
    "\"shard_count\":",
    "\"shard_params\":",
    "\"hash_param\":",
    "\"params\":",
    "\"overlap\":",
    "\"misfire\":",
    "\"catch_up_window_ms\":",
    "\"timeout_ms\":",
    "\"retries\":",
    "\"retry_backoff_ms\":",
    "\"children\":",
    "\"paused\":",
    "\"start_at_ms\":",
    "\"end_at_ms\":",
    "\"jitter_ms\":",
    "\"created_at_ms\":",
    "\"version\":",
    "\"next_fire_ms\":",
    "\"last_fire_ms\":",
    "\"sharding_broadcast\"",
    "\"round_robin\"",
    "\"random\"",
    "\"consistent_hash\"",
    "\"least_recently_used\"",
    "\"least_loaded\"",
    "\"failover\"",
    "\"busy_over\"",
    "\"first\"",
    "\"last\"",
    "\"allow\"",
    "\"skip\"",
    "\"buffer_one\"",
    "\"cancel_running\"",
    "\"fire_once\"",
    "\"fire_all\"",
    "-1",
    "0",
    "100",
    "99",
    "1e309",
    "1.0",
    "-0",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "253402300799999",
    "8210266876799999",
    "\"*/5 * * * * *\"",
    "\"0 30 2 * * *\"",
    "\"Europe/Paris\"",
    "\"Asia/Tokyo\"",
    "\"America/Los_Angeles\"",
];

fn dictionary() -> Vec<Vec<u8>> {
    TOKENS.iter().map(|t| t.as_bytes().to_vec()).collect()
}
