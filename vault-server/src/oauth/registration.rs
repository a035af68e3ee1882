//! How the vault becomes a client of an MCP server's authorization server when no operator
//! registered it there: Dynamic Client Registration (RFC 7591), and the Client ID Metadata
//! Document (draft-ietf-oauth-client-id-metadata-document) that the MCP authorization
//! specification (revision 2025-11-25) prefers when the server supports it.
//!
//! The registration endpoint was named by discovery, so [`register`] is normally called with
//! [`Origin::Derived`] and held to the egress policy. The answer is untrusted: it is read within
//! 64 KiB, no redirect is followed, and every field the vault keeps is checked here. Errors name
//! the tool and the rule; they never contain a response body or the client secret.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{Value, json};
use url::Url;

use crate::http::{HttpError, Origin, Outbound};

/// Largest registration answer read: a client information response is small, and this bounds
/// a hostile one.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Longest `client_id` kept: it is stored and sent on every token call.
pub const MAX_CLIENT_ID_BYTES: usize = 1024;

/// Longest `client_secret` kept.
const MAX_CLIENT_SECRET_BYTES: usize = 4096;

/// The grant types the vault registers for: the consent flow and refresh.
const GRANT_TYPES: [&str; 2] = ["authorization_code", "refresh_token"];

/// The response types the vault registers for.
const RESPONSE_TYPES: [&str; 1] = ["code"];

/// How the client authenticates at the token endpoint (RFC 7591 §2
/// `token_endpoint_auth_method`), limited to the methods the vault can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// `client_secret_basic`: the secret in HTTP Basic.
    ClientSecretBasic,
    /// `client_secret_post`: the secret in the form body.
    ClientSecretPost,
    /// `none`: a public client; PKCE alone protects the code.
    None,
}

impl AuthMethod {
    /// The RFC 7591 name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::None => "none",
        }
    }

    /// The method named `name` (exact RFC 7591 spelling); `None` for any other method.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "client_secret_basic" => Some(Self::ClientSecretBasic),
            "client_secret_post" => Some(Self::ClientSecretPost),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// Whether the client has a secret to present.
    pub fn is_confidential(self) -> bool {
        !matches!(self, Self::None)
    }
}

impl std::fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AuthMethod {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::parse(name).ok_or_else(|| {
            format!(
                "token_endpoint_auth_method {} is not client_secret_basic, client_secret_post or \
                 none",
                quote(name)
            )
        })
    }
}

/// The method to register with, from the server's `token_endpoint_auth_methods_supported`.
/// An empty list means RFC 8414's default, `client_secret_basic`. A confidential method is
/// preferred (basic, then post) because a secret also protects the refresh token; `none` only
/// when it is all the server offers. The error names the field when no usable method is listed.
pub fn choose_auth_method(supported: &[String]) -> Result<AuthMethod, String> {
    if supported.is_empty() {
        return Ok(AuthMethod::ClientSecretBasic);
    }
    [
        AuthMethod::ClientSecretBasic,
        AuthMethod::ClientSecretPost,
        AuthMethod::None,
    ]
    .into_iter()
    .find(|method| supported.iter().any(|s| s == method.as_str()))
    .ok_or_else(|| {
        let listed: Vec<String> = supported.iter().take(8).map(|s| quote(s)).collect();
        format!(
            "token_endpoint_auth_methods_supported lists none of client_secret_basic, \
             client_secret_post or none (it lists {})",
            listed.join(", ")
        )
    })
}

/// What the vault asks to be registered as (RFC 7591 §2).
#[derive(Debug, Clone)]
pub struct ClientMetadata<'a> {
    /// `client_name`, shown to the user on the consent screen.
    pub client_name: &'a str,
    /// `redirect_uris`: the vault's callback(s).
    pub redirect_uris: &'a [String],
    /// `token_endpoint_auth_method` asked for; the server may register another.
    pub auth_method: AuthMethod,
    /// `scope`, when the vault knows what it will ask for.
    pub scope: Option<&'a str>,
}

impl ClientMetadata<'_> {
    /// The registration request body (RFC 7591 §3.1).
    pub fn request_json(&self) -> Value {
        let mut body = json!({
            "redirect_uris": self.redirect_uris,
            "grant_types": GRANT_TYPES,
            "response_types": RESPONSE_TYPES,
            "token_endpoint_auth_method": self.auth_method.as_str(),
            "client_name": self.client_name,
        });
        if let Some(scope) = self.scope {
            body["scope"] = Value::from(scope);
        }
        body
    }
}

/// A client the server registered, checked.
pub struct Registered {
    /// The `client_id` assigned: non-empty, at most [`MAX_CLIENT_ID_BYTES`], no control
    /// characters.
    pub client_id: String,
    /// The `client_secret`; always present for a confidential method, never kept for `none`.
    pub client_secret: Option<SecretString>,
    /// The method the server registered (which may differ from the one asked).
    pub auth_method: AuthMethod,
    /// `client_secret_expires_at`; `None` when the secret does not expire (or there is none).
    pub secret_expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("auth_method", &self.auth_method)
            .field("secret_expires_at", &self.secret_expires_at)
            .finish()
    }
}

/// Why registration failed. [`RegistrationError::is_transient`] tells the caller whether to
/// try again later; otherwise the server will not register the vault as asked (or cannot be
/// asked), and only a change of configuration or of the server helps. Every message names the
/// tool; none contains a response body or a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistrationError {
    /// Not reached, timed out, 5xx or 429: try again later, after `retry_after` if given.
    #[error("tool {tool}: dynamic client registration unavailable: {reason}")]
    Unavailable {
        /// The tool.
        tool: String,
        /// What happened, without URL query, body or header.
        reason: String,
        /// The server's `Retry-After`, in seconds.
        retry_after: Option<Duration>,
    },
    /// The server refused the request (4xx), with its RFC 7591 §3.2.2 `error` code when it
    /// sent a well-formed one.
    #[error(
        "tool {tool}: the authorization server refused to register the vault: HTTP {status}, {code} (RFC 7591 §3.2.2)"
    )]
    Refused {
        /// The tool.
        tool: String,
        /// The status.
        status: u16,
        /// `invalid_redirect_uri`, `invalid_client_metadata`, …; `unrecognised error` when the
        /// server sent none or one that is not a short ASCII code (never echoed).
        code: String,
    },
    /// The egress policy or the configured-URL rules forbid the registration endpoint; no
    /// connection was made.
    #[error("tool {tool}: registration endpoint {rule}")]
    Blocked {
        /// The tool.
        tool: String,
        /// The rule, with the address it refused.
        rule: String,
    },
    /// The server answered, but not with a usable registration: a redirect, an unexpected
    /// status, a body too large or not JSON, or a field breaking RFC 7591.
    #[error("tool {tool}: dynamic client registration answer unusable: {rule}")]
    Invalid {
        /// The tool.
        tool: String,
        /// The rule broken, naming the field.
        rule: String,
    },
}

impl RegistrationError {
    /// Whether the same request may succeed later (the server was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// When to try again, if the server said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn from_http(tool: &str, err: HttpError) -> Self {
        let tool = tool.to_string();
        match err {
            HttpError::Refused(rule) => Self::Blocked { tool, rule },
            HttpError::TooLarge => Self::Invalid {
                tool,
                rule: format!(
                    "the answer is larger than {} KiB",
                    MAX_RESPONSE_BYTES / 1024
                ),
            },
            HttpError::Status {
                status,
                retry_after,
            } => Self::Unavailable {
                tool,
                reason: format!("the server answered HTTP {status}"),
                retry_after,
            },
            HttpError::Transport(reason) => Self::Unavailable {
                tool,
                reason,
                retry_after: None,
            },
        }
    }
}

/// Registers the vault at `endpoint` (RFC 7591 §3.1) as `metadata` describes, for `tool`.
/// `origin` is [`Origin::Derived`] for an endpoint discovery found. The answer is checked by
/// [`parse_registration`].
#[tracing::instrument(skip(outbound, metadata), fields(endpoint = %endpoint))]
pub async fn register(
    outbound: &Outbound,
    tool: &str,
    origin: Origin,
    endpoint: &Url,
    metadata: &ClientMetadata<'_>,
) -> Result<Registered, RegistrationError> {
    let mut request = reqwest::Request::new(reqwest::Method::POST, endpoint.clone());
    let headers = request.headers_mut();
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    *request.body_mut() = Some(metadata.request_json().to_string().into());
    let fetched = outbound
        .send(origin, request, MAX_RESPONSE_BYTES)
        .await
        .map_err(|err| RegistrationError::from_http(tool, err))?;
    let status = fetched.status.as_u16();
    let result = parse_registration(tool, metadata, status, &fetched.body);
    match result {
        Err(RegistrationError::Unavailable {
            tool,
            reason,
            retry_after: None,
        }) => Err(RegistrationError::Unavailable {
            tool,
            reason,
            retry_after: fetched
                .headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        }),
        Ok(registered) => {
            tracing::info!(
                tool,
                auth_method = %registered.auth_method,
                "registered at the authorization server"
            );
            Ok(registered)
        }
        other => other,
    }
}

/// Checks a registration answer (`status`, `body`) to the request `asked` (RFC 7591 §3.2):
/// 200 or 201 with a JSON object carrying a usable client; a 4xx is the server's refusal; 5xx
/// and 429 are transient (without `Retry-After`, which [`register`] adds from the headers).
pub fn parse_registration(
    tool: &str,
    asked: &ClientMetadata<'_>,
    status: u16,
    body: &[u8],
) -> Result<Registered, RegistrationError> {
    let invalid = |rule: String| RegistrationError::Invalid {
        tool: tool.to_string(),
        rule,
    };
    if status == 429 || (500..600).contains(&status) {
        return Err(RegistrationError::Unavailable {
            tool: tool.to_string(),
            reason: format!("the server answered HTTP {status}"),
            retry_after: None,
        });
    }
    if (300..400).contains(&status) {
        return Err(invalid(format!(
            "HTTP {status}, a redirect; registration follows none"
        )));
    }
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(invalid(format!(
            "the answer is larger than {} KiB",
            MAX_RESPONSE_BYTES / 1024
        )));
    }
    let json = serde_json::from_slice::<Value>(body).ok();
    if (400..500).contains(&status) {
        let code = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
            .map_or("unrecognised error", super::error_code);
        return Err(RegistrationError::Refused {
            tool: tool.to_string(),
            status,
            code: code.to_string(),
        });
    }
    if status != 200 && status != 201 {
        return Err(invalid(format!("HTTP {status}, not 201 (RFC 7591 §3.2.1)")));
    }
    let Some(Value::Object(answer)) = json else {
        return Err(invalid(
            "the answer is not a JSON object (RFC 7591 §3.2.1)".into(),
        ));
    };

    let client_id = match answer.get("client_id") {
        Some(Value::String(id)) if id.is_empty() => {
            return Err(invalid("client_id is empty (RFC 7591 §3.2.1)".into()));
        }
        Some(Value::String(id)) if id.len() > MAX_CLIENT_ID_BYTES => {
            return Err(invalid(format!(
                "client_id is longer than {MAX_CLIENT_ID_BYTES} bytes"
            )));
        }
        Some(Value::String(id)) if id.chars().any(char::is_control) => {
            return Err(invalid("client_id contains a control character".into()));
        }
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(invalid("client_id is not a string".into())),
        None => return Err(invalid("client_id is missing (RFC 7591 §3.2.1)".into())),
    };

    // Absent: the server registered what was asked. Another answer is a server's right
    // (RFC 7591 §3.2.1 lets it replace values), as long as the vault can use it.
    let auth_method = match answer.get("token_endpoint_auth_method") {
        None | Some(Value::Null) => asked.auth_method,
        Some(Value::String(name)) => name.parse::<AuthMethod>().map_err(invalid)?,
        Some(_) => return Err(invalid("token_endpoint_auth_method is not a string".into())),
    };

    let client_secret = if auth_method.is_confidential() {
        match answer.get("client_secret") {
            Some(Value::String(secret)) if secret.is_empty() => {
                return Err(invalid(format!(
                    "client_secret is empty, but the registered method is {auth_method}"
                )));
            }
            Some(Value::String(secret)) if secret.len() > MAX_CLIENT_SECRET_BYTES => {
                return Err(invalid(format!(
                    "client_secret is longer than {MAX_CLIENT_SECRET_BYTES} bytes"
                )));
            }
            Some(Value::String(secret)) => Some(SecretString::from(secret.clone())),
            Some(_) => return Err(invalid("client_secret is not a string".into())),
            None => {
                return Err(invalid(format!(
                    "client_secret is missing, but the registered method is {auth_method}"
                )));
            }
        }
    } else {
        // A public client presents no secret; one sent anyway is not kept.
        None
    };

    // RFC 7591 §3.2.1: 0 means the secret does not expire.
    let secret_expires_at = match answer.get("client_secret_expires_at") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_i64() {
            Some(0) => None,
            Some(seconds) if seconds > 0 => Some(
                DateTime::<Utc>::from_timestamp(seconds, 0)
                    .ok_or_else(|| invalid("client_secret_expires_at is out of range".into()))?,
            ),
            _ => {
                return Err(invalid(
                    "client_secret_expires_at is not 0 or a positive unix time".into(),
                ));
            }
        },
    };
    let secret_expires_at = secret_expires_at.filter(|_| client_secret.is_some());

    // RFC 7591 §3.2.1: the answer carries the registered metadata. Redirect URIs the server
    // replaced would make every consent fail at the callback, so find out now.
    match answer.get("redirect_uris") {
        None | Some(Value::Null) => {}
        Some(Value::Array(echoed)) => {
            let missing = asked
                .redirect_uris
                .iter()
                .find(|ours| !echoed.iter().any(|e| e.as_str() == Some(ours.as_str())));
            if let Some(missing) = missing {
                return Err(invalid(format!(
                    "redirect_uris does not contain {} (the server registered other redirect \
                     URIs)",
                    quote(missing)
                )));
            }
        }
        Some(_) => return Err(invalid("redirect_uris is not an array".into())),
    }

    Ok(Registered {
        client_id,
        client_secret,
        auth_method,
        secret_expires_at,
    })
}

/// The Client ID Metadata Document the vault serves at `client_id` (an `https` URL): a public
/// client, since a document anyone can fetch cannot carry a secret. `client_id` is written
/// exactly as the URL's serialisation, which the authorization server compares with the URL it
/// fetched.
pub fn metadata_document(client_id: &Url, client_name: &str, redirect_uris: &[String]) -> Value {
    json!({
        "client_id": client_id.as_str(),
        "client_name": client_name,
        "redirect_uris": redirect_uris,
        "grant_types": GRANT_TYPES,
        "response_types": RESPONSE_TYPES,
        "token_endpoint_auth_method": AuthMethod::None.as_str(),
    })
}

/// A value from a response, fit for a message: escaped and at most 120 characters.
fn quote(value: &str) -> String {
    let short: String = value.chars().take(120).collect();
    let ellipsis = if short.len() < value.len() { "…" } else { "" };
    format!("{short:?}{ellipsis}")
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const TOOL: &str = "notes";

    fn redirects() -> Vec<String> {
        vec!["https://vault.example.com/oauth/callback".to_string()]
    }

    fn asked(redirect_uris: &[String], auth_method: AuthMethod) -> ClientMetadata<'_> {
        ClientMetadata {
            client_name: "credential-vault",
            redirect_uris,
            auth_method,
            scope: None,
        }
    }

    fn parse(
        method: AuthMethod,
        status: u16,
        body: &Value,
    ) -> Result<Registered, RegistrationError> {
        let uris = redirects();
        parse_registration(
            TOOL,
            &asked(&uris, method),
            status,
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn the_method_is_basic_then_post_then_none_and_basic_when_unlisted() {
        let table: &[(&[&str], Option<AuthMethod>)] = &[
            (&[], Some(AuthMethod::ClientSecretBasic)),
            (
                &["none", "client_secret_post", "client_secret_basic"],
                Some(AuthMethod::ClientSecretBasic),
            ),
            (
                &["private_key_jwt", "client_secret_post", "none"],
                Some(AuthMethod::ClientSecretPost),
            ),
            (&["none"], Some(AuthMethod::None)),
            (&["private_key_jwt", "none"], Some(AuthMethod::None)),
            (&["private_key_jwt"], None),
            (&["tls_client_auth", "client_secret_jwt"], None),
            (&["Client_Secret_Basic"], None),
        ];
        for (supported, expected) in table {
            let supported: Vec<String> = supported.iter().map(|s| s.to_string()).collect();
            match (choose_auth_method(&supported), expected) {
                (Ok(got), Some(want)) => assert_eq!(got, *want, "{supported:?}"),
                (Err(message), None) => assert!(
                    message.starts_with("token_endpoint_auth_methods_supported"),
                    "{message}"
                ),
                (got, _) => panic!("{supported:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn methods_round_trip_through_their_rfc_7591_names() {
        for method in [
            AuthMethod::ClientSecretBasic,
            AuthMethod::ClientSecretPost,
            AuthMethod::None,
        ] {
            assert_eq!(method.as_str().parse::<AuthMethod>(), Ok(method));
        }
        let err = "private_key_jwt".parse::<AuthMethod>().unwrap_err();
        assert!(err.contains("token_endpoint_auth_method"), "{err}");
    }

    #[test]
    fn the_request_asks_for_code_and_refresh_with_the_chosen_method() {
        let uris = redirects();
        let mut metadata = asked(&uris, AuthMethod::ClientSecretPost);
        assert_eq!(
            metadata.request_json(),
            json!({
                "redirect_uris": ["https://vault.example.com/oauth/callback"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_post",
                "client_name": "credential-vault",
            })
        );
        metadata.scope = Some("files:read files:write");
        assert_eq!(
            metadata.request_json()["scope"],
            json!("files:read files:write")
        );
    }

    #[test]
    fn a_confidential_registration_is_read() {
        let registered = parse(
            AuthMethod::ClientSecretBasic,
            201,
            &json!({
                "client_id": "abc123",
                "client_secret": "s3cr3t-value",
                "client_id_issued_at": 1_700_000_000,
                "client_secret_expires_at": 0,
                "redirect_uris": ["https://vault.example.com/oauth/callback"],
                "token_endpoint_auth_method": "client_secret_basic",
            }),
        )
        .expect("a good answer");
        assert_eq!(registered.client_id, "abc123");
        assert_eq!(
            registered.client_secret.as_ref().map(|s| s.expose_secret()),
            Some("s3cr3t-value")
        );
        assert_eq!(registered.auth_method, AuthMethod::ClientSecretBasic);
        assert_eq!(registered.secret_expires_at, None);
        let shown = format!("{registered:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn a_public_registration_needs_no_secret_and_keeps_none() {
        let registered = parse(
            AuthMethod::None,
            200,
            &json!({"client_id": "pub-1", "client_secret": "ignored"}),
        )
        .expect("a public client");
        assert_eq!(registered.auth_method, AuthMethod::None);
        assert!(registered.client_secret.is_none());
        assert_eq!(registered.secret_expires_at, None);
    }

    #[test]
    fn a_confidential_method_without_a_secret_is_refused_naming_the_field() {
        for body in [
            json!({"client_id": "abc"}),
            json!({"client_id": "abc", "client_secret": ""}),
            json!({"client_id": "abc", "client_secret": 5}),
            json!({"client_id": "abc", "token_endpoint_auth_method": "client_secret_post"}),
        ] {
            let err = parse(AuthMethod::ClientSecretBasic, 201, &body).unwrap_err();
            assert!(matches!(err, RegistrationError::Invalid { .. }), "{err:?}");
            assert!(err.to_string().contains("client_secret"), "{err}");
            assert!(err.to_string().contains(TOOL), "{err}");
        }
        // The server turned a public request into a confidential client: it owes a secret.
        let err = parse(
            AuthMethod::None,
            201,
            &json!({"client_id": "abc", "token_endpoint_auth_method": "client_secret_basic"}),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("client_secret is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_secret_expiry_of_zero_is_never_and_a_time_is_kept() {
        let at = |expires: Value| {
            parse(
                AuthMethod::ClientSecretBasic,
                201,
                &json!({"client_id": "a", "client_secret": "s", "client_secret_expires_at": expires}),
            )
        };
        assert_eq!(at(json!(0)).unwrap().secret_expires_at, None);
        assert_eq!(at(Value::Null).unwrap().secret_expires_at, None);
        assert_eq!(
            at(json!(1_900_000_000)).unwrap().secret_expires_at,
            DateTime::<Utc>::from_timestamp(1_900_000_000, 0)
        );
        for bad in [json!(-5), json!("soon"), json!(1.5), json!(i64::MAX)] {
            let err = at(bad.clone()).unwrap_err();
            assert!(
                err.to_string().contains("client_secret_expires_at"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn an_oversized_or_non_json_answer_is_unusable() {
        let uris = redirects();
        let metadata = asked(&uris, AuthMethod::ClientSecretBasic);
        let big = format!(
            r#"{{"client_id":"a","client_secret":"s","pad":"{}"}}"#,
            "x".repeat(MAX_RESPONSE_BYTES)
        );
        for body in [
            big.as_bytes(),
            b"<html>registered!</html>".as_slice(),
            b"[\"client_id\"]".as_slice(),
            b"".as_slice(),
        ] {
            let err = parse_registration(TOOL, &metadata, 201, body).unwrap_err();
            assert!(matches!(err, RegistrationError::Invalid { .. }), "{err:?}");
            assert!(!err.to_string().contains("registered!"), "{err}");
        }
    }

    #[test]
    fn a_bad_client_id_is_refused_naming_the_field() {
        for id in [
            json!(null),
            json!(""),
            json!(7),
            json!("x".repeat(MAX_CLIENT_ID_BYTES + 1)),
            json!("a\nb"),
        ] {
            let err = parse(AuthMethod::None, 201, &json!({"client_id": id})).unwrap_err();
            assert!(err.to_string().contains("client_id"), "{err}");
        }
        assert!(
            parse(
                AuthMethod::None,
                201,
                &json!({"client_id": "x".repeat(MAX_CLIENT_ID_BYTES)})
            )
            .is_ok()
        );
    }

    #[test]
    fn an_error_answer_is_a_refusal_quoting_only_a_well_formed_code() {
        let err = parse(
            AuthMethod::ClientSecretBasic,
            400,
            &json!({"error": "invalid_redirect_uri", "error_description": "no"}),
        )
        .unwrap_err();
        assert!(
            matches!(&err, RegistrationError::Refused { status: 400, code, .. } if code == "invalid_redirect_uri"),
            "{err:?}"
        );
        assert!(!err.is_transient());
        let hostile = "<script>alert(1)</script>\nsecret=hunter2";
        let err = parse(
            AuthMethod::ClientSecretBasic,
            400,
            &json!({"error": hostile, "error_description": "hunter2"}),
        )
        .unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("unrecognised error"), "{shown}");
        assert!(
            !shown.contains("script") && !shown.contains("hunter2"),
            "{shown}"
        );
        let err = parse_registration(
            TOOL,
            &asked(&redirects(), AuthMethod::None),
            401,
            b"Unauthorized",
        )
        .unwrap_err();
        assert!(
            matches!(err, RegistrationError::Refused { status: 401, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn overload_and_server_errors_are_transient_and_redirects_are_not_followed() {
        for status in [429, 500, 503] {
            let err = parse(AuthMethod::None, status, &json!({})).unwrap_err();
            assert!(err.is_transient(), "{status}: {err:?}");
        }
        for status in [301, 302, 307, 204, 202] {
            let err = parse(AuthMethod::None, status, &json!({"client_id": "a"})).unwrap_err();
            assert!(
                matches!(err, RegistrationError::Invalid { .. }),
                "{status}: {err:?}"
            );
        }
    }

    #[test]
    fn a_changed_method_is_taken_when_usable_and_refused_otherwise() {
        let registered = parse(
            AuthMethod::ClientSecretBasic,
            201,
            &json!({"client_id": "a", "client_secret": "s",
                    "token_endpoint_auth_method": "client_secret_post"}),
        )
        .expect("post is usable");
        assert_eq!(registered.auth_method, AuthMethod::ClientSecretPost);
        let registered = parse(
            AuthMethod::ClientSecretBasic,
            201,
            &json!({"client_id": "a", "token_endpoint_auth_method": "none"}),
        )
        .expect("a public client is usable");
        assert_eq!(registered.auth_method, AuthMethod::None);
        assert!(registered.client_secret.is_none());
        let err = parse(
            AuthMethod::ClientSecretBasic,
            201,
            &json!({"client_id": "a", "client_secret": "s",
                    "token_endpoint_auth_method": "private_key_jwt"}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("token_endpoint_auth_method \"private_key_jwt\""),
            "{err}"
        );
    }

    #[test]
    fn echoed_redirect_uris_must_contain_ours() {
        let answer = |uris: Value| {
            parse(
                AuthMethod::None,
                201,
                &json!({"client_id": "a", "redirect_uris": uris}),
            )
        };
        assert!(answer(json!(["https://vault.example.com/oauth/callback"])).is_ok());
        assert!(
            answer(json!([
                "https://other.example/cb",
                "https://vault.example.com/oauth/callback"
            ]))
            .is_ok()
        );
        for bad in [
            json!(["https://attacker.example/cb"]),
            json!([]),
            json!("https://vault.example.com/oauth/callback"),
        ] {
            let err = answer(bad.clone()).unwrap_err();
            assert!(err.to_string().contains("redirect_uris"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_metadata_document_is_a_public_client_named_by_its_url() {
        let url = Url::parse("https://vault.example.com/oauth/client.json").unwrap();
        let document = metadata_document(&url, "credential-vault", &redirects());
        assert_eq!(
            document,
            json!({
                "client_id": "https://vault.example.com/oauth/client.json",
                "client_name": "credential-vault",
                "redirect_uris": ["https://vault.example.com/oauth/callback"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            })
        );
        assert!(document.get("client_secret").is_none());
    }
}
