//! Where the caller's JWT comes from. The interceptor attaches whatever the source last
//! produced; typed calls ask the source first, so a rotated token is picked up without
//! rebuilding the client.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tonic::metadata::{Ascii, MetadataValue};

use crate::Error;

/// The error a token callback may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Callback =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>> + Send + Sync;

/// A source of caller tokens.
#[derive(Clone)]
pub struct TokenSource(Kind);

/// A header made from the token file as it was at (modified time, length).
type FileCache = Arc<Mutex<Option<(SystemTime, u64, MetadataValue<Ascii>)>>>;

#[derive(Clone)]
enum Kind {
    Static(MetadataValue<Ascii>),
    File { path: PathBuf, cache: FileCache },
    Callback(Arc<Callback>),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::Static(_) => f.write_str("TokenSource::Static([REDACTED])"),
            Kind::File { path, .. } => write!(f, "TokenSource::File({})", path.display()),
            Kind::Callback(_) => f.write_str("TokenSource::Callback"),
        }
    }
}

fn header(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| Error::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

impl TokenSource {
    /// One fixed token.
    pub fn fixed(token: &str) -> Result<Self, Error> {
        Ok(Self(Kind::Static(header(token)?)))
    }

    /// A file holding the token (such as a projected workload-identity token), re-read
    /// whenever its modification time or size changes.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self(Kind::File {
            path: path.into(),
            cache: Arc::new(Mutex::new(None)),
        })
    }

    /// A callback asked before every call; it may cache as it likes.
    pub fn callback<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        Self(Kind::Callback(Arc::new(move || Box::pin(f()))))
    }

    /// The header, when it never changes.
    pub(crate) fn fixed_value(&self) -> Option<MetadataValue<Ascii>> {
        match &self.0 {
            Kind::Static(value) => Some(value.clone()),
            _ => None,
        }
    }

    /// The `authorization` value to send now.
    pub(crate) async fn current(&self) -> Result<MetadataValue<Ascii>, Error> {
        match &self.0 {
            Kind::Static(value) => Ok(value.clone()),
            Kind::File { path, cache } => {
                // tokio::fs, not std::fs: a slow volume must not stall the caller's runtime.
                let unreadable =
                    |e: std::io::Error| Error::TokenSource(format!("{}: {e}", path.display()));
                let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                // The lock is never held across an await: taken to look, then again to store.
                if let Some((modified, len, value)) =
                    cache.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
                    && (*modified, *len) == stamp
                {
                    return Ok(value.clone());
                }
                let text = tokio::fs::read_to_string(path).await.map_err(unreadable)?;
                let value = header(&text)?;
                *cache.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((stamp.0, stamp.1, value.clone()));
                Ok(value)
            }
            Kind::Callback(callback) => {
                let token = callback()
                    .await
                    .map_err(|e| Error::TokenSource(e.to_string()))?;
                header(&token)
            }
        }
    }
}
