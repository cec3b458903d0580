//! The generated gRPC types and stubs of `proto/chime/v1` (worker sessions, the
//! admin API and the delay queue). Import them as `chime_shared::proto`; convert to domain types at the
//! edge that receives them, so domain code never touches generated types.

// Generated code: not ours to lint or document.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

tonic::include_proto!("chime.v1");

/// The encoded descriptors of every chime proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chime_descriptor");
