//! Trust anchors: the root certificates peers' chains must lead to (several at once during
//! anchor rotation).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::Error;

#[derive(Clone, Debug)]
pub struct TrustAnchors {
    ders: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustAnchors {
    /// Reads every CERTIFICATE block (other PEM sections are ignored). Each must parse as a
    /// trust anchor; an input without any certificate is an error, as trusting nothing would
    /// only surface later as confusing handshake failures.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pem(e.to_string()))?;
        if ders.is_empty() {
            return Err(Error::NoCertificates);
        }
        let anchors = ders
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| Error::InvalidTrustAnchor(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustAnchors { ders, anchors })
    }

    pub fn len(&self) -> usize {
        self.ders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ders.is_empty()
    }

    pub fn ders(&self) -> &[CertificateDer<'static>] {
        &self.ders
    }

    pub(crate) fn webpki_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_input_without_certificates() {
        assert!(matches!(
            TrustAnchors::from_pem(b""),
            Err(Error::NoCertificates)
        ));
        assert!(matches!(
            TrustAnchors::from_pem(b"not pem at all"),
            Err(Error::NoCertificates)
        ));
    }

    #[test]
    fn rejects_certificate_block_with_garbage_der() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustAnchors::from_pem(pem),
            Err(Error::InvalidTrustAnchor(_))
        ));
    }

    #[test]
    fn rejects_bad_base64() {
        let pem = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(TrustAnchors::from_pem(pem), Err(Error::Pem(_))));
    }
}
