//! Work that outlives the call that started it.
//!
//! A refresh holds a rotated refresh token between the provider's answer and the database
//! write, and a revocation holds deleted credentials between the delete and the provider's
//! confirmation: if the caller hangs up, the work must still finish, or the new token (or the
//! revocation) is lost. Such work runs here, detached from the call, and shutdown waits for it.

use std::future::Future;
use std::time::Duration;

use tokio_util::task::TaskTracker;

/// Detached tasks, tracked so that shutdown can wait for them.
#[derive(Debug, Clone, Default)]
pub struct Detached(TaskTracker);

impl Detached {
    /// Runs `work` to completion whether or not its caller is still waiting; the caller may
    /// await the handle for the result.
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.spawn(work)
    }

    /// Waits up to `within` for the running work (called once the server takes no more calls,
    /// so nothing new arrives).
    pub async fn drain(&self, within: Duration) {
        self.0.close();
        if tokio::time::timeout(within, self.0.wait()).await.is_err() {
            tracing::warn!(
                ?within,
                remaining = self.0.len(),
                "detached refreshes or revocations still running at shutdown"
            );
        }
    }
}
