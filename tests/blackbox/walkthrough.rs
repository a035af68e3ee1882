//! The README's newcomer path, for real: `vault-server dev` in an empty directory, then the
//! `buf curl` commands it printed, run by a shell with the token it printed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::helpers::binary;

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tools")
}

/// `buf` from the committed lockfile, installed on first use so `cargo test` works on a fresh
/// clone. `tests/tools/bin/buf` picks the platform build npm installed.
fn buf_bin_dir() -> PathBuf {
    static INSTALLED: OnceLock<Mutex<()>> = OnceLock::new();
    let _once = INSTALLED.get_or_init(|| Mutex::new(())).lock().unwrap();
    let dir = tools_dir();
    if !dir.join("node_modules/@bufbuild").is_dir() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is installed");
        assert!(status.success(), "npm ci in tests/tools failed");
    }
    dir.join("bin")
}

struct Dev {
    child: std::process::Child,
    lines: Vec<String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vault-server dev` with only PATH and the given variables, and reads its banner.
fn start_dev(data_dir: &Path) -> Dev {
    start_dev_with(data_dir, &[])
}

fn start_dev_with(data_dir: &Path, extra: &[(&str, &str)]) -> Dev {
    let mut child = Command::new(binary())
        .arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VAULT_DATA_DIR", data_dir)
        .env("VAULT_LISTEN", "127.0.0.1:0")
        .env("VAULT_CALLBACK_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = line.starts_with("more tokens:");
            seen.push(line);
            if last {
                let _ = tx.send(std::mem::take(&mut seen));
            }
        }
    });
    let lines = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("dev printed its banner");
    Dev { child, lines }
}

fn run_shell(line: &str, token: &str, bin: &Path) -> (bool, String) {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("sh")
        .arg("-c")
        .arg(line)
        .env("PATH", path)
        .env("VAULT_TOKEN", token)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_readme_walkthrough_runs_on_what_dev_prints() {
    let bin = buf_bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("vault-data");
    let dev = start_dev(&data_dir);

    let banner = dev.lines.join("\n");
    assert!(banner.contains("DEVELOPMENT MODE"), "{banner}");
    let token = dev
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("export VAULT_TOKEN="))
        .expect("a caller token")
        .to_string();
    let buf_lines: Vec<&String> = dev
        .lines
        .iter()
        .filter(|l| l.starts_with("buf curl"))
        .collect();
    assert_eq!(buf_lines.len(), 3, "{banner}");
    assert!(
        dev.lines.iter().any(|l| l.starts_with("grpcurl ")),
        "{banner}"
    );

    let (ok, stored) = run_shell(buf_lines[0], &token, &bin);
    assert!(ok, "StoreToken through reflection failed: {stored}");
    assert!(stored.contains("\"generation\""), "{stored}");
    let (ok, fetched) = run_shell(buf_lines[1], &token, &bin);
    assert!(ok, "GetToken through reflection failed: {fetched}");
    assert!(fetched.contains("demo-access-token"), "{fetched}");
    assert!(
        !fetched.contains("demo-refresh-token"),
        "a refresh token never leaves the vault"
    );

    for file in ["root.key", "dev-issuer.pem", "dev-jwks.json", "vault.db"] {
        assert!(data_dir.join(file).exists(), "{file} in the data directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data_dir.join("dev-issuer.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }

    // `token` mints with the same key; another user sees nothing of demo-user's.
    let minted = Command::new(binary())
        .args(["token", "--agent", "demo-agent", "--user", "someone-else"])
        .env_clear()
        .env("VAULT_DATA_DIR", &data_dir)
        .output()
        .unwrap();
    assert!(minted.status.success());
    let other = String::from_utf8(minted.stdout).unwrap().trim().to_string();
    let (ok, denied) = run_shell(buf_lines[1], &other, &bin);
    assert!(!ok && denied.contains("not_found"), "{denied}");
}

#[test]
fn token_refuses_without_a_dev_key_and_serve_never_uses_one() {
    let dir = tempfile::tempdir().unwrap();
    let minted = Command::new(binary())
        .args(["token", "--agent", "a", "--user", "u"])
        .env_clear()
        .env("VAULT_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!minted.status.success());
    assert!(String::from_utf8_lossy(&minted.stderr).contains("vault-server dev"));

    // A data directory with dev keys does not make `serve` start without configured keys.
    let _dev = start_dev(&dir.path().join("vault-data"));
    let serve = Command::new(binary())
        .arg("serve")
        .env_clear()
        .env("VAULT_DATA_DIR", dir.path().join("vault-data"))
        .env("VAULT_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("VAULT_ROOT_KEY"));
}

#[tokio::test]
async fn dev_never_connects_to_a_database_named_in_the_environment() {
    let db = crate::helpers::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("vault-data");
    let dev = start_dev_with(&data_dir, &[("VAULT_DATABASE_URL", db.url.as_str())]);

    let banner = dev.lines.join("\n");
    assert!(banner.contains("ignores VAULT_DATABASE_URL"), "{banner}");
    assert!(data_dir.join("vault.db").exists(), "its own embedded store");
    let mut conn = db.connect().await;
    let schemas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'vault'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(schemas, 0, "nothing was created in the named database");
}

#[tokio::test]
async fn the_consent_flow_runs_in_dev_on_what_it_prints() {
    use crate::browser::Browser;
    use crate::provider::{OidcProvider, TestPki};

    let bin = buf_bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    // dev binds the callback itself, so the port is chosen here and registered at the provider
    // first (loopback only; the port is free when dev binds it a moment later).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/api/v1/auth/tool/callback");
    let state = dir.path().join("provider-state");
    std::fs::create_dir_all(&state).unwrap();
    let provider = OidcProvider::start_with(&pki, &state, 0, 3600, &[redirect_uri.as_str()]);
    let providers = crate::provider::consent_providers_file(dir.path(), &provider.ready);
    let listen = format!("127.0.0.1:{port}");
    let dev = start_dev_with(
        &dir.path().join("vault-data"),
        &[
            ("VAULT_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("VAULT_PROVIDER_CA_FILE", pki.ca_path.to_str().unwrap()),
            ("VAULT_CALLBACK_LISTEN", listen.as_str()),
        ],
    );
    let banner = dev.lines.join("\n");
    let token = dev
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("export VAULT_TOKEN="))
        .expect("a caller token")
        .to_string();
    let buf = |rpc: &str| {
        dev.lines
            .iter()
            .find(|l| l.starts_with("buf curl") && l.ends_with(rpc))
            .unwrap_or_else(|| panic!("a buf curl line for {rpc}: {banner}"))
            .clone()
    };

    let (ok, begun) = run_shell(&buf("/BeginAuthorization"), &token, &bin);
    assert!(ok, "BeginAuthorization failed: {begun}");
    let begun: serde_json::Value = serde_json::from_str(&begun).unwrap();
    let url = begun["authorizationUrl"]
        .as_str()
        .expect("an authorization URL");

    let browser = Browser::new(&pki);
    let callback = browser.consent(url, "demo-user").await.unwrap();
    assert!(callback.as_str().starts_with(&redirect_uri), "{callback}");
    let (status, _, page) = browser.visit(&callback).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("connected"), "{page}");

    let (ok, fetched) = run_shell(&buf("/GetToken"), &token, &bin);
    assert!(ok, "GetToken failed: {fetched}");
    let fetched: serde_json::Value = serde_json::from_str(&fetched).unwrap();
    let access = fetched["token"]["accessToken"].as_str().unwrap();
    assert!(provider.is_active(access).await);
}
