//! Issuance end to end: generated PKI → issuer → workload CSR → signed leaf, and every way a
//! CSR or issuer input is refused.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{id, Pki, DAY};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use weft_certs::{
    generate_identity, spiffe_id_of_cert, CsrError, Error, Issuer, SpiffeId, TrustAnchors,
    WorkloadKey, MAX_CSR_LEN,
};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const RSA_TEST_KEY: &str = include_str!("data/rsa2048-test-key.pem");

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn csr_with(key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    edit(&mut params);
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri_san(id: &SpiffeId) -> SanType {
    SanType::URI(id.to_string().try_into().unwrap())
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

#[test]
fn generated_identity_is_a_two_level_ca() {
    let pki = Pki::new("cluster.local");
    let (_, root) = X509Certificate::from_der(pki.anchors.ders()[0].as_ref()).unwrap();
    let issuer_der = &pki.issuer.chain_der()[0];
    let (_, issuer) = X509Certificate::from_der(issuer_der.as_ref()).unwrap();

    assert_eq!(pki.anchors.len(), 1);
    assert_eq!(pki.issuer.chain_der().len(), 1);
    let root_bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(root_bc.ca);
    assert_eq!(root_bc.path_len_constraint, Some(1));
    assert_eq!(root.subject(), root.issuer());
    let issuer_bc = issuer.basic_constraints().unwrap().unwrap().value;
    assert!(issuer_bc.ca);
    assert_eq!(issuer_bc.path_len_constraint, Some(0));
    assert_eq!(issuer.issuer(), root.subject());
    issuer.verify_signature(Some(root.public_key())).unwrap();
    assert!(issuer.validity().not_after <= root.validity().not_after);
    assert_eq!(
        issuer.validity().not_after.timestamp(),
        unix(pki.issuer.not_after())
    );
    // The anchor's key is not part of the output: only the issuer key is a PEM key.
    assert!(!pki.generated.trust_anchors_pem.contains("PRIVATE KEY"));
    assert!(!pki.generated.issuer_pem.contains("PRIVATE KEY"));
    assert!(pki.generated.issuer_key_pem.contains("BEGIN PRIVATE KEY"));
    assert!(!format!("{:?}", pki.generated).contains(&pki.generated.issuer_key_pem));
}

#[test]
fn issuer_lifetime_is_capped_by_the_anchor() {
    let generated = generate_identity("td", DAY, 10 * DAY).unwrap();
    let issuer = Issuer::from_pem(&generated.issuer_pem, &generated.issuer_key_pem).unwrap();
    let anchors = TrustAnchors::from_pem(generated.trust_anchors_pem.as_bytes()).unwrap();
    let (_, root) = X509Certificate::from_der(anchors.ders()[0].as_ref()).unwrap();
    assert_eq!(
        unix(issuer.not_after()),
        root.validity().not_after.timestamp()
    );
}

#[test]
fn csr_flow_produces_a_leaf_for_exactly_the_proven_identity() {
    let pki = Pki::new("cluster.local");
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_der(&web).unwrap();
    let before = SystemTime::now();
    let signed = pki.issuer.sign_csr(&csr, &web, DAY).unwrap();

    assert_eq!(signed.chain_der, pki.issuer.chain_der());
    assert_eq!(spiffe_id_of_cert(&signed.leaf_der).unwrap(), web);

    let (_, leaf) = X509Certificate::from_der(signed.leaf_der.as_ref()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject requires a critical SAN");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
    );
    assert_eq!(leaf.subject().iter().count(), 0);
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert_eq!(not_after, unix(signed.not_after));
    let expected_after = unix(before + DAY);
    assert!(
        (not_after - expected_after).abs() <= 2,
        "{not_after} vs {expected_after}"
    );
    let expected_before = unix(before) - 60;
    assert!((not_before - expected_before).abs() <= 2);

    // The leaf chains to the anchor for both TLS usages.
    let ee = webpki::EndEntityCert::try_from(&signed.leaf_der).unwrap();
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            algs,
            &[webpki::anchor_from_trusted_cert(&pki.anchors.ders()[0]).unwrap()],
            &signed.chain_der,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }

    let certified = key
        .certified_key(
            signed.leaf_der.to_vec(),
            signed.chain_der.iter().map(|c| c.to_vec()).collect(),
        )
        .unwrap();
    assert_eq!(certified.cert.len(), 2);
    certified.keys_match().unwrap();
}

#[test]
fn serials_differ_between_leaves() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_der(&web).unwrap();
    let serial = |der: &CertificateDer<'_>| {
        X509Certificate::from_der(der.as_ref())
            .unwrap()
            .1
            .raw_serial()
            .to_vec()
    };
    let a = pki.issuer.sign_csr(&csr, &web, DAY).unwrap();
    let b = pki.issuer.sign_csr(&csr, &web, DAY).unwrap();
    assert_ne!(serial(&a.leaf_der), serial(&b.leaf_der));
}

#[test]
fn leaf_lifetime_never_exceeds_the_issuer() {
    let generated = generate_identity("td", 10 * DAY, Duration::from_secs(3600)).unwrap();
    let issuer = Issuer::from_pem(&generated.issuer_pem, &generated.issuer_key_pem).unwrap();
    let web = id("spiffe://td/ns/a/sa/b");
    let key = WorkloadKey::generate().unwrap();
    let signed = issuer
        .sign_csr(&key.csr_der(&web).unwrap(), &web, DAY)
        .unwrap();
    assert_eq!(signed.not_after, issuer.not_after());
}

#[test]
fn requested_extensions_and_subject_are_not_copied() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let key = p256();
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri_san(&web)];
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        p.key_usages = vec![KeyUsagePurpose::ContentCommitment];
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            vec![0x05, 0x00],
        )];
    });
    let signed = pki.issuer.sign_csr(&csr, &web, DAY).unwrap();
    let (_, leaf) = X509Certificate::from_der(signed.leaf_der.as_ref()).unwrap();
    assert_eq!(leaf.subject().iter().count(), 0);
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.non_repudiation());
    assert!(leaf.extensions().iter().all(|e| !matches!(
        e.parsed_extension(),
        ParsedExtension::UnsupportedExtension { .. }
    )));
}

#[test]
fn ed25519_csr_is_accepted() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let csr = csr_with(&key, |p| p.subject_alt_names = vec![uri_san(&web)]);
    let signed = pki.issuer.sign_csr(&csr, &web, DAY).unwrap();
    let (_, leaf) = X509Certificate::from_der(signed.leaf_der.as_ref()).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
}

fn sign_err(pki: &Pki, csr: &[u8], proven: &SpiffeId) -> CsrError {
    pki.issuer.sign_csr(csr, proven, DAY).unwrap_err()
}

#[test]
fn refuses_garbage_and_trailing_bytes() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    assert!(matches!(sign_err(&pki, b"", &web), CsrError::Malformed(_)));
    assert!(matches!(
        sign_err(&pki, b"\x30\x03garbage", &web),
        CsrError::Malformed(_)
    ));
    let mut csr = WorkloadKey::generate().unwrap().csr_der(&web).unwrap();
    csr.push(0);
    assert!(matches!(sign_err(&pki, &csr, &web), CsrError::Malformed(_)));
}

#[test]
fn refuses_csr_for_another_identity() {
    let pki = Pki::new("td");
    let asked = id("spiffe://td/ns/kube-system/sa/admin");
    let proven = id("spiffe://td/ns/a/sa/b");
    let csr = WorkloadKey::generate().unwrap().csr_der(&asked).unwrap();
    match sign_err(&pki, &csr, &proven) {
        CsrError::WrongIdentity {
            asked: a,
            proven: p,
        } => {
            assert_eq!(a, asked.to_string());
            assert_eq!(p, proven.to_string());
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn refuses_extra_or_non_spiffe_sans() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let key = p256();

    let with_dns = csr_with(&key, |p| {
        p.subject_alt_names = vec![
            uri_san(&web),
            SanType::DnsName("evil.example.com".try_into().unwrap()),
        ]
    });
    match sign_err(&pki, &with_dns, &web) {
        CsrError::WrongIdentity { asked, .. } => {
            assert!(asked.contains("DNS:evil.example.com"), "{asked}")
        }
        other => panic!("unexpected {other:?}"),
    }

    let with_ip = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri_san(&web), SanType::IpAddress([10, 0, 0, 1].into())]
    });
    assert!(matches!(
        sign_err(&pki, &with_ip, &web),
        CsrError::WrongIdentity { asked, .. } if asked.contains("IP:10.0.0.1")
    ));

    let twice = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri_san(&web), uri_san(&id("spiffe://td/ns/a/sa/other"))]
    });
    assert!(matches!(
        sign_err(&pki, &twice, &web),
        CsrError::WrongIdentity { .. }
    ));

    let non_canonical = csr_with(&key, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://td/ns/a/sa/b/".try_into().unwrap())]
    });
    assert!(matches!(
        sign_err(&pki, &non_canonical, &web),
        CsrError::WrongIdentity { .. }
    ));

    let no_san = csr_with(&key, |_| {});
    assert!(matches!(
        sign_err(&pki, &no_san, &web),
        CsrError::MissingIdentity
    ));

    let dns_only = csr_with(&key, |p| {
        p.subject_alt_names = vec![SanType::DnsName("b.a.svc".try_into().unwrap())]
    });
    assert!(matches!(
        sign_err(&pki, &dns_only, &web),
        CsrError::MissingIdentity
    ));
}

#[test]
fn refuses_ca_requests() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let key = p256();
    for is_ca in [
        IsCa::Ca(BasicConstraints::Unconstrained),
        IsCa::Ca(BasicConstraints::Constrained(0)),
    ] {
        let csr = csr_with(&key, |p| {
            p.subject_alt_names = vec![uri_san(&web)];
            p.is_ca = is_ca;
        });
        assert!(matches!(sign_err(&pki, &csr, &web), CsrError::CaRequested));
    }
    let cert_sign = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri_san(&web)];
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    });
    assert!(matches!(
        sign_err(&pki, &cert_sign, &web),
        CsrError::CaRequested
    ));
    // Explicitly not a CA is fine.
    let explicit_leaf = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri_san(&web)];
        p.is_ca = IsCa::ExplicitNoCa;
    });
    pki.issuer.sign_csr(&explicit_leaf, &web, DAY).unwrap();
}

#[test]
fn refuses_oversize_csr() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let big = csr_with(&p256(), |p| {
        p.subject_alt_names = vec![uri_san(&web)];
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 2],
            vec![0x04, 0x82, 0x13, 0x88]
                .into_iter()
                .chain(std::iter::repeat_n(0u8, 5000))
                .collect(),
        )];
    });
    assert!(big.len() > MAX_CSR_LEN);
    match sign_err(&pki, &big, &web) {
        CsrError::TooLarge { len } => assert_eq!(len, big.len()),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn refuses_tampered_signature_and_body() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/web");
    let csr = WorkloadKey::generate().unwrap().csr_der(&web).unwrap();

    let mut bad_signature = csr.clone();
    *bad_signature.last_mut().unwrap() ^= 0x01;
    assert!(matches!(
        sign_err(&pki, &bad_signature, &web),
        CsrError::BadSignature
    ));

    // Rewriting the requested identity invalidates the signature; the signature is checked
    // before the identity, so this is not reported as a plain identity mismatch.
    let other = id("spiffe://td/ns/a/sa/wex");
    let mut bad_body = csr.clone();
    let at = bad_body
        .windows(3)
        .rposition(|w| w == b"web")
        .expect("identity in CSR");
    bad_body[at + 2] = b'x';
    assert!(matches!(
        sign_err(&pki, &bad_body, &other),
        CsrError::BadSignature
    ));
}

#[test]
fn refuses_unsupported_keys() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");

    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = csr_with(&p384, |p| p.subject_alt_names = vec![uri_san(&web)]);
    assert!(matches!(
        sign_err(&pki, &csr, &web),
        CsrError::UnsupportedKey(msg) if msg.contains("1.3.132.0.34")
    ));

    let rsa = KeyPair::from_pem(RSA_TEST_KEY).unwrap();
    let csr = csr_with(&rsa, |p| p.subject_alt_names = vec![uri_san(&web)]);
    assert!(matches!(
        sign_err(&pki, &csr, &web),
        CsrError::UnsupportedKey(_)
    ));
}

#[test]
fn certified_key_refuses_a_leaf_for_another_key() {
    let pki = Pki::new("td");
    let web = id("spiffe://td/ns/a/sa/b");
    let requester = WorkloadKey::generate().unwrap();
    let signed = pki
        .issuer
        .sign_csr(&requester.csr_der(&web).unwrap(), &web, DAY)
        .unwrap();
    let other = WorkloadKey::generate().unwrap();
    assert!(matches!(
        other.certified_key(signed.leaf_der.to_vec(), vec![]),
        Err(Error::KeyMismatch)
    ));
    assert!(matches!(
        other.certified_key(b"nonsense".to_vec(), vec![]),
        Err(Error::MalformedCertificate(_))
    ));
}

#[test]
fn issue_own_mints_a_server_identity() {
    let pki = Pki::new("cluster.local");
    let control = id("spiffe://cluster.local/ns/weft/sa/weft-control");
    let (certified, not_after) = pki.issuer.issue_own(&control, DAY).unwrap();
    certified.keys_match().unwrap();
    assert_eq!(certified.cert.len(), 2);
    assert_eq!(certified.cert[1], pki.issuer.chain_der()[0]);
    assert_eq!(spiffe_id_of_cert(&certified.cert[0]).unwrap(), control);
    let (_, leaf) = X509Certificate::from_der(certified.cert[0].as_ref()).unwrap();
    assert_eq!(leaf.validity().not_after.timestamp(), unix(not_after));
}

#[test]
fn issuer_from_pem_checks_its_inputs() {
    let a = generate_identity("td", DAY, DAY).unwrap();
    let b = generate_identity("td", DAY, DAY).unwrap();

    assert!(matches!(
        Issuer::from_pem(&a.issuer_pem, &b.issuer_key_pem),
        Err(Error::KeyMismatch)
    ));
    assert!(matches!(
        Issuer::from_pem("", &a.issuer_key_pem),
        Err(Error::NoCertificates)
    ));
    assert!(matches!(
        Issuer::from_pem(&a.issuer_pem, "not a key"),
        Err(Error::PrivateKey(_))
    ));

    // A self-signed leaf (not a CA) cannot be an issuer.
    let key = p256();
    let mut params = CertificateParams::new(vec!["leaf.example".to_owned()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    let leaf = params.self_signed(&key).unwrap();
    assert!(matches!(
        Issuer::from_pem(&leaf.pem(), &key.serialize_pem()),
        Err(Error::NotCa)
    ));

    // An expired CA is refused.
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let expired = params.self_signed(&key).unwrap();
    assert!(matches!(
        Issuer::from_pem(&expired.pem(), &key.serialize_pem()),
        Err(Error::IssuerExpired { .. })
    ));
}

#[test]
fn spiffe_id_of_cert_requires_exactly_one_spiffe_uri() {
    let key = p256();
    let cert_with = |sans: Vec<SanType>| {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let web = id("spiffe://td/ns/a/sa/b");

    let with_dns = cert_with(vec![
        SanType::DnsName("x.example".try_into().unwrap()),
        uri_san(&web),
    ]);
    assert_eq!(spiffe_id_of_cert(&with_dns).unwrap(), web);
    assert!(matches!(
        spiffe_id_of_cert(&cert_with(vec![])),
        Err(Error::NoSpiffeId)
    ));
    assert!(matches!(
        spiffe_id_of_cert(&cert_with(vec![SanType::URI(
            "https://example.com".try_into().unwrap()
        )])),
        Err(Error::NoSpiffeId)
    ));
    assert!(matches!(
        spiffe_id_of_cert(&cert_with(vec![
            uri_san(&web),
            uri_san(&id("spiffe://td/ns/a/sa/c"))
        ])),
        Err(Error::MultipleSpiffeIds { count: 2 })
    ));
    assert!(matches!(
        spiffe_id_of_cert(b"garbage"),
        Err(Error::MalformedCertificate(_))
    ));
}

#[test]
fn trust_anchor_bundle_keeps_every_root() {
    let a = generate_identity("td", DAY, DAY).unwrap();
    let b = generate_identity("td", DAY, DAY).unwrap();
    let bundle = format!(
        "{}{}{}",
        a.trust_anchors_pem, a.issuer_key_pem, b.trust_anchors_pem
    );
    let anchors = TrustAnchors::from_pem(bundle.as_bytes()).unwrap();
    assert_eq!(anchors.len(), 2);
    assert!(!anchors.is_empty());
    assert_ne!(anchors.ders()[0], anchors.ders()[1]);
}
