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
    /// Script the SMMU with QEMU's qtest protocol plus DMA, TLBI and stats commands.
    Qtest(twinmmu_sim::qtest::Args),
    /// Replay a VMID allocation trace through KVM arm64's VMID allocator.
    Vmid(twinmmu_sim::vmid::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Qtest(args) => match twinmmu_sim::qtest::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("twinmmu qtest: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Vmid(args) => twinmmu_sim::vmid::run(&args),
    }
}
