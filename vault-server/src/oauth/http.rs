//! The HTTP client for provider calls: a private CA when configured, connect and total
//! timeouts, no redirects, a product User-Agent. It answers 5xx and 429 itself as a transient
//! error carrying `Retry-After`, so the oauth2 crate only ever parses real OAuth responses.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

/// Largest provider response read (token responses are small; this bounds a hostile one).
const MAX_BODY_BYTES: usize = 256 * 1024;

/// A provider call failed below OAuth.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connection refused or reset, TLS failure, timeout.
    #[error("provider unreachable: {0}")]
    Transport(String),
    /// 5xx or 429.
    #[error("provider answered HTTP {status}")]
    Status {
        /// The status code.
        status: u16,
        /// `Retry-After`, when the provider sent seconds.
        retry_after: Option<Duration>,
    },
    /// The response was larger than any token response should be.
    #[error("provider response too large")]
    TooLarge,
}

/// The shared provider HTTP client.
#[derive(Debug, Clone)]
pub struct ProviderHttp {
    client: reqwest::Client,
}

impl ProviderHttp {
    /// Builds the client; `ca_file` adds a PEM bundle of extra trusted roots.
    pub fn new(
        ca_file: Option<&Path>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credential-vault/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!(
                    "VAULT_PROVIDER_CA_FILE: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("VAULT_PROVIDER_CA_FILE: not a PEM bundle: {e}"))?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(Self {
            client: builder.build()?,
        })
    }

    /// GET returning JSON, for discovery documents.
    pub async fn get_json(&self, url: &str) -> Result<serde_json::Value, HttpError> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| HttpError::Transport(describe(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after: None,
            });
        }
        let body = read_limited(response).await?;
        serde_json::from_slice(&body)
            .map_err(|e| HttpError::Transport(format!("discovery document is not JSON: {e}")))
    }

    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let request =
            reqwest::Request::try_from(request).map_err(|e| HttpError::Transport(describe(&e)))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| HttpError::Transport(describe(&e)))?;
        let status = response.status();
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after,
            });
        }
        let mut builder = http::Response::builder().status(status);
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let body = read_limited(response).await?;
        builder
            .body(body)
            .map_err(|e| HttpError::Transport(e.to_string()))
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| HttpError::Transport(describe(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A transport error without its URL's query (a token call's URL carries none, but be sure).
fn describe(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    match err.url() {
        Some(url) => format!(
            "{kind} ({}://{}{})",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.path()
        ),
        None => kind.to_string(),
    }
}

impl<'c> AsyncHttpClient<'c> for ProviderHttp {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.execute(request))
    }
}
