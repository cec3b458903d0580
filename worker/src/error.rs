//! The one error enum of `chime-worker`.

/// Why a worker could not be built or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The builder was given a bad setting; the message names it.
    #[error("worker configuration: {0}")]
    Config(String),
    /// The store failed in a way the worker cannot ride out.
    #[error(transparent)]
    Store(#[from] chime_shared::Error),
}
