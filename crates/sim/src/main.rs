//! `twinmmu`: parses the command line and hands each subcommand to its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A software twin of the Arm SMMUv3 / KVM arm64 / iommufd stack.
#[derive(Parser)]
#[command(name = "twinmmu", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Vmid(twinmmu_sim::vmid::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Vmid(args) => twinmmu_sim::vmid::run(&args),
    }
}
