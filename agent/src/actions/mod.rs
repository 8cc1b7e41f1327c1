//! Green actions the agent runs under a lease, one module per action class. Each validates its
//! parameters when the config loads and its preconditions just before acting, and has a dry-run
//! executor for observe mode.
//!
//! - `cleanup`: `disk_cleanup` (fd-relative deletion under configured roots; I7).
//! - `restart`: `process_restart` (allow-listed systemd units or supervised argv processes,
//!   signalled through pidfds, health-checked within a window; no shell; I7).
//! - `trigger` (pure): which finding becomes which proposal, cooldowns and crash-loop backoff.
//! - `journal`: the fsynced local journal of tokens, plans, steps and outcomes (I2 across
//!   restarts: interrupted actions are reported, never re-run under their old token).
//!
//! Action modules take a `continue_ok` callback instead of importing the lease machinery: they
//! must not import `run`, `report` or tokio.

pub mod cleanup;
pub mod journal;
pub mod restart;
pub mod trigger;
