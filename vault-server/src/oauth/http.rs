//! The oauth2 crate's view of [`crate::http::Outbound`]: provider token and revocation calls,
//! capped at 256 KiB (a token response is small; this bounds a hostile one). It answers 5xx and
//! 429 itself as a transient error carrying `Retry-After`, so the oauth2 crate only ever parses
//! real OAuth responses, and it normalises `expires_in` before the crate sees it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

use crate::http::{HttpError, Origin, Outbound};

/// Largest token or revocation response read.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// The shared outbound client, as every provider call sees it.
#[derive(Debug, Clone)]
pub struct ProviderHttp {
    outbound: Outbound,
}

impl ProviderHttp {
    /// Provider calls through `outbound`.
    pub fn new(outbound: Outbound) -> Self {
        Self { outbound }
    }

    /// The shared client itself, for discovery and registration.
    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// GET returning JSON, for discovery documents.
    pub async fn get_json(
        &self,
        origin: Origin,
        url: &str,
    ) -> Result<serde_json::Value, HttpError> {
        self.outbound.get_json(origin, url).await
    }

    /// The oauth2 client for a call to an endpoint of this origin.
    pub fn to(&self, origin: Origin) -> OAuthHttp<'_> {
        OAuthHttp {
            outbound: &self.outbound,
            origin,
        }
    }
}

/// One provider call's HTTP client: the shared one, and who chose the endpoint.
#[derive(Debug)]
pub struct OAuthHttp<'a> {
    outbound: &'a Outbound,
    origin: Origin,
}

impl OAuthHttp<'_> {
    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let request = reqwest::Request::try_from(request)
            .map_err(|e| HttpError::Transport(format!("request failed: {e}")))?;
        let fetched = self
            .outbound
            .send(self.origin, request, MAX_BODY_BYTES)
            .await?;
        let status = fetched.status;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = fetched
                .headers
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
        for (name, value) in &fetched.headers {
            builder = builder.header(name, value);
        }
        let mut body = fetched.body;
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

impl<'c> AsyncHttpClient<'c> for OAuthHttp<'_> {
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
