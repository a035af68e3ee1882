//! Black-box tests: a real vault-server (in process, or the built binary) on port 0, a fresh
//! PostgreSQL database per test, real JWTs signed by keys made at test time, and the
//! `vault-client` crate as the caller.

mod helpers;

mod agent_keys;
mod api;
mod audit;
mod audit_cli;
mod auth;
mod bad_input;
mod browser;
#[path = "../chaos/mod.rs"]
mod chaos;
mod citus;
mod cli;
mod client;
mod config;
mod conformance;
mod consent;
mod egress;
mod hardening;
mod keys;
mod lifecycle;
mod mcp;
mod mcp_probe;
mod mcp_tools;
mod operations;
mod policy;
mod production;
mod provider;
mod refresh;
mod scale;
mod telemetry;
mod ttl_and_sweep;
mod walkthrough;
mod watch;
