//! A database of the bench's own, created fresh for one run and dropped when the run ends,
//! whether it succeeded, failed or panicked.

use sqlx::{Connection, PgConnection};

/// `vault_bench_<random>` on the server named by the admin URL.
#[derive(Debug)]
pub struct BenchDb {
    /// The database name; only ever `vault_bench_` and hex digits, so it is safe to splice.
    pub name: String,
    /// A URL for the new database (the admin URL with its database path replaced).
    pub url: String,
    admin_url: String,
    /// Set once [`BenchDb::drop_database`] succeeded, so `Drop` has nothing left to do.
    dropped: bool,
}

impl BenchDb {
    /// Creates a fresh database through `admin_url` (any database on the same server).
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("vault_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the database URL: {e}"))?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url, String::new()),
        };
        let (server, _) = base
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("the database URL has no database path"))?;
        Ok(Self {
            url: format!("{server}/{name}{query}"),
            name,
            admin_url: admin_url.to_owned(),
            dropped: false,
        })
    }

    /// Drops the database, disconnecting anyone still on it.
    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        drop_by_name(&self.admin_url, &self.url, &self.name).await?;
        self.dropped = true;
        Ok(())
    }
}

/// Drops the database and the roles the vault made for it.
async fn drop_by_name(admin_url: &str, url: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    vault_server::store::drop_database_and_roles(&mut admin, url, name).await?;
    admin.close().await?;
    Ok(())
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Only reached on a panic or an early return that skipped `drop_database`. Drop cannot
        // await, and the caller's runtime may be shutting down: a runtime of its own on its own
        // thread does the cleanup.
        let admin_url = self.admin_url.clone();
        let url = self.url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Err(err) = runtime.block_on(drop_by_name(&admin_url, &url, &name)) {
                eprintln!("warning: could not drop database {name}: {err:#}");
            }
        })
        .join();
    }
}
