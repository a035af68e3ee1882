//! The live policy and its reloading. Calls read it through an `ArcSwap` (no lock, no database);
//! [`PolicyReload`] re-reads the file on SIGHUP and whenever its contents change, and keeps the
//! old policy, with one clear log line, when the new text does not load.
//!
//! Changes are found by polling the file's contents rather than by inotify: a Kubernetes
//! ConfigMap is updated by swapping a symlink two directories up, an editor may write a new
//! file and rename it over the old, and a network filesystem sends no events at all. Reading
//! a small file every few seconds notices all of them the same way.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Invalid, Limits, Policy};

/// The policy in force, if a file is configured.
#[derive(Debug)]
pub struct PolicyHandle {
    current: ArcSwapOption<Policy>,
    file: Option<PathBuf>,
    secrets_ttl_seconds: u64,
    /// SHA-256 of the text last loaded (or last refused), so an unchanged file is not parsed
    /// again and a broken one is reported once, not every poll.
    seen: Mutex<Option<[u8; 32]>>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file is as last seen.
    Unchanged,
    /// The new text is in force.
    Loaded,
    /// The new text did not load; the previous policy stays.
    Kept(String),
}

impl PolicyHandle {
    /// Loads `file` (every agent may use every tool when `None`). A file that cannot be read,
    /// parsed or validated stops startup with every problem named.
    pub fn load(file: Option<&Path>, secrets_ttl_seconds: u64) -> anyhow::Result<Self> {
        let handle = Self {
            current: ArcSwapOption::empty(),
            file: file.map(Path::to_path_buf),
            secrets_ttl_seconds,
            seen: Mutex::new(None),
        };
        if let Some(path) = file {
            match handle.reload(true) {
                Reloaded::Kept(problem) => {
                    anyhow::bail!("VAULT_POLICY_FILE ({}): {problem}", path.display())
                }
                _ => {
                    if let Some(policy) = handle.current() {
                        let (grants, tools) = policy.size();
                        tracing::info!(file = %path.display(), grants, tools, "policy loaded");
                    }
                }
            }
        }
        Ok(handle)
    }

    /// No policy: everything allowed.
    pub fn none() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            file: None,
            secrets_ttl_seconds: crate::config::MAX_SECRETS_TTL_SECONDS,
            seen: Mutex::new(None),
        }
    }

    /// The policy in force, `None` when no file is configured.
    pub fn current(&self) -> Option<Arc<Policy>> {
        self.current.load_full()
    }

    /// Re-reads the file; `force` parses it even when unchanged (SIGHUP).
    pub fn reload(&self, force: bool) -> Reloaded {
        let Some(path) = &self.file else {
            return Reloaded::Unchanged;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => return self.refuse(format!("cannot read it: {e}"), None),
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *seen == Some(digest) {
                return Reloaded::Unchanged;
            }
        }
        let previous = self.current();
        match Policy::parse(&text, self.secrets_ttl_seconds, previous.as_deref()) {
            Ok(policy) => {
                self.current.store(Some(Arc::new(policy)));
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
                Reloaded::Loaded
            }
            Err(Invalid(problems)) => self.refuse(problems.join("; "), Some(digest)),
        }
    }

    fn refuse(&self, problem: String, digest: Option<[u8; 32]>) -> Reloaded {
        if digest.is_some() {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = digest;
        }
        Reloaded::Kept(problem)
    }
}

/// Reloads the policy on SIGHUP and when the file changes, and drops idle rate-limit cells.
#[derive(Debug)]
pub struct PolicyReload {
    /// The policy to reload.
    pub policy: Arc<PolicyHandle>,
    /// The global buckets, cleaned up with the tools'.
    pub limits: Arc<Limits>,
    /// How often the file is checked.
    pub interval: Duration,
}

impl PolicyReload {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the policy reloads only when its file changes");
                None
            }
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let forced = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            self.report(self.policy.reload(forced), forced);
            self.limits.forget_idle();
            if let Some(policy) = self.policy.current() {
                policy.all_limits().for_each(|limits| limits.forget_idle());
            }
        }
    }

    fn report(&self, reloaded: Reloaded, forced: bool) {
        let file = self
            .policy
            .file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match reloaded {
            Reloaded::Unchanged if forced => {
                tracing::info!("SIGHUP: no VAULT_POLICY_FILE to reload")
            }
            Reloaded::Unchanged => {}
            Reloaded::Loaded => {
                let (grants, tools) = self.policy.current().map_or((0, 0), |p| p.size());
                tracing::info!(%file, grants, tools, "policy reloaded");
            }
            Reloaded::Kept(problem) => {
                tracing::error!(%file, %problem, "the policy file did not load; the previous policy stays in force");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[[grants]]\nagents = [\"a\"]\ntools = [\"jira\"]\n";

    #[test]
    fn a_broken_file_keeps_the_previous_policy_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, GOOD).unwrap();
        let handle = PolicyHandle::load(Some(&path), 86_400).unwrap();
        let first = handle.current().unwrap();
        assert_eq!(handle.reload(false), Reloaded::Unchanged);
        std::fs::write(&path, "[[grants]\n").unwrap();
        assert!(matches!(handle.reload(false), Reloaded::Kept(_)));
        assert!(
            Arc::ptr_eq(&first, &handle.current().unwrap()),
            "old policy kept"
        );
        assert_eq!(handle.reload(false), Reloaded::Unchanged, "reported once");
        std::fs::write(&path, GOOD.replace("jira", "confluence")).unwrap();
        assert_eq!(handle.reload(false), Reloaded::Loaded);
        assert!(!Arc::ptr_eq(&first, &handle.current().unwrap()));
    }

    #[test]
    fn a_file_that_does_not_validate_stops_startup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[tools.jira]\nmax_ttl_seconds = 0\n").unwrap();
        let err = PolicyHandle::load(Some(&path), 86_400).unwrap_err();
        assert!(
            err.to_string().contains("tools.jira.max_ttl_seconds"),
            "{err}"
        );
        assert!(PolicyHandle::load(Some(&dir.path().join("missing.toml")), 86_400).is_err());
    }
}
