//! Verification of workload CSRs before the issuer signs them: size, syntax, self-signature,
//! key type, and that the requested identity is exactly the one the caller proved.

use ring::signature::{UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ED25519};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::spiffe::has_spiffe_scheme;
use crate::SpiffeId;

/// Upper bound on an accepted CSR: a P-256 CSR with one SAN is a few hundred bytes, and a
/// bound keeps hostile input cheap to reject.
pub const MAX_CSR_LEN: usize = 4096;

/// Why a CSR was refused. Messages are meant for the requesting workload's logs.
#[derive(thiserror::Error, Debug)]
pub enum CsrError {
    #[error("CSR is {len} bytes; at most {MAX_CSR_LEN} are accepted")]
    TooLarge { len: usize },

    #[error("malformed CSR: {0}")]
    Malformed(String),

    #[error("CSR signature does not verify with the CSR's own public key")]
    BadSignature,

    #[error("unsupported CSR key: {0}; only ECDSA P-256 and Ed25519 keys are accepted")]
    UnsupportedKey(String),

    #[error("CSR requests no spiffe:// URI SAN")]
    MissingIdentity,

    #[error("CSR asks for [{asked}] but the token proves {proven}")]
    WrongIdentity { asked: String, proven: String },

    #[error("CSR requests a CA certificate")]
    CaRequested,

    #[error("signing failed: {0}")]
    Signing(String),
}

/// What survives verification: the only thing taken from a CSR is its public key.
pub(crate) struct VerifiedCsr {
    pub(crate) spki_der: Vec<u8>,
}

#[derive(Clone, Copy)]
enum KeyKind {
    EcdsaP256,
    Ed25519,
}

/// Checks run cheapest-first, and the signature is checked before anything the CSR claims is
/// looked at, so identity errors are only reported for requests the key holder really made.
pub(crate) fn verify_csr(csr_der: &[u8], proven: &SpiffeId) -> Result<VerifiedCsr, CsrError> {
    if csr_der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge { len: csr_der.len() });
    }
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing bytes after the CSR".into()));
    }
    let key_kind = key_kind(&csr)?;
    verify_self_signature(&csr, key_kind)?;
    let extensions = requested_extensions(&csr)?;
    refuse_ca_request(&extensions)?;
    check_identity(&extensions, proven)?;
    Ok(VerifiedCsr {
        spki_der: csr.certification_request_info.subject_pki.raw.to_vec(),
    })
}

fn key_kind(csr: &X509CertificationRequest<'_>) -> Result<KeyKind, CsrError> {
    let algorithm = &csr.certification_request_info.subject_pki.algorithm;
    if algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == OID_EC_P256 {
            Ok(KeyKind::EcdsaP256)
        } else {
            Err(CsrError::UnsupportedKey(format!("EC curve {curve}")))
        }
    } else if algorithm.algorithm == OID_SIG_ED25519 {
        Ok(KeyKind::Ed25519)
    } else {
        Err(CsrError::UnsupportedKey(format!(
            "key algorithm {}",
            algorithm.algorithm
        )))
    }
}

fn verify_self_signature(
    csr: &X509CertificationRequest<'_>,
    key_kind: KeyKind,
) -> Result<(), CsrError> {
    let signature_oid = &csr.signature_algorithm.algorithm;
    let algorithm: &'static dyn VerificationAlgorithm = match key_kind {
        KeyKind::EcdsaP256 if *signature_oid == OID_SIG_ECDSA_WITH_SHA256 => {
            &ECDSA_P256_SHA256_ASN1
        }
        KeyKind::Ed25519 if *signature_oid == OID_SIG_ED25519 => &ED25519,
        _ => {
            return Err(CsrError::UnsupportedKey(format!(
                "signature algorithm {signature_oid} for this key"
            )))
        }
    };
    let info = &csr.certification_request_info;
    UnparsedPublicKey::new(algorithm, &info.subject_pki.subject_public_key.data)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::BadSignature)
}

fn requested_extensions<'a>(
    csr: &'a X509CertificationRequest<'a>,
) -> Result<Vec<&'a X509Extension<'a>>, CsrError> {
    let mut requests =
        csr.certification_request_info
            .iter_attributes()
            .filter_map(|attr| match attr.parsed_attribute() {
                ParsedCriAttribute::ExtensionRequest(request) => Some(request),
                _ => None,
            });
    let Some(request) = requests.next() else {
        return Ok(Vec::new());
    };
    if requests.next().is_some() {
        return Err(CsrError::Malformed(
            "more than one extensionRequest attribute".into(),
        ));
    }
    let extensions: Vec<&X509Extension<'_>> = request.extensions.iter().collect();
    for ext in &extensions {
        if let ParsedExtension::ParseError { error } = ext.parsed_extension() {
            return Err(CsrError::Malformed(format!(
                "requested extension {}: {error}",
                ext.oid
            )));
        }
    }
    Ok(extensions)
}

/// We never copy requested extensions, but a CA request signals a confused or hostile client,
/// so it is refused outright rather than silently downgraded.
fn refuse_ca_request(extensions: &[&X509Extension<'_>]) -> Result<(), CsrError> {
    for ext in extensions {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::CaRequested),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(CsrError::CaRequested)
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_identity(extensions: &[&X509Extension<'_>], proven: &SpiffeId) -> Result<(), CsrError> {
    let mut sans = extensions
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        });
    let Some(san) = sans.next() else {
        return Err(CsrError::MissingIdentity);
    };
    if sans.next().is_some() {
        return Err(CsrError::Malformed(
            "more than one subjectAltName extension".into(),
        ));
    }
    let names = &san.general_names;
    if !names
        .iter()
        .any(|name| matches!(name, GeneralName::URI(uri) if has_spiffe_scheme(uri)))
    {
        return Err(CsrError::MissingIdentity);
    }
    let exactly_proven = match names.as_slice() {
        [GeneralName::URI(uri)] => SpiffeId::parse(uri).is_ok_and(|asked| asked == *proven),
        _ => false,
    };
    if exactly_proven {
        return Ok(());
    }
    Err(CsrError::WrongIdentity {
        asked: names.iter().map(describe).collect::<Vec<_>>().join(", "),
        proven: proven.to_string(),
    })
}

/// Renders a SAN entry for the refusal message.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => (*uri).to_owned(),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(email) => format!("email:{email}"),
        GeneralName::IPAddress(bytes) => {
            if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                format!("IP:{}", std::net::Ipv4Addr::from(v4))
            } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                format!("IP:{}", std::net::Ipv6Addr::from(v6))
            } else {
                "IP:<invalid>".to_owned()
            }
        }
        other => format!("{other:?}"),
    }
}
