//! `chime-coordinator`: the worker registry, job store, trigger loop, routing and
//! shard assignment, run history, leader election, admin API and web console.
//!
//! Not built yet (issue 4 builds it). The crate exists so the workspace has the shape
//! of the design card and so dependents can be wired early.
