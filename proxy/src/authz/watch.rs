//! `Inbound/Watch` client: one stream per port of this pod, started by the first
//! connection to that port. Each update is compiled once and published; an update that
//! does not compile is refused and the last good policy stays. Streams reconnect with
//! backoff and the last policy is kept while the control plane is away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tonic::transport::Channel;
use weft_api::inbound::inbound_client::InboundClient;
use weft_api::inbound::{InboundPolicy, WatchRequest};

use super::policy::PortPolicy;
use crate::identity::Backoff;
use crate::metrics::Metrics;

/// The latest compiled policy of one port; `None` until the first answer.
pub type PolicyRx = watch::Receiver<Option<Arc<PortPolicy>>>;

pub struct PolicyWatch {
    client: InboundClient<Channel>,
    namespace: String,
    pod: String,
    /// Stands in for an empty trust domain in an answer.
    local_trust_domain: String,
    metrics: Arc<Metrics>,
    /// What each watched port enforces, for the admin `/config` view. Written on policy
    /// updates and read by that view only, never per connection.
    ports: Mutex<BTreeMap<u16, PortSnapshot>>,
    /// Tells a port's replacement watch from the one it replaced (after an eviction).
    generations: AtomicU64,
}

/// One watched port as the admin view sees it.
#[derive(Clone)]
pub struct PortSnapshot {
    pub port: u16,
    /// What is enforced; `None` until the first answer.
    pub policy: Option<Arc<PortPolicy>>,
    /// The answer `policy` was compiled from (`None` when nothing compiled yet): the
    /// compiled form cannot be printed back (identity patterns are split, regexes compiled).
    pub source: Option<Arc<InboundPolicy>>,
    /// When `policy` last changed.
    pub updated: Option<SystemTime>,
    /// Updates refused because they did not compile, and the latest reason.
    pub rejected: u64,
    pub last_error: Option<String>,
    pub(crate) generation: u64,
}

impl PolicyWatch {
    pub fn new(
        channel: Channel,
        namespace: &str,
        pod: &str,
        local_trust_domain: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(PolicyWatch {
            client: InboundClient::new(channel),
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            local_trust_domain: local_trust_domain.to_string(),
            metrics,
            ports: Mutex::new(BTreeMap::new()),
            generations: AtomicU64::new(0),
        })
    }

    /// Starts watching `port`; the task ends when every receiver is gone.
    pub fn start(self: &Arc<Self>, port: u16) -> PolicyRx {
        let (tx, rx) = watch::channel(None);
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        self.snapshots().insert(
            port,
            PortSnapshot {
                port,
                policy: None,
                source: None,
                updated: None,
                rejected: 0,
                last_error: None,
                generation,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            this.clone().run(port, generation, tx).await;
            let mut ports = this.snapshots();
            if ports.get(&port).is_some_and(|p| p.generation == generation) {
                ports.remove(&port);
            }
        });
        rx
    }

    /// The watched ports in order (at most `max`) and whether more were left out.
    pub fn snapshot(&self, max: usize) -> (Vec<PortSnapshot>, bool) {
        let ports = self.snapshots();
        (
            ports.values().take(max).cloned().collect(),
            ports.len() > max,
        )
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, PortSnapshot>> {
        self.ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records what `port`'s watch of `generation` now enforces, unless a newer watch of
    /// the port has taken over.
    fn record(&self, port: u16, generation: u64, update: impl FnOnce(&mut PortSnapshot)) {
        if let Some(p) = self.snapshots().get_mut(&port) {
            if p.generation == generation {
                update(p);
            }
        }
    }

    async fn run(
        self: Arc<Self>,
        port: u16,
        generation: u64,
        tx: watch::Sender<Option<Arc<PortPolicy>>>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut client = self.client.clone();
        loop {
            let req = WatchRequest {
                namespace: self.namespace.clone(),
                pod: self.pod.clone(),
                port: u32::from(port),
            };
            let call = tokio::select! {
                _ = tx.closed() => return,
                call = client.watch(req) => call,
            };
            match call {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        let message = tokio::select! {
                            _ = tx.closed() => return,
                            m = stream.message() => m,
                        };
                        match message {
                            Ok(Some(msg)) => {
                                backoff.reset();
                                self.metrics.control_plane_connected.set(1);
                                self.publish(port, generation, &msg, &tx);
                            }
                            Ok(None) => {
                                tracing::debug!(port, "inbound policy stream ended");
                                break;
                            }
                            Err(status) => {
                                tracing::warn!(port, %status, "inbound policy stream failed; keeping the last policy");
                                break;
                            }
                        }
                    }
                }
                Err(status) => {
                    self.metrics.control_plane_connected.set(0);
                    tracing::warn!(port, %status, "inbound policy watch failed; keeping the last policy");
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    fn publish(
        &self,
        port: u16,
        generation: u64,
        msg: &InboundPolicy,
        tx: &watch::Sender<Option<Arc<PortPolicy>>>,
    ) {
        match PortPolicy::compile(msg, &self.local_trust_domain) {
            Ok(policy) => {
                tracing::info!(
                    port,
                    policies = policy.policies.len(),
                    default = policy.default.as_str(),
                    require_mtls = policy.require_mtls,
                    "inbound policy updated"
                );
                let policy = Arc::new(policy);
                self.record(port, generation, |p| {
                    p.policy = Some(policy.clone());
                    p.source = Some(Arc::new(msg.clone()));
                    p.updated = Some(SystemTime::now());
                });
                tx.send_replace(Some(policy));
            }
            Err(error) => {
                self.metrics.inbound_policy_rejected.inc();
                let has_good = tx.borrow().as_ref().is_some_and(|p| !p.is_invalid());
                tracing::error!(
                    port,
                    %error,
                    keeping_previous = has_good,
                    "refusing an inbound policy that does not compile"
                );
                let refuse = (!has_good).then(|| Arc::new(PortPolicy::refuse_all()));
                self.record(port, generation, |p| {
                    p.rejected += 1;
                    p.last_error = Some(error.to_string());
                    if let Some(refuse) = &refuse {
                        p.policy = Some(refuse.clone());
                        p.source = None;
                        p.updated = Some(SystemTime::now());
                    }
                });
                if let Some(refuse) = refuse {
                    // Nothing good to keep: refuse everything rather than guess.
                    tx.send_replace(Some(refuse));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
    use tonic::{Request, Response, Status};
    use weft_api::inbound::inbound_server::{Inbound, InboundServer};
    use weft_api::inbound::{DefaultPolicy, InboundPolicy};

    type Updates = mpsc::Receiver<Result<InboundPolicy, Status>>;

    /// Hands each Watch call the next scripted stream and records what was asked.
    struct Scripted {
        streams: tokio::sync::Mutex<Vec<Updates>>,
        asked: mpsc::UnboundedSender<WatchRequest>,
    }

    #[tonic::async_trait]
    impl Inbound for Scripted {
        type WatchStream =
            Pin<Box<dyn futures_util::Stream<Item = Result<InboundPolicy, Status>> + Send>>;

        async fn watch(
            &self,
            req: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            let _ = self.asked.send(req.into_inner());
            let next = self.streams.lock().await.pop();
            match next {
                Some(rx) => Ok(Response::new(Box::pin(ReceiverStream::new(rx)))),
                None => Err(Status::unavailable("no more scripted streams")),
            }
        }
    }

    fn policy(default: DefaultPolicy) -> InboundPolicy {
        InboundPolicy {
            default_policy: default as i32,
            ..Default::default()
        }
    }

    async fn serve(streams: Vec<Updates>) -> (Channel, mpsc::UnboundedReceiver<WatchRequest>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (asked, asked_rx) = mpsc::unbounded_channel();
        // Calls pop from the end.
        let mut streams = streams;
        streams.reverse();
        let svc = InboundServer::new(Scripted {
            streams: tokio::sync::Mutex::new(streams),
            asked,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        (channel, asked_rx)
    }

    async fn next_change(rx: &mut PolicyRx) -> Arc<PortPolicy> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("an update in time")
            .unwrap();
        rx.borrow().clone().unwrap()
    }

    #[tokio::test]
    async fn updates_apply_bad_ones_are_refused_and_the_last_survives_outages() {
        let (first_tx, first_rx) = mpsc::channel(4);
        let (second_tx, second_rx) = mpsc::channel(4);
        let (channel, mut asked) = serve(vec![first_rx, second_rx]).await;
        let metrics = Metrics::new();
        let watch = PolicyWatch::new(channel, "shop", "web-1", "cluster.local", metrics.clone());
        let mut rx = watch.start(8080);

        let req = asked.recv().await.unwrap();
        assert_eq!(
            (req.namespace.as_str(), req.pod.as_str(), req.port),
            ("shop", "web-1", 8080)
        );
        first_tx
            .send(Ok(policy(DefaultPolicy::AllAuthenticated)))
            .await
            .unwrap();
        let p = next_change(&mut rx).await;
        assert_eq!(p.default, super::super::DefaultPolicy::AllAuthenticated);
        assert_eq!(p.trust_domain, "cluster.local");

        // An invalid update is refused; the previous policy stays in force.
        let mut bad = policy(DefaultPolicy::Deny);
        bad.policies.push(weft_api::inbound::Policy {
            name: "shop/broken".into(),
            action: 0,
            rules: vec![weft_api::inbound::Rule {
                from: vec![weft_api::inbound::Source {
                    networks: vec![weft_api::inbound::Network {
                        cidr: "10.0.0.0/40".into(),
                        except: vec![],
                    }],
                    ..Default::default()
                }],
                to: vec![],
            }],
        });
        first_tx.send(Ok(bad)).await.unwrap();
        first_tx
            .send(Ok(policy(DefaultPolicy::Deny)))
            .await
            .unwrap();
        let p = next_change(&mut rx).await;
        assert_eq!(p.default, super::super::DefaultPolicy::Deny);
        assert_eq!(metrics.inbound_policy_rejected.get(), 1);

        // The control plane drops the stream: the last policy stays until a new stream says otherwise.
        first_tx
            .send(Err(Status::internal("control plane restarting")))
            .await
            .unwrap();
        drop(first_tx);
        let again = tokio::time::timeout(Duration::from_secs(10), asked.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.port, 8080);
        assert_eq!(
            rx.borrow().as_ref().map(|p| p.default),
            Some(super::super::DefaultPolicy::Deny)
        );
        second_tx
            .send(Ok(policy(DefaultPolicy::ClusterAuthenticated)))
            .await
            .unwrap();
        let p = next_change(&mut rx).await;
        assert_eq!(p.default, super::super::DefaultPolicy::ClusterAuthenticated);
    }

    #[tokio::test]
    async fn snapshots_follow_updates_and_forget_unwatched_ports() {
        let (tx, first) = mpsc::channel(4);
        let (channel, _asked) = serve(vec![first]).await;
        let watch = PolicyWatch::new(channel, "shop", "web-1", "cluster.local", Metrics::new());
        let mut rx = watch.start(8080);
        let (ports, more) = watch.snapshot(10);
        assert!(!more);
        assert_eq!(ports.len(), 1);
        assert!(ports[0].policy.is_none() && ports[0].updated.is_none());

        tx.send(Ok(policy(DefaultPolicy::AllAuthenticated)))
            .await
            .unwrap();
        next_change(&mut rx).await;
        tx.send(Ok(InboundPolicy {
            protocol: 77,
            ..Default::default()
        }))
        .await
        .unwrap();
        // The refused update changes nothing the data path sees; wait for the view instead.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let port = loop {
            let (ports, _) = watch.snapshot(10);
            if ports[0].rejected == 1 || tokio::time::Instant::now() > deadline {
                break ports[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(port.port, 8080);
        assert_eq!(port.rejected, 1);
        assert!(port.last_error.as_deref().unwrap().contains("protocol"));
        let source = port.source.as_ref().unwrap();
        assert_eq!(
            source.default_policy,
            DefaultPolicy::AllAuthenticated as i32
        );
        assert_eq!(
            port.policy.as_ref().unwrap().default,
            super::super::DefaultPolicy::AllAuthenticated
        );
        assert!(port.updated.is_some());

        let _second = watch.start(9090);
        let (ports, more) = watch.snapshot(1);
        assert!(more);
        assert_eq!(ports.iter().map(|p| p.port).collect::<Vec<_>>(), [8080]);

        // Once no connection holds the port's policy its watch ends, and so does its entry.
        drop(rx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let ports = loop {
            let (ports, _) = watch.snapshot(10);
            let ports: Vec<u16> = ports.iter().map(|p| p.port).collect();
            if ports == [9090] || tokio::time::Instant::now() > deadline {
                break ports;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(ports, [9090]);
    }

    #[tokio::test]
    async fn an_invalid_first_answer_refuses_everything() {
        let (tx, first) = mpsc::channel(4);
        let (channel, _asked) = serve(vec![first]).await;
        let watch = PolicyWatch::new(channel, "shop", "web-1", "cluster.local", Metrics::new());
        let mut rx = watch.start(5432);
        tx.send(Ok(InboundPolicy {
            protocol: 77,
            ..Default::default()
        }))
        .await
        .unwrap();
        assert!(next_change(&mut rx).await.is_invalid());
        tx.send(Ok(policy(DefaultPolicy::AllUnauthenticated)))
            .await
            .unwrap();
        assert!(!next_change(&mut rx).await.is_invalid());
    }
}
