//! weft-proxy: the data plane. A connection's path through the proxy reads top to bottom:
//! `inbound`/`outbound` listeners → `original_dst` → `discovery` (outbound) or TLS
//! detection (inbound) → `forward`. Identity, admin and metrics run beside it.

pub mod admin;
pub mod authz;
pub mod config;
pub mod connect;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod forward;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod process;
pub mod run;
pub mod trace;

/// ALPN protocol spoken on a mesh mTLS connection that carries one opaque TCP stream.
pub const ALPN_OPAQUE: &[u8] = b"weft.opaque/1";
