//! Every outbound HTTP request the vault makes goes through [`Outbound`], the only place that
//! builds a `reqwest::Client`: caller JWKS, provider discovery, token and revocation calls. It
//! owns what must hold for all of them — connect and total timeouts, a response-size cap, no
//! redirects ever, the user agent, the extra roots of `VAULT_PROVIDER_CA_FILE` — and the egress
//! policy that separates the two kinds of URL:
//!
//! - [`Origin::Configured`]: written by the operator (settings, the providers file). Trusted as
//!   to its destination (Keycloak may live on 10.1.2.3); `http` only to a loopback host.
//! - [`Origin::Derived`]: learned from a response (a discovery document's endpoints). Whoever
//!   wrote that response picks the destination, so it must be `https` and every address its host
//!   resolves to must pass [`EgressPolicy`]. The check is in the client's DNS resolver, which
//!   hands the connector only the addresses it checked, so nothing can change between check and
//!   connect (DNS rebinding); IP-literal hosts never reach a resolver and are checked here before
//!   the request is sent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::egress::{EgressPolicy, Refused};

/// Largest response read unless a caller asks for less.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Where outbound requests may go and how long they may take.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// `VAULT_PROVIDER_CA_FILE`: extra PEM roots.
    pub ca_file: Option<PathBuf>,
    /// `VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS`.
    pub connect_timeout: Duration,
    /// `VAULT_PROVIDER_TIMEOUT_SECONDS`: the whole exchange, body included.
    pub timeout: Duration,
    /// `VAULT_EGRESS_ALLOW_CIDRS`.
    pub egress: EgressPolicy,
}

/// Who chose a URL, which decides how far it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The operator wrote it.
    Configured,
    /// A response named it.
    Derived,
}

/// An outbound request failed or was not made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    /// Connection refused or reset, TLS failure, timeout.
    #[error("unreachable: {0}")]
    Transport(String),
    /// 5xx or 429 on a provider call; any non-success status on a GET.
    #[error("answered HTTP {status}")]
    Status {
        /// The status code.
        status: u16,
        /// `Retry-After`, when the server sent seconds.
        retry_after: Option<Duration>,
    },
    /// The response was larger than the caller's cap.
    #[error("response too large")]
    TooLarge,
    /// The egress policy (derived URL) or the configured-URL rules refused the destination;
    /// no connection was made. The text names the rule, never a response.
    #[error("{0}")]
    Refused(String),
}

impl HttpError {
    /// What a caller may be told: the kind of failure, never a URL, body or header. A refusal
    /// names its rule and address, which the operator needs and which came from configuration
    /// or from the refused response's own metadata, not from a secret.
    pub fn caller_message(&self) -> String {
        match self {
            Self::Transport(detail) if detail.starts_with("timed out") => {
                "the provider did not answer in time".into()
            }
            Self::Transport(_) => "the provider could not be reached".into(),
            Self::Status { status, .. } => format!("the provider answered HTTP {status}"),
            Self::TooLarge => "the provider's response was too large".into(),
            Self::Refused(rule) => format!("authorization server {rule}"),
        }
    }
}

/// A response read in full, within its cap.
#[derive(Debug)]
pub struct Fetched {
    /// The status code.
    pub status: reqwest::StatusCode,
    /// The response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body, at most the cap asked for.
    pub body: Vec<u8>,
}

/// The vault's outbound HTTP client: one `reqwest::Client` per [`Origin`].
#[derive(Debug, Clone)]
pub struct Outbound {
    configured: reqwest::Client,
    derived: reqwest::Client,
    egress: Arc<EgressPolicy>,
}

/// The derived client's resolver: resolves once, screens every address, and returns only
/// screened ones, so the connection can only go where the policy allowed.
struct Screening {
    egress: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for Screening {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = Arc::clone(&self.egress);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = match egress.pinned(&host) {
                Some(pinned) => pinned,
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let checked = egress.screen(found)?;
            Ok(Box::new(checked.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Outbound {
    /// Builds both clients; an unreadable or malformed CA file stops startup naming the setting.
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let egress = Arc::new(settings.egress.clone());
        let certs = match &settings.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!(
                        "VAULT_PROVIDER_CA_FILE: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                Some(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    anyhow::anyhow!("VAULT_PROVIDER_CA_FILE: not a PEM bundle: {e}")
                })?)
            }
            None => None,
        };
        let base = || {
            let builder = reqwest::Client::builder()
                .connect_timeout(settings.connect_timeout)
                .timeout(settings.timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("credential-vault/", env!("CARGO_PKG_VERSION")));
            match &certs {
                Some(certs) => builder.tls_certs_merge(certs.clone()),
                None => builder,
            }
        };
        Ok(Self {
            configured: base().build()?,
            // A proxy would resolve the name itself, past the screening resolver.
            derived: base()
                .no_proxy()
                .dns_resolver(Arc::new(Screening {
                    egress: Arc::clone(&egress),
                }))
                .build()?,
            egress,
        })
    }

    /// Whether `url` may be fetched as `origin`, before any connection. A derived URL with a
    /// host name is checked again, on every address, when it is resolved.
    pub fn check(&self, origin: Origin, url: &url::Url) -> Result<(), HttpError> {
        match origin {
            Origin::Configured => {
                configured_url_problem(url).map_or(Ok(()), |p| Err(HttpError::Refused(p.into())))
            }
            Origin::Derived => self
                .egress
                .check_url(url)
                .map_err(|refused| refusal(url, &refused)),
        }
    }

    /// Sends `request` as `origin` and reads at most `limit` bytes of the answer. Any status
    /// is returned; a redirect is never followed.
    pub async fn send(
        &self,
        origin: Origin,
        request: reqwest::Request,
        limit: usize,
    ) -> Result<Fetched, HttpError> {
        self.check(origin, request.url())?;
        let client = match origin {
            Origin::Configured => &self.configured,
            Origin::Derived => &self.derived,
        };
        let url = request.url().clone();
        let mut response = client
            .execute(request)
            .await
            .map_err(|e| transport(&url, &e))?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(HttpError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(&url, &e))? {
            if body.len() + chunk.len() > limit {
                return Err(HttpError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched {
            status,
            headers,
            body,
        })
    }

    /// GET `url` as `origin`: the body of a 2xx answer, at most `limit` bytes; anything else is
    /// [`HttpError::Status`].
    pub async fn get(
        &self,
        origin: Origin,
        url: &url::Url,
        limit: usize,
    ) -> Result<Fetched, HttpError> {
        let request = reqwest::Request::new(reqwest::Method::GET, url.clone());
        let fetched = self.send(origin, request, limit).await?;
        if !fetched.status.is_success() {
            return Err(HttpError::Status {
                status: fetched.status.as_u16(),
                retry_after: None,
            });
        }
        Ok(fetched)
    }

    /// GET returning JSON (discovery documents), within [`MAX_BODY_BYTES`].
    pub async fn get_json(
        &self,
        origin: Origin,
        url: &str,
    ) -> Result<serde_json::Value, HttpError> {
        let url = url::Url::parse(url).map_err(|e| HttpError::Transport(e.to_string()))?;
        let fetched = self.get(origin, &url, MAX_BODY_BYTES).await?;
        serde_json::from_slice(&fetched.body)
            .map_err(|e| HttpError::Transport(format!("the document is not JSON: {e}")))
    }
}

/// Parses a configured URL and checks it as [`Outbound::check`] will, so a bad one stops
/// startup instead of failing every call.
pub fn check_configured(text: &str) -> Result<url::Url, &'static str> {
    let url = url::Url::parse(text.trim()).map_err(|_| "is not a URL")?;
    match configured_url_problem(&url) {
        Some(problem) => Err(problem),
        None => Ok(url),
    }
}

/// Why a configured URL may not be fetched: `https`, or `http` to a loopback host only, and
/// never with user info. Judged on the parsed URL, not its spelling.
fn configured_url_problem(url: &url::Url) -> Option<&'static str> {
    if !url.username().is_empty() || url.password().is_some() {
        return Some("URL must not contain user info");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Some("URL has no host"),
    };
    match url.scheme() {
        "https" => None,
        "http" if loopback => None,
        _ => Some("URL must be https:// (plain http only for a loopback host)"),
    }
}

/// Refused derived fetches, exported as the OpenTelemetry counter `vault.egress.refusals`
/// (attribute `rule`: `loopback`, `private`, `not_https`, …) through the global meter provider.
fn refusals() -> &'static opentelemetry::metrics::Counter<u64> {
    static COUNTER: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    COUNTER.get_or_init(|| {
        opentelemetry::global::meter(crate::telemetry::SCOPE)
            .u64_counter("vault.egress.refusals")
            .with_description("Outbound fetches of derived URLs refused by the egress policy")
            .build()
    })
}

/// The counter's attribute for a refusal: the rule, never the address.
fn rule_label(refused: &Refused) -> String {
    match refused {
        Refused::Address { rule, .. } => format!("{rule:?}").to_ascii_lowercase(),
        Refused::NotHttps => "not_https".into(),
        Refused::UserInfo => "user_info".into(),
        Refused::NoAddress => "no_address".into(),
    }
}

/// A refused derived fetch: logged here, once, at warning, and counted; the caller gets the
/// same words.
fn refusal(url: &url::Url, refused: &Refused) -> HttpError {
    tracing::warn!(
        host = url.host_str().unwrap_or(""),
        rule = %refused,
        "egress refused a derived URL; no connection was made"
    );
    refusals().add(
        1,
        &[opentelemetry::KeyValue::new("rule", rule_label(refused))],
    );
    HttpError::Refused(refused.to_string())
}

/// A transport error, or the resolver's refusal inside it; never the URL's query.
fn transport(url: &url::Url, err: &reqwest::Error) -> HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<Refused>() {
            return refusal(url, refused);
        }
        source = cause.source();
    }
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    HttpError::Transport(format!(
        "{kind} ({}://{}{})",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(allow: &str) -> Outbound {
        Outbound::new(&HttpSettings {
            ca_file: None,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            egress: EgressPolicy::parse(allow).unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn configured_urls_are_judged_on_their_parsed_scheme_and_host() {
        let http = outbound("");
        for good in [
            "https://keycloak.internal/realms/x",
            "https://10.1.2.3/token",
            "http://127.0.0.1:8080/jwks",
            "http://localhost:3000/",
            "http://[::1]:3000/",
        ] {
            let url = url::Url::parse(good).unwrap();
            assert!(http.check(Origin::Configured, &url).is_ok(), "{good}");
        }
        for bad in [
            "http://localhost@evil.example/",
            "http://127.0.0.1.evil.example/",
            "http://10.1.2.3/token",
            "https://user:pass@issuer.example/",
        ] {
            let url = url::Url::parse(bad).unwrap();
            assert!(http.check(Origin::Configured, &url).is_err(), "{bad}");
        }
    }

    /// The resolver path: `localhost` comes from the hosts file, so nothing leaves the machine;
    /// the listener proves no connection was made.
    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_without_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = url::Url::parse(&format!("https://localhost:{port}/token")).unwrap();
        let err = outbound("")
            .get(Origin::Derived, &url, MAX_BODY_BYTES)
            .await
            .unwrap_err();
        let HttpError::Refused(rule) = &err else {
            panic!("expected a refusal, got {err:?}");
        };
        assert!(rule.ends_with("is loopback"), "{rule}");
        assert!(
            err.caller_message()
                .starts_with("authorization server address "),
            "{err}"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(
            accepted.is_err(),
            "the vault connected to a refused address"
        );
    }

    #[tokio::test]
    async fn an_ip_literal_is_refused_before_sending() {
        for url in [
            "https://127.0.0.2:1/",
            "https://[::1]:1/",
            "http://8.8.8.8/",
        ] {
            let url = url::Url::parse(url).unwrap();
            let err = outbound("")
                .get(Origin::Derived, &url, MAX_BODY_BYTES)
                .await
                .unwrap_err();
            assert!(matches!(err, HttpError::Refused(_)), "{url}: {err:?}");
        }
    }
}
