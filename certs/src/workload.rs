//! A workload's private key (generated and kept in memory only), its CSR, and turning a signed
//! certificate plus that key into a rustls `CertifiedKey`.

use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::FromDer;

use crate::{Error, SpiffeId};

/// A P-256 key that never leaves process memory.
#[derive(Debug)]
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, Error> {
        Ok(WorkloadKey {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A CSR whose only content besides the key is the identity as a URI SAN; the issuer
    /// ignores everything else anyway.
    pub fn csr_der(&self, id: &SpiffeId) -> Result<Vec<u8>, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&self.key)?;
        Ok(csr.der().to_vec())
    }

    /// Pairs the signed leaf (and its chain, leaf excluded) with this key. Refuses a leaf for a
    /// different key, which would otherwise only fail later in every handshake.
    pub fn certified_key(
        &self,
        leaf_der: Vec<u8>,
        chain_der: Vec<Vec<u8>>,
    ) -> Result<Arc<CertifiedKey>, Error> {
        certified_key_from_parts(
            &self.key,
            CertificateDer::from(leaf_der),
            chain_der.into_iter().map(CertificateDer::from).collect(),
        )
    }
}

pub(crate) fn certified_key_from_parts(
    key: &KeyPair,
    leaf: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
) -> Result<Arc<CertifiedKey>, Error> {
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(&leaf)
        .map_err(|e| Error::MalformedCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::MalformedCertificate(
            "trailing bytes after leaf certificate".into(),
        ));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::KeyMismatch);
    }
    let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&private_key)?;
    let mut certs = Vec::with_capacity(1 + chain.len());
    certs.push(leaf);
    certs.extend(chain);
    Ok(Arc::new(CertifiedKey::new(certs, signing_key)))
}
