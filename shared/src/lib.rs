//! `chime-shared`: the pieces every chime process needs.
//!
//! It owns the delay queue ([`queue`]): the item model, the limits every input is
//! checked against, the placement of keys onto queues, and the two stores behind one
//! trait ([`queue::DelayStore`]): the Redis store used in production and the in-memory
//! store used by `chime dev` and unit tests. Both pass the same conformance suite
//! (`chime-tests`). It also owns the injected [`clock`] and the crate's one error enum.
//!
//! Architecture invariant: nothing in this crate binds a port, reads a config file or
//! installs a logger; those belong to the `chime` binary.

pub mod activity;
pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod limits;
#[cfg(feature = "ops")]
pub mod ops;
pub mod queue;
pub mod ratelimit;
pub mod redis_conn;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod trace;

pub use error::{Error, Result};
