//! The crate's error type for everything except CSR verification (see `csr::CsrError`).

/// Errors from identity parsing, PEM/certificate loading, certificate minting and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid SPIFFE id {input:?}: {reason}")]
    InvalidSpiffeId { input: String, reason: String },

    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,

    #[error("certificate has {count} spiffe:// URI SANs; exactly one is allowed")]
    MultipleSpiffeIds { count: usize },

    #[error("malformed certificate: {0}")]
    MalformedCertificate(String),

    #[error("malformed PEM: {0}")]
    Pem(String),

    #[error("no CERTIFICATE block found in PEM input")]
    NoCertificates,

    #[error("invalid trust anchor certificate: {0}")]
    InvalidTrustAnchor(String),

    #[error("issuer certificate is not a CA (needs basicConstraints cA=true and keyCertSign)")]
    NotCa,

    #[error("private key does not match the certificate's public key")]
    KeyMismatch,

    #[error("invalid private key: {0}")]
    PrivateKey(String),

    #[error("issuer certificate is not valid now (valid until unix time {not_after_unix})")]
    IssuerExpired { not_after_unix: i64 },

    #[error("invalid certificate lifetime: {0}")]
    Lifetime(String),

    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),

    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),

    #[error("TLS peer verifier setup failed: {0}")]
    Verifier(String),
}
