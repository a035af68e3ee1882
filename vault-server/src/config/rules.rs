//! What each setting must satisfy beyond its type: the rules that relate settings to each
//! other (exactly one root key source, one key set per issuer, TLS files in pairs) and those on a
//! value's content (a database URL's scheme, a JWKS URL's host). Each rule is a function from
//! [`Config`] to the piece of [`super::Settings`] it guards, so validation and the settings the
//! server uses cannot disagree.

use std::path::PathBuf;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::settings::{
    CallbackSettings, Database, JwksSource, PinSetting, Pkcs11Location, RootKeySetting,
    TlsSettings, TrustedIssuer,
};
use super::{Config, ConfigError};
use crate::ids::IssuerId;

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Config {
    pub(super) fn database(&self) -> Result<Database, ConfigError> {
        let Some(url) = &self.vault_database_url else {
            return Ok(Database::SqliteFile(self.vault_data_dir.join("vault.db")));
        };
        let text = url.expose_secret();
        if is_postgres(text) {
            return Ok(Database::Postgres(url.clone()));
        }
        if text == "sqlite::memory:" {
            return Ok(Database::SqliteMemory);
        }
        let problem = |p: &str| Err(ConfigError::new("VAULT_DATABASE_URL", p));
        match text
            .strip_prefix("sqlite:")
            .map(|p| p.trim_start_matches("//"))
        {
            Some("") => problem("sqlite:// needs a file path"),
            Some(path) => Ok(Database::SqliteFile(PathBuf::from(path))),
            None => problem(
                "must be postgres://…, sqlite://PATH or sqlite::memory: (unset: the embedded file in VAULT_DATA_DIR)",
            ),
        }
    }

    /// The warning a PostgreSQL URL earns, or the refusal when TLS is required.
    pub(super) fn transport_warning(&self) -> Result<Option<String>, ConfigError> {
        let risk = match self.database() {
            Ok(Database::Postgres(url)) => database_transport_risk(url.expose_secret()),
            _ => None,
        };
        match risk {
            Some(risk) if self.vault_database_require_tls => {
                Err(ConfigError::new("VAULT_DATABASE_REQUIRE_TLS", risk))
            }
            risk => Ok(risk),
        }
    }

    pub(super) fn migrate_url(&self) -> Result<Option<SecretString>, ConfigError> {
        let Some(url) = &self.vault_database_migrate_url else {
            return Ok(None);
        };
        let problem = |p: &str| Err(ConfigError::new("VAULT_DATABASE_MIGRATE_URL", p));
        if !is_postgres(url.expose_secret()) {
            return problem("must be a postgres:// URL (the owner role)");
        }
        if !matches!(self.database(), Ok(Database::Postgres(_))) {
            return problem("is only for a postgres:// VAULT_DATABASE_URL");
        }
        Ok(Some(url.clone()))
    }

    pub(super) fn serving_role(&self) -> Result<Option<String>, ConfigError> {
        match &self.vault_database_serving_role {
            Some(role)
                if role.len() > 63
                    || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                Err(ConfigError::new(
                    "VAULT_DATABASE_SERVING_ROLE",
                    "must be a plain role name: letters, digits and _, at most 63",
                ))
            }
            role => Ok(role.clone()),
        }
    }

    pub(super) fn root_key(&self) -> Result<RootKeySetting, ConfigError> {
        let key = &self.vault_root_key;
        let file = &self.vault_root_key_file;
        let phrase = &self.vault_root_passphrase;
        let pkcs11 = &self.vault_root_pkcs11_module;
        let kinds = [
            key.is_some(),
            file.is_some(),
            phrase.is_some(),
            pkcs11.is_some(),
        ];
        if kinds.iter().filter(|set| **set).count() > 1 {
            return Err(ConfigError::new(
                "VAULT_ROOT_KEY",
                "set only one of VAULT_ROOT_KEY, VAULT_ROOT_KEY_FILE, VAULT_ROOT_PASSPHRASE, VAULT_ROOT_PKCS11_MODULE",
            ));
        }
        if pkcs11.is_none() {
            self.pkcs11_settings_unused()?;
        }
        if let Some(key) = key {
            decode_root_key(key.expose_secret())
                .map_err(|p| ConfigError::new("VAULT_ROOT_KEY", p))?;
            return Ok(RootKeySetting::Key(key.clone()));
        }
        if let Some(file) = file {
            return Ok(RootKeySetting::File(file.clone()));
        }
        if let Some(phrase) = phrase {
            if phrase.expose_secret().len() < 16 {
                return Err(ConfigError::new(
                    "VAULT_ROOT_PASSPHRASE",
                    "must be at least 16 characters",
                ));
            }
            return Ok(RootKeySetting::Passphrase(phrase.clone()));
        }
        if let Some(module) = pkcs11 {
            return self.pkcs11_location(module).map(RootKeySetting::Pkcs11);
        }
        Err(ConfigError::new(
            "VAULT_ROOT_KEY",
            "no root key: set one of VAULT_ROOT_KEY, VAULT_ROOT_KEY_FILE, VAULT_ROOT_PASSPHRASE, VAULT_ROOT_PKCS11_MODULE (`vault-server keygen` makes a key file)",
        ))
    }

    /// The rest of `VAULT_ROOT_PKCS11_*`, once the module is set.
    fn pkcs11_location(&self, module: &std::path::Path) -> Result<Pkcs11Location, ConfigError> {
        let token_label = match self.vault_root_pkcs11_token_label.as_deref() {
            Some(label) if !label.is_empty() => label.to_owned(),
            _ => {
                return Err(ConfigError::new(
                    "VAULT_ROOT_PKCS11_TOKEN_LABEL",
                    "required with VAULT_ROOT_PKCS11_MODULE: the label of the token holding the root key",
                ));
            }
        };
        if self.vault_root_pkcs11_key_label.is_empty() {
            return Err(ConfigError::new(
                "VAULT_ROOT_PKCS11_KEY_LABEL",
                "must not be empty",
            ));
        }
        let pin = match (
            &self.vault_root_pkcs11_pin,
            &self.vault_root_pkcs11_pin_file,
        ) {
            (Some(pin), None) => PinSetting::Pin(pin.clone()),
            (None, Some(file)) => PinSetting::File(file.clone()),
            (None, None) => {
                return Err(ConfigError::new(
                    "VAULT_ROOT_PKCS11_PIN",
                    "required with VAULT_ROOT_PKCS11_MODULE: set VAULT_ROOT_PKCS11_PIN or VAULT_ROOT_PKCS11_PIN_FILE",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "VAULT_ROOT_PKCS11_PIN",
                    "set only one of VAULT_ROOT_PKCS11_PIN, VAULT_ROOT_PKCS11_PIN_FILE",
                ));
            }
        };
        Ok(Pkcs11Location {
            module: module.to_owned(),
            token_label,
            key_label: self.vault_root_pkcs11_key_label.clone(),
            pin,
        })
    }

    /// A PKCS#11 setting without `VAULT_ROOT_PKCS11_MODULE` would be silently ignored.
    fn pkcs11_settings_unused(&self) -> Result<(), ConfigError> {
        let stray = [
            (
                "VAULT_ROOT_PKCS11_TOKEN_LABEL",
                self.vault_root_pkcs11_token_label.is_some(),
            ),
            (
                "VAULT_ROOT_PKCS11_PIN",
                self.vault_root_pkcs11_pin.is_some(),
            ),
            (
                "VAULT_ROOT_PKCS11_PIN_FILE",
                self.vault_root_pkcs11_pin_file.is_some(),
            ),
        ];
        match stray.into_iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(ConfigError {
                name: name.to_owned(),
                problem: "has no effect without VAULT_ROOT_PKCS11_MODULE".to_owned(),
            }),
            None => Ok(()),
        }
    }

    pub(super) fn issuers(&self) -> Result<Vec<TrustedIssuer>, ConfigError> {
        let names = &self.vault_jwt_issuer.0;
        if names.is_empty() {
            return Err(ConfigError::new(
                "VAULT_JWT_ISSUER",
                "is not set (comma-separated allowed issuers)",
            ));
        }
        let (files, urls) = (&self.vault_jwt_jwks_file.0, &self.vault_jwt_jwks_url.0);
        let jwks: Vec<JwksSource> = match (files.is_empty(), urls.is_empty()) {
            (false, true) => files.iter().map(|f| JwksSource::File(f.into())).collect(),
            (true, false) => urls
                .iter()
                .map(|u| check_jwks_url(u).map(JwksSource::Url))
                .collect::<Result<_, _>>()
                .map_err(|why| ConfigError::new("VAULT_JWT_JWKS_URL", why))?,
            (true, true) => {
                return Err(ConfigError::new(
                    "VAULT_JWT_JWKS_FILE",
                    "is not set: set VAULT_JWT_JWKS_FILE or VAULT_JWT_JWKS_URL",
                ));
            }
            (false, false) => {
                return Err(ConfigError::new(
                    "VAULT_JWT_JWKS_FILE",
                    "set only one of VAULT_JWT_JWKS_FILE, VAULT_JWT_JWKS_URL",
                ));
            }
        };
        let problem = |p: String| ConfigError::new("VAULT_JWT_ISSUER", p);
        if jwks.len() != names.len() {
            // One key set shared by several issuers would let each sign for the others.
            return Err(problem(format!(
                "names {} issuers but {} key sets are configured; give each issuer its own JWKS, comma-separated in the same order",
                names.len(),
                jwks.len()
            )));
        }
        let mut issuers: Vec<TrustedIssuer> = Vec::with_capacity(names.len());
        for (name, jwks) in names.iter().zip(jwks) {
            let issuer =
                IssuerId::parse(name.as_str()).map_err(|e| problem(format!("an issuer {e}")))?;
            if issuers.iter().any(|t| t.issuer == issuer) {
                return Err(problem(format!("{issuer} is named twice")));
            }
            issuers.push(TrustedIssuer { issuer, jwks });
        }
        Ok(issuers)
    }

    pub(super) fn store_scope(&self) -> Result<String, ConfigError> {
        let scope = self.vault_store_scope.trim();
        if scope.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "VAULT_STORE_SCOPE",
                "must be one scope name, without spaces",
            ));
        }
        Ok(scope.to_string())
    }

    pub(super) fn store_refresh_tokens(&self) -> Result<bool, ConfigError> {
        match self.vault_store_refresh_tokens.trim() {
            "allow" => Ok(true),
            "deny" => Ok(false),
            other => Err(ConfigError::new(
                "VAULT_STORE_REFRESH_TOKENS",
                format!(
                    "must be allow or deny, got {:?}",
                    super::value::truncate(other)
                ),
            )),
        }
    }

    pub(super) fn audit_releases(&self) -> Result<bool, ConfigError> {
        match self.vault_audit_releases.trim() {
            "on" => Ok(true),
            "off" => Ok(false),
            other => Err(ConfigError::new(
                "VAULT_AUDIT_RELEASES",
                format!("must be on or off, got {:?}", super::value::truncate(other)),
            )),
        }
    }

    pub(super) fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let ca = &self.vault_tls_client_ca_file;
        match (&self.vault_tls_cert_file, &self.vault_tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(TlsSettings {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: ca.clone(),
            })),
            (None, None) if ca.is_some() => Err(ConfigError::new(
                "VAULT_TLS_CLIENT_CA_FILE",
                "needs VAULT_TLS_CERT_FILE and VAULT_TLS_KEY_FILE",
            )),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::new(
                "VAULT_TLS_KEY_FILE",
                "is needed with VAULT_TLS_CERT_FILE",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "VAULT_TLS_CERT_FILE",
                "is needed with VAULT_TLS_KEY_FILE",
            )),
        }
    }

    /// gRPC in clear is only for a loopback address, unless explicitly allowed.
    pub(super) fn plaintext_problem(&self) -> Option<ConfigError> {
        let listen = self.vault_listen;
        let plaintext = matches!(self.tls(), Ok(None));
        (plaintext && !listen.ip().is_loopback() && !self.vault_allow_plaintext).then(|| {
            ConfigError::new(
                "VAULT_LISTEN",
                format!(
                    "{listen} is reachable from the network but no TLS is configured (VAULT_TLS_CERT_FILE, VAULT_TLS_KEY_FILE); caller tokens and access tokens would cross it in clear. Set VAULT_ALLOW_PLAINTEXT=true only behind a sidecar that terminates mTLS"
                ),
            )
        })
    }
}

impl Config {
    /// `VAULT_EGRESS_ALLOW_CIDRS`, each CIDR parsed.
    pub(super) fn egress(&self) -> Result<crate::egress::EgressPolicy, ConfigError> {
        crate::egress::EgressPolicy::parse(&self.vault_egress_allow_cidrs.0.join(","))
            .map_err(|p| ConfigError::new("VAULT_EGRESS_ALLOW_CIDRS", p))?
            .with_hosts(&self.vault_egress_hosts.0.join(","))
            .map_err(|p| ConfigError::new("VAULT_EGRESS_HOSTS", p))
    }

    /// The consent flow's settings, each URL checked.
    pub(super) fn callback(&self) -> Result<CallbackSettings, ConfigError> {
        let redirect_uri = self
            .oauth_tool_redirect_uri
            .as_deref()
            .map(|text| {
                check_web_url(text).map_err(|p| ConfigError::new("OAUTH_TOOL_REDIRECT_URI", p))
            })
            .transpose()?;
        let return_urls = self
            .vault_oauth_return_urls
            .0
            .iter()
            .map(|text| {
                check_web_url(text).map_err(|p| {
                    ConfigError::new(
                        "VAULT_OAUTH_RETURN_URLS",
                        format!("{:?} {p}", super::value::truncate(text)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unbound = match self.vault_oauth_unbound_callback.trim() {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(ConfigError::new(
                    "VAULT_OAUTH_UNBOUND_CALLBACK",
                    format!(
                        "must be deny or allow, got {:?}",
                        super::value::truncate(other)
                    ),
                ));
            }
        };
        if let Some(listen) = self.vault_callback_listen {
            let plaintext = matches!(self.tls(), Ok(None));
            if plaintext && !listen.ip().is_loopback() && !self.vault_allow_plaintext {
                return Err(ConfigError::new(
                    "VAULT_CALLBACK_LISTEN",
                    format!(
                        "{listen} is reachable from the network but no TLS is configured (VAULT_TLS_CERT_FILE, VAULT_TLS_KEY_FILE); authorization codes would cross it in clear. Set VAULT_ALLOW_PLAINTEXT=true only behind a proxy that terminates TLS"
                    ),
                ));
            }
        }
        Ok(CallbackSettings {
            listen: self.vault_callback_listen,
            redirect_uri,
            return_urls,
            unbound,
            flow_ttl: std::time::Duration::from_secs(self.vault_oauth_flow_ttl_seconds),
        })
    }
}

/// A URL a browser is sent to: `https://`, or `http://` to a loopback host; no user info, no
/// fragment.
pub fn check_web_url(text: &str) -> Result<url::Url, &'static str> {
    let url = check_jwks_url(text)?;
    if url.fragment().is_some() {
        return Err("must not contain a fragment");
    }
    Ok(url)
}

/// The 32 key bytes that root key text (base64) stands for, or why it stands for none.
pub fn decode_root_key(text: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "must be base64 of 32 bytes".to_string())?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("must be 32 bytes, got {}", bytes.len()))?;
    Ok(Zeroizing::new(key))
}

/// Whether a JWKS URL may be used: `https://`, or `http://` to a loopback host only, never with
/// user info (which hides the real host: `http://localhost@evil.example/`). Checked on the
/// parsed URL, not its spelling.
pub fn check_jwks_url(text: &str) -> Result<url::Url, &'static str> {
    let url = url::Url::parse(text.trim()).map_err(|_| "is not a URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("has no host"),
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err("must be https:// (plain http only for a loopback host)"),
    }
}

/// Why a PostgreSQL URL may reach a non-local server without a verified TLS connection, or
/// `None` when it cannot: the host is local (loopback or a Unix socket), or `sslmode` is
/// `verify-full` or `verify-ca`. `prefer` and `require` encrypt without checking who answers.
pub fn database_transport_risk(url: &str) -> Option<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Some("VAULT_DATABASE_URL could not be checked for TLS".into());
    };
    let query = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let sslmode = query("sslmode").unwrap_or_else(|| "prefer".into());
    if matches!(sslmode.as_str(), "verify-full" | "verify-ca") {
        return None;
    }
    // A `host` parameter overrides the authority (and may be a socket directory).
    let local = match query("host") {
        Some(host) => host.starts_with('/') || is_local_host(&host),
        None => match parsed.host() {
            None => true,
            Some(url::Host::Domain(name)) => is_local_host(name),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        },
    };
    (!local).then(|| {
        format!(
            "VAULT_DATABASE_URL reaches a non-local PostgreSQL with sslmode={sslmode}: the connection is not verified against a CA, so a network attacker can read or change credential rows in transit; use sslmode=verify-full (and set VAULT_DATABASE_REQUIRE_TLS=true to refuse anything less)"
        )
    })
}

fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_a_rule_names_is_declared() {
        let declared: Vec<String> = Config::default()
            .describe()
            .into_iter()
            .map(|s| s.name)
            .collect();
        // The rules only: the tests below quote the call too.
        let rules = include_str!("rules.rs").split("#[cfg(test)]").next();
        let named = rules
            .unwrap_or_default()
            .split("ConfigError::new(")
            .skip(1)
            .filter_map(|call| call.split('"').nth(1));
        let mut count = 0;
        for name in named {
            assert!(
                declared.iter().any(|d| d == name),
                "{name} is not a setting"
            );
            count += 1;
        }
        assert!(count > 10, "the rules were not found");
    }

    #[test]
    fn a_jwks_url_is_checked_on_its_parsed_host_and_scheme() {
        for good in [
            "https://issuer.example/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://127.8.9.1/jwks",
            "http://localhost:3000/jwks",
            "http://[::1]:3000/jwks",
        ] {
            assert!(check_jwks_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://localhost@evil.example/",
            "http://127.0.0.1@evil.example/jwks",
            "http://localhost.evil.example/jwks",
            "http://127.0.0.1.evil.example/jwks",
            "https://user:pass@issuer.example/jwks",
            "http://issuer.example/jwks",
            "ftp://localhost/jwks",
            "file:///etc/jwks.json",
            "not a url",
        ] {
            assert!(check_jwks_url(bad).is_err(), "{bad}");
        }
    }
}
