//! The credential vault: stores each (agent, user, tool) OAuth2 token set under envelope
//! encryption in a PostgreSQL schema per agent, and hands a valid access token only to a caller
//! whose JWT proves it is that agent acting for that user.
//!
//! Layers, top to bottom: [`grpc`] (tonic edge) → [`vault`] (use cases) → [`store`], [`crypto`],
//! [`auth`]. [`startup`] wires them; [`config`] reads settings.

pub mod audit;
pub mod auth;
pub mod callback;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod egress;
pub mod grpc;
pub mod http;
pub mod ids;
pub mod jobs;
pub mod oauth;
pub mod policy;
pub mod secret;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod vault;
