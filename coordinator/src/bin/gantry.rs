//! `gantry`: the user CLI. Not implemented in this version; see README.md.

use clap::Parser;

#[derive(Parser)]
#[command(name = "gantry", version, about = "Gantry's CLI (not implemented yet)")]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "gantry: the cluster CLI is not implemented in this version. \
         Run containers on a host directly with `gantry-agent run` (see README.md)."
    );
    std::process::ExitCode::from(2)
}
