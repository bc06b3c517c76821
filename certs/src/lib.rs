//! weft identity: SPIFFE ids, trust anchors, the issuing CA, CSR checks, workload keys, the
//! hot-swappable certificate store and the rustls configs that authenticate peers by SPIFFE id.

mod anchors;
mod csr;
mod error;
mod issuer;
mod spiffe;
mod store;
mod time_util;
mod tls;
mod workload;

pub use anchors::TrustAnchors;
pub use csr::{CsrError, MAX_CSR_LEN};
pub use error::Error;
pub use issuer::{generate_identity, GeneratedIdentity, Issuer, SignedCert};
pub use spiffe::{spiffe_id_of_cert, SpiffeId};
pub use store::CertStore;
pub use tls::{client_config, peer_identity, server_config, ClientAuth};
pub use workload::WorkloadKey;
