//! The embedded store: SQLite through sqlx, one file (or memory), for the zero-setup default
//! and single-node installs. Same trait, same envelope, same fencing rules as PostgreSQL; the
//! conformance tests run against both. Each table group has its own file, named as in the
//! PostgreSQL store.
//!
//! SQLite serialises writers, so the conditional UPDATEs that implement leases and
//! compare-and-swap are atomic without row locks. Times are unix milliseconds from this
//! process's clock: the embedded store has one writer process by design.

mod agent_keys;
mod audit;
mod credentials;
mod flows;
mod keys;
mod leases;
mod outbox;
mod registrations;
mod schema;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::StoreError;

fn e(err: sqlx::Error) -> StoreError {
    StoreError::from_sqlx(err)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Makes `path` a file only its owner can read: missing directories are created 0700, the file
/// is created (or tightened to) 0600, and so are its `-wal` and `-shm` companions when present.
/// SQLite creates those companions with the database file's mode, so they start private too.
fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let file = Path::new(&name);
            if file.exists() {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(())
}

/// SQLite-backed [`Store`](super::Store).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open_file(path: &Path, max_connections: u32) -> Result<Self, StoreError> {
        private_file(path).map_err(|err| StoreError::Database(sqlx::Error::Io(err)))?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(e)?;
        Ok(Self { pool })
    }

    /// A private in-memory database: one connection that is never closed, since every new
    /// connection to `:memory:` would be a different, empty database.
    pub async fn open_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(e)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(e)?;
        Ok(Self { pool })
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::store::SchemaStore as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_database_its_wal_and_its_directory_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vault-data").join("nested");
        let path = dir.join("vault.db");
        let store = SqliteStore::open_file(&path, 2).await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(mode(&path), 0o600);
        for companion in ["vault.db-wal", "vault.db-shm"] {
            let file = dir.join(companion);
            assert!(file.exists(), "{companion} exists in WAL mode");
            assert_eq!(mode(&file), 0o600, "{companion}");
        }
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(dir.parent().unwrap()), 0o700);
    }

    #[tokio::test]
    async fn an_existing_world_readable_database_is_tightened() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("vault.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        SqliteStore::open_file(&path, 1).await.unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
