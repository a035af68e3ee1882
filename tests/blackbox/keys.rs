//! Key lifecycle (issue 17): `rotate-root` online under load on two replicas, killed halfway and
//! run again, and on the embedded store.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::helpers::{
    Issuer, OTHER_ROOT_KEY, ROOT_KEY, TestDb, access_token, binary, eventually, spawn_with, store,
    try_spawn,
};

/// Writes `key` (base64, as `keygen` writes it) to a file in `dir`.
fn key_file(dir: &tempfile::TempDir, key: &str) -> String {
    let path = dir.path().join("new-root.key");
    std::fs::write(&path, format!("{key}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs `vault-server rotate-root ARGS` on `db_url` with the current root `root`; returns
/// (success, stdout, stderr).
async fn rotate_root(db_url: &str, root: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["rotate-root"];
    all.extend_from_slice(args);
    run(
        &all,
        &[("VAULT_DATABASE_URL", db_url), ("VAULT_ROOT_KEY", root)],
    )
    .await
}

fn agent_name(n: usize) -> String {
    format!("agent-{n:02}")
}

/// Stores one credential for each of `agents` agents through `app`, access token `v0-<agent>`.
async fn seed(app: &crate::helpers::TestApp, issuer: &Issuer, agents: usize) {
    for n in 0..agents {
        let name = agent_name(n);
        let vault = app.client(issuer, &name, "user-1").await;
        store(&vault, "jira", &format!("v0-{name}")).await;
    }
}

/// Every agent's credential opens on a fresh server with `root`, holding the access token the
/// last acknowledged write stored (`latest[n]`, or `v0-<agent>`).
async fn all_open(db: &TestDb, issuer: &Issuer, root: &str, latest: &[String]) {
    let app = spawn_with(db, issuer, &[("VAULT_ROOT_KEY", root)]).await;
    for (n, expected) in latest.iter().enumerate() {
        let vault = app.client(issuer, &agent_name(n), "user-1").await;
        assert_eq!(&access_token(&vault, "jira").await, expected, "agent {n}");
    }
    app.stop().await;
}

/// A server started with `root` is refused with the key-check line.
async fn refused_with(db: &TestDb, issuer: &Issuer, root: &str) {
    let err = try_spawn(db, issuer, &[("VAULT_ROOT_KEY", root)])
        .await
        .err()
        .expect("a server on the old root key is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains("key check failed") && err.contains("rotate-root"),
        "{err}"
    );
}

/// Load on two replicas: for each caller (its index, and its client on each replica), a task
/// writes a new access token on one replica and reads it back from the other, alternately,
/// until stopped. Every call must succeed (a failure panics its task).
pub(crate) struct WriteReadLoad {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<(usize, String)>,
    callers: u64,
}

impl WriteReadLoad {
    /// Starts the load; each caller's first token is `v0-<name>`, already stored.
    pub(crate) fn start(callers: Vec<(usize, String, [vault_client::Client; 2])>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        let count = callers.len() as u64;
        for (n, name, replicas) in callers {
            let (stop, calls) = (Arc::clone(&stop), Arc::clone(&calls));
            tasks.spawn(async move {
                let mut latest = format!("v0-{name}");
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let access = format!("v{round}-{name}");
                    replicas[(round % 2) as usize]
                        .store_token(
                            "jira",
                            crate::helpers::oauth_token(&access, "rt", 3600),
                            None,
                        )
                        .await
                        .unwrap_or_else(|e| panic!("StoreToken of {name} failed: {e}"));
                    latest = access;
                    let read = replicas[((round + 1) % 2) as usize]
                        .get_token("jira", Duration::ZERO)
                        .await
                        .unwrap_or_else(|e| panic!("GetToken of {name} failed: {e}"));
                    assert_eq!(read.access_token, latest);
                    calls.fetch_add(2, Ordering::Relaxed);
                }
                (n, latest)
            });
        }
        Self {
            stop,
            calls,
            tasks,
            callers: count,
        }
    }

    /// Waits until every caller made about one more round than now (`what` names the wait).
    pub(crate) async fn goes_on(&self, what: &str) {
        let target = self.calls.load(Ordering::Relaxed) + 2 * self.callers;
        let calls = Arc::clone(&self.calls);
        eventually(what, move || {
            let calls = Arc::clone(&calls);
            async move { calls.load(Ordering::Relaxed) >= target }
        })
        .await;
    }

    /// Stops the load; each caller's last acknowledged access token, by index, over `latest`
    /// (which holds the callers' indexes and whatever the others should keep).
    pub(crate) async fn stop(mut self, mut latest: Vec<String>) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            let (n, access) = done.expect("no call failed under the load");
            latest[n] = access;
        }
        latest
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotate_root_under_load_on_two_replicas_loses_no_call_and_the_old_root_is_refused() {
    const AGENTS: usize = 24;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let a = spawn_with(&db, &issuer, &[]).await;
    let b = spawn_with(&db, &issuer, &[]).await;
    seed(&a, &issuer, AGENTS).await;

    // Load: the last acknowledged write per agent is what must open afterwards.
    let mut callers = Vec::new();
    for n in 0..AGENTS {
        let name = agent_name(n);
        let replicas = [
            a.client(&issuer, &name, "user-1").await,
            b.client(&issuer, &name, "user-1").await,
        ];
        callers.push((n, name, replicas));
    }
    let load = WriteReadLoad::start(callers);
    load.goes_on("the load is running").await;

    let dir = tempfile::tempdir().unwrap();
    let new_key = key_file(&dir, OTHER_ROOT_KEY);
    let (ok, out, err) = rotate_root(
        &db.url,
        ROOT_KEY,
        &["--new-key-file", &new_key, "--batch", "5"],
    )
    .await;
    assert!(ok, "rotate-root failed: {out}\n{err}");
    assert!(out.contains("re-wrapped 5/"), "plain progress lines: {out}");
    assert!(out.contains("now the vault's root (24 agent keys"), "{out}");
    // The replicas, still on the old root, go on serving the agents they hold after the switch.
    load.goes_on("the load goes on after the switch").await;
    let latest = load.stop(vec![String::new(); AGENTS]).await;
    a.stop().await;
    b.stop().await;

    all_open(&db, &issuer, OTHER_ROOT_KEY, &latest).await;
    refused_with(&db, &issuer, ROOT_KEY).await;
    // Run again with the same keys: nothing left to do, and it says so.
    let new_key = key_file(&dir, OTHER_ROOT_KEY);
    let (ok, out, err) = rotate_root(&db.url, ROOT_KEY, &["--new-key-file", &new_key]).await;
    assert!(ok && out.contains("already complete"), "{out}\n{err}");
}

/// A command of the binary running in the background until the test kills it, on `db_url`
/// with the test root key; what it prints is collected on a thread.
pub(crate) struct Killable {
    child: std::process::Child,
    lines: std::thread::JoinHandle<Vec<String>>,
}

impl Killable {
    pub(crate) fn start(args: &[&str], db_url: &str) -> Self {
        let mut child = Command::new(binary())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VAULT_DATABASE_URL", db_url)
            .env("VAULT_ROOT_KEY", ROOT_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        Self { child, lines }
    }

    /// kill -9, then every line it printed.
    pub(crate) fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.lines.join().unwrap()
    }
}

/// Waits until exactly one statement LIKE `pattern` waits on a lock in `db`.
pub(crate) async fn waits_on_lock(db: &TestDb, what: &str, pattern: &str) {
    let probe = Arc::new(tokio::sync::Mutex::new(db.connect().await));
    eventually(what, || {
        let probe = Arc::clone(&probe);
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE $1",
            )
            .bind(pattern)
            .fetch_one(&mut *probe.lock().await)
            .await
            .unwrap();
            waiting == 1
        }
    })
    .await;
}

#[tokio::test]
async fn rotate_root_killed_halfway_is_finished_by_running_it_again() {
    const AGENTS: usize = 12;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    seed(&app, &issuer, AGENTS).await;
    app.stop().await;

    // Hold one agent's registry row in the middle of the order, so the run stops there with
    // the agents before it re-wrapped; then kill it.
    let mut holder = db.connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    let middle: String = sqlx::query_scalar(
        "SELECT schema_name FROM vault.agents ORDER BY schema_name OFFSET 6 LIMIT 1",
    )
    .fetch_one(&mut holder)
    .await
    .unwrap();
    sqlx::query("SELECT 1 FROM vault.agents WHERE schema_name = $1 FOR UPDATE")
        .bind(&middle)
        .execute(&mut holder)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let new_key = key_file(&dir, OTHER_ROOT_KEY);
    let run = Killable::start(
        &["rotate-root", "--new-key-file", &new_key, "--batch", "1"],
        &db.url,
    );
    waits_on_lock(
        &db,
        "rotate-root waits on the held agent",
        "UPDATE vault.agents SET next_wrapped_key%",
    )
    .await;
    let mut probe = db.connect().await;
    let (done, total): (i64, i64) =
        sqlx::query_as("SELECT count(next_wrapped_key), count(*) FROM vault.agents")
            .fetch_one(&mut probe)
            .await
            .unwrap();
    assert_eq!((done, total), (6, AGENTS as i64), "halfway");
    let printed = run.kill();
    assert_eq!(
        printed.last().map(String::as_str),
        Some("re-wrapped 6/12 agent keys")
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    // Killed before the switch: the old root still opens everything, and is still the root.
    let seeded: Vec<String> = (0..AGENTS)
        .map(|n| format!("v0-{}", agent_name(n)))
        .collect();
    all_open(&db, &issuer, ROOT_KEY, &seeded).await;
    let (ok, out, err) = rotate_root(
        &db.url,
        ROOT_KEY,
        &["--new-key-file", &new_key, "--batch", "4"],
    )
    .await;
    assert!(ok, "the re-run failed: {out}\n{err}");
    assert!(out.contains("now the vault's root (12 agent keys"), "{out}");
    all_open(&db, &issuer, OTHER_ROOT_KEY, &seeded).await;
    refused_with(&db, &issuer, ROOT_KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_moves_the_embedded_store_to_a_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let on_sqlite = [("VAULT_DATABASE_URL", url.as_str())];
    let app = spawn_with(&db, &issuer, &on_sqlite).await;
    let vault = app.client(&issuer, "agent-a", "user-1").await;
    store(&vault, "jira", "before-rotation").await;

    // Online: the server keeps serving on the old root while the file is rotated under it
    // (on a blocking thread, so the server in this runtime goes on running meanwhile).
    let (ok, out, err) = run(
        &["rotate-root", "--new-passphrase-env", "NEW_ROOT_PASSPHRASE"],
        &[
            ("VAULT_DATABASE_URL", url.as_str()),
            ("VAULT_ROOT_KEY", ROOT_KEY),
            ("NEW_ROOT_PASSPHRASE", "correct horse battery staple"),
        ],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("now the vault's root (1 agent keys"), "{out}");
    store(&vault, "jira", "during-rotation").await;
    assert_eq!(access_token(&vault, "jira").await, "during-rotation");
    app.stop().await;

    let passphrase = [
        ("VAULT_DATABASE_URL", url.as_str()),
        ("VAULT_ROOT_KEY", ""),
        ("VAULT_ROOT_PASSPHRASE", "correct horse battery staple"),
    ];
    let app = spawn_with(&db, &issuer, &passphrase).await;
    let vault = app.client(&issuer, "agent-a", "user-1").await;
    assert_eq!(access_token(&vault, "jira").await, "during-rotation");
    // A new agent is registered under the new root.
    let newcomer = app.client(&issuer, "agent-b", "user-1").await;
    store(&newcomer, "jira", "new-agent").await;
    app.stop().await;
    let err = try_spawn(&db, &issuer, &on_sqlite)
        .await
        .err()
        .expect("the old root key is refused");
    assert!(
        format!("{err:#}").contains("root key is a passphrase"),
        "{err:#}"
    );
}

/// A SoftHSM2 token of the test's own: its directory, its configuration file, and the
/// environment a process needs to reach it.
struct Token {
    _dir: tempfile::TempDir,
    conf: String,
    pin_file: String,
}

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "vault-test";
const PIN: &str = "user-pin-5678";

impl Token {
    fn new() -> Self {
        assert!(
            std::path::Path::new(SOFTHSM).exists(),
            "SoftHSM2 is not installed ({SOFTHSM}); `apt-get install softhsm2` (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN])
            .args(["--so-pin", "1234", "--pin", PIN])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        Self {
            conf: conf.to_str().unwrap().to_owned(),
            pin_file: pin_file.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    /// The settings of a root key labelled `key` in this token, the PIN given as `pin`.
    fn root<'a>(&'a self, key: &'a str, pin: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("SOFTHSM2_CONF", self.conf.as_str()),
            ("VAULT_ROOT_PKCS11_MODULE", SOFTHSM),
            ("VAULT_ROOT_PKCS11_TOKEN_LABEL", TOKEN),
            ("VAULT_ROOT_PKCS11_KEY_LABEL", key),
            ("VAULT_ROOT_PKCS11_PIN", pin),
        ]
    }
}

/// `settings_pairs` for a server process whose root is `root`: the test key's setting left out.
fn process_pairs<'a>(
    db: &'a TestDb,
    issuer: &'a Issuer,
    root: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    crate::helpers::settings_pairs(db, issuer, root)
        .into_iter()
        .filter(|(name, _)| *name != "VAULT_ROOT_KEY")
        .collect()
}

/// Runs the binary with `args` and exactly `pairs` (plus PATH), on a blocking thread so that
/// servers in this runtime go on serving; (success, stdout, stderr).
pub(crate) async fn run(args: &[&str], pairs: &[(&str, &str)]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(pairs)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a server process with `pairs`, calls `work` against it, stops it, and returns how many
/// calls it sent to the root key's token (`vault.root_key.device_calls`, flushed at SIGTERM).
async fn hsm_calls<F, Fut>(pairs: &[(&str, &str)], work: F) -> i64
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (collector, otlp) = crate::telemetry::Collector::start().await;
    let mut pairs = pairs.to_vec();
    pairs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()));
    let server = crate::helpers::start_binary(&pairs).await;
    work(server.endpoint()).await;
    assert!(server.terminate().await.success());
    let calls = collector.counter("vault.root_key.device_calls", "none");
    calls.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_key_in_softhsm_serves_across_restarts_and_the_hot_path_never_calls_it() {
    let token = Token::new();
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let root = token.root("vault-root", PIN);

    let (ok, out, err) = run(&["keygen", "--pkcs11"], &root).await;
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("created the root key \"vault-root\" in token \"vault-test\""),
        "{out}"
    );
    let (ok, _, err) = run(&["keygen", "--pkcs11"], &root).await;
    assert!(
        !ok && err.contains("VAULT_ROOT_PKCS11_KEY_LABEL") && err.contains("exists already"),
        "{err}"
    );

    let pairs = process_pairs(&db, &issuer, &root);
    let jwt = issuer.token("agent-a", "alice");
    // First start: registers the vault and the agent under the token's key, stores.
    let first = hsm_calls(&pairs, |endpoint| async {
        let vault = crate::helpers::client_at(endpoint, &jwt).await;
        store(&vault, "jira", "in-the-hsm").await;
    })
    .await;
    assert!(
        first >= 3,
        "key check, control key and agent key went to the token: {first}"
    );

    // Restart, read once: the warm-up.
    let warm = hsm_calls(&pairs, |endpoint| async {
        let vault = crate::helpers::client_at(endpoint, &jwt).await;
        assert_eq!(access_token(&vault, "jira").await, "in-the-hsm");
    })
    .await;
    // Restart, the same warm-up, then the hot path: reads and writes of the agent.
    let hot = hsm_calls(&pairs, |endpoint| async {
        let vault = crate::helpers::client_at(endpoint, &jwt).await;
        assert_eq!(access_token(&vault, "jira").await, "in-the-hsm");
        for round in 0..100 {
            if round % 10 == 0 {
                store(&vault, "jira", &format!("round-{round}")).await;
            }
            vault.get_token("jira", Duration::ZERO).await.unwrap();
        }
    })
    .await;
    assert!(warm >= 2, "{warm}");
    assert_eq!(
        hot, warm,
        "the hot path sent nothing to the token after warm-up"
    );

    // A wrong PIN, or a key the token does not hold, stops startup with one clear line.
    let wrong_pin = process_pairs(&db, &issuer, &token.root("vault-root", "not-the-pin"));
    let (ok, err) = crate::helpers::run_binary_to_exit(&["serve"], &wrong_pin);
    assert!(
        !ok && err.contains("VAULT_ROOT_PKCS11_PIN: the token refused the PIN"),
        "{err}"
    );
    assert!(!err.contains("not-the-pin"), "{err}");
    let missing = process_pairs(&db, &issuer, &token.root("no-such-key", PIN));
    let (ok, err) = crate::helpers::run_binary_to_exit(&["serve"], &missing);
    assert!(
        !ok && err.contains("VAULT_ROOT_PKCS11_KEY_LABEL: no AES key labelled \"no-such-key\" in token \"vault-test\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_moves_from_a_key_file_to_softhsm_and_back() {
    let token = Token::new();
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let hsm = token.root("vault-root", PIN);
    let (ok, out, err) = run(&["keygen", "--pkcs11"], &hsm).await;
    assert!(ok, "{out}\n{err}");

    // On a key file.
    let app = spawn_with(&db, &issuer, &[]).await;
    let vault = app.client(&issuer, "agent-a", "user-1").await;
    store(&vault, "jira", "on-a-key-file").await;
    let other = app.client(&issuer, "agent-b", "user-1").await;
    store(&other, "jira", "agent-b-token").await;

    // Into the token, while the server on the file keeps serving.
    let (ok, out, err) = run(
        &[
            "rotate-root",
            "--new-pkcs11-module",
            SOFTHSM,
            "--new-pkcs11-token",
            TOKEN,
            "--new-pkcs11-key",
            "vault-root",
            "--new-pkcs11-pin-file",
            &token.pin_file,
        ],
        &[
            ("SOFTHSM2_CONF", token.conf.as_str()),
            ("VAULT_DATABASE_URL", db.url.as_str()),
            ("VAULT_ROOT_KEY", ROOT_KEY),
        ],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("now the vault's root (2 agent keys"), "{out}");
    store(&vault, "jira", "during-the-move").await;
    app.stop().await;
    refused_with(&db, &issuer, ROOT_KEY).await;

    // This time the PIN comes from a file.
    let mut pairs = process_pairs(&db, &issuer, &hsm);
    pairs.retain(|(name, _)| *name != "VAULT_ROOT_PKCS11_PIN");
    pairs.push(("VAULT_ROOT_PKCS11_PIN_FILE", token.pin_file.as_str()));
    let server = crate::helpers::start_binary(&pairs).await;
    let vault = server.client_with(&issuer.token("agent-a", "user-1")).await;
    assert_eq!(access_token(&vault, "jira").await, "during-the-move");
    store(&vault, "jira", "in-the-token").await;
    drop(vault);
    assert!(server.terminate().await.success());

    // And back out to a key file, the current root named by VAULT_ROOT_PKCS11_*.
    let dir = tempfile::tempdir().unwrap();
    let back = key_file(&dir, OTHER_ROOT_KEY);
    let mut rotate = vec![("VAULT_DATABASE_URL", db.url.as_str())];
    rotate.extend_from_slice(&hsm);
    let (ok, out, err) = run(&["rotate-root", "--new-key-file", &back], &rotate).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("now the vault's root (2 agent keys"), "{out}");

    let app = spawn_with(&db, &issuer, &[("VAULT_ROOT_KEY", OTHER_ROOT_KEY)]).await;
    let vault = app.client(&issuer, "agent-a", "user-1").await;
    assert_eq!(access_token(&vault, "jira").await, "in-the-token");
    let other = app.client(&issuer, "agent-b", "user-1").await;
    assert_eq!(access_token(&other, "jira").await, "agent-b-token");
    app.stop().await;
}

/// How many schemas are named `schema`.
async fn schemas(conn: &mut sqlx::PgConnection, schema: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1")
        .bind(schema)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// `vault-server shred-agent ARGS` on `db_url` (as the owner: the test database's URL);
/// (success, stdout, stderr).
async fn shred(db_url: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["shred-agent"];
    all.extend_from_slice(args);
    run(&all, &[("VAULT_DATABASE_URL", db_url)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_agent_destroys_the_key_and_a_restored_dump_of_its_rows_does_not_open() {
    use vault_server::crypto::{Binding, RootKey, SealedCredential, open_credential};
    use vault_server::ids::{AgentId, Generation, IssuerId, Tool, UserId};

    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[]).await;
    for agent in ["agent-a", "agent-b"] {
        let vault = app.client(&issuer, agent, "user-1").await;
        store(&vault, "jira", &format!("{agent}-token")).await;
    }
    app.stop().await;
    let schema = crate::helpers::schema_of("agent-a");
    let mut conn = db.connect().await;
    // A provider revocation of agent-a queued (a copy of its credential), not due for a day.
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".revocation_outbox
             (user_id, tool, generation, key_version, wrapped_data_key, ciphertext, next_attempt_at)
         SELECT user_id, tool, generation, key_version, wrapped_data_key, ciphertext,
                now() + interval '1 day'
         FROM \"{schema}\".credentials"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("before.dump");
    let out = Command::new("pg_dump")
        .args(["-Fc", "-d", &db.url, "-f", dump.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without --yes: what it would destroy, and nothing done.
    let (ok, out, err) = shred(&db.url, &["--agent", "agent-a"]).await;
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("would shred agent agent-a of https://issuer.test: its key, and 1 credentials, 1 queued provider revocations"),
        "{out}"
    );
    // With a revocation queued, it waits for the replicas to deliver it.
    let (ok, _, err) = shred(&db.url, &["--agent", "agent-a", "--yes"]).await;
    assert!(
        !ok && err.contains("1 provider revocations queued"),
        "{err}"
    );
    assert_eq!(
        schemas(&mut conn, &schema).await,
        1,
        "nothing was destroyed yet"
    );

    let (ok, out, err) = shred(
        &db.url,
        &["--agent", "agent-a", "--yes", "--skip-provider-revocation"],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("(1 provider revocations abandoned)"), "{out}");
    assert_eq!(
        schemas(&mut conn, &schema).await,
        0,
        "the schema is dropped"
    );
    let (keys, tombstones): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM vault.agents WHERE agent_id = 'agent-a'),
                (SELECT count(*) FROM vault.shredded_agents WHERE agent_id = 'agent-a')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((keys, tombstones), (0, 1));
    let roles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = vault.agent_role($1)")
            .bind(&schema)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(roles, 0, "the agent's role is dropped");

    // The agent's rows, restored from the dump taken before, open under no key the vault has.
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut conn)
        .await
        .unwrap();
    let out = Command::new("pg_restore")
        .args([
            "--no-owner",
            "--no-privileges",
            "-d",
            &db.url,
            "-n",
            &schema,
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    /// user, tool, generation, key version, wrapped data key, ciphertext
    type Row = (String, String, i64, i32, Vec<u8>, Vec<u8>);
    let restored: Vec<Row> = sqlx::query_as(&format!(
        "SELECT user_id, tool, generation, key_version, wrapped_data_key, ciphertext
         FROM \"{schema}\".credentials"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(restored.len(), 1, "the dump held the credential");
    let wraps: Vec<(String, String, i32, Vec<u8>)> =
        sqlx::query_as("SELECT issuer, agent_id, key_version, wrapped_key FROM vault.agents")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(wraps.len(), 1, "only agent-b's key is left");
    let root_bytes: [u8; 32] =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ROOT_KEY)
            .unwrap()
            .try_into()
            .unwrap();
    let root = RootKey::from_bytes(root_bytes);
    let (user, tool, generation, version, data_key, ciphertext) = &restored[0];
    let (user, tool) = (UserId::parse(user).unwrap(), Tool::parse(tool).unwrap());
    let shredded = AgentId::parse("agent-a").unwrap();
    let binding = Binding {
        agent: &shredded,
        user: &user,
        tool: &tool,
        generation: Generation::new(*generation as u64).unwrap(),
    };
    let sealed = SealedCredential {
        wrapped_data_key: data_key.clone(),
        ciphertext: ciphertext.clone(),
        key_version: *version as u32,
    };
    for (iss, agent_id, key_version, wrapped) in &wraps {
        let key = root
            .unwrap_agent_key(
                &IssuerId::parse(iss).unwrap(),
                &AgentId::parse(agent_id).unwrap(),
                *key_version as u32,
                wrapped,
            )
            .unwrap();
        assert!(open_credential(&key, binding, &sealed).is_err());
    }

    // Served again: agent-b is untouched; agent-a is neither found nor registered anew.
    let app = spawn_with(&db, &issuer, &[]).await;
    let b = app.client(&issuer, "agent-b", "user-1").await;
    assert_eq!(access_token(&b, "jira").await, "agent-b-token");
    let a = app.client(&issuer, "agent-a", "user-1").await;
    assert!(matches!(
        a.get_token("jira", Duration::ZERO).await,
        Err(vault_client::Error::CredentialNotFound)
    ));
    let again = a
        .store_token("jira", crate::helpers::oauth_token("new", "rt", 3600), None)
        .await;
    assert!(
        matches!(&again, Err(vault_client::Error::PermissionDenied { message, .. }) if message.contains("shredded")),
        "{again:?}"
    );
    app.stop().await;

    // The audit log still verifies, and says what was shredded.
    let (ok, err) = crate::helpers::run_binary_to_exit(
        &["audit", "verify"],
        &[
            ("VAULT_DATABASE_URL", db.url.as_str()),
            ("VAULT_ROOT_KEY", ROOT_KEY),
        ],
    );
    assert!(ok, "{err}");
    let shredded_records: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vault.audit_log WHERE action IN ('key.agent_shred_started', 'key.agent_shredded')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(shredded_records, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_agent_on_the_embedded_store_deletes_its_rows_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let on_sqlite = [("VAULT_DATABASE_URL", url.as_str())];
    let app = spawn_with(&db, &issuer, &on_sqlite).await;
    for agent in ["agent-a", "agent-b"] {
        let vault = app.client(&issuer, agent, "user-1").await;
        store(&vault, "jira", &format!("{agent}-token")).await;
    }
    app.stop().await;

    let (ok, out, err) = shred(&url, &["--agent", "agent-a", "--yes"]).await;
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("shredded agent agent-a of https://issuer.test: its key is destroyed, with 1 credentials"), "{out}");
    let (ok, _, err) = shred(&url, &["--agent", "agent-a", "--yes"]).await;
    assert!(!ok && err.contains("no agent agent-a"), "{err}");

    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let namespace = crate::helpers::schema_of("agent-a");
    let left: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM agents WHERE agent_id = 'agent-a'),
                (SELECT count(*) FROM credentials WHERE namespace = ?1),
                (SELECT count(*) FROM audit_log WHERE chain = ?1)",
    )
    .bind(&namespace)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(left, (0, 0, 0), "the key and every row of agent-a are gone");
    drop(conn);

    let app = spawn_with(&db, &issuer, &on_sqlite).await;
    let b = app.client(&issuer, "agent-b", "user-1").await;
    assert_eq!(access_token(&b, "jira").await, "agent-b-token");
    let a = app.client(&issuer, "agent-a", "user-1").await;
    let again = a
        .store_token("jira", crate::helpers::oauth_token("new", "rt", 3600), None)
        .await;
    assert!(
        matches!(&again, Err(vault_client::Error::PermissionDenied { message, .. }) if message.contains("shredded")),
        "{again:?}"
    );
    app.stop().await;
}
