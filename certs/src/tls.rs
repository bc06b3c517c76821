//! rustls client and server configurations that authenticate peers by SPIFFE identity
//! against the trust anchors (TLS 1.3 only, ring provider), and reading the peer's identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::{spiffe_id_of_cert, CertStore, Error, SpiffeId, TrustAnchors};

/// Whether a server demands a client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    /// Clients without a certificate are accepted (their `peer_identity` is `None`); a
    /// certificate that is presented must still verify.
    Optional,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server presenting the store's current certificate. Client certificates must chain to an
/// anchor and carry a SPIFFE id; which ids are allowed is the caller's authorization decision.
pub fn server_config(
    anchors: &TrustAnchors,
    store: Arc<CertStore>,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let roots = Arc::new(RootCertStore {
        roots: anchors.webpki_anchors().to_vec(),
    });
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let chain_verifier = builder
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { chain_verifier }))
        .with_cert_resolver(store);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Resumption would let a peer skip certificate verification on later connections, so a
    // renewed certificate, an expired one or a removed anchor would not take effect on them.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client that presents the store's certificate (if given and ready) and accepts a server
/// only if its chain leads to an anchor and its SPIFFE id's `tls_server_name()` equals the
/// DNS server name connected to.
pub fn client_config(
    anchors: &TrustAnchors,
    store: Option<Arc<CertStore>>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        anchors: anchors.webpki_anchors().to_vec(),
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(store),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // See server_config: every connection re-verifies the peer's current certificate.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE id of the verified peer certificate, once the handshake has completed.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of_cert(leaf).ok()
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;

        // Only a chain-verified certificate's identity means anything, hence after the chain.
        let ServerName::DnsName(expected) = server_name else {
            return Err(CertificateError::NotValidForName.into());
        };
        let presented = spiffe_id_of_cert(end_entity)
            .map_err(|_| rustls::Error::from(CertificateError::NotValidForName))?;
        if !presented
            .tls_server_name()
            .eq_ignore_ascii_case(expected.as_ref())
        {
            return Err(CertificateError::NotValidForNameContext {
                expected: server_name.to_owned(),
                presented: vec![presented.to_string()],
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// rustls' WebPKI client verifier plus the requirement that the certificate names exactly one
/// SPIFFE id, so an authenticated client always has a `peer_identity`.
#[derive(Debug)]
struct SpiffeClientVerifier {
    chain_verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain_verifier.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain_verifier.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of_cert(end_entity)
            .map_err(|_| rustls::Error::from(CertificateError::ApplicationVerificationFailure))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain_verifier.supported_verify_schemes()
    }
}

/// Maps WebPKI path-building failures onto the rustls errors (and TLS alerts) peers expect.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::BadDer | E::BadDerTime | E::InvalidCertValidity => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::UnsupportedCriticalExtension => CertificateError::UnhandledCriticalExtension,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    cert_error.into()
}
