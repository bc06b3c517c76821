//! Lazy outbound discovery: the first connection to an `ip:port` starts a
//! `Destination/Watch` stream for it; later connections read the latest answer. Streams
//! reconnect with backoff and the last answer is kept while the control plane is away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_api::destination::destination_client::DestinationClient;
use weft_api::destination::{HttpRoute, OutboundPolicy, WatchRequest};
use weft_certs::SpiffeId;

use crate::http::route::Routes;
use crate::identity::Backoff;
use crate::metrics::{Metrics, Name};

/// What the proxy does with connections to one original destination.
#[derive(Debug)]
pub struct Target {
    /// False when the control plane knows nothing of the address: connect to it as the app asked.
    pub known: bool,
    pub opaque: bool,
    pub service: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// The Service name as a metrics label ("" when the target is not a Service).
    pub service_label: Name,
    /// HTTP routing, built once per update (regexes compiled, balancers carried over).
    pub routes: Routes,
    /// The control plane's routes without their endpoints, kept for the admin `/config`
    /// view: the compiled matchers in `routes` cannot be read back.
    pub route_specs: Vec<HttpRoute>,
    /// When this answer arrived.
    pub updated: SystemTime,
}

/// The latest answer for one destination; cheap to clone, read once per request.
#[derive(Clone)]
pub struct TargetWatch {
    rx: TargetRx,
}

impl TargetWatch {
    /// Resolution has always completed before a `TargetWatch` is handed out.
    pub fn current(&self) -> Arc<Target> {
        match self.rx.borrow().as_ref() {
            Some(t) => t.clone(),
            None => Arc::new(Target::unknown()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity the endpoint's proxy must prove; `None` for an unmeshed endpoint.
    pub identity: Option<MeshPeer>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeshPeer {
    pub id: SpiffeId,
    pub server_name: ServerName<'static>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no answer from the control plane for {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
}

type TargetRx = watch::Receiver<Option<Arc<Target>>>;
/// One destination for the admin view: `None` while its first answer is awaited.
pub type TargetSnapshot = (SocketAddr, Option<Arc<Target>>);

pub struct Discovery {
    client: DestinationClient<Channel>,
    caller: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    // Touched once per new connection, never per byte; uncontended on the default single-threaded runtime.
    targets: Mutex<HashMap<SocketAddr, TargetRx>>,
}

impl Discovery {
    pub fn new(
        channel: Channel,
        caller: &SpiffeId,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Discovery {
            client: DestinationClient::new(channel),
            caller: caller.to_string(),
            timeout,
            metrics,
            targets: Mutex::new(HashMap::new()),
        })
    }

    pub async fn resolve(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<TargetWatch, DiscoveryError> {
        let mut rx = {
            let mut targets = self
                .targets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            targets
                .entry(addr)
                .or_insert_with(|| self.start_watch(addr))
                .clone()
        };
        if rx.borrow().is_some() {
            return Ok(TargetWatch { rx });
        }
        let answered = matches!(
            tokio::time::timeout(self.timeout, rx.wait_for(|t| t.is_some())).await,
            Ok(Ok(_))
        );
        if answered {
            Ok(TargetWatch { rx })
        } else {
            self.metrics.discovery_failures.inc();
            Err(DiscoveryError::Timeout(addr, self.timeout))
        }
    }

    /// The targets resolved so far (at most `max`; `None` while a first answer is awaited),
    /// and whether more were left out. The map lock is held only while cloning the handles.
    pub fn snapshot(&self, max: usize) -> (Vec<TargetSnapshot>, bool) {
        let (rxs, more): (Vec<(SocketAddr, TargetRx)>, bool) = {
            let targets = self
                .targets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let rxs = targets
                .iter()
                .take(max)
                .map(|(addr, rx)| (*addr, rx.clone()))
                .collect();
            (rxs, targets.len() > max)
        };
        let mut out: Vec<_> = rxs
            .into_iter()
            .map(|(addr, rx)| {
                let current = rx.borrow().clone();
                (addr, current)
            })
            .collect();
        out.sort_by_key(|(addr, _)| *addr);
        (out, more)
    }

    fn start_watch(self: &Arc<Self>, addr: SocketAddr) -> TargetRx {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        tokio::spawn(async move { this.watch(addr, tx).await });
        rx
    }

    async fn watch(self: Arc<Self>, addr: SocketAddr, tx: watch::Sender<Option<Arc<Target>>>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut client = self.client.clone();
        loop {
            let req = WatchRequest {
                target: addr.to_string(),
                caller_identity: self.caller.clone(),
            };
            match client.watch(req).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(policy)) => {
                                backoff.reset();
                                self.metrics.control_plane_connected.set(1);
                                // The stream only sends on change; balancer state carries over.
                                let previous = tx.borrow().clone();
                                let target = Target::from_policy(policy, previous.as_deref());
                                tracing::debug!(%addr, ?target, "destination updated");
                                tx.send_replace(Some(Arc::new(target)));
                            }
                            Ok(None) => {
                                tracing::debug!(%addr, "destination stream ended");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(%addr, %status, "destination stream failed; keeping the last answer");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    self.metrics.control_plane_connected.set(0);
                    tracing::warn!(%addr, %status, "destination watch failed; keeping the last answer");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

impl Target {
    fn unknown() -> Target {
        Target {
            known: false,
            opaque: false,
            service: None,
            endpoints: Vec::new(),
            service_label: Name::new(""),
            routes: Routes::from_policy(&OutboundPolicy::default(), Vec::new(), None),
            route_specs: Vec::new(),
            updated: SystemTime::now(),
        }
    }

    /// Validates the control plane's answer; endpoints that do not parse are dropped with a
    /// log line. `previous` lends its balancer state to endpoints that remain.
    pub fn from_policy(policy: OutboundPolicy, previous: Option<&Target>) -> Target {
        use weft_api::destination::ProtocolHint;
        let endpoints = parse_endpoints(&policy.endpoints);
        let service = (!policy.service.is_empty()).then(|| policy.service.clone());
        let routes = Routes::from_policy(&policy, endpoints.clone(), previous.map(|p| &p.routes));
        let route_specs: Vec<HttpRoute> = policy
            .routes
            .into_iter()
            .map(|mut r| {
                // The endpoints live on in `routes`; only the rest is kept for the view.
                for b in &mut r.backends {
                    b.endpoints = Vec::new();
                }
                r
            })
            .collect();
        Target {
            known: policy.known,
            opaque: policy.protocol == ProtocolHint::Opaque as i32,
            service_label: Name::new(service.as_deref().unwrap_or("")),
            service,
            endpoints,
            routes,
            route_specs,
            updated: SystemTime::now(),
        }
    }
}

/// Parses endpoints from the control plane; invalid ones are dropped with a log line.
pub fn parse_endpoints(endpoints: &[weft_api::destination::Endpoint]) -> Vec<Endpoint> {
    endpoints
            .iter()
            .filter_map(|ep| {
                let addr: SocketAddr = match ep.address.parse() {
                    Ok(a) => a,
                    Err(_) => {
                        tracing::warn!(address = %ep.address, "ignoring endpoint with an invalid address");
                        return None;
                    }
                };
                if ep.identity.is_empty() {
                    return Some(Endpoint { addr, identity: None });
                }
                match SpiffeId::parse(&ep.identity) {
                    Ok(id) => match ServerName::try_from(id.tls_server_name()) {
                        Ok(server_name) => Some(Endpoint { addr, identity: Some(MeshPeer { id, server_name }) }),
                        Err(_) => None,
                    },
                    Err(e) => {
                        tracing::warn!(identity = %ep.identity, error = %e, "ignoring endpoint with an invalid identity");
                        None
                    }
                }
            })
            .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::destination::Endpoint as ProtoEndpoint;

    #[test]
    fn invalid_endpoints_are_dropped() {
        let policy = OutboundPolicy {
            known: true,
            protocol: 1,
            service: "web.shop".into(),
            routes: vec![],
            endpoints: vec![
                ProtoEndpoint {
                    address: "198.18.0.2:80".into(),
                    identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                    labels: Default::default(),
                },
                ProtoEndpoint {
                    address: "not-an-addr".into(),
                    identity: String::new(),
                    labels: Default::default(),
                },
                ProtoEndpoint {
                    address: "198.18.0.3:80".into(),
                    identity: "http://evil".into(),
                    labels: Default::default(),
                },
                ProtoEndpoint {
                    address: "198.18.0.4:80".into(),
                    identity: String::new(),
                    labels: Default::default(),
                },
            ],
        };
        let t = Target::from_policy(policy, None);
        assert!(t.known && t.opaque);
        assert_eq!(t.service.as_deref(), Some("web.shop"));
        assert_eq!(t.endpoints.len(), 2);
        let meshed = t.endpoints[0].identity.as_ref().unwrap();
        assert_eq!(
            meshed.id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(t.endpoints[1].identity.is_none());
    }
}
