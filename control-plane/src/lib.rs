//! weft's control plane as a library: model → sources → index → gRPC.

pub mod grpc;
pub mod identity_proof;
pub mod index;
pub mod model;
pub mod source;
pub mod tls_server;
