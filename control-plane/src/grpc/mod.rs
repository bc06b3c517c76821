//! The gRPC layer: translates between the `weft.*.v1` protobuf contract and the
//! transport-free model/index. No policy decisions are made here.

pub mod destination;
pub mod identity;
pub mod inbound;

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use weft_certs::SpiffeId;

use crate::index::Index;
use crate::model::ClusterState;
use crate::tls_server::PeerInfo;

/// The caller's workload identity from its mTLS client certificate, or UNAUTHENTICATED.
pub fn caller_identity<T>(request: &tonic::Request<T>, service: &str) -> Result<SpiffeId, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "{service} requires mTLS with a workload certificate"
            ))
        })
}

/// A watch stream: sends `answer(state)` once a source has published, and again whenever a
/// change of the cluster state changes it (full state each time, never a diff). Ends when
/// the client goes away, or after sending the error `answer` returns.
pub fn watch<T, M>(
    index: &Arc<Index>,
    mut answer: impl FnMut(&ClusterState) -> Result<T, Status> + Send + 'static,
    to_proto: impl Fn(&T) -> M + Send + 'static,
) -> ReceiverStream<Result<M, Status>>
where
    T: PartialEq + Send + 'static,
    M: Send + 'static,
{
    let mut updates = index.subscribe();
    let index = index.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        // Until the first publish (a Kubernetes source lists every kind first) the index is
        // empty: answering from it would tell proxies reconnecting to a restarted control
        // plane that every destination is unknown, i.e. unmeshed.
        tokio::select! {
            _ = tx.closed() => return,
            _ = index.wait_until_published() => {}
        }
        let mut last: Option<T> = None;
        loop {
            let state = updates.borrow_and_update().clone();
            match answer(&state) {
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                Ok(now) if last.as_ref() != Some(&now) => {
                    if tx.send(Ok(to_proto(&now))).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                Ok(_) => {}
            }
            tokio::select! {
                _ = tx.closed() => return,
                changed = updates.changed() => if changed.is_err() { return },
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn watches_answer_only_once_a_source_has_published() {
        let index = Index::new();
        let mut stream = watch(
            &index,
            |state: &ClusterState| Ok(state.services.len()),
            |count: &usize| *count,
        );
        let early = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
        assert!(
            early.is_err(),
            "answered from an unpublished index: {early:?}"
        );
        index.publish(ClusterState::default());
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an answer after the publish");
        assert_eq!(first.map(|r| r.ok()), Some(Some(0)));
    }
}
