//! `chime-proto`: the code generated from `proto/chime/v1/*.proto` (worker sessions,
//! the admin API, the delay queue, item delivery) and nothing else. Every crate
//! imports it as `proto` and converts to its domain types at the one edge that
//! receives a message, so domain code never touches generated types.
//!
//! Architecture invariant: no hand-written logic here; the crate has no tonic
//! transport of its own beyond the generated clients' `connect`, so depending on it
//! brings no server.

// Generated code: not ours to lint or document.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

tonic::include_proto!("chime.v1");

/// OTLP trace export (`proto/otlp/trace_export.proto`): the client chime's span
/// exporter sends with, and the messages, wire-compatible with opentelemetry-proto.
pub mod otlp {
    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
}

/// The encoded descriptors of every chime proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chime_descriptor");
