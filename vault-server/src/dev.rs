//! Development mode: everything a newcomer needs on one machine with no setup. The embedded
//! store, a root key file and an Ed25519 issuer key are generated once in the data directory;
//! `dev` prints a caller token and ready-to-paste commands. Never for real credentials: the
//! keys sit unprotected next to the data they protect.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::crypto::RootKey;

/// The issuer named in development tokens.
pub const DEV_ISSUER: &str = "vault-dev";
/// The `kid` of the development issuer key.
const DEV_KID: &str = "dev-1";
const ISSUER_KEY_FILE: &str = "dev-issuer.pem";
const JWKS_FILE: &str = "dev-jwks.json";
const ROOT_KEY_FILE: &str = "root.key";

/// The files `dev` keeps in the data directory.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// The data directory.
    pub dir: PathBuf,
    /// Root key (base64, 0600).
    pub root_key: PathBuf,
    /// Ed25519 issuer private key (PKCS#8 PEM, 0600).
    pub issuer_key: PathBuf,
    /// Its public JWKS.
    pub jwks: PathBuf,
}

impl DevFiles {
    /// The file layout under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            root_key: dir.join(ROOT_KEY_FILE),
            issuer_key: dir.join(ISSUER_KEY_FILE),
            jwks: dir.join(JWKS_FILE),
        }
    }

    /// Creates whatever is missing; existing keys are kept, so tokens and data survive restarts.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let files = Self::in_dir(dir);
        if !files.root_key.exists() {
            write_root_key(&files.root_key)?;
        }
        if !files.issuer_key.exists() || !files.jwks.exists() {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
            let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": DEV_KID, "alg": "EdDSA", "use": "sig"}]});
            write_private(&files.issuer_key, pair.serialize_pem().as_bytes())?;
            std::fs::write(&files.jwks, serde_json::to_vec_pretty(&jwks)?)?;
        }
        Ok(files)
    }
}

/// Writes a new random root key (base64 text, mode 0600); refuses to overwrite. Missing parent
/// directories are created 0700: a key file is only as private as the directory it sits in.
pub fn write_root_key(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(parent)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
    }
    let key = RootKey::generate();
    let mut text = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            // A generated key is held in this process.
            .encode(key.software_bytes().expect("a generated key has its bytes")),
    );
    text.push('\n');
    write_private(path, text.as_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Mints a caller token with the development issuer key in `dir`, granting `scopes`
/// (`vault:store`, `vault:admin`).
pub fn mint(
    dir: &Path,
    agent: &str,
    user: &str,
    scopes: &[&str],
    ttl_seconds: u64,
    audience: &str,
) -> anyhow::Result<String> {
    let files = DevFiles::in_dir(dir);
    let pem = std::fs::read(&files.issuer_key).map_err(|_| {
        anyhow::anyhow!(
            "no development issuer key at {} — run `vault-server dev` first; `token` only mints development tokens",
            files.issuer_key.display()
        )
    })?;
    crate::ids::AgentId::parse(agent).map_err(|e| anyhow::anyhow!("--agent {e}"))?;
    crate::ids::UserId::parse(user).map_err(|e| anyhow::anyhow!("--user {e}"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut claims = json!({
        "iss": DEV_ISSUER, "aud": audience, "sub": user, "agent_id": agent,
        "iat": now, "exp": now + ttl_seconds,
    });
    if !scopes.is_empty() {
        claims["scope"] = json!(scopes.join(" "));
    }
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(DEV_KID.into());
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ed_pem(&pem)?,
    )?)
}

/// How the README and the banner call `buf` without installing it: `npx --yes` so a fresh
/// machine is not asked a question first.
pub const BUF: &str = "npx --yes @bufbuild/buf";
/// How the README and the banner run `vault-server` itself: the release profile `dev` was
/// started with (`cargo run --release -p vault-server -- dev`), so nothing is built twice.
pub const SERVER: &str = "cargo run --release -q -p vault-server --";
/// How the README and the banner run a client example, in that same profile.
pub const EXAMPLE: &str = "cargo run --release -p vault-client --example";

/// The banner `dev` prints once it listens: every command in it is ready to paste, in the
/// profile `dev` was built with. The README's walkthrough is these lines, word for word
/// (`walkthrough::the_readme_walkthrough_runs_on_what_dev_prints` holds them equal), and
/// `$VAULT_ADDR` / `$VAULT_TOKEN` are exactly what the client examples read.
pub fn banner(
    addr: std::net::SocketAddr,
    callback: Option<std::net::SocketAddr>,
    files: &DevFiles,
    store: &str,
    token: &str,
) -> String {
    let buf = |request: &str, rpc: &str| {
        format!(
            "{BUF} curl --protocol grpc --http2-prior-knowledge -H \"authorization: Bearer $VAULT_TOKEN\" -d '{request}' \"$VAULT_ADDR/vault.v1.CredentialVault/{rpc}\""
        )
    };
    let grpcurl = |request: &str, rpc: &str| {
        format!(
            "grpcurl -plaintext -H \"authorization: Bearer $VAULT_TOKEN\" -d '{request}' {addr} vault.v1.CredentialVault/{rpc}"
        )
    };
    let store_request = r#"{"tool":"jira","token":{"access_token":"demo-access-token","refresh_token":"demo-refresh-token","expires_at":"2030-01-01T00:00:00Z"}}"#;
    let get_request = r#"{"tool":"jira"}"#;
    let consent = match callback {
        Some(callback) => format!(
            "or let the vault run the consent flow (the tool needs an entry in VAULT_PROVIDERS_FILE; the\n\
callback listens on http://{callback}): begin, open the authorization_url it answers in a\n\
browser and consent, then GetToken (above) works:\n\
\n\
{begin}\n\
{begin_grpcurl}\n\
\n",
            begin = buf(get_request, "BeginAuthorization"),
            begin_grpcurl = grpcurl(get_request, "BeginAuthorization"),
        ),
        None => String::new(),
    };
    format!(
        "\n\
=====================================================================\n\
  DEVELOPMENT MODE: generated keys are stored unprotected in\n\
  {dir}. Never put real credentials in this vault.\n\
=====================================================================\n\
\n\
listening on {addr}, embedded store {store}\n\
\n\
in another shell, from this directory: where the vault listens, and a caller token (agent\n\
demo-agent, user demo-user, scope vault:store, valid 1 h); the client examples read both:\n\
\n\
export VAULT_ADDR=http://{addr}\n\
export VAULT_TOKEN={token}\n\
\n\
store a token set as a gateway would after consent, then read it back as the agent would\n\
(server reflection, no .proto needed):\n\
\n\
{store_buf}\n\
{get_buf}\n\
\n\
or with grpcurl:\n\
\n\
{store_grpcurl}\n\
{get_grpcurl}\n\
\n\
or with the Rust client's examples:\n\
\n\
{EXAMPLE} gateway_store_token -- jira demo-access-token demo-refresh-token 3600\n\
{EXAMPLE} agent_get_token -- jira\n\
\n\
{consent}another user of the same agent sees nothing of demo-user's:\n\
\n\
export VAULT_TOKEN=$({SERVER} token --user someone-else)\n\
{EXAMPLE} agent_get_token -- jira\n\
\n\
admin calls (Sweep, another user's credentials, with a --admin token): docs/operations.md\n\
more tokens: {SERVER} token --agent AGENT --user USER [--store] [--admin] [--ttl SECONDS]\n",
        dir = files.dir.display(),
        store_buf = buf(store_request, "StoreToken"),
        get_buf = buf(get_request, "GetToken"),
        store_grpcurl = grpcurl(store_request, "StoreToken"),
        get_grpcurl = grpcurl(get_request, "GetToken"),
    )
}
