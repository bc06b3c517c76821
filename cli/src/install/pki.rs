//! Certificate material for a Kubernetes install: the mesh identity (trust anchors + issuer,
//! generated with weft-certs like `weft identity`, or read from a directory), the admission
//! webhook's own CA and serving certificate (generated in memory, never written), and the
//! chain/expiry inspection `weft check` reports on.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(86_400);
/// Default lifetimes of a generated mesh identity, here and in `weft identity`.
pub const ANCHOR_DAYS: u64 = 3650;
pub const ISSUER_DAYS: u64 = 365;
/// The webhook CA and serving certificate are not rotated by anything but a new install, so
/// they live long; `weft check` warns before they run out.
pub const WEBHOOK_CERT_DAYS: u32 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{dir} holds neither issuer.pem + issuer-key.pem + trust-anchors.pem nor tls.crt + tls.key + ca.crt")]
    NoIdentityFiles { dir: PathBuf },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("generating certificates: {0}")]
    Generate(String),
    #[error(transparent)]
    Certs(#[from] weft_certs::Error),
}

fn invalid(what: &str, reason: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// The three PEM documents of a mesh identity, as `weft identity` writes them (its Debug
/// elides the key).
pub type IdentityPem = weft_certs::GeneratedIdentity;

/// `n` days, saturating (a lifetime flag of absurd size means "as long as possible").
pub fn days(n: u64) -> Duration {
    DAY.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

/// A fresh anchor + issuer for `trust_domain`, with `weft identity`'s default lifetimes.
pub fn generate_identity(trust_domain: &str) -> Result<IdentityPem, PkiError> {
    Ok(weft_certs::generate_identity(
        trust_domain,
        days(ANCHOR_DAYS),
        days(ISSUER_DAYS),
    )?)
}

/// Reads `weft identity --out` files, or a cert-manager Certificate's secret written out
/// (`tls.crt` = issuer and its chain, `tls.key` = PKCS#8 key, `ca.crt` = the anchor), and
/// checks that they fit together before anything is rendered.
pub fn read_identity_dir(dir: &Path) -> Result<IdentityPem, PkiError> {
    let names = if dir.join("issuer.pem").exists() {
        ["trust-anchors.pem", "issuer.pem", "issuer-key.pem"]
    } else if dir.join("tls.crt").exists() {
        ["ca.crt", "tls.crt", "tls.key"]
    } else {
        return Err(PkiError::NoIdentityFiles {
            dir: dir.to_path_buf(),
        });
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|error| PkiError::Read { path, error })
    };
    let identity = IdentityPem {
        trust_anchors_pem: read(names[0])?,
        issuer_pem: read(names[1])?,
        issuer_key_pem: read(names[2])?,
    };
    validate_identity(&identity)?;
    Ok(identity)
}

/// Everything the control plane will insist on at start-up: anchors parse, the issuer is a
/// CA whose key matches and which has not expired, and it chains to one of the anchors.
pub fn validate_identity(identity: &IdentityPem) -> Result<ChainReport, PkiError> {
    weft_certs::TrustAnchors::from_pem(identity.trust_anchors_pem.as_bytes())?;
    weft_certs::Issuer::from_pem(&identity.issuer_pem, &identity.issuer_key_pem)?;
    verify_issuer_chain(&identity.issuer_pem, &identity.trust_anchors_pem)
}

/// Subject and validity of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl CertInfo {
    fn of(cert: &X509Certificate<'_>) -> CertInfo {
        CertInfo {
            subject: cert.subject().to_string(),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
        }
    }

    /// Seconds until expiry (negative once expired).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        self.not_after_unix - unix_seconds(now)
    }
}

/// The issuer (first certificate of its PEM) and the anchor its chain ends at.
#[derive(Debug, Clone)]
pub struct ChainReport {
    pub issuer: CertInfo,
    pub anchor: CertInfo,
}

/// Every CERTIFICATE block of `pem`; none is an error naming `what`.
pub fn parse_pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, e))?;
    if ders.is_empty() {
        return Err(invalid(what, "no CERTIFICATE block"));
    }
    Ok(ders)
}

fn parse_der<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| invalid(what, e))?;
    if !rest.is_empty() {
        return Err(invalid(what, "trailing bytes after the certificate"));
    }
    Ok(cert)
}

/// Checks signatures along `issuer_pem` (issuer first, then any intermediates) up to one of
/// the anchors. Validity periods are reported, not judged: the caller decides what is too
/// close to expiry.
pub fn verify_issuer_chain(issuer_pem: &str, anchors_pem: &str) -> Result<ChainReport, PkiError> {
    let chain = parse_pem_certs(issuer_pem, "issuer certificate")?;
    let anchor_ders = parse_pem_certs(anchors_pem, "trust anchors")?;
    let chain_certs = chain
        .iter()
        .map(|der| parse_der(der, "issuer certificate"))
        .collect::<Result<Vec<_>, _>>()?;
    let anchors = anchor_ders
        .iter()
        .map(|der| parse_der(der, "trust anchor"))
        .collect::<Result<Vec<_>, _>>()?;
    for pair in chain_certs.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| {
                invalid(
                    "issuer chain",
                    format!(
                        "{} is not signed by {}: {e}",
                        pair[0].subject(),
                        pair[1].subject()
                    ),
                )
            })?;
    }
    let (issuer, last) = match (chain_certs.first(), chain_certs.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => return Err(invalid("issuer certificate", "no CERTIFICATE block")),
    };
    // A chain that carries the anchor itself (cert-manager's tls.crt may) ends at it.
    let anchor = anchors
        .iter()
        .zip(&anchor_ders)
        .find(|(anchor, der)| {
            der.as_ref() == chain.last().map(|d| d.as_ref()).unwrap_or_default()
                || (last.issuer() == anchor.subject()
                    && last.verify_signature(Some(anchor.public_key())).is_ok())
        })
        .map(|(anchor, _)| anchor)
        .ok_or_else(|| {
            invalid(
                "issuer chain",
                format!(
                    "{} is not signed by any of the {} trust anchor(s) (issued by {})",
                    last.subject(),
                    anchors.len(),
                    last.issuer()
                ),
            )
        })?;
    Ok(ChainReport {
        issuer: CertInfo::of(issuer),
        anchor: CertInfo::of(anchor),
    })
}

/// Subject and validity of the first certificate in `pem`.
pub fn cert_info(pem: &str, what: &str) -> Result<CertInfo, PkiError> {
    let ders = parse_pem_certs(pem, what)?;
    let cert = parse_der(&ders[0], what)?;
    Ok(CertInfo::of(&cert))
}

/// The DNS names in the first certificate's subjectAltName.
pub fn dns_names(pem: &str) -> Result<Vec<String>, PkiError> {
    let ders = parse_pem_certs(pem, "certificate")?;
    let cert = parse_der(&ders[0], "certificate")?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| invalid("certificate", e))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Whether the first certificate of `cert_pem` is signed by one of the certificates of
/// `ca_pem` (the webhook's caBundle).
pub fn verify_signed_by(cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
    let ders = parse_pem_certs(cert_pem, "serving certificate")?;
    let cert = parse_der(&ders[0], "serving certificate")?;
    let ca_ders = parse_pem_certs(ca_pem, "CA bundle")?;
    for der in &ca_ders {
        let ca = parse_der(der, "CA bundle")?;
        if cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok() {
            return Ok(());
        }
    }
    Err(invalid(
        "serving certificate",
        format!(
            "{} (issued by {}) is not signed by the CA bundle",
            cert.subject(),
            cert.issuer()
        ),
    ))
}

/// The admission webhook's CA and the serving certificate it signs. The CA's key is dropped
/// once the serving certificate is signed: a new install makes a new pair.
#[derive(Clone)]
pub struct WebhookTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for WebhookTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTls")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret key elided]")
            .finish()
    }
}

/// A P-256 CA and a serving certificate for `dns_names` (the first is also the subject CN).
pub fn generate_webhook_tls(dns_names: &[String], days: u32) -> Result<WebhookTls, PkiError> {
    let gen = |e: rcgen::Error| PkiError::Generate(e.to_string());
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for API servers whose clock runs behind ours.
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(i64::from(days));

    let mut ca_params = CertificateParams::default();
    let mut ca_name = DistinguishedName::new();
    ca_name.push(DnType::OrganizationName, "weft");
    ca_name.push(DnType::CommonName, "weft-injector webhook CA");
    ca_params.distinguished_name = ca_name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen)?;
    let ca = rcgen::Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(gen)?;
    let mut name = DistinguishedName::new();
    if let Some(first) = dns_names.first() {
        name.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(gen)?;
    let cert = params.signed_by(&key, &ca).map_err(gen)?;
    Ok(WebhookTls {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_chains_to_its_anchor() {
        let identity = generate_identity("example.org").unwrap();
        let report = validate_identity(&identity).unwrap();
        assert!(report.issuer.subject.contains("weft issuer"), "{report:?}");
        assert!(
            report.anchor.subject.contains("weft trust anchor"),
            "{report:?}"
        );
        let days_left = report.issuer.seconds_left(SystemTime::now()) / 86_400;
        assert!((363..=365).contains(&days_left), "{days_left}");
    }

    #[test]
    fn issuer_of_another_anchor_is_refused() {
        let a = generate_identity("cluster.local").unwrap();
        let b = generate_identity("cluster.local").unwrap();
        let err = verify_issuer_chain(&a.issuer_pem, &b.trust_anchors_pem).unwrap_err();
        assert!(err.to_string().contains("not signed by any"), "{err}");
        // Trusting both anchors (rotation) admits it again.
        let both = format!("{}{}", b.trust_anchors_pem, a.trust_anchors_pem);
        verify_issuer_chain(&a.issuer_pem, &both).unwrap();
    }

    #[test]
    fn identity_dir_reads_weft_and_cert_manager_layouts() {
        let identity = generate_identity("cluster.local").unwrap();
        let base = std::env::temp_dir().join(format!("weft-pki-test-{}", std::process::id()));
        let weft_dir = base.join("weft");
        let cm_dir = base.join("cm");
        std::fs::create_dir_all(&weft_dir).unwrap();
        std::fs::create_dir_all(&cm_dir).unwrap();
        for (dir, names) in [
            (
                &weft_dir,
                ["trust-anchors.pem", "issuer.pem", "issuer-key.pem"],
            ),
            (&cm_dir, ["ca.crt", "tls.crt", "tls.key"]),
        ] {
            std::fs::write(dir.join(names[0]), &identity.trust_anchors_pem).unwrap();
            std::fs::write(dir.join(names[1]), &identity.issuer_pem).unwrap();
            std::fs::write(dir.join(names[2]), &identity.issuer_key_pem).unwrap();
            let read = read_identity_dir(dir).unwrap();
            assert_eq!(read.issuer_pem, identity.issuer_pem);
            assert_eq!(read.trust_anchors_pem, identity.trust_anchors_pem);
        }
        let empty = base.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            read_identity_dir(&empty),
            Err(PkiError::NoIdentityFiles { .. })
        ));
        // A key that is not the issuer's is caught before anything is rendered.
        let other = generate_identity("cluster.local").unwrap();
        std::fs::write(weft_dir.join("issuer-key.pem"), &other.issuer_key_pem).unwrap();
        assert!(read_identity_dir(&weft_dir).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn webhook_serving_cert_is_signed_by_its_ca_and_names_the_service() {
        let names = vec![
            "weft-injector.mesh.svc".to_string(),
            "weft-injector.mesh.svc.cluster.local".to_string(),
        ];
        let tls = generate_webhook_tls(&names, 30).unwrap();
        verify_signed_by(&tls.cert_pem, &tls.ca_pem).unwrap();
        assert_eq!(dns_names(&tls.cert_pem).unwrap(), names);
        let other = generate_webhook_tls(&names, 30).unwrap();
        assert!(verify_signed_by(&tls.cert_pem, &other.ca_pem).is_err());
        let info = cert_info(&tls.cert_pem, "serving").unwrap();
        let days = info.seconds_left(SystemTime::now()) / 86_400;
        assert!((29..=30).contains(&days), "{days}");
        KeyPair::from_pem(&tls.key_pem).unwrap();
    }
}
