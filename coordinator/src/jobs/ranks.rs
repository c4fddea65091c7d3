//! The rank environment of a job's members, and the port rank 0 listens on. Pure.
//!
//! Every member of a generation gets the variables torchrun, Slurm-style and
//! SkyPilot-style launch scripts read, so training scripts run unchanged (one container per
//! node; inside it a launcher such as torchrun starts one process per GPU):
//!
//! | variable | value |
//! |---|---|
//! | `MASTER_ADDR` | address of the rank-0 node, reachable from the others |
//! | `MASTER_PORT` | a port on the rank-0 node no other live attempt there was given (29500–29999) |
//!
//! (`MASTER_*` only for gangs and GPU jobs: see `reconcile::record`.)
//!
//! | variable | value |
//! |---|---|
//! | `NNODES` | nodes in the gang (`GANTRY_NNODES` too) |
//! | `NODE_RANK` | this node's rank, 0..NNODES-1 (`GANTRY_NODE_RANK` too) |
//! | `GPUS_PER_NODE` | GPUs of each member |
//! | `LOCAL_WORLD_SIZE` | processes per node a launcher starts: GPUS_PER_NODE, at least 1 |
//! | `WORLD_SIZE` | NNODES × LOCAL_WORLD_SIZE |
//! | `RANK` | NODE_RANK × LOCAL_WORLD_SIZE: the global rank of the node's first process (a launcher sets each worker's own) |
//! | `LOCAL_RANK` | 0 |
//! | `GANTRY_NODE_IPS` | every member's address, comma-separated, in rank order |
//! | `GANTRY_JOB_ID`, `GANTRY_ATTEMPT` | the job and the generation |
//! | `GANTRY_NODE` | this member's node id |
//!
//! `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES` are set by the agent from the
//! member's GPUs. These names win over the same names in the job's `env`.

use std::collections::BTreeSet;

use gantry_shared::api::{Attempt, Job};

/// Ports handed out as `MASTER_PORT` (PyTorch's default 29500 and the 499 above it).
pub const MASTER_PORTS: std::ops::RangeInclusive<u16> = 29500..=29999;

/// The lowest port of [`MASTER_PORTS`] not in `used` (ports live attempts whose rank 0 is
/// on the same node hold).
pub fn allocate_port(used: &BTreeSet<u16>) -> Option<u16> {
    MASTER_PORTS.clone().find(|p| !used.contains(p))
}

/// The variables for `member`, one of `members` (the whole generation, any order).
pub fn env(job: &Job, members: &[&Attempt], member: &Attempt) -> Vec<(String, String)> {
    let mut by_rank: Vec<&&Attempt> = members.iter().collect();
    by_rank.sort_by_key(|a| a.rank);
    let nnodes = members.len().max(1);
    let gpus = job.spec.resources.gpus as usize;
    let local = gpus.max(1);
    let ips: Vec<&str> = by_rank
        .iter()
        .map(|a| a.address.as_deref().unwrap_or(""))
        .collect();
    let rank = member.rank as usize;
    let mut vars = vec![
        ("NNODES", nnodes.to_string()),
        ("NODE_RANK", rank.to_string()),
        ("GPUS_PER_NODE", gpus.to_string()),
        ("LOCAL_WORLD_SIZE", local.to_string()),
        ("WORLD_SIZE", (nnodes * local).to_string()),
        ("RANK", (rank * local).to_string()),
        ("LOCAL_RANK", "0".to_string()),
        ("GANTRY_NNODES", nnodes.to_string()),
        ("GANTRY_NODE_RANK", rank.to_string()),
        ("GANTRY_NODE_IPS", ips.join(",")),
        ("GANTRY_JOB_ID", job.id.to_string()),
        ("GANTRY_ATTEMPT", member.generation.to_string()),
        ("GANTRY_NODE", member.node.to_string()),
    ];
    if let Some(addr) = &member.master_addr {
        vars.push(("MASTER_ADDR", addr.clone()));
    }
    if let Some(port) = member.master_port {
        vars.push(("MASTER_PORT", port.to_string()));
    }
    vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Names [`env`] sets, which replace the job's own.
pub fn is_rank_var(name: &str) -> bool {
    matches!(
        name,
        "MASTER_ADDR"
            | "MASTER_PORT"
            | "NNODES"
            | "NODE_RANK"
            | "GPUS_PER_NODE"
            | "LOCAL_WORLD_SIZE"
            | "WORLD_SIZE"
            | "RANK"
            | "LOCAL_RANK"
    ) || name.starts_with("GANTRY_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::{JobId, NodeId};

    fn job(gpus: u32) -> Job {
        let spec = serde_json::from_value(serde_json::json!({
            "name": "t", "image": "x", "nodes": 2, "resources": {"cpu": "1", "memory": "1G", "gpus": gpus}
        }))
        .expect("spec");
        Job {
            id: JobId::from_sequence(7),
            spec,
            state: gantry_shared::api::JobState::Running,
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            attempts: vec![],
            failures: 0,
            not_before_ms: None,
        }
    }

    fn member(rank: u32, node: &str, ip: &str) -> Attempt {
        Attempt {
            generation: gantry_shared::Generation(3),
            node: NodeId::new(node).expect("id"),
            gpus: vec![],
            rank,
            address: Some(ip.into()),
            master_addr: Some("10.0.0.1".into()),
            master_port: Some(29501),
            started_at_ms: None,
            exit_code: None,
            cause: None,
            reason: None,
            ended_at_ms: None,
        }
    }

    #[test]
    fn a_two_node_gang_of_eight_gpus() {
        let (a, b) = (member(0, "a", "10.0.0.1"), member(1, "b", "10.0.0.2"));
        let env: std::collections::BTreeMap<_, _> =
            super::env(&job(8), &[&b, &a], &b).into_iter().collect();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29501"));
        assert_eq!(get("NNODES"), Some("2"));
        assert_eq!(get("NODE_RANK"), Some("1"));
        assert_eq!(get("WORLD_SIZE"), Some("16"));
        assert_eq!(get("RANK"), Some("8"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("8"));
        assert_eq!(get("GPUS_PER_NODE"), Some("8"));
        assert_eq!(get("GANTRY_NODE_IPS"), Some("10.0.0.1,10.0.0.2"));
        assert_eq!(get("GANTRY_ATTEMPT"), Some("3"));
        assert_eq!(get("GANTRY_JOB_ID"), Some(job(8).id.as_str()));
    }

    #[test]
    fn cpu_members_count_one_process_each() {
        let (a, b) = (member(0, "a", "10.0.0.1"), member(1, "b", "10.0.0.2"));
        let env: std::collections::BTreeMap<_, _> =
            super::env(&job(0), &[&a, &b], &b).into_iter().collect();
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["RANK"], "1");
    }

    #[test]
    fn ports_are_handed_out_lowest_first() {
        assert_eq!(allocate_port(&BTreeSet::new()), Some(29500));
        assert_eq!(allocate_port(&[29500, 29501].into()), Some(29502));
        assert_eq!(allocate_port(&MASTER_PORTS.collect()), None);
        assert!(is_rank_var("RANK") && is_rank_var("GANTRY_X") && !is_rank_var("PATH"));
    }
}
