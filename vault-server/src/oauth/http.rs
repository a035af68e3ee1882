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

impl HttpError {
    /// What a caller may be told: the kind of failure, never a URL, body or header.
    pub fn caller_message(&self) -> String {
        match self {
            Self::Transport(detail) if detail.starts_with("timed out") => {
                "the provider did not answer in time".into()
            }
            Self::Transport(_) => "the provider could not be reached".into(),
            Self::Status { status, .. } => format!("the provider answered HTTP {status}"),
            Self::TooLarge => "the provider's response was too large".into(),
        }
    }
}

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
        let mut body = read_limited(response).await?;
        if status.is_success() {
            body = normalize_expires_in(body);
        }
        builder
            .body(body)
            .map_err(|e| HttpError::Transport(e.to_string()))
    }
}

/// Rewrites a token response's `expires_in` into whole seconds within 1 s..=1 year, so that a
/// provider sending a negative, huge, fractional or quoted number neither breaks the response's
/// parsing (which would lose a rotated refresh token) nor the expiry arithmetic. A value that is
/// not a number at all is dropped (the lifetime is then unknown). Anything that is not a JSON
/// object passes through untouched.
fn normalize_expires_in(mut body: Vec<u8>) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(&body) else {
        return body;
    };
    let Some(value) = object.get("expires_in") else {
        return body;
    };
    if value
        .as_u64()
        .is_some_and(|n| (1..=MAX_EXPIRES_IN_SECONDS).contains(&n))
    {
        return body;
    }
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| !f.is_nan());
    match seconds {
        Some(f) => {
            let clamped = f.floor().clamp(1.0, MAX_EXPIRES_IN_SECONDS as f64) as u64;
            object.insert("expires_in".into(), serde_json::Value::from(clamped));
        }
        None => {
            object.remove("expires_in");
        }
    }
    // Serialising a map of JSON values cannot fail.
    let rewritten = serde_json::to_vec(&object).unwrap_or_default();
    // The original held the tokens too.
    zeroize::Zeroize::zeroize(&mut body);
    rewritten
}

/// A year, in seconds: the longest access-token lifetime taken from a provider.
const MAX_EXPIRES_IN_SECONDS: u64 = 365 * 86_400;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn expires_in(body: &str) -> Option<serde_json::Value> {
        let out = normalize_expires_in(body.as_bytes().to_vec());
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        json.get("expires_in").cloned()
    }

    #[test]
    fn expires_in_is_clamped_to_whole_seconds_in_range() {
        let at = |v: &str| {
            expires_in(&format!(
                r#"{{"access_token":"a","token_type":"Bearer","expires_in":{v}}}"#
            ))
        };
        assert_eq!(at("3600"), Some(serde_json::json!(3600)));
        assert_eq!(at("-5"), Some(serde_json::json!(1)));
        assert_eq!(at("0"), Some(serde_json::json!(1)));
        assert_eq!(at("3600.9"), Some(serde_json::json!(3600)));
        assert_eq!(at("1e300"), Some(serde_json::json!(MAX_EXPIRES_IN_SECONDS)));
        assert_eq!(
            at("18446744073709551615"),
            Some(serde_json::json!(MAX_EXPIRES_IN_SECONDS))
        );
        assert_eq!(at(r#""7200""#), Some(serde_json::json!(7200)));
        assert_eq!(at(r#""soon""#), None);
        assert_eq!(at("[1]"), None);
        assert_eq!(at("null"), None);
    }

    #[test]
    fn the_rest_of_the_response_survives_the_rewrite() {
        let out = normalize_expires_in(
            br#"{"access_token":"at","refresh_token":"rt","token_type":"Bearer","expires_in":"60"}"#
                .to_vec(),
        );
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["access_token"], "at");
        assert_eq!(json["refresh_token"], "rt");
        let untouched = b"not json".to_vec();
        assert_eq!(normalize_expires_in(untouched.clone()), untouched);
    }
}
