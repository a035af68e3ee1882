//! The command line as an operator meets it on the first day: `keygen` into a new directory,
//! `migrate` and `sweep` refusing to guess a database, `help settings`, the startup lines that
//! say what a valid configuration quietly turns off, and no `npx` in the docs that stops to ask.

use std::process::Command;

use crate::helpers::*;

/// Runs the binary with only `pairs` (plus PATH) as its environment, in `dir`; returns
/// (success, stdout, stderr).
fn run_in(dir: &std::path::Path, args: &[&str], pairs: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(binary());
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in pairs {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[test]
fn keygen_creates_a_missing_directory_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new/keys/root.key");
    let (ok, stdout, stderr) = run_in(dir.path(), &["keygen", "--out", out.to_str().unwrap()], &[]);
    assert!(ok, "{stdout}{stderr}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("new")), 0o700);
    assert_eq!(mode(&dir.path().join("new/keys")), 0o700);
    assert_eq!(mode(&out), 0o600);
    let key = std::fs::read_to_string(&out).unwrap();
    assert_eq!(key.trim().len(), 44, "base64 of 32 bytes");
}

#[test]
fn migrate_and_sweep_without_a_database_refuse_naming_vault_database_url() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["migrate"][..], &["sweep", "--dry-run"][..]] {
        let (ok, stdout, stderr) = run_in(dir.path(), args, &[]);
        assert!(!ok, "{args:?}: {stdout}");
        assert!(
            stderr.contains("VAULT_DATABASE_URL is not set") && stderr.contains("dev"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "no embedded store was created in the working directory"
    );
}

#[test]
fn help_settings_prints_what_config_docs_prints() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, docs, stderr) = run_in(dir.path(), &["config", "--docs"], &[]);
    assert!(ok, "{stderr}");
    assert!(docs.contains("VAULT_DATABASE_URL"), "{docs}");
    let (ok, help, stderr) = run_in(dir.path(), &["help", "settings"], &[]);
    assert!(ok, "{stderr}");
    assert_eq!(help, docs);

    let (ok, top, _) = run_in(dir.path(), &["--help"], &[]);
    assert!(ok);
    assert!(top.contains("help settings"), "--help points at it: {top}");
    let (ok, sweep, _) = run_in(dir.path(), &["help", "sweep"], &[]);
    assert!(ok && sweep.contains("--dry-run"), "{sweep}");
    let (ok, _, stderr) = run_in(dir.path(), &["help", "nonsense"], &[]);
    assert!(!ok && stderr.contains("nonsense"), "{stderr}");
}

/// Serves `issuer`'s JWKS over plain http on loopback; returns its URL.
async fn serve_jwks(issuer: &Issuer) -> String {
    let jwks = std::fs::read_to_string(&issuer.jwks_path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { ([(http::header::CONTENT_TYPE, "application/json")], jwks) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/jwks.json")
}

#[tokio::test]
async fn startup_says_when_providers_are_off_and_when_issuer_keys_come_over_plain_http() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let jwks_url = serve_jwks(&issuer).await;
    let mut pairs = settings_pairs(&db, &issuer, &[("VAULT_JWT_JWKS_URL", jwks_url.as_str())]);
    pairs.retain(|(k, _)| *k != "VAULT_JWT_JWKS_FILE");
    let server = start_binary(&pairs).await;
    let lines = server.stderr_lines.lock().unwrap().join("\n");
    assert!(
        lines.contains(
            "refresh and revocation at providers are off: VAULT_PROVIDERS_FILE is not set"
        ),
        "{lines}"
    );
    assert!(
        lines.contains("issuer keys are fetched over plain http on localhost")
            && lines.contains(&jwks_url),
        "{lines}"
    );
}

/// Every `npx` the project tells a reader (or a test) to run answers npm's install question
/// itself: on a fresh machine a bare `npx @bufbuild/buf` stops to ask.
#[test]
fn every_npx_command_in_the_docs_and_the_dev_banner_says_yes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for dir in [
        "docs",
        "vault-server/src",
        "vault-client/examples",
        "tests/blackbox",
    ] {
        let mut pending = vec![root.join(dir)];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.map(Result::unwrap) {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "md" || e == "rs") {
                    files.push(path);
                }
            }
        }
    }
    let npx = "npx ";
    let mut bare = Vec::new();
    // This file names the bare form on purpose.
    for file in files
        .iter()
        .filter(|f| !f.ends_with("tests/blackbox/cli.rs"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            for (at, _) in line.match_indices(npx) {
                // A command names a package (or a flag) next; `"npx "` in a string does not.
                let next = &line[at + npx.len()..];
                let command =
                    next.starts_with(|c: char| c == '@' || c == '-' || c.is_alphanumeric());
                if command && !next.starts_with("--yes") {
                    bare.push(format!("{}:{}: {line}", file.display(), number + 1));
                }
            }
        }
    }
    assert!(files.len() > 10, "the files were found: {files:?}");
    assert!(bare.is_empty(), "npx without --yes:\n{}", bare.join("\n"));
}
