//! The one error enum of `chime-shared`: a variant per cause a caller acts on.

use std::fmt;

/// Result alias used across `chime-shared`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the shared core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something we refuse; `field` names the offending input so a
    /// CLI, an API or a console can point at it. Nothing was stored.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Name of the field, e.g. `payload` or `items[3].handler`.
        field: String,
        /// Human-readable reason, including the limit that was exceeded.
        reason: String,
    },
    /// The queue lease this pop was fenced with is no longer ours: another consumer
    /// claimed the queue after our lease expired. The caller must claim again.
    #[error("lease on queue {queue} is no longer held by this consumer")]
    StaleLease {
        /// Queue index whose lease was lost.
        queue: u32,
    },
    /// The caller's queue layout is older than the store's (a resize happened); the
    /// store refreshes and retries by itself, so callers only see this when that
    /// keeps failing.
    #[error("queue layout epoch {epoch} is newer than this process's; refresh it")]
    StaleLayout {
        /// The newer epoch.
        epoch: u64,
    },
    /// The store could not be reached or answered with an error; retrying may help.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store holds data we cannot decode (written by a foreign or newer writer).
    #[error("corrupt data in store: {0}")]
    Corrupt(String),
}

impl Error {
    /// Builds an [`Error::InvalidArgument`] naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// Prefixes the field of an `InvalidArgument` (e.g. `payload` → `items[3].payload`).
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Unavailable(format!("redis: {e}"))
    }
}
