//! PostgreSQL restarted under GetToken and StoreToken load: every acknowledged StoreToken is
//! readable afterwards, calls fail only with UNAVAILABLE during the outage and never answer
//! wrong, and service returns within 5 s of the database.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use vault_client::RetryPolicy;

use super::load::{Tally, closed_loops, ms, percentile};
use crate::helpers::*;

/// A PostgreSQL cluster of the test's own, listening only on a Unix socket in its directory, so
/// that stopping it disturbs nothing else. Stopped when dropped.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// The port names the socket file; nothing listens on TCP.
const PORT: u16 = 5439;

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().expect("a PostgreSQL with pg_ctl")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivatePg {
    /// Creates and starts the cluster (initdb refuses root, so as root it runs as `postgres`).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres", dir.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let pg = Self {
            dir,
            bin: bin_dir(),
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.pg_ctl("start");
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `pg_ctl start`, `stop` or `restart`, waiting until it is done.
    pub fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {PORT} -k {} -c listen_addresses='' -c fsync=off -c max_connections=100",
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let data = self.data();
        let mut args = vec![
            action,
            "-D",
            data.to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
        ];
        if action != "stop" {
            args.extend(["-o", &options, "-l", log.to_str().unwrap()]);
        }
        self.run("pg_ctl", &args);
    }

    /// A URL to database `name` over the socket.
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/{name}?host={}",
            self.dir.path().display()
        )
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) {
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new(if is_root() { "runuser" } else { "true" })
            .args(if is_root() {
                vec!["-u", "postgres", "--"]
            } else {
                vec![]
            })
            .arg(self.bin.join("pg_ctl"))
            .args([
                "stop",
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_keeps_every_acknowledged_write_and_answers_only_unavailable()
{
    let pg = PrivatePg::start();
    pg.create_database("vault").await;
    let url = pg.url("vault");
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_DATABASE_URL", url.as_str())]).await;

    // Writers store numbered tokens for users of their own; readers read theirs back.
    let (writers, readers) = (4usize, 4usize);
    let mut clients = Vec::new();
    for i in 0..writers + readers {
        let client = app
            .client(&issuer, "agent-chaos", &format!("user-{i}"))
            .await
            .with_retry(RetryPolicy::none());
        store(&client, "jira", &format!("user-{i}-0")).await;
        clients.push(client);
    }
    let clients = Arc::new(clients);
    // The highest number acknowledged per writer, and every reader answer seen.
    let acknowledged = Arc::new(Mutex::new(HashMap::<usize, u64>::new()));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (clients, acknowledged, wrong) = (
            Arc::clone(&clients),
            Arc::clone(&acknowledged),
            Arc::clone(&wrong),
        );
        tokio::spawn(closed_loops(
            writers + readers,
            Arc::clone(&stop),
            move |i, n| {
                let (clients, acknowledged, wrong) = (
                    Arc::clone(&clients),
                    Arc::clone(&acknowledged),
                    Arc::clone(&wrong),
                );
                async move {
                    let client = &clients[i];
                    if i < writers {
                        let value = format!("user-{i}-{}", n + 1);
                        let result = client
                            .store_token("jira", oauth_token(&value, "", 3600), None)
                            .await;
                        if result.is_ok() {
                            acknowledged.lock().unwrap().insert(i, n + 1);
                        }
                        result.map(|_| ())
                    } else {
                        let result = client.get_token("jira", Duration::ZERO).await;
                        if let Ok(token) = &result
                            && token.access_token != format!("user-{i}-0")
                        {
                            wrong.lock().unwrap().push(token.access_token.clone());
                        }
                        result.map(|_| ())
                    }
                }
            },
        ))
    };

    let warm = super::pick(Duration::from_secs(2), Duration::from_secs(20));
    tokio::time::sleep(warm).await;
    let restart = {
        let started = Instant::now();
        let pg = &pg;
        tokio::task::block_in_place(|| pg.pg_ctl("restart"));
        started.elapsed()
    };
    let back = Instant::now();
    // The first call that succeeds after the database is back.
    let probe = app.client(&issuer, "agent-chaos", "user-probe").await;
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(30) {
        if probe
            .store_token("jira", oauth_token("probe", "", 3600), None)
            .await
            .is_ok()
            && probe.get_token("jira", Duration::ZERO).await.is_ok()
        {
            recovered = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(warm).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tally: Tally = load.await.unwrap();

    // Every acknowledged write is there: each writer reads its last acknowledged number or a
    // later one (a write whose reply was lost may have committed).
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut lost = Vec::new();
    for (i, last) in &acknowledged {
        let token = clients[*i].get_token("jira", Duration::ZERO).await.unwrap();
        let number: u64 = token
            .access_token
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap();
        if number < *last {
            lost.push(format!("user-{i}: acknowledged {last}, reads {number}"));
        }
    }
    let recovered = recovered.expect("the vault serves again within 30 s of the database");
    super::report(
        "PostgreSQL restarted under GetToken and StoreToken load",
        &[
            ("calls", (tally.ok.len() + tally.failures()).to_string()),
            ("succeeded", tally.ok.len().to_string()),
            ("failed", tally.failure_summary()),
            ("p99 of successful calls", ms(percentile(&tally.ok, 99.0))),
            ("database restart took", ms(restart)),
            ("service back after the database", ms(recovered)),
            (
                "acknowledged writes lost",
                format!("{} of {}", lost.len(), acknowledged.len()),
            ),
            ("wrong answers", wrong.lock().unwrap().len().to_string()),
        ],
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        wrong.lock().unwrap().is_empty(),
        "wrong answers: {:?}",
        wrong.lock().unwrap()
    );
    let other: Vec<_> = tally
        .failed
        .keys()
        .filter(|k| !k.starts_with("UNAVAILABLE/"))
        .collect();
    assert!(
        other.is_empty(),
        "failures other than UNAVAILABLE: {}",
        tally.failure_summary()
    );
    assert!(
        recovered <= Duration::from_secs(5),
        "service returned {} after the database, more than 5 s",
        ms(recovered)
    );
    drop(app);
}
