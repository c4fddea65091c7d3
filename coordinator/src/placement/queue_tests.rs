//! Tests of the queue pass: order, fences, backfill, reasons.

use gantry_shared::JobId;

use super::tests::{eight, engine, held, node, req, usage};
use super::*;

fn pending(seq: u64, priority: i32, request: Request) -> Pending {
    Pending {
        job: JobId::from_sequence(seq),
        priority,
        seq,
        request,
    }
}

fn gang(nodes: u32, gpus: u32, models: &[&str]) -> Request {
    Request {
        nodes,
        ..req(gpus, models)
    }
}

/// Outcome per job: the nodes it got, or its reason.
fn outcome(decisions: &[(JobId, Result<Assignment, Unplaceable>)]) -> Vec<(u64, String)> {
    decisions
        .iter()
        .map(|(job, r)| {
            let seq = u64::from_str_radix(job.as_str().trim_start_matches("j-"), 16)
                .expect("sequence id");
            let what = match r {
                Ok(a) => a
                    .members
                    .iter()
                    .map(|m| m.node.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                Err(e) => e.to_string(),
            };
            (seq, what)
        })
        .collect()
}

/// n1, n2: A100; n3, n4: H100 with 2 and 4 GPUs taken by running work; one rack.
fn cluster() -> Engine {
    engine(
        vec![
            node("n1", &[("rack", "r1")], eight("A100-40GB", 40)),
            node("n2", &[("rack", "r1")], eight("A100-40GB", 40)),
            node("n3", &[("rack", "r1")], eight("H100-80GB", 80)),
            node("n4", &[("rack", "r1")], eight("H100-80GB", 80)),
        ],
        vec![held("n3", &[0, 1]), held("n4", &[0, 1, 2, 3])],
    )
}

#[test]
fn a_blocked_gang_fences_its_nodes_and_small_jobs_run_elsewhere() {
    let mut e = cluster();
    let jobs = [
        // Needs both H100 nodes whole: blocked, fences n3 and n4.
        pending(1, 0, gang(2, 8, &["H100"])),
        // Would pack onto n4 (4 free) but it is fenced: goes to an A100 node.
        pending(2, 0, req(1, &[])),
        // H100 only: the H100 nodes are fenced and there is no other place to wait for.
        pending(3, 0, req(2, &["H100"])),
        // Never fits: reported, fences nothing, so the job after it still runs.
        pending(4, 0, req(16, &[])),
        pending(5, 0, req(8, &["A100"])),
    ];
    let out = outcome(&schedule(&mut e, &jobs));
    assert_eq!(out[0].0, 1);
    assert_eq!(
        out[0].1,
        "waiting for capacity: no node has 8 free healthy H100 GPUs; 2 nodes have 8 free \
         A100-40GB but the job accepts only H100"
    );
    assert_eq!(out[1], (2, "n1".into()));
    assert_eq!(
        out[2],
        (
            3,
            format!(
                "waiting behind job {}: the nodes this job fits on are held for that job, \
                 which is ahead in the queue and waiting for capacity",
                JobId::from_sequence(1)
            )
        )
    );
    assert!(
        out[3].1.starts_with("no node has 16 healthy GPUs"),
        "{}",
        out[3].1
    );
    assert_eq!(out[4], (5, "n2".into()));
    // The fences last one pass: afterwards the H100 nodes take work again.
    assert_eq!(
        e.place(&req(2, &["H100"])).expect("unfenced").members[0]
            .node
            .as_str(),
        "n4"
    );
}

#[test]
fn the_shadow_waits_for_the_least_running_work() {
    // Three H100 nodes: the blocked 8-GPU job fences the one with the most already free.
    let mut e = engine(
        vec![
            node("a", &[], eight("H100", 80)),
            node("b", &[], eight("H100", 80)),
            node("c", &[], eight("H100", 80)),
        ],
        vec![
            held("a", &[0, 1, 2, 3, 4, 5]),
            held("b", &[0]),
            held("c", &[0, 1, 2]),
        ],
    );
    let jobs = [pending(1, 0, req(8, &[])), pending(2, 0, req(1, &[]))];
    let out = outcome(&schedule(&mut e, &jobs));
    assert_eq!(
        out[0].1,
        "waiting for capacity: no node has 8 free healthy GPUs of one model"
    );
    // b is fenced; a is the best pack among the rest.
    assert_eq!(out[1], (2, "a".into()));
}

#[test]
fn a_later_job_that_fits_only_on_fenced_nodes_waits_behind() {
    let mut e = engine(
        vec![node("only", &[], eight("H100", 80))],
        vec![held("only", &[0, 1, 2, 3])],
    );
    let jobs = [pending(1, 0, req(8, &[])), pending(2, 0, req(1, &[]))];
    let before = usage(&e);
    let out = outcome(&schedule(&mut e, &jobs));
    assert!(out[0].1.starts_with("waiting for capacity"), "{}", out[0].1);
    assert!(
        out[1]
            .1
            .starts_with(&format!("waiting behind job {}", JobId::from_sequence(1))),
        "{}",
        out[1].1
    );
    assert_eq!(usage(&e), before);
}

#[test]
fn never_placeable_jobs_fence_nothing() {
    let mut e = engine(
        vec![node("only", &[], eight("H100", 80))],
        vec![held("only", &[0, 1, 2, 3])],
    );
    let jobs = [pending(1, 0, req(9, &[])), pending(2, 0, req(1, &[]))];
    let out = outcome(&schedule(&mut e, &jobs));
    assert!(
        out[0].1.starts_with("no node has 9 healthy GPUs"),
        "{}",
        out[0].1
    );
    assert_eq!(out[1], (2, "only".into()));
}

#[test]
fn higher_priority_first_then_older() {
    let nodes = || vec![node("only", &[], eight("H100", 80))];
    let jobs = [
        pending(1, 0, req(8, &[])),
        pending(2, 10, req(8, &[])),
        pending(3, 10, req(8, &[])),
    ];
    let out = outcome(&schedule(&mut engine(nodes(), vec![]), &jobs));
    let order: Vec<u64> = out.iter().map(|o| o.0).collect();
    assert_eq!(order, [2, 3, 1]);
    assert_eq!(out[0].1, "only");
    assert!(out[1].1.starts_with("waiting for capacity"), "{}", out[1].1);
    // Job 1 fits only on the node fenced for job 3.
    assert!(
        out[2]
            .1
            .starts_with(&format!("waiting behind job {}", JobId::from_sequence(3))),
        "{}",
        out[2].1
    );
    // Submission order breaks ties, whatever the slice order.
    let mut reversed = jobs.clone();
    reversed.reverse();
    assert_eq!(
        outcome(&schedule(&mut engine(nodes(), vec![]), &reversed)),
        out
    );
}

#[test]
fn a_blocked_job_with_a_selector_fences_only_matching_nodes() {
    let mut e = engine(
        vec![
            node("n1", &[("pool", "train")], eight("H100", 80)),
            node("n2", &[("pool", "serve")], eight("H100", 80)),
        ],
        vec![held("n1", &[0]), held("n2", &[0])],
    );
    let mut big = req(8, &[]);
    big.selector = [("pool".into(), "train".into())].into();
    let jobs = [pending(1, 0, big), pending(2, 0, req(2, &[]))];
    let out = outcome(&schedule(&mut e, &jobs));
    assert_eq!(
        out[0].1,
        "waiting for capacity: no matching node has 8 free healthy GPUs of one model"
    );
    assert_eq!(out[1], (2, "n2".into()));
}
