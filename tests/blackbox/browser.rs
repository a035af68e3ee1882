//! A headless browser for OAuth consent flows, and the tests that prove it against the real
//! provider. It does what a user's browser does between the vault's authorization URL and the
//! vault's callback: follows the provider's redirects, fills in and posts the login form, posts
//! the consent (or deny) form, and keeps cookies throughout. The provider's pages are our own
//! (tests/oidc/provider.mjs), so a few lines of string handling parse them.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use url::{Origin, Url};

use crate::provider::{OidcProvider, TestPki};

/// Enough redirects and form posts for login + consent (about eight) with room to spare; more
/// means the provider is looping.
const MAX_STEPS: usize = 20;

/// A cookie-keeping HTTP client that never follows redirects by itself and trusts the test CA.
pub struct Browser {
    http: reqwest::Client,
    jar: Mutex<Vec<Cookie>>,
}

/// A cookie as a browser keeps it: host-only (oidc-provider sets no `Domain`), and like a browser
/// it ignores the port, so provider cookies also go to a vault on another 127.0.0.1 port.
#[derive(Debug)]
struct Cookie {
    host: String,
    path: String,
    name: String,
    value: String,
    secure: bool,
}

/// Which button the user presses on the consent page.
#[derive(Clone, Copy)]
enum Decision {
    Allow,
    Deny,
}

impl Decision {
    /// The last path segment of the form's action (see provider.mjs).
    fn action(self) -> &'static str {
        match self {
            Decision::Allow => "confirm",
            Decision::Deny => "abort",
        }
    }
}

/// Where following a chain of same-origin redirects ended.
enum Landing {
    /// A `200` page from the provider.
    Page { url: Url, body: String },
    /// A redirect out of the provider's origin, not followed.
    Left(Url),
}

/// A response, with its `Location` resolved against the request URL.
struct Response {
    status: u16,
    location: Option<Url>,
    raw_location: Option<String>,
    body: String,
}

/// A `<form method="post">` on a page: where it posts and its named inputs.
#[derive(Debug)]
struct Form {
    action: Url,
    fields: Vec<(String, String)>,
}

impl Browser {
    pub fn new(pki: &TestPki) -> Self {
        let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())
            .expect("the test CA is valid PEM");
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("a client with only a CA and a timeout builds");
        Self {
            http,
            jar: Mutex::new(Vec::new()),
        }
    }

    /// Logs in as `user` (unless this browser already has a session) and approves the consent
    /// page. Returns the redirect out of the provider, normally the client's redirect URI with
    /// `code`, `state` and `iss`, without fetching it.
    pub async fn consent(&self, authorization_url: &str, user: &str) -> Result<Url, String> {
        self.authorize(authorization_url, user, Decision::Allow)
            .await
    }

    /// Like [`consent`](Self::consent) but presses Deny; the returned redirect carries
    /// `error=access_denied` and the `state`.
    pub async fn deny(&self, authorization_url: &str, user: &str) -> Result<Url, String> {
        self.authorize(authorization_url, user, Decision::Deny)
            .await
    }

    /// One GET with this browser's cookies, redirects not followed: the status, the raw
    /// `Location` header, and the body. Panics if the request cannot be made at all.
    pub async fn visit(&self, url: &Url) -> (u16, Option<String>, String) {
        let response = self.send(url, None).await.unwrap_or_else(|e| panic!("{e}"));
        (response.status, response.raw_location, response.body)
    }

    async fn authorize(
        &self,
        authorization_url: &str,
        user: &str,
        decision: Decision,
    ) -> Result<Url, String> {
        let start = Url::parse(authorization_url)
            .map_err(|e| format!("authorization URL {authorization_url:?}: {e}"))?;
        let provider = start.origin();
        let mut landing = self.follow(&provider, start, None).await?;
        let mut logged_in = false;
        let mut decided = false;
        for _ in 0..MAX_STEPS {
            let (url, body) = match landing {
                Landing::Left(out) if decided => return Ok(out),
                Landing::Left(out) => {
                    return Err(format!(
                        "the provider redirected out to {out} before the consent page"
                    ));
                }
                Landing::Page { url, body } => (url, body),
            };
            if decided {
                return Err(format!(
                    "a page at {url} after the consent decision: {body}"
                ));
            }
            let forms = post_forms(&body, &url)?;
            let (form, fields) = if let Some(login) = find_form(&forms, "login") {
                if logged_in {
                    return Err(format!("the login page again at {url}: {body}"));
                }
                logged_in = true;
                let mut fields = login.fields.clone();
                fields.retain(|(name, _)| name != "login");
                fields.push(("login".into(), user.into()));
                (login, fields)
            } else if let Some(choice) = find_form(&forms, decision.action()) {
                // Login was skipped because this browser already has a session: make sure it is
                // `user`'s, or the caller would get someone else's grant.
                if !logged_in {
                    let account = element_text(&body, "account");
                    if account.as_deref() != Some(user) {
                        return Err(format!(
                            "consent page at {url} is for {account:?}, not {user:?}"
                        ));
                    }
                }
                decided = true;
                (choice, choice.fields.clone())
            } else {
                return Err(format!(
                    "no login or {} form on the page at {url}: {body}",
                    decision.action()
                ));
            };
            landing = self
                .follow(&provider, form.action.clone(), Some(fields))
                .await?;
        }
        Err(format!(
            "no redirect out of the provider after {MAX_STEPS} steps"
        ))
    }

    /// Sends `url` (a POST of `form` if given, else a GET), then GETs redirect after redirect
    /// while they stay on `provider`'s origin, until a `200` page or a redirect elsewhere.
    async fn follow(
        &self,
        provider: &Origin,
        mut url: Url,
        mut form: Option<Vec<(String, String)>>,
    ) -> Result<Landing, String> {
        for _ in 0..MAX_STEPS {
            let method = if form.is_some() { "POST" } else { "GET" };
            let response = self.send(&url, form.take()).await?;
            match (response.status, response.location) {
                (200, _) => {
                    return Ok(Landing::Page {
                        url,
                        body: response.body,
                    });
                }
                (301..=303, Some(next)) if next.origin() == *provider => url = next,
                (301..=303, Some(next)) => return Ok(Landing::Left(next)),
                (status, _) => {
                    return Err(format!(
                        "{method} {url}: unexpected HTTP {status}: {}",
                        response.body
                    ));
                }
            }
        }
        Err(format!("more than {MAX_STEPS} redirects from {url}"))
    }

    async fn send(
        &self,
        url: &Url,
        form: Option<Vec<(String, String)>>,
    ) -> Result<Response, String> {
        let method = if form.is_some() { "POST" } else { "GET" };
        let mut request = match form {
            Some(fields) => self
                .http
                .post(url.clone())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(fields)
                        .finish(),
                ),
            None => self.http.get(url.clone()),
        };
        if let Some(cookies) = self.cookie_header(url) {
            request = request.header("cookie", cookies);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        self.store_cookies(url, response.headers());
        let status = response.status().as_u16();
        let raw_location = response
            .headers()
            .get("location")
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let location = match &raw_location {
            Some(raw) => Some(
                url.join(raw)
                    .map_err(|e| format!("{method} {url}: bad Location {raw:?}: {e}"))?,
            ),
            None => None,
        };
        let body = response
            .text()
            .await
            .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
        Ok(Response {
            status,
            location,
            raw_location,
            body,
        })
    }

    fn store_cookies(&self, url: &Url, headers: &reqwest::header::HeaderMap) {
        let host = url.host_str().unwrap_or_default();
        let mut jar = self
            .jar
            .lock()
            .expect("no test panics while holding the jar");
        for header in headers.get_all("set-cookie") {
            let Ok(header) = header.to_str() else {
                continue;
            };
            let mut parts = header.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|pair| pair.split_once('=')) else {
                continue;
            };
            // RFC 6265 5.1.4: without a Path, the directory of the request path.
            let mut path = match url.path().rfind('/') {
                Some(0) | None => "/".to_string(),
                Some(slash) => url.path()[..slash].to_string(),
            };
            let mut secure = false;
            // The `cookies` package behind oidc-provider deletes a cookie by setting it empty
            // with an expiry in 1970; Max-Age=0 is the other common way.
            let mut expired = value.is_empty();
            for attribute in parts {
                let (key, attribute_value) = attribute.split_once('=').unwrap_or((attribute, ""));
                match key.to_ascii_lowercase().as_str() {
                    "path" if attribute_value.starts_with('/') => path = attribute_value.into(),
                    "secure" => secure = true,
                    "max-age" => expired |= attribute_value.parse::<i64>().is_ok_and(|s| s <= 0),
                    _ => {}
                }
            }
            jar.retain(|c| !(c.host == host && c.path == path && c.name == name));
            if !expired {
                jar.push(Cookie {
                    host: host.into(),
                    path,
                    name: name.into(),
                    value: value.into(),
                    secure,
                });
            }
        }
    }

    fn cookie_header(&self, url: &Url) -> Option<String> {
        let host = url.host_str().unwrap_or_default();
        let jar = self
            .jar
            .lock()
            .expect("no test panics while holding the jar");
        let mut matching: Vec<&Cookie> = jar
            .iter()
            .filter(|c| c.host == host && (!c.secure || url.scheme() == "https"))
            .filter(|c| path_matches(url.path(), &c.path))
            .collect();
        // RFC 6265 5.4: longer paths first.
        matching.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
        let header = matching
            .iter()
            .map(|c| format!("{}={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join("; ");
        (!header.is_empty()).then_some(header)
    }
}

/// RFC 6265 5.1.4 path-match.
fn path_matches(request_path: &str, cookie_path: &str) -> bool {
    request_path == cookie_path
        || (request_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || request_path[cookie_path.len()..].starts_with('/')))
}

/// The form whose action's last path segment is `step` (`login`, `confirm`, `abort`).
fn find_form<'a>(forms: &'a [Form], step: &str) -> Option<&'a Form> {
    forms
        .iter()
        .find(|form| form.action.path_segments().and_then(|mut s| s.next_back()) == Some(step))
}

/// The `<form method="post">` elements of `html`, actions resolved against `page`.
fn post_forms(html: &str, page: &Url) -> Result<Vec<Form>, String> {
    let mut forms = Vec::new();
    for chunk in html.split("<form").skip(1) {
        let Some(tag_end) = chunk.find('>') else {
            return Err(format!("unterminated <form> tag on {page}"));
        };
        let tag = &chunk[..tag_end];
        let inner = chunk[tag_end..].split("</form>").next().unwrap_or_default();
        if !attribute(tag, "method").is_some_and(|m| m.eq_ignore_ascii_case("post")) {
            continue;
        }
        let action = attribute(tag, "action").unwrap_or_default();
        let action = page
            .join(&action)
            .map_err(|e| format!("form action {action:?} on {page}: {e}"))?;
        let fields = inner
            .split("<input")
            .skip(1)
            .filter_map(|input| {
                let tag = &input[..input.find('>')?];
                Some((
                    attribute(tag, "name")?,
                    attribute(tag, "value").unwrap_or_default(),
                ))
            })
            .collect();
        forms.push(Form { action, fields });
    }
    Ok(forms)
}

/// The unescaped value of `name="..."` in a tag's attribute text.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let length = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + length]))
}

/// The unescaped text of the element with `id="id"`, if it has no child elements.
fn element_text(html: &str, id: &str) -> Option<String> {
    let needle = format!(" id=\"{id}\">");
    let start = html.find(&needle)? + needle.len();
    let length = html[start..].find('<')?;
    Some(unescape(&html[start..start + length]))
}

/// Undoes provider.mjs's `escapeHtml` (numeric references) and the usual named ones.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').and_then(|semi| {
            let c = match &rest[1..semi] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                entity => char::from_u32(entity.strip_prefix('#')?.parse().ok()?)?,
            };
            Some((c, semi + 1))
        });
        match decoded {
            Some((c, consumed)) => {
                out.push(c);
                rest = &rest[consumed..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Never contacted: `consent` and `deny` return the redirect to it without following it.
const CALLBACK: &str = "http://127.0.0.1:9/api/v1/auth/tool/callback";

/// A provider that accepts [`CALLBACK`], and a browser trusting it.
struct World {
    _pki: TestPki,
    _dir: tempfile::TempDir,
    provider: OidcProvider,
    browser: Browser,
}

impl World {
    fn new() -> Self {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let provider = OidcProvider::start_with(&pki, dir.path(), 0, 3600, &[CALLBACK]);
        let browser = Browser::new(&pki);
        Self {
            _pki: pki,
            _dir: dir,
            provider,
            browser,
        }
    }

    /// An authorization request as the vault makes it, and its PKCE verifier and state.
    fn authorization_url(&self) -> (String, String, String) {
        let verifier = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let challenge =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&verifier));
        let state = uuid::Uuid::new_v4().simple().to_string();
        let mut url = Url::parse(&self.provider.ready.authorization_endpoint).unwrap();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.provider.ready.client_id)
            .append_pair("redirect_uri", CALLBACK)
            .append_pair("scope", "openid offline_access read:jira-work")
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("prompt", "consent");
        (url.into(), verifier, state)
    }
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn without_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.into()
}

#[tokio::test]
async fn a_browser_consents_at_the_provider_and_the_code_redeems_for_an_active_token() {
    let w = World::new();
    let (authorization_url, verifier, state) = w.authorization_url();

    let callback = w.browser.consent(&authorization_url, "bob").await.unwrap();

    assert_eq!(without_query(&callback), CALLBACK);
    assert_eq!(param(&callback, "state"), Some(state));
    assert_eq!(
        param(&callback, "iss"),
        Some(w.provider.ready.issuer.clone())
    );
    let code = param(&callback, "code").expect("a code");
    let (status, token) = w.provider.exchange_code(&code, CALLBACK, &verifier).await;
    assert_eq!(status, 200, "{token}");
    assert!(
        token["refresh_token"].is_string(),
        "offline_access granted: {token}"
    );
    let introspection = w
        .provider
        .introspect(token["access_token"].as_str().unwrap())
        .await;
    assert_eq!(introspection["active"], true, "{introspection}");
    assert_eq!(introspection["sub"], "bob", "{introspection}");
    let scopes: Vec<&str> = introspection["scope"]
        .as_str()
        .unwrap()
        .split(' ')
        .collect();
    assert!(scopes.contains(&"read:jira-work"), "{introspection}");
}

#[tokio::test]
async fn a_second_consent_in_the_same_browser_reuses_the_session_but_not_for_another_user() {
    let w = World::new();
    let (first, _, _) = w.authorization_url();
    w.browser.consent(&first, "alice").await.unwrap();

    let (second, _, state) = w.authorization_url();
    let callback = w.browser.consent(&second, "alice").await.unwrap();
    assert_eq!(param(&callback, "state"), Some(state));
    assert!(param(&callback, "code").is_some(), "{callback}");

    let (third, _, _) = w.authorization_url();
    let error = w.browser.consent(&third, "bob").await.unwrap_err();
    assert!(error.contains("not \"bob\""), "{error}");
}

#[tokio::test]
async fn a_browser_that_denies_gets_access_denied_with_the_state() {
    let w = World::new();
    let (authorization_url, _, state) = w.authorization_url();

    let callback = w.browser.deny(&authorization_url, "alice").await.unwrap();

    assert_eq!(without_query(&callback), CALLBACK);
    assert_eq!(param(&callback, "error").as_deref(), Some("access_denied"));
    assert_eq!(param(&callback, "state"), Some(state));
    assert_eq!(
        param(&callback, "iss"),
        Some(w.provider.ready.issuer.clone())
    );
    assert_eq!(param(&callback, "code"), None);
}

#[tokio::test]
async fn a_visit_returns_the_redirect_without_following_it() {
    let w = World::new();
    let (authorization_url, _, _) = w.authorization_url();

    let (status, location, _) = w
        .browser
        .visit(&Url::parse(&authorization_url).unwrap())
        .await;

    assert_eq!(status, 303);
    let location = location.expect("a Location");
    assert!(location.starts_with("/interaction/"), "{location}");
}

#[tokio::test]
async fn an_authorization_url_the_provider_refuses_is_a_descriptive_error() {
    let w = World::new();
    let (authorization_url, _, _) = w.authorization_url();
    let unregistered = authorization_url.replace("127.0.0.1%3A9", "127.0.0.1%3A10");
    assert_ne!(unregistered, authorization_url);

    let error = w.browser.consent(&unregistered, "alice").await.unwrap_err();

    assert!(error.contains("unexpected HTTP 400"), "{error}");
    assert!(error.contains("redirect_uri"), "{error}");
}

#[test]
fn forms_and_escaped_attributes_parse() {
    let page = Url::parse("https://127.0.0.1:1/interaction/abc").unwrap();
    let html = r#"<form method="post" action="/interaction/abc/login">
  <input type="text" name="login" value="&#34;&gt;&#60;x&amp;" autofocus>
  <button type="submit">Sign in</button></form>
<form method="get" action="/elsewhere"></form>
<p><b id="account">a&#38;b</b></p>"#;
    let forms = post_forms(html, &page).unwrap();
    assert_eq!(forms.len(), 1);
    assert_eq!(
        forms[0].action.as_str(),
        "https://127.0.0.1:1/interaction/abc/login"
    );
    assert_eq!(
        forms[0].fields,
        vec![("login".to_string(), "\"><x&".to_string())]
    );
    assert_eq!(element_text(html, "account").as_deref(), Some("a&b"));
    assert!(find_form(&forms, "login").is_some());
    assert!(find_form(&forms, "confirm").is_none());
}

#[test]
fn cookie_paths_match_like_a_browser() {
    assert!(path_matches("/interaction/abc", "/interaction/abc"));
    assert!(path_matches("/interaction/abc/login", "/interaction/abc"));
    assert!(!path_matches("/interaction/abcd", "/interaction/abc"));
    assert!(path_matches("/anything", "/"));
}
