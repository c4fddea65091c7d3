//! How the CLI prints jobs and nodes: tables for people, JSON with `--output json`.

use gantry_shared::api::{Job, JobState, Node};
use gantry_shared::now_ms;

pub fn print_job(job: &Job, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    println!("id:      {}", job.id);
    println!("name:    {}", job.spec.name);
    println!("image:   {}", job.spec.image);
    println!("state:   {}", state_name(job.state));
    if let Some(r) = &job.reason {
        println!("reason:  {r}");
    }
    let r = &job.spec.resources;
    println!(
        "asks:    {} node(s) × cpu {}, memory {}, {} GPU(s){}{}",
        job.spec.nodes,
        r.cpu,
        r.memory,
        r.gpus,
        if r.gpu_types.is_empty() {
            String::new()
        } else {
            format!(" of {}", r.gpu_types.join(" or "))
        },
        r.gpu_memory
            .as_ref()
            .map(|m| format!(" with ≥ {m} each"))
            .unwrap_or_default()
    );
    for (path, u) in &job.spec.volumes {
        let place = match &u.backend {
            Some(gantry_shared::volumes::VolumeBackend::Local { node, .. }) => {
                format!(" (local to {node})")
            }
            Some(gantry_shared::volumes::VolumeBackend::Shared) => " (shared)".to_owned(),
            None => String::new(),
        };
        println!("volume:  {} at {path}{place}", u.name);
    }
    if job.attempts.is_empty() {
        return Ok(());
    }
    println!(
        "\n{:<4} {:<5} {:<20} {:<16} {:<14} {:<10} {:<5} REASON",
        "GEN", "RANK", "NODE", "ADDRESS", "GPUS", "STATE", "EXIT"
    );
    for a in &job.attempts {
        let state = match (a.is_live(), a.started_at_ms) {
            (false, _) => "ended",
            (true, Some(_)) => "running",
            (true, None) => "starting",
        };
        let gpus: Vec<String> = a.gpus.iter().map(u32::to_string).collect();
        println!(
            "{:<4} {:<5} {:<20} {:<16} {:<14} {:<10} {:<5} {}",
            a.generation,
            a.rank,
            a.node,
            a.address.as_deref().unwrap_or("-"),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            state,
            a.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            a.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub fn print_jobs(jobs: &[Job], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(jobs)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<24} {:<6} REASON",
        "ID", "STATE", "NAME", "EXIT"
    );
    for j in jobs {
        let exit = j
            .exit_code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<10} {:<24} {:<6} {}",
            j.id,
            state_name(j.state),
            j.spec.name,
            exit,
            j.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub fn print_nodes(nodes: &[Node], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(nodes)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<10} {:<16} {:>13} {:>15} {:<22} JOBS",
        "NODE", "STATE", "LAST SEEN", "ADDRESS", "CPU FREE", "MEMORY FREE", "GPUS FREE"
    );
    let now = now_ms();
    for n in nodes {
        println!(
            "{:<20} {:<10} {:<10} {:<16} {:>13} {:>15} {:<22} {}",
            n.id,
            n.state,
            n.last_seen_ms.map_or("never".into(), |t| ago(now, t)),
            n.address.as_deref().unwrap_or("-"),
            format!(
                "{}/{}m",
                n.cpu_millis.saturating_sub(n.reserved_cpu_millis),
                n.cpu_millis
            ),
            format!(
                "{}/{}Mi",
                n.memory_bytes.saturating_sub(n.reserved_memory_bytes) >> 20,
                n.memory_bytes >> 20
            ),
            gpu_summary(n),
            n.jobs.len()
        );
    }
    Ok(())
}

/// `gantry nodes show`: one node in full, with a line per GPU.
pub fn print_node(n: &Node, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(n)?);
        return Ok(());
    }
    let now = now_ms();
    println!("node:       {}", n.id);
    println!(
        "state:      {}{} (since {})",
        n.state,
        n.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        ago(now, n.state_since_ms)
    );
    if let Some(d) = n.deadline_ms {
        let now = now_ms();
        println!(
            "deadline:   {}",
            if d > now {
                format!("in {}s", (d - now).div_ceil(1000))
            } else {
                "passed".into()
            }
        );
    }
    println!(
        "last seen:  {}",
        n.last_seen_ms.map_or("never".into(), |t| ago(now, t))
    );
    println!("connected:  {}", if n.connected { "yes" } else { "no" });
    println!("address:    {}", n.address.as_deref().unwrap_or("-"));
    println!(
        "labels:     {}",
        if n.labels.is_empty() {
            "-".into()
        } else {
            gantry_shared::gossip::format_labels(&n.labels)
        }
    );
    println!(
        "cpu:        {}m offered, {}m reserved, {} free as the node reports",
        n.cpu_millis,
        n.reserved_cpu_millis,
        n.free_cpu_millis.map_or("?".into(), |f| format!("{f}m"))
    );
    println!(
        "memory:     {}Mi offered, {}Mi reserved, {} free as the node reports",
        n.memory_bytes >> 20,
        n.reserved_memory_bytes >> 20,
        n.free_memory_bytes
            .map_or("?".into(), |f| format!("{}Mi", f >> 20))
    );
    println!("jobs:       {}", n.jobs.len());
    if n.gpus.is_empty() {
        println!("gpus:       none");
        return Ok(());
    }
    println!(
        "\n{:<5} {:<34} {:<24} {:>7} {:>5} {:>7} {:<9} {:<22} KIND",
        "GPU", "UUID", "MODEL", "MEMORY", "NUMA", "NVLINK", "RESERVED", "HEALTH"
    );
    for g in &n.gpus {
        let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "{:<5} {:<34} {:<24} {:>6}G {:>5} {:>7} {:<9} {:<22} {}",
            g.index,
            g.uuid,
            g.model,
            g.memory_bytes >> 30,
            opt(g.numa_node),
            opt(g.nvlink_group),
            if n.reserved_gpus.contains(&g.index) {
                "yes"
            } else {
                "no"
            },
            g.health.to_compact(),
            if g.simulated { "simulated" } else { "real" }
        );
    }
    Ok(())
}

/// `6/8 H100-80GB sim`: free (neither reserved nor unhealthy) over total, the models, and
/// whether they are simulated.
fn gpu_summary(n: &Node) -> String {
    if n.gpus.is_empty() {
        return "-".into();
    }
    let free = n
        .gpus
        .iter()
        .filter(|g| !g.health.is_unhealthy() && !n.reserved_gpus.contains(&g.index))
        .count();
    let mut models: Vec<&str> = n.gpus.iter().map(|g| g.model.as_str()).collect();
    models.dedup();
    let sim = if n.gpus.iter().any(|g| g.simulated) {
        " (simulated)"
    } else {
        ""
    };
    format!("{free}/{} {}{sim}", n.gpus.len(), models.join("+"))
}

pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}
