//! Metric names, in one place so the worker, the coordinator, the console and the
//! docs agree on them. Recording goes through the `metrics` facade; the binary
//! installs the Prometheus exporter.

/// Items stored by enqueue (label `handler`).
pub const ITEMS_ENQUEUED: &str = "chime_items_enqueued_total";
/// Items handed to a handler (label `handler`).
pub const ITEMS_FIRED: &str = "chime_items_fired_total";
/// Items acknowledged after their handler succeeded (label `handler`).
pub const ITEMS_ACKED: &str = "chime_items_acked_total";
/// Items whose handler failed and that will be retried (label `handler`).
pub const ITEMS_RETRIED: &str = "chime_items_retried_total";
/// Items that failed their last attempt and went to the dead-letter set.
pub const ITEMS_DEAD_LETTERED: &str = "chime_items_dead_lettered_total";
/// Items handed back unprocessed by a draining worker.
pub const ITEMS_RELEASED: &str = "chime_items_released_total";
/// Seconds between an item's due time and its handler starting (label `handler`).
pub const FIRE_LAG_SECONDS: &str = "chime_fire_lag_seconds";
/// Queue leases taken.
pub const QUEUE_CLAIMS: &str = "chime_queue_claims_total";
/// Claims refused because another consumer held the lease.
pub const LEASE_CONFLICTS: &str = "chime_lease_conflicts_total";
/// Pops refused because the consumer's lease had expired (fencing at work).
pub const STALE_LEASES: &str = "chime_stale_leases_total";
/// Settlements the store refused because the delivery token was stale.
pub const STALE_SETTLEMENTS: &str = "chime_stale_settlements_total";
/// Store calls that failed (label `op`).
pub const STORE_ERRORS: &str = "chime_store_errors_total";
/// Live config changes applied.
pub const CONFIG_APPLIED: &str = "chime_config_changes_applied_total";
/// Live config values refused (label `key`).
pub const CONFIG_REJECTED: &str = "chime_config_rejected_total";
/// Queue layout changes (resizes) applied by this process.
pub const LAYOUT_APPLIED: &str = "chime_queue_layout_changes_total";
/// Items moved between queues by a resize.
pub const ITEMS_MIGRATED: &str = "chime_items_migrated_total";
/// Workers connected to this coordinator.
pub const CONNECTED_WORKERS: &str = "chime_connected_workers";
/// Seconds between a job's scheduled instant and its fire.
pub const TRIGGER_LAG_SECONDS: &str = "chime_trigger_lag_seconds";
/// Job fires (label `outcome`: fired, skipped).
pub const JOB_FIRES: &str = "chime_job_fires_total";
/// Shard results reported by workers (label `status`).
pub const RUN_RESULTS: &str = "chime_run_results_total";
/// 1 on the leading coordinator, 0 elsewhere.
pub const IS_LEADER: &str = "chime_coordinator_leader";
