//! The proxy's current certificate, swapped atomically on renewal and read wait-free by
//! every handshake.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::SpiffeId;

struct Installed {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// Holds the certificate for one identity. A handshake takes the certificate current when it
/// starts; installing a new one affects only later handshakes, so open connections are kept.
pub struct CertStore {
    identity: SpiffeId,
    current: ArcSwapOption<Installed>,
}

impl CertStore {
    pub fn new(identity: SpiffeId) -> Arc<Self> {
        Arc::new(CertStore {
            identity,
            current: ArcSwapOption::empty(),
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Callers install certificates issued for `identity()`.
    pub fn install(&self, key: Arc<CertifiedKey>, not_after: SystemTime) {
        self.current
            .store(Some(Arc::new(Installed { key, not_after })));
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|i| i.key.clone())
    }

    pub fn not_after(&self) -> Option<SystemTime> {
        self.current.load().as_ref().map(|i| i.not_after)
    }

    /// True once a certificate has been installed (it may have expired since).
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after())
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Offering a cert the server cannot verify fails the handshake; sending none at least
        // lets a server with optional client auth continue.
        self.current()
            .filter(|key| key.key.choose_scheme(sigschemes).is_some())
    }

    fn has_certs(&self) -> bool {
        self.is_ready()
    }
}
