//! The one error enum of `chime-coordinator`, and its one conversion to
//! `tonic::Status`.

/// Result alias.
pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// Everything a coordinator call can fail with; a variant per cause a caller acts on.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// Refused input; `field` names it. Nothing was stored.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Field path, e.g. `schedule.expr`.
        field: String,
        /// Why.
        reason: String,
    },
    /// No such job or run.
    #[error("{0} not found")]
    NotFound(String),
    /// A job with this name exists.
    #[error("job {0:?} already exists")]
    AlreadyExists(String),
    /// The job changed since it was read (stale version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// This coordinator is not the leader; `leader` is (empty when unknown).
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// `host:port` of the leader.
        leader: String,
    },
    /// The caller is not allowed to do this.
    #[error("{0}")]
    Unauthenticated(String),
    /// This coordinator was not set up for the call (no delay store); another
    /// coordinator, or a config change, is needed.
    #[error("{0}")]
    NotConfigured(String),
    /// A store (etcd, Redis) failed; retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl CoordError {
    /// An `InvalidArgument` naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        CoordError::InvalidArgument {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<chime_shared::Error> for CoordError {
    fn from(e: chime_shared::Error) -> Self {
        match e {
            chime_shared::Error::InvalidArgument { field, reason } => {
                CoordError::InvalidArgument { field, reason }
            }
            other => CoordError::Unavailable(other.to_string()),
        }
    }
}

impl From<etcd_client::Error> for CoordError {
    fn from(e: etcd_client::Error) -> Self {
        CoordError::Unavailable(format!("etcd: {e}"))
    }
}

impl From<redis::RedisError> for CoordError {
    fn from(e: redis::RedisError) -> Self {
        CoordError::Unavailable(format!("redis: {e}"))
    }
}

/// gRPC metadata key carrying the field an `InvalidArgument` names.
pub const FIELD_METADATA: &str = "chime-field";

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::InvalidArgument { field, .. } => {
                // The field also travels as metadata, so a client (the console's
                // JSON API among them) can point at it without parsing the message.
                let mut s = tonic::Status::invalid_argument(msg);
                if let Ok(v) = field.parse() {
                    s.metadata_mut().insert(FIELD_METADATA, v);
                }
                s
            }
            CoordError::NotFound(_) => tonic::Status::not_found(msg),
            CoordError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            CoordError::Conflict(_) => tonic::Status::failed_precondition(msg),
            CoordError::NotLeader { .. } => tonic::Status::unavailable(msg),
            CoordError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            CoordError::NotConfigured(_) => tonic::Status::failed_precondition(msg),
            CoordError::Unavailable(_) => tonic::Status::unavailable(msg),
        }
    }
}
