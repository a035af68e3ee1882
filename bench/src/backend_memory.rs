//! The private memory of the PostgreSQL backends that serve the vault.
//!
//! The backends are found in `pg_stat_activity`: those connected to the run's database whose
//! `application_name` starts with `vault-server`, which is what the server names its pool and
//! read connections (`vault-server`) and its LISTEN connection (`vault-server audit listener`).
//! For each, `/proc/PID/smaps_rollup` gives `Private_Clean + Private_Dirty`.
//!
//! Private memory, not RSS or PSS: a backend's RSS, and its share in PSS, include the pages of
//! `shared_buffers` it has touched, which are PostgreSQL's one shared cache and grow with
//! whatever the backend reads. Its private pages are what it holds for itself alone: its catalog
//! and relation caches, its prepared statements and plans, its work memory. That is what each
//! agent schema a backend touches costs it, and what the memory budget of a vault is made of.
//!
//! This needs PostgreSQL on this machine, in this pid namespace, and the right to read its
//! `/proc` entries (root, or the user PostgreSQL runs as). Anywhere else the measurement says
//! why it is missing instead of failing the run.

use sqlx::PgConnection;

/// The prefix of every `application_name` the vault gives its connections.
pub const VAULT_APPLICATION_PREFIX: &str = "vault-server";

/// One backend serving the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Its process id, as `pg_stat_activity` and `/proc` know it.
    pub pid: i32,
    /// The name the vault gave the connection.
    pub application_name: String,
    /// `Private_Clean + Private_Dirty`, in KiB.
    pub private_kib: u64,
}

/// The vault's backends at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendMemory {
    /// Every backend found, in pid order; never empty.
    pub backends: Vec<Backend>,
}

impl BackendMemory {
    /// The sum over every backend, in MiB.
    pub fn total_mib(&self) -> f64 {
        self.backends.iter().map(|b| b.private_kib).sum::<u64>() as f64 / 1024.0
    }

    /// The largest backend, in MiB.
    pub fn max_mib(&self) -> f64 {
        self.backends
            .iter()
            .map(|b| b.private_kib)
            .max()
            .unwrap_or(0) as f64
            / 1024.0
    }

    /// The mean over every backend, in MiB.
    pub fn mean_mib(&self) -> f64 {
        self.total_mib() / self.backends.len().max(1) as f64
    }
}

/// `Private_Clean + Private_Dirty` in KiB from the text of an `smaps_rollup` (or `smaps`)
/// file; `None` when either line is missing or unreadable.
pub fn private_kib(smaps_rollup: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        smaps_rollup.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let value = parts.next()?.parse().ok()?;
            (parts.next() == Some("kB")).then_some(value)
        })
    };
    Some(field("Private_Clean")? + field("Private_Dirty")?)
}

/// The private memory of process `pid` on this machine, in KiB.
pub fn private_kib_of(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    private_kib(&text).ok_or_else(|| anyhow::anyhow!("{path}: no Private_Clean/Private_Dirty"))
}

/// Finds the vault's backends through `conn` (a connection to the run's database) and reads
/// each one's private memory.
pub async fn measure(conn: &mut PgConnection) -> anyhow::Result<BackendMemory> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT pid, application_name FROM pg_stat_activity \
         WHERE datname = current_database() AND starts_with(application_name, $1) \
         ORDER BY pid",
    )
    .bind(VAULT_APPLICATION_PREFIX)
    .fetch_all(conn)
    .await?;
    if rows.is_empty() {
        anyhow::bail!("no backend named {VAULT_APPLICATION_PREFIX}* in pg_stat_activity");
    }
    let mut backends = Vec::with_capacity(rows.len());
    let mut missing = None;
    for (pid, application_name) in rows {
        // A pid from another pid namespace (PostgreSQL in a container, or on another host)
        // may name some unrelated process here: only read a process that is PostgreSQL.
        let comm = match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(comm) => comm,
            // Gone since the listing (the vault retires connections as they serve many agents),
            // or never visible here: which one, the others tell.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing = Some(anyhow::anyhow!(
                    "backend {pid} is not visible here ({e}): is PostgreSQL on this machine?"
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !matches!(comm.trim(), "postgres" | "postmaster") {
            anyhow::bail!(
                "pid {pid} here is {:?}, not a PostgreSQL backend: is PostgreSQL on another \
                 machine or in a container?",
                comm.trim()
            );
        }
        let private_kib = match private_kib_of(pid.unsigned_abs()) {
            Ok(kib) => kib,
            // It exited between the two reads.
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => continue,
            Err(e) => return Err(e),
        };
        backends.push(Backend {
            pid,
            application_name,
            private_kib,
        });
    }
    match missing {
        Some(missing) if backends.is_empty() => Err(missing),
        _ => Ok(BackendMemory { backends }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `smaps_rollup` in the layout Linux 6 writes, with a backend's kind of numbers.
    const ROLLUP: &str = "\
55c0a4a1c000-7ffc6d3f1000 ---p 00000000 00:00 0                          [rollup]
Rss:               48212 kB
Pss:               21307 kB
Pss_Dirty:         18400 kB
Pss_Anon:           9122 kB
Pss_File:           3841 kB
Pss_Shmem:          8344 kB
Shared_Clean:      12044 kB
Shared_Dirty:      10660 kB
Private_Clean:       384 kB
Private_Dirty:     25124 kB
Referenced:        48212 kB
Anonymous:          9160 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn private_memory_is_the_clean_and_dirty_private_pages() {
        assert_eq!(private_kib(ROLLUP), Some(384 + 25_124));
    }

    #[test]
    fn a_rollup_without_both_private_lines_reads_as_nothing() {
        let without_dirty: String = ROLLUP
            .lines()
            .filter(|l| !l.starts_with("Private_Dirty"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(private_kib(&without_dirty), None);
        assert_eq!(private_kib(""), None);
        assert_eq!(
            private_kib("Private_Clean: x kB\nPrivate_Dirty: 1 kB\n"),
            None
        );
        // Private_Hugetlb shares a prefix with neither field.
        assert_eq!(
            private_kib("Private_Hugetlb: 7 kB\nPrivate_Clean: 1 kB\nPrivate_Dirty: 2 kB\n"),
            Some(3)
        );
    }

    #[test]
    fn this_process_has_private_memory() {
        let kib = private_kib_of(std::process::id()).unwrap();
        assert!(kib > 0);
    }

    #[test]
    fn totals_maxima_and_means_are_in_mebibytes() {
        let backend = |pid, private_kib| Backend {
            pid,
            application_name: "vault-server".into(),
            private_kib,
        };
        let memory = BackendMemory {
            backends: vec![backend(1, 1024), backend(2, 3072), backend(3, 2048)],
        };
        assert_eq!(memory.total_mib(), 6.0);
        assert_eq!(memory.max_mib(), 3.0);
        assert_eq!(memory.mean_mib(), 2.0);
    }
}
