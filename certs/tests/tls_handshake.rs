//! Real TLS 1.3 handshakes over in-memory buffers between configs built by this crate.

mod common;

use std::time::{Duration, SystemTime};

use common::{handshake, id, Pki, ALPN, DAY};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{AlertDescription, CertificateError, ProtocolVersion};
use weft_certs::{
    client_config, peer_identity, server_config, CertStore, ClientAuth, TrustAnchors,
};

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[test]
fn mutual_tls_succeeds_and_both_sides_know_the_peer() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let client_store = pki.workload_store(&id(CLIENT));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Required, &[ALPN]).unwrap();
    let client = client_config(&pki.anchors, Some(client_store), &[ALPN]).unwrap();

    let mut conn = handshake(client, server, &id(SERVER).tls_server_name()).unwrap();

    assert_eq!(peer_identity(&conn.server), Some(id(CLIENT)));
    assert_eq!(peer_identity(&conn.client), Some(id(SERVER)));
    assert_eq!(conn.client.alpn_protocol(), Some(ALPN));
    assert_eq!(conn.server.alpn_protocol(), Some(ALPN));
    assert_eq!(
        conn.client.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.server.server_name(),
        Some(id(SERVER).tls_server_name().as_str())
    );
    assert_eq!(
        conn.client_to_server(b"hello over mtls"),
        b"hello over mtls"
    );
}

#[test]
fn client_rejects_server_with_another_identity() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let client_store = pki.workload_store(&id(CLIENT));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Required, &[ALPN]).unwrap();
    let client = client_config(&pki.anchors, Some(client_store), &[ALPN]).unwrap();

    // The client expects the payments service, but reaches the (validly certified) cart.
    let expected = id("spiffe://cluster.local/ns/shop/sa/payments");
    let failure = handshake(client, server, &expected.tls_server_name()).unwrap_err();

    match failure.client {
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        })) => assert_eq!(presented, vec![SERVER.to_owned()]),
        other => panic!("unexpected client error {other:?}"),
    }
    assert_eq!(
        failure.server,
        Some(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
        ))
    );
}

#[test]
fn client_rejects_a_server_name_that_is_not_an_identity() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Optional, &[]).unwrap();
    let client = client_config(&pki.anchors, None, &[]).unwrap();
    let failure = handshake(client, server, "cart.shop.svc.cluster.local").unwrap_err();
    assert!(matches!(
        failure.client,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext { .. }
        ))
    ));
}

#[test]
fn client_rejects_server_from_an_unrelated_ca() {
    let trusted = Pki::new("cluster.local");
    let rogue = Pki::new("cluster.local");
    let server_store = rogue.workload_store(&id(SERVER));
    let server = server_config(&rogue.anchors, server_store, ClientAuth::Optional, &[]).unwrap();
    let client = client_config(&trusted.anchors, None, &[]).unwrap();

    let failure = handshake(client, server, &id(SERVER).tls_server_name()).unwrap_err();
    assert_eq!(
        failure.client,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn server_rejects_client_cert_from_an_unrelated_ca() {
    let trusted = Pki::new("cluster.local");
    let rogue = Pki::new("cluster.local");
    let server_store = trusted.workload_store(&id(SERVER));
    let rogue_client = rogue.workload_store(&id(CLIENT));
    let server = server_config(&trusted.anchors, server_store, ClientAuth::Required, &[]).unwrap();
    let client = client_config(&trusted.anchors, Some(rogue_client), &[]).unwrap();

    let failure = handshake(client, server, &id(SERVER).tls_server_name()).unwrap_err();
    assert_eq!(
        failure.server,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn optional_client_auth_still_verifies_presented_certs() {
    let trusted = Pki::new("cluster.local");
    let rogue = Pki::new("cluster.local");
    let server_store = trusted.workload_store(&id(SERVER));
    let server = server_config(&trusted.anchors, server_store, ClientAuth::Optional, &[]).unwrap();
    let client = client_config(
        &trusted.anchors,
        Some(rogue.workload_store(&id(CLIENT))),
        &[],
    )
    .unwrap();
    let failure = handshake(client, server, &id(SERVER).tls_server_name()).unwrap_err();
    assert!(failure.server.is_some());
}

#[test]
fn required_client_auth_rejects_anonymous_clients() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Required, &[]).unwrap();

    let anonymous = client_config(&pki.anchors, None, &[]).unwrap();
    let failure = handshake(anonymous, server.clone(), &id(SERVER).tls_server_name()).unwrap_err();
    assert_eq!(failure.server, Some(rustls::Error::NoCertificatesPresented));

    // A store that has no certificate yet behaves like no store.
    let not_ready = CertStore::new(id(CLIENT));
    let client = client_config(&pki.anchors, Some(not_ready), &[]).unwrap();
    let failure = handshake(client, server, &id(SERVER).tls_server_name()).unwrap_err();
    assert_eq!(failure.server, Some(rustls::Error::NoCertificatesPresented));
}

#[test]
fn optional_client_auth_accepts_anonymous_clients() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Optional, &[]).unwrap();
    let client = client_config(&pki.anchors, None, &[]).unwrap();

    let conn = handshake(client, server, &id(SERVER).tls_server_name()).unwrap();
    assert_eq!(peer_identity(&conn.server), None);
    assert_eq!(peer_identity(&conn.client), Some(id(SERVER)));
}

/// A certificate from the trusted issuer that carries no SPIFFE id is not a workload.
#[test]
fn server_rejects_trusted_client_cert_without_spiffe_id() {
    let pki = Pki::new("cluster.local");
    let issuer_key = KeyPair::from_pem(&pki.generated.issuer_key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&pki.generated.issuer_pem, issuer_key).unwrap();
    let client_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["web.shop.svc".to_owned()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&client_key, &issuer).unwrap();
    let certified = rustls::sign::CertifiedKey::from_der(
        vec![leaf.der().clone(), pki.issuer.chain_der()[0].clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der())),
        &rustls::crypto::ring::default_provider(),
    )
    .unwrap();
    let client_store = CertStore::new(id(CLIENT));
    client_store.install(std::sync::Arc::new(certified), SystemTime::now() + DAY);

    let server_store = pki.workload_store(&id(SERVER));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Required, &[]).unwrap();
    let client = client_config(&pki.anchors, Some(client_store), &[]).unwrap();
    let failure = handshake(client, server, &id(SERVER).tls_server_name()).unwrap_err();
    assert_eq!(
        failure.server,
        Some(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure
        ))
    );
}

/// During anchor rotation peers trust both roots; each side's chain leads to a different one.
#[test]
fn anchor_bundle_with_two_roots_verifies_chains_to_either() {
    let old = Pki::new("cluster.local");
    let new = Pki::new("cluster.local");
    let bundle = TrustAnchors::from_pem(
        format!(
            "{}{}",
            old.generated.trust_anchors_pem, new.generated.trust_anchors_pem
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(bundle.len(), 2);

    for (server_pki, client_pki) in [(&old, &new), (&new, &old)] {
        let server_store = server_pki.workload_store(&id(SERVER));
        let client_store = client_pki.workload_store(&id(CLIENT));
        let server = server_config(&bundle, server_store, ClientAuth::Required, &[]).unwrap();
        let client = client_config(&bundle, Some(client_store), &[]).unwrap();
        let conn = handshake(client, server, &id(SERVER).tls_server_name()).unwrap();
        assert_eq!(peer_identity(&conn.server), Some(id(CLIENT)));
        assert_eq!(peer_identity(&conn.client), Some(id(SERVER)));
    }
}

#[test]
fn new_handshakes_use_the_newly_installed_certificate() {
    let pki = Pki::new("cluster.local");
    let server_store = CertStore::new(id(SERVER));
    let server = server_config(
        &pki.anchors,
        server_store.clone(),
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    let client = client_config(&pki.anchors, None, &[]).unwrap();
    let name = id(SERVER).tls_server_name();

    // Nothing installed yet: no certificate to present.
    assert!(!server_store.is_ready());
    assert!(handshake(client.clone(), server.clone(), &name).is_err());

    let (first, first_not_after) = pki.issuer.issue_own(&id(SERVER), DAY).unwrap();
    server_store.install(first.clone(), first_not_after);
    assert!(server_store.is_ready());
    assert_eq!(server_store.not_after(), Some(first_not_after));
    let mut before = handshake(client.clone(), server.clone(), &name).unwrap();
    assert_eq!(peer_leaf(&before.client), first.cert[0]);

    let (second, second_not_after) = pki
        .issuer
        .issue_own(&id(SERVER), DAY + Duration::from_secs(60))
        .unwrap();
    server_store.install(second.clone(), second_not_after);
    assert_eq!(server_store.not_after(), Some(second_not_after));
    assert_ne!(first.cert[0], second.cert[0]);

    let after = handshake(client, server, &name).unwrap();
    assert_eq!(peer_leaf(&after.client), second.cert[0]);
    assert_eq!(peer_identity(&after.client), Some(id(SERVER)));
    // The connection made before the swap keeps working with its original certificate.
    assert_eq!(peer_leaf(&before.client), first.cert[0]);
    assert_eq!(before.client_to_server(b"still open"), b"still open");
}

#[test]
fn client_store_swap_changes_the_presented_identity_cert() {
    let pki = Pki::new("cluster.local");
    let server_store = pki.workload_store(&id(SERVER));
    let server = server_config(&pki.anchors, server_store, ClientAuth::Required, &[]).unwrap();
    let client_store = pki.workload_store(&id(CLIENT));
    let client = client_config(&pki.anchors, Some(client_store.clone()), &[]).unwrap();
    let name = id(SERVER).tls_server_name();

    let first = handshake(client.clone(), server.clone(), &name).unwrap();
    let first_leaf = peer_leaf(&first.server);
    pki.renew(&client_store);
    let second = handshake(client, server, &name).unwrap();
    let second_leaf = peer_leaf(&second.server);
    assert_ne!(first_leaf, second_leaf);
    assert_eq!(
        Some(second_leaf),
        client_store.current().map(|k| k.cert[0].clone())
    );
}

#[test]
fn client_refuses_tls12() {
    let pki = Pki::new("cluster.local");
    let store = pki.workload_store(&id(SERVER));
    let tls12_server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_no_client_auth()
    .with_cert_resolver(store.clone());
    let client = client_config(&pki.anchors, Some(store), &[]).unwrap();
    let failure = handshake(
        client,
        std::sync::Arc::new(tls12_server),
        &id(SERVER).tls_server_name(),
    )
    .unwrap_err();
    assert_eq!(
        failure.server,
        Some(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled
        ))
    );
}

fn peer_leaf(conn: &rustls::CommonState) -> CertificateDer<'static> {
    conn.peer_certificates().unwrap()[0].clone().into_owned()
}
