//! `Inbound/Watch` client: one stream per port of this pod, started by the first
//! connection to that port. Each update is compiled once and published; an update that
//! does not compile is refused and the last good policy stays. Streams reconnect with
//! backoff and the last policy is kept while the control plane is away.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use weft_api::inbound::inbound_client::InboundClient;
use weft_api::inbound::WatchRequest;

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
        })
    }

    /// Starts watching `port`; the task ends when every receiver is gone.
    pub fn start(self: &Arc<Self>, port: u16) -> PolicyRx {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        tokio::spawn(async move { this.run(port, tx).await });
        rx
    }

    async fn run(self: Arc<Self>, port: u16, tx: watch::Sender<Option<Arc<PortPolicy>>>) {
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
                                self.publish(port, &msg, &tx);
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
        msg: &weft_api::inbound::InboundPolicy,
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
                tx.send_replace(Some(Arc::new(policy)));
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
                if !has_good {
                    // Nothing good to keep: refuse everything rather than guess.
                    tx.send_replace(Some(Arc::new(PortPolicy::refuse_all())));
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
