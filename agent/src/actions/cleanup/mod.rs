//! The `disk_cleanup` action class: free space on a filesystem by deleting (or, for files a
//! process holds open and where allowed, truncating) old files that match configured name
//! patterns under configured roots, oldest first, until a target free ratio or a byte cap.
//!
//! - `pattern`: file-name patterns (pure).
//! - `config`: the `[cleanup]` settings, validated at load with every problem listed (pure).
//! - `plan`: which files go, from a survey and `now` (pure).
//! - `fs`: the executor port ([`CleanupExecutor`]), the real fd-relative executor
//!   ([`FsCleanup`]) and the observe-mode one ([`DryRunCleanup`]). The containment rules (I7)
//!   are written out at the top of `fs.rs`.
//!
//! This module knows nothing of leases: the caller passes `continue_ok`, asked before every
//! step, where it checks its lease deadline and fencing. Must not import tokio, gRPC or the
//! coordinator link; never spawns a process or a shell.

pub mod config;
pub mod fs;
pub mod pattern;
pub mod plan;

use std::time::SystemTime;

pub use config::{
    CleanupConfig, CleanupProblem, CleanupProblems, CleanupRoot, RawCleanup, RawCleanupRoot,
};
pub use fs::{CleanupError, CleanupExecutor, CleanupReport, DryRunCleanup, FsCleanup, Skipped};
pub use pattern::NamePattern;
pub use plan::{Plan, SkipReason, StepKind, Survey};

/// One cleanup run: survey the roots, plan at `now`, carry the plan out. `continue_ok` is asked
/// before every directory and every step; once it says no, the run stops (the report says so).
pub fn run(
    executor: &mut dyn CleanupExecutor,
    config: &CleanupConfig,
    now: SystemTime,
    continue_ok: &mut dyn FnMut() -> bool,
) -> Result<CleanupReport, CleanupError> {
    let survey = executor.survey(config, continue_ok)?;
    let plan = plan::plan(config, &survey, now);
    Ok(executor.apply(config, &survey, &plan, continue_ok))
}
