//! The README's newcomer path, for real: `vault-server dev` in an empty directory, then every
//! command of the README's walkthrough as `dev` printed it, run by a shell with only the
//! variables the README names. Also the machinery that runs a document's commands
//! ([`documented_commands`], [`Launchers`], [`run_documented`]), which `operations` shares.

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

/// A running `vault-server dev` and the banner it printed.
pub(crate) struct Dev {
    child: std::process::Child,
    pub(crate) lines: Vec<String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    /// The address it listens on, from its `export VAULT_ADDR=http://…` line.
    pub(crate) fn addr(&self) -> String {
        self.export("VAULT_ADDR")
            .strip_prefix("http://")
            .expect("VAULT_ADDR is an http:// URL")
            .to_string()
    }

    /// The value of the banner's `export NAME=…` line.
    pub(crate) fn export(&self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("dev printed no `{prefix}` line: {}", self.lines.join("\n")))
            .to_string()
    }

    /// The banner line a documented command stands for: the same text once dev's address (a
    /// free port here) is written as the default `127.0.0.1:50051`, or, for a documented line
    /// ending in `…` (the token), the line it begins.
    pub(crate) fn line_for(&self, documented: &str) -> String {
        let addr = self.addr();
        let as_documented = |line: &str| line.replace(&addr, "127.0.0.1:50051");
        let found = match documented.strip_suffix('…') {
            Some(start) => self
                .lines
                .iter()
                .find(|l| as_documented(l).starts_with(start)),
            None => self.lines.iter().find(|l| as_documented(l) == documented),
        };
        found
            .unwrap_or_else(|| {
                panic!(
                    "the README says\n{documented}\nbut dev printed no such command:\n{}",
                    self.lines.join("\n")
                )
            })
            .clone()
    }
}

/// Starts `vault-server dev` with only PATH and the given variables, and reads its banner.
fn start_dev(data_dir: &Path) -> Dev {
    start_dev_with(data_dir, &[])
}

fn start_dev_with(data_dir: &Path, extra: &[(&str, &str)]) -> Dev {
    let data_dir = data_dir.to_str().unwrap();
    let mut env = vec![("VAULT_DATA_DIR", data_dir)];
    env.extend_from_slice(extra);
    spawn_dev(None, &env)
}

/// Starts `vault-server dev` in `cwd` (its data directory is then `cwd/vault-data`, as for a
/// reader of the README) with only PATH, a free port for gRPC and the callback (tests run side
/// by side), and `extra`; reads its banner.
pub(crate) fn spawn_dev(cwd: Option<&Path>, extra: &[(&str, &str)]) -> Dev {
    let mut command = Command::new(binary());
    command
        .arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VAULT_LISTEN", "127.0.0.1:0")
        .env("VAULT_CALLBACK_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().unwrap();
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

/// The commands of the fenced `sh` blocks in `file` (relative to the repository) under the
/// heading `heading`, up to the next heading.
pub(crate) fn documented_commands(file: &str, heading: &str) -> Vec<String> {
    let text = read_document(file);
    let mut lines = text.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "{file} has a heading `{heading}`");
    let mut in_block = false;
    let section: Vec<&str> = lines
        .take_while(|l| {
            in_block ^= l.starts_with("```");
            in_block || l.starts_with("```") || !l.starts_with('#')
        })
        .collect();
    commands_in(&section.join("\n"))
}

/// `file`, relative to the repository.
pub(crate) fn read_document(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The commands of the fenced `sh` blocks in a Markdown `text`: one entry per command,
/// `\`-continued lines joined, comments and blank lines left out.
pub(crate) fn commands_in(text: &str) -> Vec<String> {
    // None: prose; Some(true): inside a ```sh block; Some(false): inside another block.
    let mut fence = None::<bool>;
    let (mut commands, mut pending) = (Vec::new(), String::new());
    for line in text.lines() {
        match fence {
            None if line.starts_with("```") => fence = Some(line == "```sh"),
            Some(_) if line.starts_with("```") => fence = None,
            None | Some(false) => {}
            Some(true) => {
                let line = line.trim();
                if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
                    continue;
                }
                match line.strip_suffix('\\') {
                    Some(start) => {
                        pending.push_str(start.trim_end());
                        pending.push(' ');
                    }
                    None => {
                        pending.push_str(line);
                        commands.push(std::mem::take(&mut pending));
                    }
                }
            }
        }
    }
    commands
}

/// What the documented launchers stand for here. A reader runs `cargo run --release …` and
/// `npx --yes @bufbuild/buf`; the test runs the same programs already built for it: the
/// `vault-server` binary under test, the client examples built in the test profile (see
/// [`examples_dir`]) and `buf` from the committed lockfile (no download). Only the launcher is
/// swapped; the rest of each command runs as written. A launcher not in this list, such as a
/// `cargo run` in another profile, fails the test: the documents use the profile `dev` was
/// built with, so that nothing is built twice.
pub(crate) struct Launchers {
    server: String,
    buf: PathBuf,
}

impl Launchers {
    pub(crate) fn new() -> Self {
        Self {
            server: binary().to_string(),
            buf: buf_bin_dir().join("buf"),
        }
    }

    /// `command` with its launcher replaced by the program it runs.
    pub(crate) fn local(&self, command: &str) -> String {
        let mut local = command
            .replace("cargo run --release -q -p vault-server --", &self.server)
            .replace("cargo run --release -p vault-server --", &self.server)
            .replace("npx --yes @bufbuild/buf", self.buf.to_str().unwrap());
        let example = "cargo run --release -p vault-client --example ";
        while let Some(at) = local.find(example) {
            let rest = &local[at + example.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = &rest[name.len()..];
            let after = after.strip_prefix(" --").unwrap_or(after);
            let program = examples_dir().join(&name);
            assert!(program.is_file(), "no client example named {name}");
            local = format!("{}{}{after}", &local[..at], program.to_str().unwrap());
        }
        assert!(
            !local.contains("cargo ") && !local.contains("npx "),
            "`{command}` uses a launcher the walkthrough does not (another cargo profile?)"
        );
        local
    }
}

/// The client examples, built once per run in the profile the tests were built in. A release
/// build here would compile the whole dependency tree a second time for no coverage the debug
/// build lacks. `cargo test --workspace` (the README's and CI's test command) has already built
/// them into `target/debug/examples` with the workspace's features, so this `cargo build` finds
/// them fresh and returns at once; under a narrower `cargo test -p vault-server` it compiles the
/// three small example binaries (and whatever the workspace's feature set adds), once.
fn examples_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = Path::new(binary()).parent().unwrap().to_path_buf();
            let target_dir = profile_dir.parent().unwrap();
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--quiet", "--workspace", "--examples"])
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the client examples failed");
            profile_dir.join("examples")
        })
        .clone()
}

/// Runs one command with `sh` in `cwd`, with only PATH and `env`: nothing else of the test's
/// environment leaks in.
pub(crate) fn run_shell_in(line: &str, env: &[(String, String)], cwd: &Path) -> (bool, String) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(line)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs a documented command as a reader's shell would: an `export NAME=…` line sets NAME for
/// the commands after it and answers its value; any other line answers (success, output).
pub(crate) fn run_documented(
    launchers: &Launchers,
    line: &str,
    env: &mut Vec<(String, String)>,
    cwd: &Path,
) -> (bool, String) {
    let local = launchers.local(line);
    if let Some((name, _)) = line
        .strip_prefix("export ")
        .and_then(|rest| rest.split_once('='))
    {
        let (ok, value) = run_shell_in(&format!("{local}\nprintf %s \"${name}\""), env, cwd);
        assert!(ok && !value.is_empty(), "`{line}` failed: {value}");
        env.retain(|(k, _)| k != name);
        env.push((name.to_string(), value.clone()));
        return (true, value);
    }
    run_shell_in(&local, env, cwd)
}

#[test]
fn the_readme_walkthrough_runs_on_what_dev_prints() {
    let launchers = Launchers::new();
    // A fresh directory stands for the checkout: `dev` keeps ./vault-data there and `token`
    // finds its key there, as when both run from the repository root.
    let checkout = tempfile::tempdir().unwrap();
    let run = documented_commands("README.md", "## Run");
    assert_eq!(run, ["cargo run --release -p vault-server -- dev"]);
    assert_eq!(launchers.local(&run[0]), format!("{} dev", binary()));
    let dev = spawn_dev(Some(checkout.path()), &[]);
    let banner = dev.lines.join("\n");
    assert!(banner.contains("DEVELOPMENT MODE"), "{banner}");
    let demo_token = dev.export("VAULT_TOKEN");

    // Each README command is a line dev printed; the test runs that line, in README order.
    let mut env = Vec::new();
    let mut ran = Vec::new();
    for documented in documented_commands("README.md", "## Walkthrough") {
        let line = dev.line_for(&documented);
        let (ok, out) = run_documented(&launchers, &line, &mut env, checkout.path());
        assert!(ok, "`{documented}` failed:\n{out}");
        let as_demo_user = env
            .iter()
            .any(|(k, v)| k == "VAULT_TOKEN" && *v == demo_token);
        let step = if line.starts_with("export VAULT_ADDR=") {
            assert_eq!(out, format!("http://{}", dev.addr()));
            "address"
        } else if line.starts_with("export VAULT_TOKEN=") {
            assert_eq!(out.split('.').count(), 3, "a JWT: {out}");
            "token"
        } else if line.ends_with("/StoreToken\"") {
            assert!(out.contains("\"generation\""), "{out}");
            "StoreToken"
        } else if line.ends_with("/GetToken\"") {
            assert!(out.contains("demo-access-token"), "{out}");
            assert!(
                !out.contains("demo-refresh-token"),
                "a refresh token never leaves the vault"
            );
            "GetToken"
        } else if line.contains("--example gateway_store_token ") {
            assert!(out.contains("stored jira"), "{out}");
            "gateway example"
        } else if line.contains("--example agent_get_token ") && as_demo_user {
            assert!(out.contains("token for jira"), "{out}");
            assert!(
                !out.contains("demo-access-token"),
                "the example never prints it"
            );
            "agent example"
        } else if line.contains("--example agent_get_token ") {
            assert!(out.contains("no credential for jira"), "{out}");
            "another user's agent example"
        } else {
            panic!("the test does not know what `{documented}` should do: add it here")
        };
        ran.push(step);
    }
    assert_eq!(
        ran,
        [
            "address",
            "token",
            "StoreToken",
            "GetToken",
            "gateway example",
            "agent example",
            "token",
            "another user's agent example"
        ],
        "the walkthrough's steps"
    );
    assert!(
        dev.lines.iter().any(|l| l.starts_with("grpcurl ")),
        "{banner}"
    );

    let data_dir = checkout.path().join("vault-data");
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
    let launchers = Launchers::new();
    // The README's consent block, as dev printed it: start dev, begin, (browser), GetToken.
    let documented = documented_commands("README.md", "### The consent flow in `dev`");
    assert_eq!(documented.len(), 3, "{documented:?}");
    assert_eq!(
        documented[0],
        "VAULT_PROVIDERS_FILE=providers.toml cargo run --release -p vault-server -- dev"
    );
    let mut env = vec![
        ("VAULT_ADDR".to_string(), dev.export("VAULT_ADDR")),
        ("VAULT_TOKEN".to_string(), dev.export("VAULT_TOKEN")),
    ];
    let cwd = dir.path();
    let begin = dev.line_for(&documented[1]);
    assert!(begin.ends_with("/BeginAuthorization\""), "{begin}");
    let get = dev.line_for(&documented[2]);
    assert!(get.ends_with("/GetToken\""), "{get}");

    let (ok, begun) = run_documented(&launchers, &begin, &mut env, cwd);
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

    let (ok, fetched) = run_documented(&launchers, &get, &mut env, cwd);
    assert!(ok, "GetToken failed: {fetched}");
    let fetched: serde_json::Value = serde_json::from_str(&fetched).unwrap();
    let access = fetched["token"]["accessToken"].as_str().unwrap();
    assert!(provider.is_active(access).await);
}
