//! `gantry-bench builds`: image builds from recipes on `gantry dev` (a coordinator and one
//! agent on this machine, as a user runs it; `gantry_tests::dev`). Times, wall clock around `gantry image
//! build` (the CLI included):
//! - the first build of a `debian_slim` recipe (the base made with mmdebstrap from this
//!   machine's apt sources, then one step that runs Python), from an empty cluster;
//! - the same recipe again, every step from the cache (`rounds` times; goal ≤ 1 s);
//! - the recipe with only its last step changed (a configuration step, so it is built on
//!   the coordinator without a container).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;

pub struct BuildsBench {
    pub work: PathBuf,
    pub rounds: usize,
    pub json: Option<PathBuf>,
}

const RECIPE: &str = "base = { debian_slim = \"3.11\" }\n[[steps]]\nrun_commands = [\"python3 -c 'import sys; print(sys.version)' > /python-version\"]\n[[steps]]\n";

pub fn run(b: BuildsBench) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&b.work);
    std::fs::create_dir_all(&b.work)?;
    // gantry dev from this build's target directory, stopped when dropped.
    let dev = gantry_tests::dev::DevCluster::start(&b.work, "bench");
    let recipe = b.work.join("recipe.toml");
    let build = |last: &str| -> anyhow::Result<f64> {
        std::fs::write(&recipe, format!("{RECIPE}{last}\n"))?;
        let start = Instant::now();
        let out = dev.gantry(&[
            "image",
            "build",
            "-f",
            recipe.to_str().unwrap_or_default(),
            "--name",
            "bench:latest",
        ]);
        let took = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("the build failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    };
    let first = build("env = { ROUND = \"0\" }")?;
    eprintln!("first build (debian_slim base with mmdebstrap, one step): {first:.1} s");
    let mut cached = Vec::new();
    for _ in 0..b.rounds.max(1) {
        cached.push(build("env = { ROUND = \"0\" }")? * 1000.0);
    }
    let mut changed = Vec::new();
    for i in 1..=b.rounds.max(1) {
        changed.push(build(&format!("env = {{ ROUND = \"{i}\" }}"))? * 1000.0);
    }
    let (cached_p50, cached_max) = (median(&mut cached), max(&cached));
    let (changed_p50, changed_max) = (median(&mut changed), max(&changed));
    println!("| build | wall time | goal |");
    println!("|---|---|---|");
    println!(
        "| first: `debian_slim` 3.11 base (mmdebstrap) + one step that runs Python | {first:.1} s | |"
    );
    println!(
        "| again, every step cached (median of {n}; max {cached_max:.0} ms) | {cached_p50:.0} ms | ≤ 1 s: {} |",
        if cached_p50 <= 1000.0 {
            "met"
        } else {
            "not met"
        },
        n = cached.len()
    );
    println!(
        "| only the last (configuration) step changed (median of {n}; max {changed_max:.0} ms) | {changed_p50:.0} ms | |",
        n = changed.len()
    );
    if let Some(path) = &b.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "first_build_s": first,
                "cached_ms": cached,
                "cached_p50_ms": cached_p50,
                "changed_last_ms": changed,
                "changed_last_p50_ms": changed_p50,
            }))?,
        )?;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}
