//! The reconciler's decisions, one pass at a time, with no store, network or clock.

use std::collections::BTreeMap;

use gantry_shared::api::{Job, JobState};
use gantry_shared::gossip::{AgentGossip, GpuInfo, NodeResources};
use gantry_shared::protocol::{Command, NodeCapacity};
use gantry_shared::{EndCause, Generation, JobId, NodeId, Owner};

use super::plan::{Action, Memory, SendKind, Snapshot, plan};
use crate::jobs::Eviction;
use crate::nodes::liveness::{Liveness, NodeStatus};
use crate::store::Fence;
use crate::store::node_admin::{AdminMode, AdminState};

const NOW: u64 = 1_000_000;

fn id(n: &str) -> NodeId {
    NodeId::new(n).expect("node id")
}

/// An up, ready node with 8 CPUs, 64 GiB and `gpus` simulated H100s.
fn node(name: &str, gpus: u32) -> NodeStatus {
    let capacity = NodeCapacity {
        cpu_millis: 8_000,
        memory_bytes: 64 << 30,
        gpus,
        shared_volumes: false,
    };
    NodeStatus {
        id: id(name),
        liveness: Liveness::Up,
        reason: "",
        since_ms: 0,
        last_seen_ms: Some(NOW),
        connected: true,
        capacity: Some(capacity),
        gossip: Some(AgentGossip {
            addr: std::net::IpAddr::from([10, 0, 0, name.len() as u8]),
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu_millis: capacity.cpu_millis,
                free_cpu_millis: capacity.cpu_millis,
                memory_bytes: capacity.memory_bytes,
                free_memory_bytes: capacity.memory_bytes,
            },
            free_gpus: (0..gpus).collect(),
            gpus: (0..gpus)
                .map(|g| GpuInfo::simulated(name, g, "H100-80GB", 80 << 30))
                .collect(),
            images: Default::default(),
        }),
        gossip_error: None,
        admin: None,
    }
}

fn job(seq: u64, body: serde_json::Value) -> Job {
    let mut spec = serde_json::json!({"name": "t", "image": "busybox"});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), body.as_object()) {
        spec.extend(extra.clone());
    }
    Job {
        id: JobId::from_sequence(seq),
        spec: serde_json::from_value(spec).expect("spec"),
        state: JobState::Pending,
        reason: Some("waiting for capacity".into()),
        created_at_ms: 0,
        updated_at_ms: 0,
        attempts: Vec::new(),
        failures: 0,
        not_before_ms: None,
    }
}

fn snapshot<'a>(statuses: &'a [NodeStatus], jobs: Vec<Job>) -> Snapshot<'a> {
    Snapshot {
        now_ms: NOW,
        statuses,
        jobs,
        fences: Vec::new(),
        warm: BTreeMap::new(),
        sessions: statuses
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i + 1))
            .collect(),
    }
}

/// The placements a plan made, as (job, nodes).
fn placed(actions: &[Action]) -> Vec<(JobId, Vec<NodeId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Place { job, members } => Some((
                job.clone(),
                members.iter().map(|m| m.node.clone()).collect(),
            )),
            _ => None,
        })
        .collect()
}

fn sends(actions: &[Action]) -> Vec<(NodeId, SendKind)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { member, kind, .. } => Some((member.2.clone(), kind.clone())),
            _ => None,
        })
        .collect()
}

/// Applies a plan's placements to the jobs, as the executor's store writes would.
fn placed_jobs(statuses: &[NodeStatus], jobs: Vec<Job>) -> Vec<Job> {
    let mut memory = Memory::default();
    let actions = plan(snapshot(statuses, jobs.clone()), &mut memory);
    let mut jobs = jobs;
    for a in actions {
        if let Action::Place { job, members } = a
            && let Some(j) = jobs.iter_mut().find(|j| j.id == job)
        {
            j.attempts.extend(members);
            j.state = JobState::Running;
        }
    }
    jobs
}

#[test]
fn a_pending_job_is_placed_and_its_start_follows_the_record() {
    let nodes = [node("a", 0)];
    let mut memory = Memory::default();
    let actions = plan(
        snapshot(&nodes, vec![job(1, serde_json::json!({}))]),
        &mut memory,
    );
    assert_eq!(placed(&actions), [(JobId::from_sequence(1), vec![id("a")])]);
    let place = actions
        .iter()
        .position(|a| matches!(a, Action::Place { .. }))
        .expect("place");
    let start = actions
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::Send {
                    kind: SendKind::Start { placed: true },
                    ..
                }
            )
        })
        .expect("start");
    assert!(place < start, "recorded before the node hears of it");
    // The start is remembered for the node's session: the next pass does not resend it.
    let jobs = placed_jobs(&nodes, vec![job(1, serde_json::json!({}))]);
    let again = plan(snapshot(&nodes, jobs), &mut memory);
    assert!(sends(&again).is_empty(), "{again:?}");
}

#[test]
fn a_gang_is_placed_whole_with_ranks_or_waits_whole() {
    let gang =
        serde_json::json!({"nodes": 2, "resources": {"cpu": "1", "memory": "1G", "gpus": 4}});
    let nodes = [node("a", 8), node("b", 8)];
    let mut memory = Memory::default();
    let actions = plan(snapshot(&nodes, vec![job(1, gang.clone())]), &mut memory);
    let Some(Action::Place { members, .. }) =
        actions.iter().find(|a| matches!(a, Action::Place { .. }))
    else {
        panic!("no placement: {actions:?}");
    };
    let ranks: Vec<u32> = members.iter().map(|m| m.rank).collect();
    assert_eq!(ranks, [0, 1]);
    assert!(members.iter().all(|m| m.generation == Generation(1)));
    assert!(
        members[0].master_port.is_some(),
        "a gang gets a MASTER_PORT"
    );
    // One node only: nothing is placed, and the job says why.
    let one = [node("a", 8)];
    let actions = plan(snapshot(&one, vec![job(1, gang)]), &mut Memory::default());
    assert!(placed(&actions).is_empty());
    assert!(
        actions.iter().any(
            |a| matches!(a, Action::NoteReason { reason, .. } if reason.starts_with("waiting:"))
        ),
        "{actions:?}"
    );
}

#[test]
fn a_job_backing_off_is_not_placed_until_its_time() {
    let nodes = [node("a", 0)];
    let mut j = job(1, serde_json::json!({}));
    j.not_before_ms = Some(NOW + 1);
    assert!(plan(snapshot(&nodes, vec![j.clone()]), &mut Memory::default()).is_empty());
    j.not_before_ms = Some(NOW);
    let actions = plan(snapshot(&nodes, vec![j]), &mut Memory::default());
    assert_eq!(placed(&actions).len(), 1);
}

#[test]
fn members_on_a_node_that_is_down_are_lost_fenced_and_re_placed_elsewhere() {
    let mut nodes = vec![node("a", 0), node("b", 0)];
    let jobs = placed_jobs(&nodes[..1], vec![job(1, serde_json::json!({}))]);
    nodes[0].liveness = Liveness::Down;
    let mut memory = Memory::default();
    let actions = plan(snapshot(&nodes, jobs), &mut memory);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::AddFence { node, generation: Generation(1), fence: Fence { grace_ms: 0, .. }, .. } if *node == id("a")
    )));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Evict {
            why: Eviction::Lost,
            ..
        }
    )));
    // Not waited for (the node is down), so the next generation goes to b at once; no
    // fence is sent to a node that is down.
    assert_eq!(placed(&actions), [(JobId::from_sequence(1), vec![id("b")])]);
    assert!(
        !sends(&actions)
            .iter()
            .any(|(n, k)| *n == id("a") && *k == SendKind::Fence)
    );
}

#[test]
fn a_preempted_member_is_fenced_and_its_next_generation_waits_for_it_to_stop() {
    let mut nodes = vec![node("a", 0), node("b", 0)];
    let jobs = placed_jobs(&nodes[..1], vec![job(1, serde_json::json!({}))]);
    nodes[0].admin = Some(AdminState {
        mode: AdminMode::Preempt,
        since_ms: NOW,
        deadline_ms: Some(NOW + 4_000),
    });
    let mut memory = Memory::default();
    let actions = plan(snapshot(&nodes, jobs), &mut memory);
    // The grace is bounded by the notice's deadline; the fence goes to the reachable node.
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::AddFence {
            fence: Fence {
                grace_ms: 4_000,
                ..
            },
            ..
        }
    )));
    let fence = actions.iter().find_map(|a| match a {
        Action::Send {
            member,
            command:
                Command::Stop {
                    owner,
                    generation,
                    grace_ms,
                },
            kind: SendKind::Fence,
            ..
        } => Some((member.2.clone(), owner.clone(), *generation, *grace_ms)),
        _ => None,
    });
    assert_eq!(
        fence,
        Some((
            id("a"),
            Owner::Job(JobId::from_sequence(1)),
            Generation(1),
            4_000
        ))
    );
    assert!(placed(&actions).is_empty(), "waits for the old generation");
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::NoteReason { reason, .. } if reason.contains("to stop on a")
    )));
}

#[test]
fn stops_of_a_cancelled_job_go_out_once_and_again_after_a_failed_send() {
    let nodes = [node("a", 0)];
    let mut jobs = placed_jobs(&nodes, vec![job(1, serde_json::json!({}))]);
    jobs[0].state = JobState::Cancelled;
    let mut memory = Memory::default();
    let first = plan(snapshot(&nodes, jobs.clone()), &mut memory);
    assert_eq!(sends(&first), [(id("a"), SendKind::Stop)]);
    assert!(sends(&plan(snapshot(&nodes, jobs.clone()), &mut memory)).is_empty());
    // The executor's report of a failed stop makes the next pass send it again.
    memory
        .stopping
        .remove(&(JobId::from_sequence(1), Generation(1), id("a")));
    assert_eq!(
        sends(&plan(snapshot(&nodes, jobs), &mut memory)),
        [(id("a"), SendKind::Stop)]
    );
}

#[test]
fn an_unconfirmed_start_is_sent_again_to_a_new_session() {
    let nodes = [node("a", 0)];
    let mut memory = Memory::default();
    let jobs = placed_jobs(&nodes, vec![job(1, serde_json::json!({}))]);
    // Placed in an earlier pass (whose memory is gone): the start goes out once.
    let first = plan(snapshot(&nodes, jobs.clone()), &mut memory);
    assert_eq!(
        sends(&first),
        [(id("a"), SendKind::Start { placed: false })]
    );
    assert!(sends(&plan(snapshot(&nodes, jobs.clone()), &mut memory)).is_empty());
    // The node reconnected: a new session gets it again.
    let mut snap = snapshot(&nodes, jobs.clone());
    snap.sessions.insert(id("a"), 99);
    assert_eq!(sends(&plan(snap, &mut memory)).len(), 1);
    // Once started, nothing more.
    let mut started = jobs;
    started[0].attempts[0].started_at_ms = Some(NOW);
    let mut snap = snapshot(&nodes, started);
    snap.sessions.insert(id("a"), 100);
    assert!(sends(&plan(snap, &mut memory)).is_empty());
}

#[test]
fn a_gpu_that_just_failed_is_not_placed_on_again() {
    let nodes = [node("a", 1)];
    let gpu = serde_json::json!({"resources": {"cpu": "1", "memory": "1G", "gpus": 1}});
    let mut jobs = placed_jobs(&nodes, vec![job(1, gpu.clone())]);
    let attempt = &mut jobs[0].attempts[0];
    attempt.end(
        EndCause::GpuFault(gantry_shared::GpuFault::Xid(79)),
        "gpu_xid_79",
        NOW - 1_000,
    );
    jobs[0].state = JobState::Pending;
    let actions = plan(snapshot(&nodes, jobs), &mut Memory::default());
    assert!(placed(&actions).is_empty(), "{actions:?}");
}

#[test]
fn the_ledger_never_oversubscribes_a_node_within_one_pass() {
    let nodes = [node("a", 2)];
    let gpu = serde_json::json!({"resources": {"cpu": "1", "memory": "1G", "gpus": 1}});
    let jobs: Vec<Job> = (1..=3).map(|i| job(i, gpu.clone())).collect();
    let actions = plan(snapshot(&nodes, jobs), &mut Memory::default());
    let gpus: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Place { members, .. } => Some(members[0].gpus.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(gpus.len(), 2, "two GPUs, two jobs: {actions:?}");
    assert_ne!(gpus[0], gpus[1]);
}
