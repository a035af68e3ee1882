//! Wake-ups from other replicas: after every audit append commits, its replica notifies
//! `vault_audit` with the chain's key ([`super::wakeups`]), and PostgreSQL delivers it to every
//! connection listening. [`AuditListener`] is that connection: it publishes each key to this
//! process's [`Changes`], where watch streams wait.
//!
//! Notifications are not stored: any sent while the connection is down are lost. So after every
//! (re)connect the listener publishes [`EVERY_CHAIN`], and every watcher re-reads its chain from
//! its last sequence. The log stays the source of truth; the listener only makes it fast.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::audit::Changes;
use crate::audit::events::EVERY_CHAIN;
use crate::config::{Database, DatabaseSettings};
use crate::store::StoreError;

/// The channel audit appends notify.
pub const AUDIT_CHANNEL: &str = "vault_audit";
/// First wait before reconnecting, doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often an idle listening connection is checked: a connection cut without a FIN (a
/// network partition) would otherwise wait forever for notifications that cannot arrive.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Listens for audit appends of every replica and publishes them to [`Changes`].
#[derive(Debug)]
pub struct AuditListener {
    /// A pool of one connection of its own, so listening never takes one from the serving
    /// pool (and the serving pool's size stays what the operator set).
    pool: PgPool,
    changes: Changes,
}

impl AuditListener {
    /// A listener for the database in `settings`, or `None` when it is SQLite (one process:
    /// its appends publish to [`Changes`] directly, and nobody else appends).
    pub fn for_database(
        settings: &DatabaseSettings,
        changes: Changes,
    ) -> Result<Option<Self>, StoreError> {
        let Database::Postgres(url) = &settings.database else {
            return Ok(None);
        };
        let options = url
            .expose_secret()
            .parse::<PgConnectOptions>()
            .map_err(StoreError::Database)?
            .application_name("vault-server audit listener");
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Some(Self { pool, changes }))
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(AUDIT_CHANNEL).await?;
        Ok(listener)
    }

    /// Listens until `shutdown`, reconnecting with backoff whenever the connection is lost.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                connected = self.connect() => connected,
            };
            let mut listener = match connected {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::warn!(error = %crate::telemetry::error_chain(&err), retry_in = ?backoff, "cannot listen for audit appends of other replicas; their watchers' events are delayed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            tracing::debug!("listening for audit appends");
            // Whatever was notified before this connection listened is lost: every watcher
            // re-reads.
            self.changes.publish(EVERY_CHAIN);
            let lost = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => self.changes.publish(notification.payload()),
                        Ok(None) => break "the connection was lost".to_string(),
                        Err(err) => break crate::telemetry::error_chain(&err),
                    },
                    () = tokio::time::sleep(HEARTBEAT) => {
                        if let Err(err) = sqlx::query("SELECT 1").execute(&mut listener).await {
                            break crate::telemetry::error_chain(&err);
                        }
                    }
                }
            };
            tracing::warn!(error = %lost, "stopped listening for audit appends; reconnecting");
            // A fresh connection next time, not one the listener would revive on its own.
            drop(listener);
        }
    }
}
