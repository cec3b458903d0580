//! Metric names, in one place so the worker, the coordinator, the console and the
//! docs agree on them (`describe` registers their help texts). Recording goes
//! through the `metrics` facade; `ops::metrics` installs the Prometheus exporter.

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
/// Items waiting per queue (label `queue`), sampled.
pub const QUEUE_DEPTH: &str = "chime_queue_depth";
/// Items in flight per queue (label `queue`), sampled.
pub const QUEUE_IN_FLIGHT: &str = "chime_queue_in_flight";
/// Dead letters per queue (label `queue`), sampled.
pub const QUEUE_DEAD: &str = "chime_queue_dead_letters";
/// Items waiting for a handler per queue (label `queue`), sampled.
pub const QUEUE_WAITING: &str = "chime_items_waiting";
/// Items parked by this worker because no subscriber ran their handler (label
/// `handler`).
pub const ITEMS_PARKED: &str = "chime_items_parked_total";
/// Subscriber streams open on this worker's delivery service.
pub const DELIVERY_SUBSCRIBERS: &str = "chime_delivery_subscribers";
/// Deliveries handed to subscribers, by how they ended (labels `handler`,
/// `outcome`: ack, fail, release, timeout, gone, abandoned).
pub const DELIVERIES: &str = "chime_deliveries_total";

/// Registers the help text of every metric.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(ITEMS_ENQUEUED, "Delayed items stored by enqueue.");
    describe_counter!(ITEMS_FIRED, "Delayed items handed to a handler.");
    describe_counter!(
        ITEMS_ACKED,
        "Delayed items acknowledged after their handler succeeded."
    );
    describe_counter!(
        ITEMS_RETRIED,
        "Delayed items whose handler failed and that will be retried."
    );
    describe_counter!(
        ITEMS_DEAD_LETTERED,
        "Delayed items that failed their last attempt."
    );
    describe_counter!(
        ITEMS_RELEASED,
        "Delayed items handed back by a draining worker."
    );
    describe_histogram!(
        FIRE_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Due time to handler start of delayed items."
    );
    describe_counter!(QUEUE_CLAIMS, "Queue leases taken.");
    describe_counter!(
        LEASE_CONFLICTS,
        "Queue claims refused: another consumer held the lease."
    );
    describe_counter!(
        STALE_LEASES,
        "Pops refused because the consumer's lease had expired."
    );
    describe_counter!(
        STALE_SETTLEMENTS,
        "Settlements refused because the delivery was stale."
    );
    describe_counter!(STORE_ERRORS, "Failed store calls.");
    describe_counter!(CONFIG_APPLIED, "Live config changes applied.");
    describe_counter!(CONFIG_REJECTED, "Live config values refused.");
    describe_counter!(LAYOUT_APPLIED, "Queue layout changes (resizes) applied.");
    describe_counter!(ITEMS_MIGRATED, "Items moved between queues by a resize.");
    describe_gauge!(CONNECTED_WORKERS, "Workers connected to this coordinator.");
    describe_histogram!(
        TRIGGER_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Scheduled instant to fire of jobs."
    );
    describe_counter!(
        JOB_FIRES,
        "Job fires by outcome (fired, skipped, unrecorded: the store refused the record)."
    );
    describe_counter!(RUN_RESULTS, "Shard results reported by workers, by status.");
    describe_gauge!(IS_LEADER, "1 on the leading coordinator.");
    describe_gauge!(QUEUE_DEPTH, "Items waiting per queue.");
    describe_gauge!(QUEUE_IN_FLIGHT, "Items in flight per queue.");
    describe_gauge!(QUEUE_DEAD, "Dead letters per queue.");
    describe_gauge!(QUEUE_WAITING, "Items waiting for a handler per queue.");
    describe_counter!(
        ITEMS_PARKED,
        "Items parked because no subscriber ran their handler."
    );
    describe_gauge!(
        DELIVERY_SUBSCRIBERS,
        "Subscriber streams open on this worker's delivery service."
    );
    describe_counter!(
        DELIVERIES,
        "Deliveries handed to subscribers, by how they ended."
    );
}
