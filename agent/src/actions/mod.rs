//! Green actions the agent runs under a lease, one module per action class. Each validates its
//! parameters when the config loads and its preconditions just before acting, and has a dry-run
//! executor for observe mode.
//!
//! - `cleanup`: `disk_cleanup` (fd-relative deletion under configured roots; I7).
//!
//! Action modules take a `continue_ok` callback instead of importing the lease machinery: they
//! must not import `run`, `report` or tokio.

pub mod cleanup;
