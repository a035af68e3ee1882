//! Re-loads each trusted issuer's signing keys when they are due, so a rotated or withdrawn
//! key takes effect without waiting for a token that names an unknown key.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;

/// Refreshes the verifier's issuer keys.
#[derive(Debug)]
pub struct JwksRefresh {
    /// Whose keys.
    pub verifier: Arc<Verifier>,
}

impl JwksRefresh {
    /// Refreshes each issuer when due (`VAULT_JWKS_REFRESH_SECONDS`, or sooner when its JWKS
    /// response's `Cache-Control: max-age` says so) until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        while let Some(next) = self.verifier.next_refresh() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next.into()) => {}
            }
            self.verifier.refresh_due().await;
        }
    }
}
