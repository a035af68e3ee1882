//! The consent flow's browser-facing side: `GET /api/v1/auth/tool/callback`, where providers
//! redirect the user's browser with the authorization code, and `GET /healthz`. Served over
//! HTTP(S) apart from gRPC, because browsers reach it and agents do not.
//!
//! Every answer is a redirect or a small fixed page: nothing from the request is echoed, and the
//! headers keep the page (whose URL held the code) out of caches, frames and `Referer`s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::vault::{CallbackOutcome, CallbackParams, Vault};

/// The path providers redirect to (the seed guide's).
pub const CALLBACK_PATH: &str = "/api/v1/auth/tool/callback";
/// The liveness path.
pub const HEALTH_PATH: &str = "/healthz";

/// Longest query string read.
const MAX_QUERY_BYTES: usize = 16 * 1024;
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; past it, new ones wait in the kernel's backlog. Browsers
/// reach this listener, so it must not be able to exhaust the process's descriptors.
const MAX_CONNECTIONS: usize = 1024;
/// Longest a callback request may take (a code exchange is bounded by the provider timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound callback listener.
pub struct CallbackServer {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for CallbackServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackServer")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl CallbackServer {
    /// Serves on `listener`, over TLS with the gRPC certificate when one is configured.
    pub fn new(
        listener: TcpListener,
        tls: Option<&crate::config::TlsSettings>,
    ) -> anyhow::Result<Self> {
        let tls = tls.map(acceptor).transpose()?;
        Ok(Self {
            local_addr: listener.local_addr()?,
            listener,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `stop`, then lets open connections finish for up to `grace`.
    pub async fn run(self, vault: Arc<Vault>, stop: CancellationToken, grace: Duration) {
        let app = router(vault);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tracing::info!(local_addr = %self.local_addr, tls = self.tls.is_some(), "consent callback listening");
        loop {
            let slot = tokio::select! {
                () = stop.cancelled() => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of descriptors and the like: keep serving the connections we have.
                        tracing::warn!(error = %err, "callback accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(app.clone());
            // HTTP/1.1 only: browsers follow a redirect fine with it, and it keeps HTTP/2's stream
            // and keep-alive limits out of what a public listener must get right.
            let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024);
            match &self.tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(err) = conn.await {
                            tracing::debug!(%peer, error = %err, "callback connection ended");
                        }
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let stream = match tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "callback TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .into_owned();
                        if let Err(err) = watcher.watch(conn).await {
                            tracing::debug!(%peer, error = %err, "callback connection ended");
                        }
                    });
                }
            }
        }
        drop(self.listener);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "callback connections still open after the grace period; dropped"
            );
        }
    }
}

fn acceptor(tls: &crate::config::TlsSettings) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "VAULT_TLS_CERT_FILE: cannot read {}: {e}",
                tls.cert_file.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
        anyhow::anyhow!(
            "VAULT_TLS_KEY_FILE: cannot read {}: {e}",
            tls.key_file.display()
        )
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("VAULT_TLS_CERT_FILE / VAULT_TLS_KEY_FILE: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn router(vault: Arc<Vault>) -> Router {
    Router::new()
        // Exactly GET: a HEAD would run the callback's side effects without showing the result.
        .route(CALLBACK_PATH, get(callback).head(not_allowed))
        .route(
            HEALTH_PATH,
            get(|| async { page(StatusCode::OK, "ok", "Serving.") }),
        )
        .route(
            crate::oauth::clients::METADATA_DOCUMENT_PATH,
            get(client_metadata),
        )
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not found", "There is nothing here.") })
        .with_state(vault)
}

/// The vault's Client ID Metadata Document, which authorization servers fetch to learn who the
/// `client_id` URL is; nothing in it is secret.
async fn client_metadata(State(vault): State<Arc<Vault>>) -> Response {
    let Some(document) = vault.client_metadata_document() else {
        return page(StatusCode::NOT_FOUND, "Not found", "There is nothing here.");
    };
    let mut response = (StatusCode::OK, document.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

async fn not_allowed() -> Response {
    page(
        StatusCode::METHOD_NOT_ALLOWED,
        "Not allowed",
        "Only GET is served here.",
    )
}

/// Reads the callback's parameters. A parameter sent twice is refused (RFC 6749 §3.1).
fn params(query: Option<&str>) -> Result<CallbackParams, &'static str> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return Err("This sign-in response is too large.");
    }
    let mut out = CallbackParams::default();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let duplicate = match name.as_ref() {
            "state" => out.state.replace(value.into_owned()).is_some(),
            "code" => out
                .code
                .replace(SecretString::from(value.into_owned()))
                .is_some(),
            "error" => out.error.replace(value.into_owned()).is_some(),
            "iss" => out.iss.replace(value.into_owned()).is_some(),
            _ => false,
        };
        if duplicate {
            return Err("This sign-in response repeats a parameter.");
        }
    }
    Ok(out)
}

async fn callback(State(vault): State<Arc<Vault>>, RawQuery(query): RawQuery) -> Response {
    let params = match params(query.as_deref()) {
        Ok(params) => params,
        Err(problem) => return page(StatusCode::BAD_REQUEST, "Sign-in failed", problem),
    };
    let Ok(outcome) = tokio::time::timeout(REQUEST_TIMEOUT, vault.callback(params)).await else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is taking too long",
            "The vault is still finishing. Check the application in a moment.",
        );
    };
    match outcome {
        CallbackOutcome::Redirect(to) => {
            let mut response = StatusCode::SEE_OTHER.into_response();
            match HeaderValue::from_str(to.as_str()) {
                Ok(location) => {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                Err(_) => {
                    return page(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Sign-in failed",
                        "The application's return address is not usable.",
                    );
                }
            }
            harden(response)
        }
        CallbackOutcome::Completed { tool } => page(
            StatusCode::OK,
            "Connected",
            &format!(
                "{} is connected. You can close this window.",
                escape(tool.as_str())
            ),
        ),
        CallbackOutcome::Refused(problem) => {
            page(StatusCode::BAD_REQUEST, "Sign-in failed", &escape(&problem))
        }
        CallbackOutcome::Unavailable(problem) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in could not finish",
            &escape(&problem),
        ),
    }
}

/// A fixed page; `body` must already be escaped.
fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body><h1>{title}</h1><p>{body}</p></body></html>\n"
    );
    let mut response = (status, html).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    harden(response)
}

fn harden(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// HTML-escapes text for a page.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn callback_parameters_are_read_once_each() {
        let p = params(Some("code=c%2F1&state=s&iss=https%3A%2F%2Fas&x=1")).unwrap();
        assert_eq!(p.code.unwrap().expose_secret(), "c/1");
        assert_eq!(p.state.as_deref(), Some("s"));
        assert_eq!(p.iss.as_deref(), Some("https://as"));
        assert!(params(Some("state=a&state=b")).is_err());
        assert!(params(Some("code=a&code=b")).is_err());
        assert!(params(Some(&"a".repeat(MAX_QUERY_BYTES + 1))).is_err());
        let empty = params(None).unwrap();
        assert!(empty.state.is_none() && empty.code.is_none());
    }

    #[test]
    fn pages_escape_what_they_show() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }
}
