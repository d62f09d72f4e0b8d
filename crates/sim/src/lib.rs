//! Scenarios, workloads and the `twinmmu` command-line tool. Each subcommand lives in its own
//! module with an `Args` (clap) and a `run`; `main.rs` only dispatches.

pub mod qtest;
pub mod vmid;
