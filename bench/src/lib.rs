//! `vault-bench`: the one-run ratio report for the vault's hot path.
//!
//! GetToken is measured next to the two floors it cannot go below: a bare tonic unary call of
//! the same size ([`proto`], served by `vault-bench-echo`) and the one prepared point SELECT it
//! runs ([`workloads`]). A third floor, one durable INSERT of an audit record's size, is what a
//! GetToken that records its release cannot go below instead of the SELECT. Reading GetToken as
//! a ratio of those floors makes one run on any machine comparable with another. [`run`] wires it all together: a fresh database ([`database`]), a
//! generated issuer ([`issuer`]), the server and echo children ([`process`]), the load driver
//! ([`load`]) and the report ([`report`]).
//!
//! The agents workload ([`agents`]) measures what one schema per agent costs as the number of
//! agents grows: onboarding, reads spread over many agents (some of them [`zipf`]-skewed), the
//! private memory of the PostgreSQL backends ([`backend_memory`]) and the time a restart takes
//! to report SERVING ([`health`]).

pub mod agents;
pub mod backend_memory;
pub mod database;
pub mod health;
pub mod issuer;
pub mod load;
pub mod process;
pub mod report;
pub mod run;
pub mod workloads;
pub mod zipf;

/// Generated from `proto/bench/v1/echo.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("bench.v1");
}
