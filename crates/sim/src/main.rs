//! `twinmmu`: the command-line front end. This file only parses arguments and dispatches;
//! each subcommand lives in its own module.

mod qtest;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "twinmmu",
    version,
    about = "A software twin of the Arm SMMUv3 / KVM / iommufd stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Script the SMMU with QEMU's qtest protocol plus DMA, TLBI and stats commands.
    Qtest(qtest::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Qtest(args) => qtest::run(args),
    }
}
