//! `gantry-coordinator`: the cluster's coordinator. Not implemented in this version; see
//! README.md for what Gantry does today.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "gantry-coordinator",
    version,
    about = "Gantry's coordinator (not implemented yet)"
)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "gantry-coordinator: the coordinator is not implemented in this version. \
         Run containers on a host directly with `gantry-agent run` (see README.md)."
    );
    std::process::ExitCode::from(2)
}
