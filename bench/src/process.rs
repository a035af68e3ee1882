//! Child processes the bench talks to (the vault server and the echo server): started with
//! `127.0.0.1:0`, their bound address read from the stderr line that announces it, stopped with
//! SIGTERM so they drain like in production, and killed if anything goes wrong on the way. A
//! [`Launch`] keeps how a child was started, so that it can be restarted the same way.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How many stderr lines are kept to explain a failure.
const KEPT_LINES: usize = 40;
/// How long a child may take to announce its address, unless its [`Launch`] says otherwise.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to start a child, kept so that it can be started again exactly as before: a restart
/// must measure the same server with the same settings.
#[derive(Clone)]
pub struct Launch {
    /// What the child is called in messages.
    pub name: &'static str,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its whole environment: nothing else from the bench's own reaches it.
    pub env: Vec<(OsString, OsString)>,
    /// Part of the stderr line the child writes once it listens, with `local_addr=IP:PORT`.
    pub marker: &'static str,
    /// How long it may take to write that line.
    pub start_timeout: Duration,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values include the root key.
        let names: Vec<_> = self.env.iter().map(|(name, _)| name).collect();
        f.debug_struct("Launch")
            .field("name", &self.name)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &names)
            .field("start_timeout", &self.start_timeout)
            .finish_non_exhaustive()
    }
}

impl Launch {
    /// A command that starts the child with exactly these arguments and this environment.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        command
    }
}

/// A running child that announced where it listens.
#[derive(Debug)]
pub struct ChildProcess {
    name: &'static str,
    child: Child,
    /// Where it accepts connections.
    pub addr: SocketAddr,
    /// The last stderr lines, for error messages.
    recent: Arc<Mutex<VecDeque<String>>>,
}

/// The `IP:PORT` after `local_addr=` on a line that contains `marker`.
pub fn announced_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    if !line.contains(marker) {
        return None;
    }
    line.split("local_addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl ChildProcess {
    /// Spawns `command` and waits until a stderr line containing `marker` names the address.
    /// The child's stderr is drained for its whole life, so a chatty child never blocks on a
    /// full pipe.
    pub async fn spawn(
        name: &'static str,
        command: Command,
        marker: &'static str,
    ) -> anyhow::Result<Self> {
        Self::spawn_within(name, command, marker, START_TIMEOUT).await
    }

    /// As [`ChildProcess::spawn`], allowing `start_timeout` for the line.
    pub async fn spawn_within(
        name: &'static str,
        mut command: Command,
        marker: &'static str,
        start_timeout: Duration,
    ) -> anyhow::Result<Self> {
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            // A bench that dies must not leave servers behind.
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("{name}: stderr was not captured"))?;
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = Arc::clone(&recent);
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = announced_addr(&line, marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                let mut kept = sink.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let addr = tokio::select! {
            addr = tokio::time::timeout(start_timeout, rx) => match addr {
                Ok(Ok(addr)) => addr,
                Ok(Err(_)) => {
                    // stderr closed without the line: the child is exiting; let it finish
                    // writing so the message below has its last words.
                    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    anyhow::bail!(
                        "{name} exited ({status:?}) before announcing its address:\n{}",
                        joined(&recent)
                    );
                }
                Err(_) => anyhow::bail!(
                    "{name} did not announce its address within {start_timeout:?}:\n{}",
                    joined(&recent)
                ),
            },
            status = child.wait() => anyhow::bail!(
                "{name} exited ({status:?}) before announcing its address:\n{}",
                joined(&recent)
            ),
        };
        Ok(Self {
            name,
            child,
            addr,
            recent,
        })
    }

    /// Starts what `launch` describes, as [`ChildProcess::spawn`] does.
    pub async fn launch(launch: &Launch) -> anyhow::Result<Self> {
        Self::spawn_within(
            launch.name,
            launch.command(),
            launch.marker,
            launch.start_timeout,
        )
        .await
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `http://IP:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM and waits for a clean exit; kills the child if it takes too long.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            anyhow::bail!("{} had already exited ({status})", self.name);
        }
        if let Some(pid) = self.child.id() {
            // `kill` the command: the workspace forbids unsafe code, so no libc::kill.
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => anyhow::bail!(
                "{} exited with {status} after SIGTERM:\n{}",
                self.name,
                joined(&self.recent)
            ),
            Ok(Err(err)) => anyhow::bail!("waiting for {}: {err}", self.name),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!("{} ignored SIGTERM for {STOP_TIMEOUT:?}; killed", self.name)
            }
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines it wrote to stderr.
    pub fn recent_log(&self) -> String {
        joined(&self.recent)
    }
}

fn joined(lines: &Mutex<VecDeque<String>>) -> String {
    let lines = lines.lock().unwrap_or_else(|p| p.into_inner());
    lines.iter().cloned().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_read_from_the_servers_listening_line() {
        let line = "2026-01-01T00:00:00.000000Z  INFO credential vault listening local_addr=127.0.0.1:40123";
        assert_eq!(
            announced_addr(line, "credential vault listening"),
            Some("127.0.0.1:40123".parse().unwrap())
        );
    }

    #[test]
    fn lines_without_the_marker_or_an_address_are_ignored() {
        assert_eq!(
            announced_addr("INFO local_addr=127.0.0.1:1", "listening"),
            None
        );
        assert_eq!(
            announced_addr("listening local_addr=nope", "listening"),
            None
        );
    }
}
