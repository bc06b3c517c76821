//! Shared test fixtures: a generated PKI, workload certificates obtained through the real
//! CSR flow, and an in-memory TLS handshake driver.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;
use weft_certs::{
    generate_identity, CertStore, GeneratedIdentity, Issuer, SpiffeId, TrustAnchors, WorkloadKey,
};

pub const DAY: Duration = Duration::from_secs(86_400);
pub const ALPN: &[u8] = b"weft.opaque/1";

pub struct Pki {
    pub generated: GeneratedIdentity,
    pub issuer: Issuer,
    pub anchors: TrustAnchors,
}

impl Pki {
    pub fn new(trust_domain: &str) -> Pki {
        let generated = generate_identity(trust_domain, 365 * DAY, 30 * DAY).unwrap();
        let issuer = Issuer::from_pem(&generated.issuer_pem, &generated.issuer_key_pem).unwrap();
        let anchors = TrustAnchors::from_pem(generated.trust_anchors_pem.as_bytes()).unwrap();
        Pki {
            generated,
            issuer,
            anchors,
        }
    }

    /// A store holding a certificate for `id` obtained the way a proxy does: key in memory,
    /// CSR, `sign_csr`, `certified_key`.
    pub fn workload_store(&self, id: &SpiffeId) -> Arc<CertStore> {
        let store = CertStore::new(id.clone());
        self.renew(&store);
        store
    }

    pub fn renew(&self, store: &CertStore) {
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr_der(store.identity()).unwrap();
        let signed = self.issuer.sign_csr(&csr, store.identity(), DAY).unwrap();
        let certified = key
            .certified_key(
                signed.leaf_der.to_vec(),
                signed.chain_der.iter().map(|c| c.to_vec()).collect(),
            )
            .unwrap();
        store.install(certified, signed.not_after);
    }
}

pub fn id(uri: &str) -> SpiffeId {
    SpiffeId::parse(uri).unwrap()
}

/// Errors each side raised during a failed handshake.
#[derive(Debug)]
pub struct HandshakeFailure {
    pub client: Option<rustls::Error>,
    pub server: Option<rustls::Error>,
}

#[derive(Debug)]
pub struct Connected {
    pub client: ClientConnection,
    pub server: ServerConnection,
}

/// Runs a full TLS handshake between two in-memory endpoints, shuttling records (alerts
/// included) until both finish or either fails.
pub fn handshake(
    client_config: Arc<ClientConfig>,
    server_config: Arc<ServerConfig>,
    server_name: &str,
) -> Result<Connected, Box<HandshakeFailure>> {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut client = ClientConnection::new(client_config, name).unwrap();
    let mut server = ServerConnection::new(server_config).unwrap();
    let mut failure = HandshakeFailure {
        client: None,
        server: None,
    };
    for _ in 0..20 {
        if let Err(e) = transfer(&mut client, &mut server) {
            failure.server = Some(e);
        }
        if let Err(e) = transfer(&mut server, &mut client) {
            failure.client = Some(e);
        }
        if failure.client.is_some() || failure.server.is_some() {
            // One more pass so the server receives any alert describing the client's failure.
            if let Err(e) = transfer(&mut client, &mut server) {
                failure.server.get_or_insert(e);
            }
            return Err(Box::new(failure));
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(Connected { client, server });
        }
    }
    panic!("handshake did not finish");
}

/// Moves every pending TLS record from `from` to `to` and lets `to` process them.
fn transfer<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> Result<(), rustls::Error> {
    let mut records = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut records).unwrap();
    }
    let mut rest = records.as_slice();
    while !rest.is_empty() {
        if to.read_tls(&mut rest).unwrap() == 0 {
            break;
        }
        to.process_new_packets()?;
    }
    Ok(())
}

impl Connected {
    /// Sends `data` client → server over the established session and returns what arrived.
    pub fn client_to_server(&mut self, data: &[u8]) -> Vec<u8> {
        use std::io::{Read, Write};
        self.client.writer().write_all(data).unwrap();
        transfer(&mut self.client, &mut self.server).unwrap();
        let mut received = vec![0u8; data.len()];
        self.server.reader().read_exact(&mut received).unwrap();
        received
    }
}
