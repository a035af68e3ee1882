//! Discovery for a tool that is only an MCP server URL, as the MCP authorization specification
//! (revisions 2025-06-18 and 2025-11-25) asks of clients: an unauthenticated request answered by
//! `401` and a `WWW-Authenticate` challenge, the server's protected-resource metadata (RFC 9728),
//! then its first authorization server's metadata (RFC 8414, or OpenID discovery), each looked
//! up in the order the specification gives and checked before anything in it is used.
//!
//! Only the MCP server's URL is configured, and with it the well-known URIs computed from it.
//! Every other URL here was named by a response, so it is fetched as [`Origin::Derived`] and held
//! to the egress policy: a server must not be able to point the vault at its own network. Errors name the tool and the rule broken, never a body.

use url::Url;

use crate::http::{Fetched, HttpError, MAX_BODY_BYTES, Origin, Outbound};

/// The `Bearer` challenge of a `WWW-Authenticate` header (RFC 6750 §3, RFC 9728 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceChallenge {
    /// Where the protected-resource metadata is (RFC 9728 §5.1).
    pub resource_metadata: Option<String>,
    /// Scopes the server asks for; the MCP specification makes them authoritative.
    pub scope: Option<String>,
    /// `invalid_token`, `insufficient_scope`, …
    pub error: Option<String>,
}

/// What discovery found for one MCP server; every URL in it has passed the checks below.
#[derive(Debug, Clone)]
pub struct McpDiscovery {
    /// The canonical URI of the MCP server (RFC 8707 `resource`), equal to the metadata's.
    pub resource: String,
    /// Where the protected-resource metadata was read.
    pub resource_metadata_url: Url,
    /// The `401`'s challenge, when it had a `Bearer` one.
    pub challenge: Option<ResourceChallenge>,
    /// The metadata's `authorization_servers`, all `https`; the first is used.
    pub authorization_servers: Vec<String>,
    /// The metadata's `scopes_supported`.
    pub scopes_supported: Vec<String>,
    /// The first authorization server's metadata.
    pub authorization_server: AuthorizationServer,
}

/// An authorization server's metadata (RFC 8414 §2), as far as an MCP client needs it.
#[derive(Debug, Clone)]
pub struct AuthorizationServer {
    /// Its issuer identifier, equal to the `authorization_servers` entry (RFC 8414 §3.3).
    pub issuer: String,
    /// Where this document was read.
    pub metadata_url: Url,
    /// `https`.
    pub authorization_endpoint: Url,
    /// `https`.
    pub token_endpoint: Url,
    /// Dynamic client registration (RFC 7591), `https` when present.
    pub registration_endpoint: Option<Url>,
    /// Token revocation (RFC 7009), `https` when present.
    pub revocation_endpoint: Option<Url>,
    /// Always contains `S256`: discovery refuses a server without it.
    pub code_challenge_methods_supported: Vec<String>,
    /// `client_secret_basic`, `none`, …; empty when not advertised.
    pub token_endpoint_auth_methods_supported: Vec<String>,
    /// Client ID Metadata Documents (the 2025-11-25 revision's preferred registration).
    pub client_id_metadata_document_supported: bool,
    /// RFC 9207: every authorization response carries `iss`.
    pub authorization_response_iss_parameter_supported: bool,
    /// `scopes_supported`; empty when not advertised.
    pub scopes_supported: Vec<String>,
}

/// Which document a step fetches, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The unauthenticated request to the MCP server.
    McpServer,
    /// The protected-resource metadata (RFC 9728).
    ResourceMetadata,
    /// The authorization server's metadata (RFC 8414 / OpenID discovery).
    ServerMetadata,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::McpServer => "the MCP server",
            Self::ResourceMetadata => "the protected resource metadata",
            Self::ServerMetadata => "the authorization server metadata",
        })
    }
}

/// The first rule an MCP server or its authorization server broke. The text names the tool and
/// the rule; values quoted from a response are short and escaped, and no body is ever shown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// Not reached, refused by the egress policy, too large, or not JSON.
    #[error("tool {tool}: {step}: {source}")]
    Fetch {
        /// The tool.
        tool: String,
        /// What was being fetched.
        step: Step,
        /// Why it failed (a refusal names the egress rule).
        source: HttpError,
    },
    /// A 3xx: discovery follows no redirect, since the target would escape the checks.
    #[error("tool {tool}: {step} answered HTTP {status}, a redirect; discovery follows none")]
    Redirected {
        /// The tool.
        tool: String,
        /// What was being fetched.
        step: Step,
        /// The status.
        status: u16,
    },
    /// The unauthenticated request was not answered by 401.
    #[error(
        "tool {tool}: the MCP server answered an unauthenticated request with HTTP {status}, \
         not 401 (MCP authorization: a protected server challenges)"
    )]
    NotChallenged {
        /// The tool.
        tool: String,
        /// The status.
        status: u16,
    },
    /// Neither the challenge's `resource_metadata` nor a well-known URI had a document.
    #[error(
        "tool {tool}: no protected resource metadata at {tried} (RFC 9728 §3; last answer HTTP \
         {status})"
    )]
    NoResourceMetadata {
        /// The tool.
        tool: String,
        /// The URLs tried, in order.
        tried: String,
        /// The last status.
        status: u16,
    },
    /// No authorization server metadata at any of the specification's URLs.
    #[error(
        "tool {tool}: no authorization server metadata at {tried} (RFC 8414 §3, OpenID \
         discovery; last answer HTTP {status})"
    )]
    NoServerMetadata {
        /// The tool.
        tool: String,
        /// The URLs tried, in order.
        tried: String,
        /// The last status.
        status: u16,
    },
    /// A document broke a rule of its specification.
    #[error("tool {tool}: {step}: {rule}")]
    Invalid {
        /// The tool.
        tool: String,
        /// Which document.
        step: Step,
        /// The rule, with the field it concerns.
        rule: String,
    },
}

/// The MCP `initialize` request the probe sends, as a client's first request would be.
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"credential-vault","version":"0"}}}"#;

/// Finds and checks the authorization of the MCP server at `mcp_server` for `tool`: the
/// challenge, the protected-resource metadata, and the first authorization server's metadata.
/// `mcp_server` is configured; every URL a response names is fetched as derived.
// The URL is not recorded: a server's query may carry a key.
#[tracing::instrument(skip(outbound, mcp_server))]
pub async fn discover(
    outbound: &Outbound,
    tool: &str,
    mcp_server: &Url,
) -> Result<McpDiscovery, DiscoveryError> {
    let invalid = |step: Step, rule: String| DiscoveryError::Invalid {
        tool: tool.to_string(),
        step,
        rule,
    };
    let resource = canonical_resource(mcp_server);

    // (a) The challenge.
    let mut request = reqwest::Request::new(reqwest::Method::POST, mcp_server.clone());
    let headers = request.headers_mut();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static("application/json, text/event-stream"),
    );
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    *request.body_mut() = Some(INITIALIZE.into());
    let answer = fetch(outbound, tool, Step::McpServer, Origin::Configured, request).await?;
    if answer.status.as_u16() != 401 {
        return Err(DiscoveryError::NotChallenged {
            tool: tool.to_string(),
            status: answer.status.as_u16(),
        });
    }
    let challenge = answer
        .headers
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(parse_www_authenticate);

    // (b) The protected-resource metadata: the challenge's URL alone when it names one,
    // otherwise the well-known URIs in order.
    // The well-known URIs are computed from the configured URL, not learned from a response,
    // so they are as trusted as it is; a URL the challenge names is derived, unless it is one of
    // them.
    let well_known = protected_resource_metadata_urls(mcp_server);
    let candidates: Vec<(Url, Origin)> = match challenge
        .as_ref()
        .and_then(|c| c.resource_metadata.as_deref())
    {
        Some(named) => {
            let url = Url::parse(named).map_err(|_| {
                invalid(
                    Step::McpServer,
                    "the WWW-Authenticate resource_metadata is not an absolute URL (RFC 9728 §5.1)"
                        .into(),
                )
            })?;
            let origin = if well_known.contains(&url) {
                Origin::Configured
            } else {
                Origin::Derived
            };
            vec![(url, origin)]
        }
        None => well_known
            .into_iter()
            .map(|url| (url, Origin::Configured))
            .collect(),
    };
    let (resource_metadata_url, prm) =
        first_document(outbound, tool, Step::ResourceMetadata, &candidates)
            .await?
            .map_err(|status| DiscoveryError::NoResourceMetadata {
                tool: tool.to_string(),
                tried: list(&candidates),
                status,
            })?;
    let named_resource = prm
        .get("resource")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            invalid(
                Step::ResourceMetadata,
                "resource is missing (RFC 9728 §2)".into(),
            )
        })?;
    // RFC 9728 §3.3: metadata for another resource must not be used, or one server could send
    // the vault's users to another's authorization server.
    let same = Url::parse(named_resource).is_ok_and(|named| canonical_resource(&named) == resource);
    if !same {
        return Err(invalid(
            Step::ResourceMetadata,
            format!(
                "resource {} is not the server's canonical URI {resource} (RFC 9728 §3.3)",
                quote(named_resource)
            ),
        ));
    }
    let authorization_servers = strings(&prm, "authorization_servers");
    if authorization_servers.is_empty() {
        return Err(invalid(
            Step::ResourceMetadata,
            "authorization_servers is missing or empty (MCP authorization: at least one)".into(),
        ));
    }
    let mut issuers = Vec::new();
    for server in &authorization_servers {
        match Url::parse(server) {
            Ok(url)
                if url.scheme() == "https" && url.query().is_none() && url.fragment().is_none() =>
            {
                issuers.push(url)
            }
            _ => {
                return Err(invalid(
                    Step::ResourceMetadata,
                    format!(
                        "authorization_servers entry {} is not an https URL without query or \
                         fragment (RFC 8414 §2)",
                        quote(server)
                    ),
                ));
            }
        }
    }

    // (c) The first authorization server's metadata.
    let issuer = &authorization_servers[0];
    // Named by the protected-resource metadata: derived.
    let candidates: Vec<(Url, Origin)> = authorization_server_metadata_urls(&issuers[0])
        .into_iter()
        .map(|url| (url, Origin::Derived))
        .collect();
    let (metadata_url, document) =
        first_document(outbound, tool, Step::ServerMetadata, &candidates)
            .await?
            .map_err(|status| DiscoveryError::NoServerMetadata {
                tool: tool.to_string(),
                tried: list(&candidates),
                status,
            })?;
    let authorization_server =
        server_metadata(issuer, metadata_url, &document).map_err(|rule| {
            DiscoveryError::Invalid {
                tool: tool.to_string(),
                step: Step::ServerMetadata,
                rule,
            }
        })?;
    Ok(McpDiscovery {
        resource,
        resource_metadata_url,
        challenge,
        scopes_supported: strings(&prm, "scopes_supported"),
        authorization_servers,
        authorization_server,
    })
}

/// Checks an authorization server's metadata document for `issuer`; the error is the rule.
fn server_metadata(
    issuer: &str,
    metadata_url: Url,
    document: &serde_json::Value,
) -> Result<AuthorizationServer, String> {
    // RFC 8414 §3.3: the document must be the issuer's own, identical to the identifier it
    // was fetched for, or its endpoints are someone else's (and RFC 9207's `iss` is compared
    // with the same string).
    let named = document.get("issuer").and_then(|v| v.as_str());
    match named {
        Some(named) if named == issuer => {}
        Some(named) => {
            return Err(format!(
                "issuer {} is not the authorization server {} whose metadata was requested \
                 (RFC 8414 §3.3)",
                quote(named),
                quote(issuer)
            ));
        }
        None => return Err("issuer is missing (RFC 8414 §3.3)".into()),
    }
    // The MCP specification: without S256 advertised, a client must refuse to proceed.
    let methods = strings(document, "code_challenge_methods_supported");
    if !methods.iter().any(|m| m == "S256") {
        return Err(
            "code_challenge_methods_supported does not list S256 (MCP authorization requires \
             PKCE with S256)"
                .into(),
        );
    }
    let endpoint = |field: &str| -> Result<Option<Url>, String> {
        match document.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => match value.as_str().map(Url::parse) {
                Some(Ok(url)) if url.scheme() == "https" => Ok(Some(url)),
                _ => Err(format!("{field} is not an https URL")),
            },
        }
    };
    let required =
        |field: &str| endpoint(field)?.ok_or_else(|| format!("{field} is missing (RFC 8414 §2)"));
    let flag = |field: &str| {
        document
            .get(field)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    Ok(AuthorizationServer {
        issuer: issuer.to_string(),
        metadata_url,
        authorization_endpoint: required("authorization_endpoint")?,
        token_endpoint: required("token_endpoint")?,
        registration_endpoint: endpoint("registration_endpoint")?,
        revocation_endpoint: endpoint("revocation_endpoint")?,
        code_challenge_methods_supported: methods,
        token_endpoint_auth_methods_supported: strings(
            document,
            "token_endpoint_auth_methods_supported",
        ),
        client_id_metadata_document_supported: flag("client_id_metadata_document_supported"),
        authorization_response_iss_parameter_supported: flag(
            "authorization_response_iss_parameter_supported",
        ),
        scopes_supported: strings(document, "scopes_supported"),
    })
}

/// Sends `request`; a transport failure or refusal is an error, any status is returned except a
/// redirect.
async fn fetch(
    outbound: &Outbound,
    tool: &str,
    step: Step,
    origin: Origin,
    request: reqwest::Request,
) -> Result<Fetched, DiscoveryError> {
    let fetched = outbound
        .send(origin, request, MAX_BODY_BYTES)
        .await
        .map_err(|source| DiscoveryError::Fetch {
            tool: tool.to_string(),
            step,
            source,
        })?;
    if fetched.status.is_redirection() {
        return Err(DiscoveryError::Redirected {
            tool: tool.to_string(),
            step,
            status: fetched.status.as_u16(),
        });
    }
    Ok(fetched)
}

/// GETs each candidate, as its origin, in order and returns the first 2xx JSON object;
/// `Err(status)` is the last status when none had one. A refusal, transport failure, redirect or
/// a 2xx that is not a JSON object stops the search: the server answered, wrongly.
async fn first_document(
    outbound: &Outbound,
    tool: &str,
    step: Step,
    candidates: &[(Url, Origin)],
) -> Result<Result<(Url, serde_json::Value), u16>, DiscoveryError> {
    let mut last = 0;
    for (url, origin) in candidates {
        let mut request = reqwest::Request::new(reqwest::Method::GET, url.clone());
        request.headers_mut().insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        let fetched = fetch(outbound, tool, step, *origin, request).await?;
        if !fetched.status.is_success() {
            tracing::debug!(tool, %url, status = fetched.status.as_u16(), "no document here");
            last = fetched.status.as_u16();
            continue;
        }
        return match serde_json::from_slice::<serde_json::Value>(&fetched.body) {
            Ok(json) if json.is_object() => Ok(Ok((url.clone(), json))),
            _ => Err(DiscoveryError::Invalid {
                tool: tool.to_string(),
                step,
                rule: format!("{url} did not answer with a JSON object"),
            }),
        };
    }
    Ok(Err(last))
}

/// The strings of an array field; anything else is empty.
fn strings(document: &serde_json::Value, field: &str) -> Vec<String> {
    document
        .get(field)
        .and_then(|v| v.as_array())
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A value from a response, fit for a message: escaped and at most 120 characters.
fn quote(value: &str) -> String {
    let short: String = value.chars().take(120).collect();
    let ellipsis = if short.len() < value.len() { "…" } else { "" };
    format!("{short:?}{ellipsis}")
}

/// The URLs tried, for a message: without their query, which may carry a key.
fn list(urls: &[(Url, Origin)]) -> String {
    urls.iter()
        .map(|(url, _)| {
            let mut shown = url.clone();
            shown.set_query(None);
            shown.to_string()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The canonical URI of an MCP server (MCP authorization, "Canonical Server URI"; RFC 8707 §2):
/// lowercase scheme and host and no default port (as [`Url`] parses them), no fragment, and no
/// trailing slash when the path is only `/`. A longer path is kept as written, trailing slash
/// included: whether it is significant is the server's to say, and its metadata's `resource`
/// must then spell it the same way.
pub fn canonical_resource(server: &Url) -> String {
    let mut url = server.clone();
    url.set_fragment(None);
    let text = url.to_string();
    if url.path() == "/" && url.query().is_none() {
        text.trim_end_matches('/').to_string()
    } else {
        text
    }
}

/// The protected-resource metadata URLs of `server` in the MCP specification's order (RFC 9728
/// §3.1): the well-known URI with the server's path appended (its query kept, a terminating
/// slash removed), then the one at the root. A server at the root has only the second.
pub fn protected_resource_metadata_urls(server: &Url) -> Vec<Url> {
    well_known(server, "oauth-protected-resource")
}

/// `/.well-known/<suffix>` inserted between host and path: the path-suffixed URL (when there is
/// a path or query) first, then the root one.
fn well_known(base: &Url, suffix: &str) -> Vec<Url> {
    let path = base.path().strip_suffix('/').unwrap_or(base.path());
    let mut root = base.clone();
    root.set_fragment(None);
    root.set_query(None);
    root.set_path(&format!("/.well-known/{suffix}"));
    let mut urls = Vec::new();
    if !path.is_empty() || base.query().is_some() {
        let mut inserted = root.clone();
        inserted.set_path(&format!("/.well-known/{suffix}{path}"));
        inserted.set_query(base.query());
        urls.push(inserted);
    }
    urls.push(root);
    urls
}

/// The metadata URLs of the authorization server `issuer` in the MCP specification's order.
/// With a path: OAuth metadata with path insertion, OpenID discovery with path insertion, then
/// OpenID discovery with the path appended (RFC 8414 §3.1 and §5). Without: the OAuth one, then
/// the OpenID one.
pub fn authorization_server_metadata_urls(issuer: &Url) -> Vec<Url> {
    let path = issuer.path().strip_suffix('/').unwrap_or(issuer.path());
    let at = |full_path: String| {
        let mut url = issuer.clone();
        url.set_fragment(None);
        url.set_query(None);
        url.set_path(&full_path);
        url
    };
    if path.is_empty() {
        vec![
            at("/.well-known/oauth-authorization-server".into()),
            at("/.well-known/openid-configuration".into()),
        ]
    } else {
        vec![
            at(format!("/.well-known/oauth-authorization-server{path}")),
            at(format!("/.well-known/openid-configuration{path}")),
            at(format!("{path}/.well-known/openid-configuration")),
        ]
    }
}

/// The first `Bearer` challenge of a `WWW-Authenticate` value (RFC 9110 §11.6.1): the scheme is
/// matched without case, parameter names too; values are tokens or quoted strings. Several
/// challenges may share the value. `None` when there is no `Bearer` challenge or the value is
/// malformed.
pub fn parse_www_authenticate(header: &str) -> Option<ResourceChallenge> {
    let challenges = challenges(header)?;
    let (_, params) = challenges
        .into_iter()
        .find(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))?;
    // RFC 9110: a parameter occurs once per challenge; should one repeat, the first counts.
    let get = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    };
    Some(ResourceChallenge {
        resource_metadata: get("resource_metadata"),
        scope: get("scope"),
        error: get("error"),
    })
}

type Challenge = (String, Vec<(String, String)>);

/// Every challenge of a `WWW-Authenticate` value with its parameters; `None` when malformed.
fn challenges(header: &str) -> Option<Vec<Challenge>> {
    let mut lexer = Lexer {
        bytes: header.as_bytes(),
        at: 0,
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        lexer.skip(|b| b == b',' || is_space(b));
        if lexer.done() {
            return Some(out);
        }
        let scheme = lexer.token()?;
        let mut params = Vec::new();
        let separated = lexer.skip(is_space);
        if separated && lexer.token68() {
            out.push((scheme, params));
            continue;
        }
        // Parameters, comma-separated, until something that is not `name = value`: the next
        // challenge's scheme, or the end.
        loop {
            let before = lexer.at;
            lexer.skip(|b| b == b',' || is_space(b));
            let Some(name) = lexer.token() else {
                lexer.at = before;
                break;
            };
            lexer.skip(is_space);
            if lexer.peek() != Some(b'=') {
                lexer.at = before;
                break;
            }
            lexer.at += 1;
            lexer.skip(is_space);
            let value = if lexer.peek() == Some(b'"') {
                lexer.quoted()?
            } else {
                lexer.token()?
            };
            params.push((name, value));
            lexer.skip(is_space);
            if !matches!(lexer.peek(), None | Some(b',')) {
                return None;
            }
        }
        out.push((scheme, params));
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

struct Lexer<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Lexer<'_> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Skips bytes matching `what`; whether any were skipped.
    fn skip(&mut self, what: impl Fn(u8) -> bool) -> bool {
        let start = self.at;
        while self.peek().is_some_and(&what) {
            self.at += 1;
        }
        self.at > start
    }

    fn token(&mut self) -> Option<String> {
        let start = self.at;
        self.skip(is_tchar);
        (self.at > start).then(|| String::from_utf8_lossy(&self.bytes[start..self.at]).into())
    }

    /// Consumes a `token68` (RFC 9110 §11.2) standing alone before a comma or the end; leaves
    /// the position unchanged otherwise (it is then a parameter list).
    fn token68(&mut self) -> bool {
        let start = self.at;
        self.skip(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        if self.at == start {
            return false;
        }
        self.skip(|b| b == b'=');
        self.skip(is_space);
        if matches!(self.peek(), None | Some(b',')) {
            return true;
        }
        self.at = start;
        false
    }

    /// A quoted string (RFC 9110 §5.6.4) with its escapes undone; `None` when unterminated.
    fn quoted(&mut self) -> Option<String> {
        self.at += 1;
        let mut value = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(String::from_utf8_lossy(&value).into());
                }
                b'\\' => {
                    self.at += 1;
                    value.push(self.peek()?);
                }
                b => value.push(b),
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).expect("the table holds URLs")
    }

    fn strs(urls: Vec<Url>) -> Vec<String> {
        urls.into_iter().map(String::from).collect()
    }

    #[test]
    fn bearer_challenges_are_parsed_from_every_spelling_the_grammar_allows() {
        let full = |rm: Option<&str>, scope: Option<&str>, error: Option<&str>| {
            Some(ResourceChallenge {
                resource_metadata: rm.map(str::to_string),
                scope: scope.map(str::to_string),
                error: error.map(str::to_string),
            })
        };
        let prm = "https://mcp.example.com/.well-known/oauth-protected-resource";
        let table: &[(&str, Option<ResourceChallenge>)] = &[
            (
                r#"Bearer resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource", scope="files:read""#,
                full(Some(prm), Some("files:read"), None),
            ),
            (
                "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource\",\t scope=\"files:read\"",
                full(Some(prm), Some("files:read"), None),
            ),
            (
                "bEaReR RESOURCE_METADATA=\"https://mcp.example.com/.well-known/oauth-protected-resource\"",
                full(Some(prm), None, None),
            ),
            (
                "Bearer error=invalid_token, scope=\"a b\"",
                full(None, Some("a b"), Some("invalid_token")),
            ),
            (
                "Bearer realm = \"x\" , error = \"insufficient_scope\"",
                full(None, None, Some("insufficient_scope")),
            ),
            ("Bearer", full(None, None, None)),
            (
                r#"Bearer scope="say \"hi\"\\""#,
                full(None, Some(r#"say "hi"\"#), None),
            ),
            (
                r#"Basic realm="x", Bearer resource_metadata="https://a.example/prm""#,
                full(Some("https://a.example/prm"), None, None),
            ),
            (
                r#"Negotiate dGVzdA==, Bearer error="invalid_token""#,
                full(None, None, Some("invalid_token")),
            ),
            (
                r#"Bearer scope="first", DPoP algs="ES256""#,
                full(None, Some("first"), None),
            ),
            (r#"Basic realm="x""#, None),
            ("", None),
            (r#"Bearer scope="unterminated"#, None),
            (r#"Bearer scope="a" junk"#, None),
        ];
        for (header, expected) in table {
            assert_eq!(&parse_www_authenticate(header), expected, "{header:?}");
        }
    }

    #[test]
    fn protected_resource_metadata_is_looked_for_at_the_path_then_the_root() {
        let root = "https://mcp.example.com/.well-known/oauth-protected-resource";
        let table: &[(&str, &[&str])] = &[
            (
                "https://mcp.example.com/public/mcp",
                &[
                    "https://mcp.example.com/.well-known/oauth-protected-resource/public/mcp",
                    root,
                ],
            ),
            (
                "https://mcp.example.com/mcp/",
                &[
                    "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
                    root,
                ],
            ),
            ("https://mcp.example.com", &[root]),
            ("https://mcp.example.com/", &[root]),
            ("https://MCP.Example.com:443/#frag", &[root]),
            (
                "https://mcp.example.com:8443/v1/sse?tenant=a",
                &[
                    "https://mcp.example.com:8443/.well-known/oauth-protected-resource/v1/sse?tenant=a",
                    "https://mcp.example.com:8443/.well-known/oauth-protected-resource",
                ],
            ),
        ];
        for (server, expected) in table {
            assert_eq!(
                strs(protected_resource_metadata_urls(&url(server))),
                *expected,
                "{server}"
            );
        }
    }

    #[test]
    fn authorization_server_metadata_is_looked_for_in_the_specifications_order() {
        let table: &[(&str, &[&str])] = &[
            (
                "https://auth.example.com/tenant1",
                &[
                    "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
                    "https://auth.example.com/.well-known/openid-configuration/tenant1",
                    "https://auth.example.com/tenant1/.well-known/openid-configuration",
                ],
            ),
            (
                "https://auth.example.com/realms/x/",
                &[
                    "https://auth.example.com/.well-known/oauth-authorization-server/realms/x",
                    "https://auth.example.com/.well-known/openid-configuration/realms/x",
                    "https://auth.example.com/realms/x/.well-known/openid-configuration",
                ],
            ),
            (
                "https://auth.example.com",
                &[
                    "https://auth.example.com/.well-known/oauth-authorization-server",
                    "https://auth.example.com/.well-known/openid-configuration",
                ],
            ),
            (
                "https://auth.example.com/",
                &[
                    "https://auth.example.com/.well-known/oauth-authorization-server",
                    "https://auth.example.com/.well-known/openid-configuration",
                ],
            ),
        ];
        for (issuer, expected) in table {
            assert_eq!(
                strs(authorization_server_metadata_urls(&url(issuer))),
                *expected,
                "{issuer}"
            );
        }
    }

    #[test]
    fn the_canonical_uri_has_lowercase_scheme_and_host_and_no_fragment_or_bare_slash() {
        let table = [
            ("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
            ("https://mcp.example.com", "https://mcp.example.com"),
            ("https://mcp.example.com/", "https://mcp.example.com"),
            ("HTTPS://MCP.Example.COM/Mcp", "https://mcp.example.com/Mcp"),
            ("https://mcp.example.com:443/", "https://mcp.example.com"),
            (
                "https://mcp.example.com:8443",
                "https://mcp.example.com:8443",
            ),
            (
                "https://mcp.example.com#fragment",
                "https://mcp.example.com",
            ),
            (
                "https://mcp.example.com/server/mcp#x",
                "https://mcp.example.com/server/mcp",
            ),
            (
                "https://mcp.example.com/mcp/",
                "https://mcp.example.com/mcp/",
            ),
            (
                "https://mcp.example.com/?t=1",
                "https://mcp.example.com/?t=1",
            ),
        ];
        for (server, expected) in table {
            assert_eq!(canonical_resource(&url(server)), expected, "{server}");
        }
    }

    fn document(extra: serde_json::Value) -> serde_json::Value {
        let mut base = serde_json::json!({
            "issuer": "https://auth.example.com/tenant1",
            "authorization_endpoint": "https://auth.example.com/authorize",
            "token_endpoint": "https://auth.example.com/token",
            "code_challenge_methods_supported": ["plain", "S256"],
        });
        for (key, value) in extra.as_object().expect("an object").clone() {
            base[key] = value;
        }
        base
    }

    #[test]
    fn authorization_server_metadata_is_refused_for_the_first_broken_rule() {
        let metadata_url =
            url("https://auth.example.com/.well-known/oauth-authorization-server/tenant1");
        let issuer = "https://auth.example.com/tenant1";
        let table = [
            (serde_json::json!({}), None),
            // RFC 8414 §3.3: identical, so not even a trailing slash differs.
            (
                serde_json::json!({"issuer": "https://auth.example.com/tenant1/"}),
                Some("RFC 8414 §3.3"),
            ),
            (
                serde_json::json!({"issuer": "https://auth.example.com/tenant2"}),
                Some("RFC 8414 §3.3"),
            ),
            (
                serde_json::json!({"issuer": null}),
                Some("issuer is missing"),
            ),
            (
                serde_json::json!({"code_challenge_methods_supported": ["plain"]}),
                Some("code_challenge_methods_supported"),
            ),
            (
                serde_json::json!({"code_challenge_methods_supported": null}),
                Some("code_challenge_methods_supported"),
            ),
            (
                serde_json::json!({"token_endpoint": null}),
                Some("token_endpoint is missing"),
            ),
            (
                serde_json::json!({"authorization_endpoint": "http://auth.example.com/a"}),
                Some("authorization_endpoint is not an https URL"),
            ),
            (
                serde_json::json!({"registration_endpoint": 7}),
                Some("registration_endpoint is not an https URL"),
            ),
        ];
        for (extra, refused) in table {
            let result = server_metadata(issuer, metadata_url.clone(), &document(extra.clone()));
            match (result, refused) {
                (Ok(_), None) => {}
                (Err(rule), Some(needle)) => assert!(rule.contains(needle), "{extra}: {rule}"),
                (other, _) => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn optional_authorization_server_fields_are_kept() {
        let found = server_metadata(
            "https://auth.example.com/tenant1",
            url("https://auth.example.com/.well-known/openid-configuration/tenant1"),
            &document(serde_json::json!({
                "registration_endpoint": "https://auth.example.com/register",
                "revocation_endpoint": "https://auth.example.com/revoke",
                "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
                "client_id_metadata_document_supported": true,
                "authorization_response_iss_parameter_supported": true,
                "scopes_supported": ["openid", "read"],
            })),
        )
        .expect("a valid document");
        assert_eq!(
            found.registration_endpoint.as_ref().map(Url::as_str),
            Some("https://auth.example.com/register")
        );
        assert_eq!(
            found.revocation_endpoint.as_ref().map(Url::as_str),
            Some("https://auth.example.com/revoke")
        );
        assert_eq!(
            found.token_endpoint_auth_methods_supported,
            ["none", "client_secret_basic"]
        );
        assert!(found.client_id_metadata_document_supported);
        assert!(found.authorization_response_iss_parameter_supported);
        assert_eq!(found.scopes_supported, ["openid", "read"]);
    }

    #[test]
    fn a_quoted_value_is_escaped_and_cut_short() {
        assert_eq!(quote("a\nb"), r#""a\nb""#);
        assert!(quote(&"x".repeat(500)).ends_with("\"…"));
    }
}
