//! `weft.destination.v1.Destination/Watch`: resolves the target against the index and
//! streams the full answer again whenever it changes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_api::destination::destination_server::Destination as DestinationApi;
use weft_api::destination::{Endpoint, OutboundPolicy, ProtocolHint, WatchRequest};

use crate::index::Index;
use crate::model::Destination;
use crate::tls_server::PeerInfo;

pub struct DestinationService {
    pub index: Arc<Index>,
    pub trust_domain: String,
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<OutboundPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl DestinationApi for DestinationService {
    type WatchStream = PolicyStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let Some(caller) = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone())
        else {
            return Err(Status::unauthenticated(
                "Destination requires mTLS with a workload certificate",
            ));
        };
        let req = request.into_inner();
        if !req.caller_identity.is_empty() && req.caller_identity != caller.to_string() {
            return Err(Status::permission_denied(format!(
                "caller_identity {} does not match the client certificate's {caller}",
                req.caller_identity
            )));
        }
        let target: SocketAddr = req.target.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "target {:?} is not ip:port (authority targets are not supported yet)",
                req.target
            ))
        })?;
        tracing::debug!(%caller, %target, "destination watch");
        let mut updates = self.index.subscribe();
        let trust_domain = self.trust_domain.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<Destination> = None;
            loop {
                let state = updates.borrow_and_update().clone();
                let dest = state.resolve(target, &trust_domain);
                if last.as_ref() != Some(&dest) {
                    if tx.send(Ok(to_proto(&dest))).await.is_err() {
                        return;
                    }
                    last = Some(dest);
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn to_proto(dest: &Destination) -> OutboundPolicy {
    OutboundPolicy {
        known: dest.known,
        protocol: if dest.opaque {
            ProtocolHint::Opaque
        } else {
            ProtocolHint::Unknown
        } as i32,
        service: dest.service.clone().unwrap_or_default(),
        endpoints: dest
            .endpoints
            .iter()
            .map(|ep| Endpoint {
                address: ep.addr.to_string(),
                identity: ep
                    .identity
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                labels: ep
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect(),
    }
}
