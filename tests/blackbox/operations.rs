//! `docs/operations.md`, for real: each admin command on that page, in its order, against
//! `vault-server dev`, with only the variables the page names; and each again with a token that
//! lacks `vault:admin`, which must be refused without changing anything.

use std::path::Path;

use serde_json::Value;

use crate::helpers::{binary, eventually};
use crate::walkthrough::{Launchers, commands_in, read_document, run_documented, spawn_dev};

/// A `buf curl` line as the page writes it: the caller's token from `$token`, the address from
/// `$VAULT_ADDR`.
fn buf(token: &str, body: &str, rpc: &str) -> String {
    format!(
        "{} curl --protocol grpc --http2-prior-knowledge -H \"authorization: Bearer ${token}\" -d '{body}' \"$VAULT_ADDR/vault.v1.CredentialVault/{rpc}\"",
        vault_server::dev::BUF
    )
}

/// A development token from the key `dev` generated under `cwd`.
fn mint(cwd: &Path, args: &[&str]) -> String {
    let minted = std::process::Command::new(binary())
        .arg("token")
        .args(args)
        .env_clear()
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    String::from_utf8(minted.stdout).unwrap().trim().to_string()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The tools of a ListCredentials answer.
fn tools(out: &str) -> Vec<String> {
    json(out)["credentials"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| c["tool"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The `swept` count of a Sweep answer (a uint64, so a JSON string; absent when 0).
fn swept(out: &str) -> u64 {
    json(out)["swept"]
        .as_str()
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_admin_command_in_operations_md_runs_and_needs_the_admin_scope() {
    let launchers = Launchers::new();
    let checkout = tempfile::tempdir().unwrap();
    let cwd = checkout.path();
    let dev = spawn_dev(Some(cwd), &[]);

    // The page, command for command: a change there fails here until this list follows it.
    let admin = |body: &str, rpc: &str| buf("ADMIN_TOKEN", body, rpc);
    let expected = [
        "export ADMIN_TOKEN=$(cargo run --release -q -p vault-server -- token --admin --user ops)"
            .to_string(),
        admin(r#"{"user_id":"demo-user"}"#, "ListCredentials"),
        admin(
            r#"{"agent_id":"other-agent","user_id":"demo-user"}"#,
            "ListCredentials",
        ),
        admin(r#"{"user_id":"demo-user","tool":"jira"}"#, "Revoke"),
        admin(
            r#"{"agent_id":"other-agent","user_id":"demo-user","at_provider":true}"#,
            "Revoke",
        ),
        admin(r#"{"dry_run":true}"#, "Sweep"),
        admin(r#"{"limit":1000}"#, "Sweep"),
        buf("VAULT_TOKEN", r#"{"dry_run":true}"#, "Sweep"),
    ];
    let documented = commands_in(&read_document("docs/operations.md"));
    assert_eq!(documented, expected, "docs/operations.md's commands");

    // Arrange what the page acts on: demo-user has jira and linear under demo-agent and jira
    // under other-agent; expiring-user's credential outlives its vault TTL of one second.
    let mut env = vec![
        ("VAULT_ADDR".to_string(), dev.export("VAULT_ADDR")),
        ("VAULT_TOKEN".to_string(), dev.export("VAULT_TOKEN")),
    ];
    let seeds = [
        (dev.export("VAULT_TOKEN"), "jira", 0),
        (dev.export("VAULT_TOKEN"), "linear", 0),
        (mint(cwd, &["--agent", "other-agent", "--store"]), "jira", 0),
        (
            mint(cwd, &["--user", "expiring-user", "--store"]),
            "jira",
            1,
        ),
    ];
    for (token, tool, ttl) in seeds {
        let mut env = env.clone();
        env.push(("SEED_TOKEN".into(), token));
        let body = format!(
            r#"{{"tool":"{tool}","token":{{"access_token":"a","refresh_token":"r"}},"ttl_seconds":{ttl}}}"#
        );
        let (ok, out) = run_documented(
            &launchers,
            &buf("SEED_TOKEN", &body, "StoreToken"),
            &mut env,
            cwd,
        );
        assert!(ok, "{out}");
    }

    // Each admin command with a token of the same agent and user but without vault:admin.
    let mut without_admin = env.clone();
    without_admin.push(("ADMIN_TOKEN".into(), mint(cwd, &["--user", "ops"])));
    for line in &expected[1..expected.len() - 1] {
        let (ok, out) = run_documented(&launchers, line, &mut without_admin, cwd);
        assert!(!ok && out.contains("permission_denied"), "{line}: {out}");
    }

    // Act and assert, in the page's order.
    let mut run = |line: &str| run_documented(&launchers, line, &mut env, cwd);
    let (_, token) = run(&expected[0]);
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let (ok, out) = run(&expected[1]);
    assert!(ok, "{out}");
    assert_eq!(
        tools(&out),
        ["jira", "linear"],
        "nothing was revoked unadmitted"
    );
    let (ok, out) = run(&expected[2]);
    assert!(ok, "{out}");
    assert_eq!(tools(&out), ["jira"]);

    let (ok, out) = run(&expected[3]);
    assert!(ok, "{out}");
    assert_eq!(json(&out)["revoked"], 1, "{out}");
    let (_, out) = run(&expected[1]);
    assert_eq!(tools(&out), ["linear"], "only that tool of that user");
    let (ok, out) = run(&expected[4]);
    assert!(ok, "{out}");
    assert_eq!(json(&out)["revoked"], 1, "{out}");
    let (_, out) = run(&expected[2]);
    assert!(tools(&out).is_empty(), "{out}");

    // expiring-user's credential is past its TTL within a second or so: the dry run sees it.
    let dry_run = expected[5].clone();
    let env_now = env.clone();
    eventually("Sweep's dry run counts the expired credential", || {
        let (dry_run, mut env) = (dry_run.clone(), env_now.clone());
        let launchers = &launchers;
        async move {
            let (ok, out) = run_documented(launchers, &dry_run, &mut env, cwd);
            assert!(ok, "{out}");
            swept(&out) == 1
        }
    })
    .await;
    let mut run = |line: &str| run_documented(&launchers, line, &mut env, cwd);
    let (ok, out) = run(&expected[6]);
    assert!(ok, "{out}");
    assert_eq!(swept(&out), 1, "{out}");
    let (_, out) = run(&expected[5]);
    assert_eq!(swept(&out), 0, "nothing expired remains: {out}");
    let (_, out) = run(&expected[1]);
    assert_eq!(tools(&out), ["linear"], "a live credential is not swept");

    let (ok, out) = run(&expected[7]);
    assert!(!ok, "{out}");
    assert!(out.contains("permission_denied"), "{out}");
    assert!(out.contains("Sweep needs the vault:admin scope"), "{out}");
}
