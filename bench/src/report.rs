//! The report: a Markdown table of every cell, the ratios the issues pin, and the same numbers
//! as JSON in a fixed shape for tooling that tracks them across runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::agents::{AgentsResults, Spread};
use crate::load::Sample;

/// Workloads in report (and run) order: the floors first.
pub const WORKLOADS: [&str; 5] = ["echo", "select", "insert", "get_token", "store_token"];
/// Concurrency levels in report order.
pub const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// `VAULT_AUDIT_RELEASES` for the server under test: whether each successful GetToken is also
/// recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuditReleases {
    /// Releases are not recorded (refusals, writes and failures still are).
    Off,
    /// Releases are recorded: the server's default.
    #[default]
    On,
}

impl AuditReleases {
    /// The setting's value, as the server reads it and the JSON records it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
        }
    }
}

/// The settings of a run that change what its numbers mean; the JSON's `config`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunConfig {
    /// What the server under test ran with.
    pub audit_releases: AuditReleases,
}

/// Every measured cell, by (workload, concurrency), and the agents workload if it ran.
#[derive(Debug, Default)]
pub struct Results {
    cells: BTreeMap<(&'static str, usize), Sample>,
    agents: Option<AgentsResults>,
}

/// The ratios that summarise a run. Each is dimensionless, so runs on different machines
/// compare.
#[derive(Debug, Clone, Copy)]
pub struct Ratios {
    /// GetToken's median over the floor (echo p50 + select p50) at concurrency 1: the cost of
    /// everything the vault adds to one RPC and one SELECT.
    pub get_p50_over_floor_c1: f64,
    /// GetToken's median over the audited-read floor (echo p50 + insert p50) at concurrency 1:
    /// what a GetToken that must also durably record its release could at best cost, as a
    /// multiple.
    pub get_p50_over_audit_floor_c1: f64,
    /// GetToken throughput as a share of the echo server's at concurrency 64.
    pub get_rps_over_echo_c64: f64,
    /// GetToken's tail at concurrency 16: p99 over p50.
    pub get_p99_over_p50_c16: f64,
    /// What a write costs relative to a read, at concurrency 1.
    pub store_p50_over_get_p50_c1: f64,
    /// GetToken throughput spread uniformly over the agents workload's N agents, over its
    /// throughput against one of them, at concurrency 64; `None` without that workload.
    pub get_spread_over_single_c64: Option<f64>,
    /// As `get_spread_over_single_c64`, with the calls Zipf-skewed over the agents.
    pub get_zipf_over_single_c64: Option<f64>,
    /// The existing agents' GetToken p99 while the N agents onboarded, over its p99 just
    /// before; `None` without the agents workload.
    pub get_p99_onboarding_over_idle: Option<f64>,
}

impl Results {
    /// Records one cell.
    pub fn insert(&mut self, workload: &'static str, concurrency: usize, sample: Sample) {
        self.cells.insert((workload, concurrency), sample);
    }

    /// Records what the agents workload measured.
    pub fn set_agents(&mut self, agents: AgentsResults) {
        self.agents = Some(agents);
    }

    /// What the agents workload measured, if it ran.
    pub fn agents(&self) -> Option<&AgentsResults> {
        self.agents.as_ref()
    }

    /// One cell, if measured.
    pub fn get(&self, workload: &str, concurrency: usize) -> Option<&Sample> {
        self.cells
            .iter()
            .find(|((w, c), _)| *w == workload && *c == concurrency)
            .map(|(_, s)| s)
    }

    fn cell(&self, workload: &str, concurrency: usize) -> anyhow::Result<&Sample> {
        self.get(workload, concurrency)
            .ok_or_else(|| anyhow::anyhow!("{workload} at c{concurrency} was not measured"))
    }

    /// Calls that failed, over all cells.
    pub fn errors(&self) -> u64 {
        self.cells.values().map(|s| s.errors).sum::<u64>()
            + self.agents.as_ref().map_or(0, AgentsResults::errors)
    }

    /// `(workload, concurrency, errors, first error)` for every cell with failures.
    pub fn failures(&self) -> Vec<(&'static str, usize, u64, String)> {
        self.cells
            .iter()
            .filter(|(_, s)| s.errors > 0)
            .map(|((w, c), s)| (*w, *c, s.errors, s.first_error.clone().unwrap_or_default()))
            .chain(self.agents.iter().flat_map(AgentsResults::failures))
            .collect()
    }

    /// The summary ratios.
    pub fn ratios(&self) -> anyhow::Result<Ratios> {
        let get1 = self.cell("get_token", 1)?;
        let get16 = self.cell("get_token", 16)?;
        let echo1 = self.cell("echo", 1)?.p50_us;
        let floor = echo1 + self.cell("select", 1)?.p50_us;
        let audit_floor = echo1 + self.cell("insert", 1)?.p50_us;
        Ok(Ratios {
            get_p50_over_floor_c1: get1.p50_us / floor,
            get_p50_over_audit_floor_c1: get1.p50_us / audit_floor,
            get_rps_over_echo_c64: self.cell("get_token", 64)?.rps / self.cell("echo", 64)?.rps,
            get_p99_over_p50_c16: get16.p99_us / get16.p50_us,
            store_p50_over_get_p50_c1: self.cell("store_token", 1)?.p50_us / get1.p50_us,
            get_spread_over_single_c64: self
                .agents
                .as_ref()
                .and_then(|a| a.over_single_c64(Spread::Uniform)),
            get_zipf_over_single_c64: self
                .agents
                .as_ref()
                .and_then(|a| a.over_single_c64(Spread::Zipf)),
            get_p99_onboarding_over_idle: self
                .agents
                .as_ref()
                .and_then(|a| a.existing_reads.p99_over_idle()),
        })
    }

    /// Rows = workload × concurrency; columns p50, p99, rps. The agents workload, if it ran,
    /// follows in tables of its own.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| workload | concurrency | p50 µs | p99 µs | rps |\n|---|---:|---:|---:|---:|\n",
        );
        for workload in WORKLOADS {
            for concurrency in CONCURRENCY {
                if let Some(s) = self.get(workload, concurrency) {
                    let _ = writeln!(
                        out,
                        "| {workload} | {concurrency} | {:.0} | {:.0} | {:.0} |",
                        s.p50_us, s.p99_us, s.rps
                    );
                }
            }
        }
        if let Some(agents) = &self.agents {
            out.push('\n');
            out.push_str(&agents.markdown());
        }
        out
    }

    /// The JSON document:
    /// `{"machine", "config": {"audit_releases"}, "results": {workload: {"c1": {...}}}, "ratios"}`.
    /// With the agents workload, `results.agents` and three more ratios.
    pub fn json(&self, machine: &str, config: &RunConfig) -> anyhow::Result<Value> {
        let mut results = serde_json::Map::new();
        for workload in WORKLOADS {
            let mut levels = serde_json::Map::new();
            for concurrency in CONCURRENCY {
                let s = self.cell(workload, concurrency)?;
                levels.insert(
                    format!("c{concurrency}"),
                    json!({"p50_us": round(s.p50_us, 1), "p99_us": round(s.p99_us, 1), "rps": round(s.rps, 1)}),
                );
            }
            results.insert(workload.into(), Value::Object(levels));
        }
        if let Some(agents) = &self.agents {
            results.insert("agents".into(), agents.json());
        }
        let r = self.ratios()?;
        let mut doc = json!({
            "machine": machine,
            "config": {
                "audit_releases": config.audit_releases.as_str(),
            },
            "results": results,
            "ratios": {
                "get_p50_over_floor_c1": round(r.get_p50_over_floor_c1, 3),
                "get_p50_over_audit_floor_c1": round(r.get_p50_over_audit_floor_c1, 3),
                "get_rps_over_echo_c64": round(r.get_rps_over_echo_c64, 3),
                "get_p99_over_p50_c16": round(r.get_p99_over_p50_c16, 3),
                "store_p50_over_get_p50_c1": round(r.store_p50_over_get_p50_c1, 3),
            },
        });
        for (key, ratio) in [
            ("get_spread_over_single_c64", r.get_spread_over_single_c64),
            ("get_zipf_over_single_c64", r.get_zipf_over_single_c64),
            (
                "get_p99_onboarding_over_idle",
                r.get_p99_onboarding_over_idle,
            ),
        ] {
            if let Some(ratio) = ratio {
                doc["ratios"][key] = json!(round(ratio, 3));
            }
        }
        Ok(doc)
    }
}

impl Ratios {
    /// The ratios as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| ratio | value |\n|---|---:|\n\
             | get_p50_over_floor_c1 (GetToken p50 / (echo p50 + select p50), c1) | {:.2} |\n\
             | get_p50_over_audit_floor_c1 (GetToken p50 / (echo p50 + insert p50), c1) | {:.2} |\n\
             | get_rps_over_echo_c64 (GetToken rps / echo rps, c64) | {:.3} |\n\
             | get_p99_over_p50_c16 (GetToken p99 / p50, c16) | {:.2} |\n\
             | store_p50_over_get_p50_c1 (StoreToken p50 / GetToken p50, c1) | {:.2} |\n",
            self.get_p50_over_floor_c1,
            self.get_p50_over_audit_floor_c1,
            self.get_rps_over_echo_c64,
            self.get_p99_over_p50_c16,
            self.store_p50_over_get_p50_c1,
        );
        for (name, what, ratio) in [
            (
                "get_spread_over_single_c64",
                "uniform over N agents",
                self.get_spread_over_single_c64,
            ),
            (
                "get_zipf_over_single_c64",
                "Zipf over N agents",
                self.get_zipf_over_single_c64,
            ),
        ] {
            if let Some(ratio) = ratio {
                let _ = writeln!(
                    out,
                    "| {name} (GetToken rps {what} / one agent, c64) | {ratio:.3} |"
                );
            }
        }
        if let Some(ratio) = self.get_p99_onboarding_over_idle {
            let _ = writeln!(
                out,
                "| get_p99_onboarding_over_idle (existing agents' GetToken p99 while N agents \
                 onboard / idle, c4) | {ratio:.2} |"
            );
        }
        out
    }
}

/// `value` rounded to `digits` decimals, for the JSON.
pub(crate) fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// `"<n> cores, <CPU model>, <OS>, Linux <kernel>"`, from what the machine says about itself.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|release| {
            release
                .lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|name| name.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!(", Linux {}", k.trim()))
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, {os}{kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p50_us: f64, p99_us: f64, rps: f64) -> Sample {
        Sample {
            p50_us,
            p99_us,
            rps,
            calls: 1,
            errors: 0,
            first_error: None,
        }
    }

    fn full() -> Results {
        let mut results = Results::default();
        for workload in WORKLOADS {
            for concurrency in CONCURRENCY {
                results.insert(workload, concurrency, sample(100.0, 300.0, 1000.0));
            }
        }
        results.insert("echo", 1, sample(40.0, 80.0, 20_000.0));
        results.insert("select", 1, sample(60.0, 90.0, 15_000.0));
        results.insert("insert", 1, sample(85.0, 200.0, 11_000.0));
        results.insert("get_token", 1, sample(250.0, 400.0, 4_000.0));
        results.insert("get_token", 16, sample(500.0, 2_000.0, 8_000.0));
        results.insert("get_token", 64, sample(900.0, 3_000.0, 9_000.0));
        results.insert("echo", 64, sample(900.0, 3_000.0, 36_000.0));
        results.insert("store_token", 1, sample(500.0, 900.0, 2_000.0));
        results
    }

    #[test]
    fn the_ratios_are_computed_from_the_pinned_cells() {
        let r = full().ratios().unwrap();
        assert!((r.get_p50_over_floor_c1 - 2.5).abs() < 1e-9);
        assert!((r.get_p50_over_audit_floor_c1 - 2.0).abs() < 1e-9);
        assert!((r.get_rps_over_echo_c64 - 0.25).abs() < 1e-9);
        assert!((r.get_p99_over_p50_c16 - 4.0).abs() < 1e-9);
        assert!((r.store_p50_over_get_p50_c1 - 2.0).abs() < 1e-9);
    }

    #[test]
    fn the_json_has_the_pinned_shape() {
        let config = RunConfig {
            audit_releases: AuditReleases::Off,
        };
        let doc = full().json("test machine", &config).unwrap();
        assert_eq!(doc["machine"], "test machine");
        assert_eq!(doc["config"]["audit_releases"], "off");
        for workload in WORKLOADS {
            for level in ["c1", "c16", "c64"] {
                for field in ["p50_us", "p99_us", "rps"] {
                    assert!(
                        doc["results"][workload][level][field].is_number(),
                        "{workload}.{level}.{field}"
                    );
                }
            }
        }
        assert_eq!(doc["ratios"]["get_p50_over_floor_c1"], 2.5);
        assert_eq!(doc["ratios"]["get_p50_over_audit_floor_c1"], 2.0);
        assert_eq!(doc.as_object().unwrap().len(), 4);
        assert_eq!(doc["ratios"].as_object().unwrap().len(), 5);
    }

    #[test]
    fn the_agents_workload_adds_its_results_and_three_ratios() {
        let mut results = full();
        assert!(
            results
                .ratios()
                .unwrap()
                .get_spread_over_single_c64
                .is_none()
        );
        results.set_agents(crate::agents::example());
        let doc = results.json("test machine", &RunConfig::default()).unwrap();
        assert_eq!(doc["results"]["agents"]["n"], 2_000);
        assert_eq!(doc["ratios"]["get_spread_over_single_c64"], 0.5);
        assert_eq!(doc["ratios"]["get_zipf_over_single_c64"], 0.75);
        assert_eq!(doc["ratios"]["get_p99_onboarding_over_idle"], 1.5);
        assert_eq!(doc["ratios"].as_object().unwrap().len(), 8);
        assert_eq!(doc["ratios"]["get_p50_over_floor_c1"], 2.5);
        let text = results.markdown();
        assert!(text.contains("agents workload: N = 2000"), "{text}");
        assert!(
            results
                .ratios()
                .unwrap()
                .markdown()
                .contains("get_spread_over_single_c64")
        );
        assert!(
            results
                .ratios()
                .unwrap()
                .markdown()
                .contains("get_p99_onboarding_over_idle")
        );
    }

    #[test]
    fn the_audit_floor_ratio_needs_the_insert_floor() {
        let mut results = full();
        results.cells.remove(&("insert", 1));
        assert!(results.ratios().is_err());
    }

    #[test]
    fn the_server_default_is_to_audit_releases() {
        assert_eq!(RunConfig::default().audit_releases.as_str(), "on");
    }

    #[test]
    fn a_missing_cell_is_an_error_not_a_zero() {
        let mut results = full();
        results.cells.remove(&("echo", 64));
        assert!(results.ratios().is_err());
    }
}
