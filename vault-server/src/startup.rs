//! Building and running the server: [`Application::build`] does everything that can fail at
//! startup (database, migrations, root key, issuer keys, binding the port);
//! [`Application::run_until_stopped`] serves until the shutdown future completes, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::audit::{AuditRecord, Owner};
use crate::auth::Verifier;
use crate::callback::CallbackServer;
use crate::config::{
    ConfigError, PinSetting, Pkcs11Location, RootKeySetting, Settings, decode_root_key,
};
use crate::crypto::{Pkcs11Error, Pkcs11Root, Pkcs11Settings, RootKey, RootKeySource};
use crate::grpc::proto::credential_vault_server::CredentialVaultServer;
use crate::grpc::{AuthLayer, Budget, CredentialVaultService, ShedLayer, SizeLimitLayer, proto};
use crate::jobs::{HeadSigner, Jobs, JwksRefresh, OutboxDelivery, SpareSchemas, Sweeper};
use crate::store::AuditListener;
use crate::vault::{ConsentOptions, Vault, VaultOptions, unlock_root_key};

/// How long shutdown waits for background jobs and for detached refreshes and revocations
/// (both at once) before it gives up on them.
const JOBS_STOP_WITHIN: Duration = Duration::from_secs(10);

/// Largest request message accepted.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// A built, bound, not yet serving vault.
pub struct Application {
    listener: TcpListener,
    callback: Option<CallbackServer>,
    local_addr: SocketAddr,
    vault: Arc<Vault>,
    verifier: Arc<Verifier>,
    head_key: crate::audit::HeadKey,
    settings: Settings,
    policy: Arc<crate::policy::PolicyHandle>,
    limits: Arc<crate::policy::Limits>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects, migrates, unlocks the root key, loads issuer keys and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_on(settings, None).await
    }

    /// Builds on a listener the caller has already bound, instead of binding `VAULT_LISTEN`:
    /// whoever chose the port never lets go of it, so no other process can take it in between.
    pub async fn build_on(
        settings: Settings,
        listener: Option<TcpListener>,
    ) -> anyhow::Result<Self> {
        Self::build_on_listeners(settings, listener, None).await
    }

    /// [`Application::build_on`], with the consent callback's listener bound by the caller too
    /// (instead of binding `VAULT_CALLBACK_LISTEN`).
    pub async fn build_on_listeners(
        settings: Settings,
        listener: Option<TcpListener>,
        callback: Option<TcpListener>,
    ) -> anyhow::Result<Self> {
        // Read first, as a bad key file is a configuration error and stops startup before the
        // database is touched.
        let root_source = root_key_source(&settings.root_key)?;
        if settings.allow_plaintext && settings.tls.is_none() && !settings.listen.ip().is_loopback()
        {
            tracing::warn!(listen = %settings.listen, "VAULT_ALLOW_PLAINTEXT=true: serving gRPC without TLS on a network address; only safe behind a sidecar that terminates mTLS");
        }
        if settings.callback.unbound {
            let loopback =
                settings
                    .callback
                    .redirect_uri
                    .as_ref()
                    .is_some_and(|uri| match uri.host() {
                        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
                        None => false,
                    });
            if !loopback {
                tracing::warn!(
                    "VAULT_OAUTH_UNBOUND_CALLBACK=allow: consent flows begun without return_url complete for whoever holds the browser, without session binding; only for a single-user or development deployment"
                );
            }
        }
        log_startup_notes(&settings);
        let store = crate::store::open(&settings.database).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot open the database (VAULT_DATABASE_URL): {}",
                crate::telemetry::error_chain(&e)
            )
        })?;
        if settings.database.migrate_url.is_some() {
            // Least privilege: this server's role cannot migrate; `vault-server migrate` runs as
            // the owner. Start only on a database at this version.
            store.schema.ready().await.map_err(|e| {
                anyhow::anyhow!(
                    "the database is not ready: {}",
                    crate::telemetry::error_chain(&e)
                )
            })?;
        } else {
            store.schema.migrate().await.map_err(|e| {
                anyhow::anyhow!("migrations failed: {}", crate::telemetry::error_chain(&e))
            })?;
        }
        let root = unlock_root_key(&store, root_source).await?;
        // The one outbound client: JWKS and every provider call share its limits and policy.
        let outbound = crate::http::Outbound::new(&settings.providers.http())?;
        let verifier = Arc::new(
            Verifier::new(settings.jwt.clone(), outbound.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot load issuer keys: {e:#}"))?,
        );
        // Outlives one provider call (connect + total timeout) with room to write the result.
        let provider_lease = settings.providers.connect_timeout
            + settings.providers.timeout
            + Duration::from_secs(10);
        // MCP tools without a configured client register the vault; that needs the redirect URI
        // to register.
        let registrar = settings.callback.redirect_uri.as_ref().map(|redirect| {
            Arc::new(crate::oauth::Registrar::new(
                store.clone(),
                root.control.duplicate(),
                outbound.clone(),
                redirect.to_string(),
                provider_lease,
            ))
        });
        let providers = crate::oauth::Providers::load(&settings.providers, &outbound, registrar)?;
        let policy = Arc::new(crate::policy::PolicyHandle::load(
            settings.policy.file.as_deref(),
            settings.secrets_ttl_seconds,
        )?);
        let limits = Arc::new(crate::policy::Limits::new(
            settings.limits.agent,
            settings.limits.user,
        ));
        let options = VaultOptions {
            secrets_ttl_seconds: settings.secrets_ttl_seconds,
            refresh_lease: provider_lease,
            backoff_base: settings.backoff_base,
            backoff_cap: settings.backoff_cap,
            revocation_max_age: settings.revocation_max_age,
            store_refresh_tokens: settings.store_refresh_tokens,
            store_scope: settings.jwt.store_scope.clone(),
            max_min_valid_seconds: settings.max_min_valid_seconds,
            sweep_revokes: settings.sweep_revokes,
            agent_creation_per_minute: settings.agent_creation_per_minute,
            refresh_cooldown: settings.refresh_cooldown,
            consent: ConsentOptions {
                redirect_uri: settings.callback.redirect_uri.clone(),
                return_urls: settings.callback.return_urls.clone(),
                unbound: settings.callback.unbound,
                flow_ttl: settings.callback.flow_ttl,
            },
            audit_releases: settings.audit.releases,
            policy: Arc::clone(&policy),
            limits: Arc::clone(&limits),
        };
        let head_key = crate::audit::HeadKey::derive(&root.control);
        let vault = Arc::new(Vault::new(store, root, providers, options));
        let issuers: Vec<_> = settings
            .jwt
            .issuers
            .iter()
            .map(|t| t.issuer.clone())
            .collect();
        vault.adopt_legacy_agents(&issuers).await?;
        // A vault that cannot audit must not serve: every call would fail.
        vault
            .recorder()
            .record(Owner::Control, lifecycle_event(STARTUP))
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "cannot write to the audit log: {}",
                    crate::telemetry::error_chain(&err)
                )
            })?;
        let listener = match listener {
            Some(listener) => listener,
            None => TcpListener::bind(settings.listen).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on VAULT_LISTEN={}: {e}", settings.listen)
            })?,
        };
        let local_addr = listener.local_addr()?;
        let callback = match (callback, settings.callback.listen) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on VAULT_CALLBACK_LISTEN={addr}: {e}")
            })?),
            (None, None) => None,
        }
        .map(|listener| CallbackServer::new(listener, settings.tls.as_ref()))
        .transpose()?;
        Ok(Self {
            listener,
            callback,
            local_addr,
            vault,
            verifier,
            head_key,
            settings,
            policy,
            limits,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The consent callback's bound address, when this replica serves it.
    pub fn callback_addr(&self) -> Option<SocketAddr> {
        self.callback.as_ref().map(CallbackServer::local_addr)
    }

    /// Serves until `shutdown` completes; then reports NOT_SERVING, stops accepting, and waits
    /// up to the grace period for in-flight calls.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            callback,
            local_addr,
            vault,
            verifier,
            head_key,
            settings,
            policy,
            limits,
        } = self;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<CredentialVaultServer<CredentialVaultService>>()
            .await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let draining = CancellationToken::new();
        // The vault's audit appends publish here, and so does the listener for other replicas';
        // watch streams wait here, and end when draining starts.
        let changes = vault.recorder().changes().clone();
        let vault_service = CredentialVaultServer::new(
            CredentialVaultService::new(Arc::clone(&vault), settings.sweep_batch)
                .watching(changes.clone(), draining.clone()),
        )
        // The backstop behind `SizeLimitLayer`, which answers first with the vault's own error.
        .max_decoding_message_size(MAX_REQUEST_BYTES);

        let mut jobs = Jobs::new();
        {
            let (vault, changes) = (Arc::clone(&vault), changes.clone());
            jobs.spawn("rotated key listener", |shutdown| {
                vault.forget_rotated_keys(changes, shutdown)
            });
        }
        if let Some(listener) = AuditListener::for_database(&settings.database, changes)? {
            jobs.spawn("audit listener", |shutdown| listener.run(shutdown));
        }
        let sweeper = Sweeper {
            vault: Arc::clone(&vault),
            interval: settings.sweep_interval,
            batch: settings.sweep_batch,
            revoke: settings.sweep_revokes,
            retention: settings.audit.retention,
        };
        jobs.spawn("sweeper", |shutdown| sweeper.run(shutdown));
        let spares = SpareSchemas {
            store: vault.store().clone(),
            target: settings.database.spare_schemas,
            interval: Duration::from_secs(1),
        };
        jobs.spawn("agent schemas", |shutdown| spares.run(shutdown));
        let signer = HeadSigner {
            store: vault.store().clone(),
            key: head_key,
            interval: settings.audit.sign_interval,
        };
        jobs.spawn("audit head signer", |shutdown| signer.run(shutdown));
        let outbox = OutboxDelivery {
            vault: Arc::clone(&vault),
            interval: settings.revocation_retry_interval,
        };
        jobs.spawn("revocation outbox", |shutdown| outbox.run(shutdown));
        let callback = callback.map(|server| {
            let stop = draining.clone();
            let vault = Arc::clone(&vault);
            tokio::spawn(server.run(vault, stop, settings.shutdown_grace))
        });
        let reload = crate::policy::PolicyReload {
            policy,
            limits,
            interval: settings.policy.reload,
        };
        jobs.spawn("policy reload", |shutdown| reload.run(shutdown));
        let jwks = JwksRefresh {
            verifier: Arc::clone(&verifier),
        };
        jobs.spawn("jwks refresh", |shutdown| jwks.run(shutdown));
        // Background jobs stop as soon as shutdown starts: a sweep or a delivery must not begin
        // while the vault reports NOT_SERVING.
        let cancel = jobs.stop_signal();

        let delay = settings.shutdown_delay;
        let signal = {
            let draining = draining.clone();
            let cancel = cancel.clone();
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down");
                health
                    .set_not_serving::<CredentialVaultServer<CredentialVaultService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                cancel.cancel();
                if !delay.is_zero() {
                    tracing::info!(?delay, "reporting NOT_SERVING before closing the listener");
                    tokio::time::sleep(delay).await;
                }
                tracing::info!("draining in-flight calls");
                draining.cancel();
            }
        };

        let mut builder = Server::builder();
        if let Some(tls) = &settings.tls {
            builder = builder.tls_config(server_tls(tls)?)?;
        }
        tracing::info!(%local_addr, tls = settings.tls.is_some(), "credential vault listening");
        let server = builder
            .trace_fn(crate::telemetry::rpc_span)
            .http2_max_header_list_size(32 * 1024)
            .max_concurrent_streams(settings.limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(settings.limits.keepalive))
            .http2_keepalive_timeout(Some(settings.limits.keepalive_timeout))
            .max_connection_age(settings.limits.max_connection_age)
            .http2_max_pending_accept_reset_streams(Some(64))
            .http2_max_local_error_reset_streams(Some(256))
            .concurrency_limit_per_connection(settings.limits.max_concurrent_streams as usize)
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .layer(AuthLayer::new(
                verifier,
                Arc::clone(vault.recorder()),
                &settings.jwt.agent_claim,
            ))
            // Inside the auth layer: only an authenticated caller learns the limit. It reads the
            // whole request message before the call goes on.
            .layer(SizeLimitLayer::new(
                MAX_REQUEST_BYTES,
                Budget::new(settings.limits.max_buffered_request_bytes),
            ))
            // Inside both: only work holds a place in the limit, never a caller still sending
            // its request (a slow or stalled sender cannot crowd others out), and an
            // unauthenticated flood is refused before it could take one.
            .layer(ShedLayer::new(settings.limits.max_concurrent_calls))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(vault_service)
            .serve_with_incoming_shutdown(
                // Server::tcp_nodelay does not reach sockets from a custom incoming stream; without
                // it, Nagle plus delayed ACKs stall 1-3% of calls by 40 ms (found by vault-bench).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            );

        let grace = settings.shutdown_grace;
        let result = tokio::select! {
            result = server => result.map_err(anyhow::Error::from),
            () = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "grace period over; dropping calls still in flight");
                Ok(())
            }
        };
        // The callback stops with gRPC; it finishes its own connections within the grace period.
        draining.cancel();
        if let Some(callback) = callback
            && let Err(err) = callback.await
        {
            tracing::error!(error = %err, "the callback server failed");
        }
        // Bounded: the process must exit even if a provider or the database hangs.
        tokio::join!(
            jobs.shutdown(JOBS_STOP_WITHIN),
            vault.drain(JOBS_STOP_WITHIN)
        );
        if let Err(err) = vault
            .recorder()
            .record(Owner::Control, lifecycle_event(SHUTDOWN))
            .await
        {
            tracing::error!(error = %crate::telemetry::error_chain(&err), "could not record the shutdown in the audit log");
        }
        tracing::info!("stopped");
        result
    }
}

/// The audit action of a server starting to serve.
pub const STARTUP: &str = "startup";
/// The audit action of a server that stopped serving.
pub const SHUTDOWN: &str = "shutdown";

/// A control-plane record of this process starting or stopping.
fn lifecycle_event(action: &str) -> AuditRecord {
    AuditRecord {
        at_ms: crate::audit::now_ms(),
        action: action.into(),
        verified: true,
        target: Some(
            serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() })
                .to_string(),
        ),
        ..AuditRecord::default()
    }
}

/// One line each for settings that are valid but quietly turn something off or down, so an
/// operator reading the startup log learns it before a user does.
fn log_startup_notes(settings: &Settings) {
    if settings.providers.file.is_none() {
        tracing::info!(
            "refresh and revocation at providers are off: VAULT_PROVIDERS_FILE is not set"
        );
    }
    for trusted in &settings.jwt.issuers {
        // Configuration accepts http:// only to a loopback host; say so anyway, as whoever can
        // bind that port on this machine can sign caller tokens.
        if let crate::config::JwksSource::Url(url) = &trusted.jwks
            && url.scheme() == "http"
        {
            tracing::warn!(issuer = %trusted.issuer, jwks_url = %url, "issuer keys are fetched over plain http on localhost: any local process that binds that port can sign caller tokens; use https outside development");
        }
    }
}

fn server_tls(
    tls: &crate::config::TlsSettings,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |name: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("{name}: cannot read {}: {e}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(
        read("VAULT_TLS_CERT_FILE", &tls.cert_file)?,
        read("VAULT_TLS_KEY_FILE", &tls.key_file)?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
            "VAULT_TLS_CLIENT_CA_FILE",
            ca,
        )?));
    }
    Ok(config)
}

/// The root key named by the settings: decoded, or read from its file, or the passphrase that
/// derives it.
pub fn root_key_source(setting: &RootKeySetting) -> Result<RootKeySource, ConfigError> {
    let key = |bytes: zeroize::Zeroizing<[u8; 32]>| RootKeySource::Key(RootKey::from_bytes(*bytes));
    match setting {
        RootKeySetting::Key(text) => decode_root_key(text.expose_secret())
            .map(key)
            .map_err(|p| ConfigError::new("VAULT_ROOT_KEY", p)),
        RootKeySetting::File(path) => read_root_key_file(path).map(key),
        RootKeySetting::Passphrase(phrase) => Ok(RootKeySource::Passphrase(phrase.clone())),
        RootKeySetting::Pkcs11(location) => open_pkcs11_root(location).map(RootKeySource::Key),
    }
}

/// Opens the root key in its PKCS#11 token: loads the module, logs in, finds the key and checks
/// that it seals and opens. Each failure names the setting to look at.
pub fn open_pkcs11_root(location: &Pkcs11Location) -> Result<RootKey, ConfigError> {
    Pkcs11Root::open(&pkcs11_settings(location)?)
        .map(RootKey::from_pkcs11)
        .map_err(pkcs11_problem)
}

/// `keygen --pkcs11`: creates the root key in the token, refusing a label in use.
pub fn generate_pkcs11_root(location: &Pkcs11Location) -> Result<RootKey, ConfigError> {
    Pkcs11Root::generate(&pkcs11_settings(location)?)
        .map(RootKey::from_pkcs11)
        .map_err(pkcs11_problem)
}

fn pkcs11_settings(location: &Pkcs11Location) -> Result<Pkcs11Settings, ConfigError> {
    let pin = match &location.pin {
        PinSetting::Pin(pin) => pin.clone(),
        PinSetting::File(path) => {
            let problem = |p: String| ConfigError::new("VAULT_ROOT_PKCS11_PIN_FILE", p);
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(path)
                    .map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?,
            );
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| problem("must hold the PIN as text".into()))?;
            let pin = text.trim_end_matches(['\r', '\n']);
            if pin.is_empty() {
                return Err(problem(format!("{} is empty", path.display())));
            }
            secrecy::SecretString::from(pin)
        }
    };
    Ok(Pkcs11Settings {
        module: location.module.clone(),
        token_label: location.token_label.clone(),
        key_label: location.key_label.clone(),
        pin,
    })
}

fn pkcs11_problem(error: Pkcs11Error) -> ConfigError {
    let setting = error.setting();
    let message = error.to_string();
    let problem = message
        .strip_prefix(setting)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(&message);
    ConfigError::new(setting, problem)
}

/// Reads a root key file for a command (`rotate-root --new-key-file`).
pub fn read_root_key(path: &Path) -> Result<RootKey, ConfigError> {
    read_root_key_file(path).map(|bytes| RootKey::from_bytes(*bytes))
}

/// Reads a root key file: base64 text of 32 bytes (what `keygen` writes) or 32 raw bytes.
fn read_root_key_file(path: &Path) -> Result<zeroize::Zeroizing<[u8; 32]>, ConfigError> {
    let problem = |p: String| ConfigError::new("VAULT_ROOT_KEY_FILE", p);
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| problem(format!("cannot read {}: {e}", path.display())))?,
    );
    if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(zeroize::Zeroizing::new(raw));
    }
    let text =
        std::str::from_utf8(&bytes).map_err(|_| problem("must be base64 of 32 bytes".into()))?;
    decode_root_key(text).map_err(problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(source: RootKeySource) -> [u8; 32] {
        match source {
            // A key read from a file is held in this process.
            RootKeySource::Key(key) => *key.software_bytes().expect("a key file's key"),
            RootKeySource::Passphrase(_) => panic!("expected a key"),
        }
    }

    #[test]
    fn a_root_key_file_holds_base64_text_or_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text.key");
        std::fs::write(&text, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").unwrap();
        let raw = dir.path().join("raw.key");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        for path in [text, raw] {
            let source = root_key_source(&RootKeySetting::File(path)).unwrap();
            assert_eq!(key_of(source), [7u8; 32]);
        }
    }

    #[test]
    fn an_unreadable_or_malformed_root_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.key");
        std::fs::write(&short, "AAAA").unwrap();
        for path in [dir.path().join("missing.key"), short] {
            let err = root_key_source(&RootKeySetting::File(path)).unwrap_err();
            assert_eq!(err.name, "VAULT_ROOT_KEY_FILE", "{err}");
        }
    }
}
