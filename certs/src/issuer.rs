//! The issuing CA: generating a trust anchor + intermediate issuer, loading an issuer from
//! PEM, and signing workload certificates (from verified CSRs, or for our own servers).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::FromDer;

use crate::csr::{verify_csr, CsrError};
use crate::time_util::{from_unix_seconds, validity, CLOCK_SKEW_ALLOWANCE};
use crate::workload::certified_key_from_parts;
use crate::{Error, SpiffeId};

/// PEM material written by `weft identity`: the trust anchor bundle, the issuer certificate,
/// and the issuer's PKCS#8 key. The anchor's key is never part of it.
pub struct GeneratedIdentity {
    pub trust_anchors_pem: String,
    pub issuer_pem: String,
    pub issuer_key_pem: String,
}

impl std::fmt::Debug for GeneratedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedIdentity")
            .field("trust_anchors_pem", &self.trust_anchors_pem)
            .field("issuer_pem", &self.issuer_pem)
            .field("issuer_key_pem", &"[secret key elided]")
            .finish()
    }
}

/// Generates a P-256 root (CA, path length 1) and a P-256 intermediate issuer (CA, path
/// length 0) signed by it. The root key is dropped here: rotating the issuer later means
/// generating a new anchor, which is what trusting several anchors at once is for.
pub fn generate_identity(
    trust_domain: &str,
    anchor_lifetime: Duration,
    issuer_lifetime: Duration,
) -> Result<GeneratedIdentity, Error> {
    crate::spiffe::validate_trust_domain(trust_domain).map_err(|reason| {
        Error::InvalidSpiffeId {
            input: trust_domain.to_owned(),
            reason: format!("trust domain: {reason}"),
        }
    })?;

    let root_serial = random_serial()?;
    let root_validity = validity(anchor_lifetime, None)?;
    let mut root_params = ca_params(
        &format!("weft trust anchor {}", short_hex(&root_serial)),
        trust_domain,
        1,
    );
    root_params.serial_number = Some(root_serial);
    root_params.not_before = root_validity.not_before;
    root_params.not_after = root_validity.not_after;
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let root_cert = root_params.self_signed(&root_key)?;
    let root = rcgen::Issuer::new(root_params, root_key);

    let issuer_serial = random_serial()?;
    let issuer_validity = validity(issuer_lifetime, Some(root_validity.not_after_system))?;
    let mut issuer_params = ca_params(
        &format!("weft issuer {}", short_hex(&issuer_serial)),
        trust_domain,
        0,
    );
    issuer_params.serial_number = Some(issuer_serial);
    issuer_params.not_before = issuer_validity.not_before;
    issuer_params.not_after = issuer_validity.not_after;
    issuer_params.use_authority_key_identifier_extension = true;
    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let issuer_cert = issuer_params.signed_by(&issuer_key, &root)?;

    Ok(GeneratedIdentity {
        trust_anchors_pem: root_cert.pem(),
        issuer_pem: issuer_cert.pem(),
        issuer_key_pem: issuer_key.serialize_pem(),
    })
}

fn ca_params(common_name: &str, trust_domain: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "weft");
    // X.520 bounds organizational unit names at 64 characters; longer trust domains are
    // simply left out of the name, which is only informational.
    if trust_domain.len() <= 64 {
        name.push(DnType::OrganizationalUnitName, trust_domain);
    }
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A 16-byte positive serial (RFC 5280 wants unpredictable serials, at most 20 bytes).
fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Generate(rcgen::Error::RingUnspecified))?;
    // Clear the sign bit so the INTEGER is positive, and set the next one so DER never needs
    // a leading zero byte that would make the encoding non-minimal.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn short_hex(serial: &SerialNumber) -> String {
    serial
        .as_ref()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A workload certificate signed from a CSR.
#[derive(Clone, Debug)]
pub struct SignedCert {
    pub leaf_der: CertificateDer<'static>,
    /// The issuer's chain, to be sent after the leaf (the trust anchor is not included).
    pub chain_der: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The intermediate CA that signs workload certificates.
#[derive(Debug)]
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
}

impl Issuer {
    /// `issuer_cert_pem` holds the issuer certificate first; further certificates (e.g. a
    /// cert-manager `tls.crt` that includes intermediates) are sent along as chain. The key must
    /// be PKCS#8 ("BEGIN PRIVATE KEY").
    pub fn from_pem(issuer_cert_pem: &str, issuer_key_pem: &str) -> Result<Self, Error> {
        let chain = CertificateDer::pem_slice_iter(issuer_cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pem(e.to_string()))?;
        let issuer_der = chain.first().ok_or(Error::NoCertificates)?;
        let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(issuer_der)
            .map_err(|e| Error::MalformedCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::MalformedCertificate(
                "trailing bytes after issuer certificate".into(),
            ));
        }

        let is_ca = cert
            .basic_constraints()
            .map_err(|e| Error::MalformedCertificate(format!("basicConstraints: {e}")))?
            .is_some_and(|bc| bc.value.ca);
        let may_sign_certs = cert
            .key_usage()
            .map_err(|e| Error::MalformedCertificate(format!("keyUsage: {e}")))?
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !is_ca || !may_sign_certs {
            return Err(Error::NotCa);
        }

        let key = KeyPair::from_pem(issuer_key_pem).map_err(|e| {
            Error::PrivateKey(format!("{e} (expected an unencrypted PKCS#8 PRIVATE KEY)"))
        })?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch);
        }

        let validity = cert.validity();
        let not_after = from_unix_seconds(validity.not_after.timestamp());
        let not_before = from_unix_seconds(validity.not_before.timestamp());
        let now = SystemTime::now();
        if not_after <= now || not_before > now + CLOCK_SKEW_ALLOWANCE {
            return Err(Error::IssuerExpired {
                not_after_unix: validity.not_after.timestamp(),
            });
        }

        let signer = rcgen::Issuer::from_ca_cert_der(issuer_der, key)?;
        Ok(Issuer {
            signer,
            chain,
            not_after,
        })
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain.clone()
    }

    /// Verifies a CSR and signs it for exactly `proven` (the identity the caller's token
    /// proved). Only the CSR's public key is used; everything else comes from our own template.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        proven: &SpiffeId,
        lifetime: Duration,
    ) -> Result<SignedCert, CsrError> {
        let verified = verify_csr(csr_der, proven)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&verified.spki_der)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
        let (params, not_after) = self
            .leaf_params(proven, lifetime)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        let leaf = params
            .signed_by(&public_key, &self.signer)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(SignedCert {
            leaf_der: leaf.der().clone(),
            chain_der: self.chain_der(),
            not_after,
        })
    }

    /// Mints a cert + fresh in-memory key for a server of our own (the control plane's identity).
    pub fn issue_own(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(Arc<CertifiedKey>, SystemTime), Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (params, not_after) = self.leaf_params(id, lifetime)?;
        let leaf = params.signed_by(&key, &self.signer)?;
        let certified = certified_key_from_parts(&key, leaf.der().clone(), self.chain_der())?;
        Ok((certified, not_after))
    }

    /// The one template every workload certificate is built from.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(CertificateParams, SystemTime), Error> {
        let validity = validity(lifetime, Some(self.not_after))?;
        let mut params = CertificateParams::default();
        // An empty subject makes rcgen mark the SAN critical, as RFC 5280 requires; the SPIFFE
        // URI SAN is the whole identity.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        Ok((params, validity.not_after_system))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn issuer_is_shareable_across_threads() {
        assert_send_sync::<Issuer>();
    }

    #[test]
    fn serials_are_positive_minimal_and_distinct() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        for s in [a, b] {
            assert_eq!(s.len(), 16);
            assert_eq!(s.as_ref()[0] & 0xc0, 0x40);
        }
    }

    #[test]
    fn generate_identity_rejects_bad_trust_domain() {
        let day = Duration::from_secs(86_400);
        assert!(matches!(
            generate_identity("Bad_Domain", day, day),
            Err(Error::InvalidSpiffeId { .. })
        ));
    }
}
