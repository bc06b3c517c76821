//! The HTTP data plane: detection hands HTTP/1 and HTTP/2 connections here. Outbound
//! requests are routed, balanced, retried and carried over pooled mesh HTTP/2; inbound
//! mesh HTTP/2 is restored for the app.

pub mod balance;
pub mod body;
pub mod client;
pub mod h1_server;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod retry;
pub mod route;

/// ALPN on mesh mTLS connections that carry multiplexed HTTP/2.
pub const ALPN_H2: &[u8] = b"weft.h2/1";
