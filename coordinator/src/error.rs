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
    /// The caller presented no token, or one nobody issued.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's token is known, but its role may not do this (a viewer
    /// changing a job): another token is needed, not a retry.
    #[error("{0}")]
    PermissionDenied(String),
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

    /// This error about one element of a list: an invalid field is named with the
    /// element's index (`jobs[3].schedule.expr`); other errors are unchanged.
    pub fn at(self, list: &str, index: usize) -> Self {
        match self {
            CoordError::InvalidArgument { field, reason } => CoordError::InvalidArgument {
                field: format!("{list}[{index}].{field}"),
                reason,
            },
            other => other,
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
            CoordError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            CoordError::NotConfigured(_) => tonic::Status::failed_precondition(msg),
            CoordError::Unavailable(_) => tonic::Status::unavailable(msg),
        }
    }
}

/// What the leader answered to a forwarded call, back in domain terms (the inverse
/// of the conversion above, so the caller of a follower sees what the leader said:
/// `Status::from(CoordError::from(status))` keeps code, message and field).
impl From<tonic::Status> for CoordError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let msg = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => {
                let field = s
                    .metadata()
                    .get(FIELD_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| {
                        let rest = msg.strip_prefix("invalid ")?;
                        rest.split_once(':').map(|(f, _)| f.to_owned())
                    })
                    .unwrap_or_else(|| "request".to_owned());
                let reason = msg
                    .strip_prefix(&format!("invalid {field}: "))
                    .unwrap_or(&msg)
                    .to_owned();
                CoordError::InvalidArgument { field, reason }
            }
            Code::NotFound => {
                CoordError::NotFound(msg.strip_suffix(" not found").unwrap_or(&msg).to_owned())
            }
            Code::AlreadyExists => {
                let name = msg
                    .strip_prefix("job ")
                    .and_then(|r| r.strip_suffix(" already exists"))
                    .and_then(|q| serde_json::from_str::<String>(q).ok());
                match name {
                    Some(n) => CoordError::AlreadyExists(n),
                    None => CoordError::Conflict(msg),
                }
            }
            Code::FailedPrecondition | Code::Aborted => match msg.strip_prefix("conflict: ") {
                Some(r) => CoordError::Conflict(r.to_owned()),
                None => CoordError::NotConfigured(msg),
            },
            Code::Unauthenticated => CoordError::Unauthenticated(msg),
            Code::PermissionDenied => CoordError::PermissionDenied(msg),
            _ => {
                if let Some(leader) = msg
                    .strip_prefix("not the leader (leader: ")
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|q| serde_json::from_str::<String>(q).ok())
                {
                    return CoordError::NotLeader { leader };
                }
                CoordError::Unavailable(
                    msg.strip_prefix("unavailable: ").unwrap_or(&msg).to_owned(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower relays the leader's errors unchanged: every variant survives the
    /// trip to `Status` and back with its message, code and field.
    #[test]
    fn every_error_survives_a_forward() {
        let all = [
            CoordError::invalid("schedule.expr", "bad: 61 is not a minute"),
            CoordError::NotFound("job \"x\"".into()),
            CoordError::AlreadyExists("nightly".into()),
            CoordError::Conflict("job \"x\" changed (version 3, not 2)".into()),
            CoordError::NotLeader {
                leader: "10.0.0.2:7070".into(),
            },
            CoordError::Unauthenticated("missing or unknown admin token".into()),
            CoordError::PermissionDenied(
                "token viewer-1 is a viewer; this needs an operator".into(),
            ),
            CoordError::NotConfigured("no delay store configured".into()),
            CoordError::Unavailable("redis: connection refused".into()),
        ];
        for e in all {
            let text = e.to_string();
            let status = tonic::Status::from(e);
            let back = CoordError::from(status.clone());
            assert_eq!(back.to_string(), text);
            let again = tonic::Status::from(back);
            assert_eq!(again.code(), status.code(), "{text}");
            assert_eq!(again.message(), status.message());
            assert_eq!(
                again
                    .metadata()
                    .get(FIELD_METADATA)
                    .map(|v| v.as_bytes().to_vec()),
                status
                    .metadata()
                    .get(FIELD_METADATA)
                    .map(|v| v.as_bytes().to_vec())
            );
        }
    }
}
