//! A handle that ends a running pipeline from another thread (as `top` does when `q` is hit).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::Notify;

#[derive(Clone, Debug, Default)]
pub struct Stop {
    inner: Arc<(AtomicBool, Notify)>,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the pipeline to stop: it detaches, reads what is left and summarizes.
    pub fn stop(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.notify_waiters();
    }

    pub fn stopped(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Returns once [`Self::stop`] was called (before or while waiting).
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            // Registered before the check, so a stop between the two is not missed.
            notified.as_mut().enable();
            if self.stopped() {
                return;
            }
            notified.await;
        }
    }
}
