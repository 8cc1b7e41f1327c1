//! The Interlock coordinator as a library: `main.rs` parses flags and calls [`server::run`] or
//! the CLI; tests call the same functions with a listener on `127.0.0.1:0`.
//!
//! Decision logic (admission, caps, budgets, modes) is pure and lives apart from the gRPC and
//! store adapters; see ARCHITECTURE.md.

pub mod admission;
pub mod alert;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod deny;
pub mod engine;
pub mod etcd_bootstrap;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod seal;
pub mod serve;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod view;
