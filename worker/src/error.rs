//! The one error enum of `chime-worker`.

/// Why a worker could not be built or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The builder was given a bad setting; the message names it.
    #[error("worker configuration: {0}")]
    Config(String),
    /// A call was refused for a bad argument; `field` names it (`items[3].payload`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as the server named it.
        field: String,
        /// Why.
        reason: String,
    },
    /// A call failed (the coordinator unreachable, a token refused, …).
    #[error("call failed ({code:?}): {message}")]
    Call {
        /// The gRPC code: `Unavailable` is worth retrying, `Unauthenticated` is not.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The delivery service could not start, or stopped on an error.
    #[error("delivery service: {0}")]
    Serve(String),
    /// The store failed in a way the worker cannot ride out.
    #[error(transparent)]
    Store(#[from] chime_shared::Error),
}
