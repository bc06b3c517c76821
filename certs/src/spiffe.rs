//! The SPIFFE workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`, its TLS server name, and
//! extracting it from a certificate.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::Error;

const SCHEME: &str = "spiffe://";

/// Labels placed between the namespace and the trust domain in [`SpiffeId::tls_server_name`].
const SERVER_NAME_MARKER: &str = "serviceaccount.identity.weft";

/// SPIFFE caps trust domains at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// RFC 1123 label (Kubernetes namespace names).
const MAX_LABEL_LEN: usize = 63;
/// RFC 1123 subdomain (Kubernetes ServiceAccount names), and the DNS name limit.
const MAX_SUBDOMAIN_LEN: usize = 253;

/// A validated workload identity. Every value has a server name that is a valid DNS name, so
/// it can always be used as TLS SNI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let input = || format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let invalid = |reason: String| Error::InvalidSpiffeId {
            input: input(),
            reason,
        };
        validate_trust_domain(trust_domain).map_err(|r| invalid(format!("trust domain: {r}")))?;
        check_label(namespace).map_err(|r| invalid(format!("namespace: {r}")))?;
        check_subdomain(service_account, MAX_SUBDOMAIN_LEN)
            .map_err(|r| invalid(format!("service account: {r}")))?;
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let server_name_len = id.tls_server_name().len();
        if server_name_len > MAX_SUBDOMAIN_LEN {
            return Err(invalid(format!(
                "its TLS server name would be {server_name_len} bytes; DNS allows {MAX_SUBDOMAIN_LEN}"
            )));
        }
        Ok(id)
    }

    /// Accepts only the canonical form `spiffe://<td>/ns/<ns>/sa/<sa>`: no query, fragment,
    /// port, user info, percent-encoding, upper case or trailing slash.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidSpiffeId {
            input: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("must start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing path /ns/<namespace>/sa/<service-account>"))?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments.as_slice() else {
            return Err(invalid("path must be /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(invalid("path must be /ns/<namespace>/sa/<service-account>"));
        }
        SpiffeId::new(trust_domain, namespace, service_account).map_err(|e| match e {
            Error::InvalidSpiffeId { reason, .. } => Error::InvalidSpiffeId {
                input: uri.to_owned(),
                reason,
            },
            other => other,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The DNS form of this identity, `<sa>.<ns>.serviceaccount.identity.weft.<td>`, sent as SNI
    /// and checked by the client's verifier. Distinct ids always map to distinct names (see
    /// `validate_trust_domain`).
    pub fn tls_server_name(&self) -> String {
        format!(
            "{}.{}.{SERVER_NAME_MARKER}.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// Checks a trust domain: lower-case DNS name characters, bounded length.
pub(crate) fn validate_trust_domain(trust_domain: &str) -> Result<(), String> {
    check_subdomain(trust_domain, MAX_TRUST_DOMAIN_LEN)?;
    // The namespace is a single label directly before the marker, and the marker is located
    // as its last occurrence; a trust domain containing the marker labels would let two
    // different ids share one server name and so pass each other's name check.
    if format!(".{trust_domain}.").contains(&format!(".{SERVER_NAME_MARKER}.")) {
        return Err(format!(
            "must not contain the labels {SERVER_NAME_MARKER:?}"
        ));
    }
    Ok(())
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty DNS label".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "DNS label {label:?} longer than {MAX_LABEL_LEN} bytes"
        ));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "character {bad:?} not allowed (only a-z, 0-9 and '-')"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "DNS label {label:?} must not start or end with '-'"
        ));
    }
    Ok(())
}

fn check_subdomain(name: &str, max_len: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > max_len {
        return Err(format!("longer than {max_len} bytes"));
    }
    name.split('.').try_for_each(check_label)
}

/// The identity of a certificate: its single `spiffe://` URI SAN. Other SAN entries are
/// ignored; zero or several SPIFFE URIs are an error because the identity would be ambiguous.
pub fn spiffe_id_of_cert(cert_der: &[u8]) -> Result<SpiffeId, Error> {
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| Error::MalformedCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::MalformedCertificate(
            "trailing bytes after certificate".into(),
        ));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::MalformedCertificate(format!("subjectAltName: {e}")))?
        .ok_or(Error::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if has_spiffe_scheme(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(Error::NoSpiffeId),
        [uri] => SpiffeId::parse(uri),
        many => Err(Error::MultipleSpiffeIds { count: many.len() }),
    }
}

/// URI schemes are case-insensitive, so `SPIFFE://` counts toward "more than one identity"
/// even though `SpiffeId::parse` then rejects it as non-canonical.
pub(crate) fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..SCHEME.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn parses_canonical_uri_and_round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            id.tls_server_name(),
            "web.default.serviceaccount.identity.weft.cluster.local"
        );
        let again: SpiffeId = id.to_string().parse().unwrap();
        assert_eq!(again, id);
    }

    #[test]
    fn service_account_may_be_a_subdomain() {
        let id = SpiffeId::new("td", "ns1", "a.b-c.d").unwrap();
        assert_eq!(id.service_account(), "a.b-c.d");
    }

    #[test]
    fn rejects_malformed_uris() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local:8443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/c",
            "spiffe://cluster.local/ns/a/sa/b%2Fc",
            "spiffe://cluster..local/ns/a/sa/b",
            "spiffe://.cluster.local/ns/a/sa/b",
            "spiffe://cluster.local./ns/a/sa/b",
            "spiffe://-cluster.local/ns/a/sa/b",
            "spiffe://cluster_local/ns/a/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b-",
            "spiffe://cluster.local/ns/a/sa/b..c",
            "spiffe://cluster.local//ns/a/sa/b",
        ] {
            let err = SpiffeId::parse(bad).expect_err(bad);
            assert!(
                matches!(&err, Error::InvalidSpiffeId { input, .. } if input == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn enforces_length_bounds() {
        let label63 = "a".repeat(63);
        assert!(SpiffeId::new("td", &label63, "sa").is_ok());
        assert!(SpiffeId::new("td", &"a".repeat(64), "sa").is_err());
        assert!(SpiffeId::new("td", "ns", &format!("{label63}.{}", "b".repeat(64))).is_err());
        // Each part valid on its own, but the server name would exceed 253 bytes.
        let long_sa = [label63.as_str(); 3].join(".");
        assert!(long_sa.len() <= 253);
        let err = SpiffeId::new("cluster.local", &label63, &long_sa).unwrap_err();
        assert!(err.to_string().contains("server name"), "{err}");
        let long_td = [label63.as_str(); 5].join(".");
        assert!(SpiffeId::new(&long_td, "ns", "sa").is_err());
    }

    #[test]
    fn trust_domain_may_not_contain_the_server_name_marker() {
        assert!(SpiffeId::new("serviceaccount.identity.weft.t", "n", "s").is_err());
        assert!(SpiffeId::new("x.serviceaccount.identity.weft", "n", "s").is_err());
        // A mere substring of a label is harmless.
        assert!(SpiffeId::new("xserviceaccount.identity.weft.t", "n", "s").is_ok());
    }

    /// Distinct identities must have distinct server names, otherwise the client verifier's
    /// name check could accept the wrong peer. Checked over a combinatorial set built from
    /// labels that collide when concatenated naively.
    #[test]
    fn server_names_are_injective() {
        let pieces = [
            "a",
            "b",
            "a.b",
            "weft",
            "identity",
            "serviceaccount",
            "serviceaccount.identity",
            "a.serviceaccount.identity",
            "identity.weft",
            "weft.a",
        ];
        let mut ids = Vec::new();
        for td in pieces {
            for ns in pieces {
                for sa in pieces {
                    if let Ok(id) = SpiffeId::new(td, ns, sa) {
                        ids.push(id);
                    }
                }
            }
        }
        assert!(ids.len() > 100, "too few valid combinations: {}", ids.len());
        let mut names = HashSet::new();
        for id in &ids {
            assert!(
                names.insert(id.tls_server_name()),
                "server name of {id} collides"
            );
            rustls_pki_types::ServerName::try_from(id.tls_server_name())
                .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
    }

    /// `new` and `parse` accept exactly the same identities, and accepted ones round-trip
    /// through `Display`. Inputs come from a fixed-seed generator biased toward edge cases.
    #[test]
    fn new_and_parse_agree_on_generated_inputs() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"abcdef0123-.abcdef0123-.abcdef0123A_/";
        let part = |next: &mut dyn FnMut() -> u64| {
            let len = (next() % 7) as usize;
            (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
                .collect::<String>()
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let (td, ns, sa) = (part(&mut next), part(&mut next), part(&mut next));
            let uri = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
            match (SpiffeId::new(&td, &ns, &sa), SpiffeId::parse(&uri)) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b);
                    assert_eq!(a.to_string(), uri);
                    accepted += 1;
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{uri}: new={a:?} parse={b:?}"),
            }
        }
        assert!(accepted > 1000, "generator too strict: {accepted}");
    }

    #[test]
    fn scheme_detection_is_case_insensitive() {
        assert!(has_spiffe_scheme("SPIFFE://x"));
        assert!(has_spiffe_scheme("spiffe://x"));
        assert!(!has_spiffe_scheme("https://x"));
        assert!(!has_spiffe_scheme("spif"));
    }
}
