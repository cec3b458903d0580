//! Timing that both ends of a worker's job session rely on: how soon a worker
//! notices that its coordinator stopped answering, which bounds how long a new
//! leader must wait for a worker to come back and claim the shards it runs.

/// A worker pings its coordinator after this long without a frame from it.
pub const PING_AFTER_SILENCE_MS: u64 = 2_000;

/// A worker gives its session up when a ping goes unanswered this long.
pub const PING_TIMEOUT_MS: u64 = 3_000;

/// A worker whose coordinator froze or became unreachable gives the session up
/// within this long, and then registers elsewhere. A new leader waits at least
/// this plus a margin before it takes over shards the old one had sent (the
/// adoption grace); waiting less would run a shard twice when the worker that
/// ran it comes back to report it just after the takeover.
pub const WORKER_NOTICES_LOSS_WITHIN_MS: u64 = PING_AFTER_SILENCE_MS + PING_TIMEOUT_MS;
