//! Graceful shutdown: a signal that listeners watch, and a count of open connections that
//! the shutdown path waits on until it reaches zero or the grace period ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

struct Shared {
    open: AtomicUsize,
    idle: Notify,
    draining: watch::Sender<bool>,
}

/// Cheap to clone; one per listener and per connection handler.
#[derive(Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

/// Held by every open connection; dropping it may complete a drain.
pub struct ConnGuard {
    shared: Arc<Shared>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (draining, _) = watch::channel(false);
        Drain {
            shared: Arc::new(Shared {
                open: AtomicUsize::new(0),
                idle: Notify::new(),
                draining,
            }),
        }
    }

    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.shared.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.shared.draining.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.shared.draining.subscribe();
        // An error means the sender is gone, which cannot happen while `self` holds it.
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn track(&self) -> ConnGuard {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard {
            shared: self.shared.clone(),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open, or `grace` has passed. Returns the number still open.
    pub async fn wait_idle(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.shared.idle.notified();
            let open = self.open_connections();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.open_connections();
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_idle_returns_when_last_connection_closes() {
        let drain = Drain::new();
        let guard = drain.track();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(guard);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn wait_idle_gives_up_after_grace() {
        let drain = Drain::new();
        let _guard = drain.track();
        assert_eq!(drain.wait_idle(Duration::from_millis(30)).await, 1);
    }
}
