//! The current cluster state and its fan-out: sources publish whole states, watchers
//! (gRPC streams) are woken only when the state actually changed.

use std::sync::Arc;

use tokio::sync::watch;

use crate::model::ClusterState;

#[derive(Debug)]
pub struct Index {
    state: watch::Sender<Arc<ClusterState>>,
    /// Lets callers tell "nothing loaded yet" apart from "the cluster is empty".
    published: watch::Sender<bool>,
}

impl Index {
    pub fn new() -> Arc<Self> {
        let (state, _) = watch::channel(Arc::new(ClusterState::default()));
        let (published, _) = watch::channel(false);
        Arc::new(Self { state, published })
    }

    /// Replaces the whole state. Subscribers are notified only if it differs from the
    /// current one; returns whether it did.
    pub fn publish(&self, state: ClusterState) -> bool {
        self.published.send_replace(true);
        self.state.send_if_modified(|current| {
            if **current == state {
                false
            } else {
                *current = Arc::new(state);
                true
            }
        })
    }

    pub fn snapshot(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// The receiver starts with the current state marked as seen; `changed()` waits for the next.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.subscribe()
    }

    pub fn has_published(&self) -> bool {
        *self.published.borrow()
    }

    /// Resolves once a source has published at least once.
    pub async fn wait_until_published(&self) {
        let mut published = self.published.subscribe();
        // The sender lives in `self`, so the channel cannot close while we borrow it.
        let _ = published.wait_for(|published| *published).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::model::Namespace;

    fn state_with_namespace(name: &str) -> ClusterState {
        let mut state = ClusterState::default();
        state.namespaces.insert(
            name.to_owned(),
            Namespace {
                name: name.to_owned(),
                annotations: BTreeMap::new(),
            },
        );
        state
    }

    #[tokio::test]
    async fn publish_notifies_only_on_change() {
        let index = Index::new();
        let mut rx = index.subscribe();
        assert!(!index.has_published());

        assert!(index.publish(state_with_namespace("shop")));
        assert!(index.has_published());
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("notified")
            .expect("open");
        assert!(rx.borrow_and_update().namespaces.contains_key("shop"));

        assert!(!index.publish(state_with_namespace("shop")));
        assert!(!rx.has_changed().expect("open"));

        assert!(index.publish(ClusterState::default()));
        assert!(rx.has_changed().expect("open"));
        assert!(index.snapshot().namespaces.is_empty());
    }

    #[tokio::test]
    async fn publishing_an_empty_state_still_counts_as_published() {
        let index = Index::new();
        assert!(!index.publish(ClusterState::default()));
        tokio::time::timeout(Duration::from_secs(1), index.wait_until_published())
            .await
            .expect("published");
    }
}
