//! The transitions of [`State`](super::State): leasing, answers recorded once, retries,
//! platform failures, setup failures, cancels.

use std::collections::BTreeMap;

use gantry_shared::calls::{FailureCause, InputFailure, InputResult, InputState, Payload};
use gantry_shared::functions::{AppManifest, FunctionSpec};
use gantry_shared::{AppName, CallId, FunctionName, InputId, NodeId, WarmId};

use super::*;

fn key() -> FunctionKey {
    FunctionKey {
        app: AppName::new("a").expect("app"),
        version: 1,
        function: FunctionName::new("f").expect("fn"),
    }
}

fn spec(extra: &str) -> FunctionSpec {
    let m: AppManifest = toml::from_str(&format!(
        "app = \"a\"\n[functions.f]\nimage = \"busybox\"\n{extra}\n"
    ))
    .expect("manifest");
    m.functions.into_values().next().expect("fn")
}

fn state(extra: &str) -> State {
    let mut specs = BTreeMap::new();
    specs.insert(key(), spec(extra));
    State::restore(specs, Vec::new(), Vec::new())
}

fn warm(n: u64, max_inputs: u32) -> WarmRecord {
    WarmRecord {
        id: WarmId::from_sequence(n),
        key: key(),
        node: NodeId::new("n1").expect("node"),
        gpus: Vec::new(),
        cpu_millis: 1000,
        memory_bytes: 1 << 20,
        max_inputs,
        phase: WarmPhase::Placed,
        placed_at_ms: 0,
        started_at_ms: None,
        image_ms: None,
        ready_at_ms: None,
        idle_since_ms: 0,
        setup_failed: false,
    }
}

fn inputs(call: u64, n: u32, now: u64) -> Vec<InputRecord> {
    let call = CallId::from_sequence(call);
    (0..n)
        .map(|i| {
            InputRecord::new(
                InputId::of(&call, i),
                call.clone(),
                i,
                key(),
                Payload::text(&format!("in{i}")),
                now,
            )
        })
        .collect()
}

fn error(cause: FailureCause) -> InputResult {
    InputResult::Error(InputFailure {
        cause,
        error_type: "E".into(),
        message: "boom".into(),
        traceback: None,
    })
}

#[test]
fn inputs_wait_for_a_ready_container_and_fill_its_slots_only() {
    let mut s = state("max_inputs = 2");
    let c = s.accept(inputs(1, 3, 10), 10);
    assert!(c.deliveries.is_empty(), "no container yet");
    assert_eq!(s.queued(&key()), 3);
    let mut w = warm(1, 2);
    w.placed_at_ms = 12;
    s.placed(w);
    s.started(&WarmId::from_sequence(1), 20, 5);
    let c = s.ready(&WarmId::from_sequence(1), 30, 30);
    assert_eq!(c.deliveries.len(), 2, "two slots");
    assert_eq!(s.queued(&key()), 1);
    assert_eq!(s.running(&key()), 2);
    assert_eq!(c.deliveries[0].input.attempt, 1);
    // An answer frees a slot and the last input goes out.
    let first = c.deliveries[0].input.id.clone();
    let c = s.answered(
        &WarmId::from_sequence(1),
        &first,
        1,
        InputResult::Output(Payload::text("ok")),
        40,
    );
    assert_eq!(c.deliveries.len(), 1);
    let ended: Vec<_> = c
        .inputs
        .iter()
        .filter(|i| i.state == InputState::Succeeded)
        .collect();
    assert_eq!(ended.len(), 1);
    let t = &ended[0].timings;
    assert_eq!(t.total_ms, Some(30));
    assert_eq!(t.run_ms, Some(10));
    // Accepted at 10, placed at 12, image 15–20, started 20, ready 30, leased 30.
    assert_eq!(t.placement_ms, Some(3));
    assert_eq!(t.image_ms, Some(5));
    assert_eq!(t.startup_ms, Some(10));
    assert_eq!(t.queued_ms, Some(2));

    // A web request's wait splits the same way: one that arrived at 25 waited through the
    // last 5 ms of the start; one that came once the container was ready only queued.
    let w = WarmId::from_sequence(1);
    let cold = s.wait_phases(&w, 25, 31);
    assert_eq!(
        (
            cold.placement_ms,
            cold.image_ms,
            cold.startup_ms,
            cold.queued_ms
        ),
        (Some(0), Some(0), Some(5), Some(1))
    );
    let warm = s.wait_phases(&w, 35, 36);
    assert_eq!(
        (warm.startup_ms, warm.queued_ms, warm.run_ms),
        (None, Some(1), None)
    );
}

#[test]
fn an_output_is_recorded_once() {
    let mut s = state("");
    s.placed(warm(1, 1));
    s.ready(&WarmId::from_sequence(1), 0, 0);
    let c = s.accept(inputs(1, 1, 0), 0);
    let id = c.deliveries[0].input.id.clone();
    let w = WarmId::from_sequence(1);
    let first = s.answered(&w, &id, 1, InputResult::Output(Payload::text("a")), 5);
    assert_eq!(first.calls.len(), 1);
    // A duplicate, a stale attempt, another container: all ignored.
    assert!(
        s.answered(&w, &id, 1, InputResult::Output(Payload::text("b")), 6)
            .inputs
            .is_empty()
    );
    assert!(
        s.answered(&w, &id, 2, InputResult::Output(Payload::text("c")), 6)
            .inputs
            .is_empty()
    );
    assert!(
        s.answered(
            &WarmId::from_sequence(9),
            &id,
            1,
            InputResult::Output(Payload::text("d")),
            6
        )
        .inputs
        .is_empty()
    );
}

#[test]
fn a_lost_container_requeues_its_inputs_without_using_retries_at_most_three_times() {
    let mut s = state("");
    s.accept(inputs(1, 1, 0), 0);
    for n in 1..=4u64 {
        s.placed(warm(n, 1));
        let c = s.ready(&WarmId::from_sequence(n), 0, 0);
        assert_eq!(c.deliveries.len(), 1, "container {n} gets the input");
        assert_eq!(c.deliveries[0].input.attempt, n as u32);
        let c = s.container_ended(&WarmId::from_sequence(n), "node down", false, 1);
        if n <= 3 {
            assert_eq!(s.queued(&key()), 1, "back in the queue after loss {n}");
            assert_eq!(c.inputs[0].user_retries, 0);
        } else {
            let failed = &c.inputs[0];
            assert_eq!(failed.state, InputState::Failed);
            let Some(InputResult::Error(e)) = &failed.result else {
                panic!("an error")
            };
            assert_eq!(e.cause, FailureCause::Platform);
            assert!(e.message.contains("node down"), "{}", e.message);
        }
    }
}

#[test]
fn user_errors_follow_the_functions_retries_with_their_delay() {
    let mut s = state("retries = { max_retries = 1, initial_delay = \"2s\" }");
    s.placed(warm(1, 1));
    s.ready(&WarmId::from_sequence(1), 0, 0);
    let c = s.accept(inputs(1, 1, 0), 0);
    let id = c.deliveries[0].input.id.clone();
    let w = WarmId::from_sequence(1);
    let c = s.answered(&w, &id, 1, error(FailureCause::User), 100);
    assert!(c.deliveries.is_empty(), "the retry waits its delay");
    assert_eq!(s.input(&id).map(|i| i.not_before_ms), Some(2_100));
    assert!(s.dispatch(&key(), 2_000).deliveries.is_empty());
    let c = s.dispatch(&key(), 2_100);
    assert_eq!(c.deliveries[0].input.attempt, 2);
    let c = s.answered(&w, &id, 2, error(FailureCause::User), 2_200);
    assert_eq!(c.inputs[0].state, InputState::Failed, "out of retries");
}

#[test]
fn setup_failures_fail_queued_inputs_after_three_or_at_once_when_certain() {
    let mut s = state("");
    s.accept(inputs(1, 2, 0), 0);
    assert!(s.setup_failed(&key(), "bad", false, 1).inputs.is_empty());
    assert!(s.setup_failed(&key(), "bad", false, 2).inputs.is_empty());
    let c = s.setup_failed(&key(), "bad init", false, 3);
    assert_eq!(c.inputs.len(), 2);
    assert!(c.inputs.iter().all(|i| i.state == InputState::Failed));
    let mut s = state("");
    s.accept(inputs(2, 1, 0), 0);
    let c = s.setup_failed(&key(), "image not found", true, 1);
    let Some(InputResult::Error(e)) = &c.inputs[0].result else {
        panic!("an error")
    };
    assert_eq!(e.cause, FailureCause::Init);
    assert!(e.message.contains("image not found"));
}

#[test]
fn cancel_drops_queued_inputs_and_tells_containers_of_running_ones() {
    let mut s = state("");
    s.placed(warm(1, 1));
    s.ready(&WarmId::from_sequence(1), 0, 0);
    s.accept(inputs(1, 2, 0), 0);
    let c = s.cancel(&CallId::from_sequence(1), 5);
    assert_eq!(c.cancels.len(), 1);
    assert_eq!(c.inputs.len(), 2);
    assert!(c.inputs.iter().all(|i| i.state == InputState::Cancelled));
    assert_eq!(s.queued(&key()), 0);
    assert_eq!(s.running(&key()), 0);
}

#[test]
fn restore_requeues_inputs_whose_container_is_gone() {
    let mut s = state("");
    s.placed(warm(1, 1));
    s.ready(&WarmId::from_sequence(1), 0, 0);
    let c = s.accept(inputs(1, 1, 0), 0);
    let leased = c.inputs.clone();
    let mut specs = BTreeMap::new();
    specs.insert(key(), spec(""));
    // The container's record is gone: the input is queued again.
    let s2 = State::restore(specs.clone(), leased.clone(), Vec::new());
    assert_eq!(s2.queued(&key()), 1);
    // It is still there: the lease stands and its answer will count.
    let mut s3 = State::restore(specs, leased, vec![warm(1, 1)]);
    assert_eq!(s3.queued(&key()), 0);
    assert_eq!(s3.running(&key()), 1);
    // Its delivery may have been lost with the restart: sent again once its node is back.
    assert!(s3.take_redeliveries(|_| false).is_empty());
    let again = s3.take_redeliveries(|_| true);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].input.attempt, 1);
    assert!(s3.take_redeliveries(|_| true).is_empty(), "once");
}

#[test]
fn containers_that_end_before_ready_back_off_the_next_start() {
    let mut s = state("");
    s.placed(warm(1, 1));
    assert!(s.may_start(&key(), 0));
    s.container_ended(&WarmId::from_sequence(1), "start refused", false, 1_000);
    assert!(!s.may_start(&key(), 1_999));
    assert!(s.may_start(&key(), 2_000));
    s.placed(warm(2, 1));
    s.container_ended(&WarmId::from_sequence(2), "exited", false, 2_000);
    assert!(!s.may_start(&key(), 3_999), "twice as long the second time");
    assert!(s.may_start(&key(), 4_000));
    // A container that becomes ready clears it.
    s.placed(warm(3, 1));
    s.ready(&WarmId::from_sequence(3), 4_000, 4_000);
    s.container_ended(&WarmId::from_sequence(3), "drained", false, 5_000);
    assert!(s.may_start(&key(), 5_000));
}

#[test]
fn containers_lost_with_their_host_before_ready_do_not_back_off_the_next_start() {
    // A host that crashes under eight starting containers is the platform's failure: the
    // version starts new ones elsewhere at once (it waited 30 s before).
    let mut s = state("");
    s.accept(inputs(1, 8, 0), 0);
    for n in 1..=8 {
        s.placed(warm(n, 1));
    }
    s.started(&WarmId::from_sequence(1), 10, 0);
    for n in 1..=8 {
        s.container_lost(
            &WarmId::from_sequence(n),
            "its node went down",
            n % 2 == 0,
            100,
        );
    }
    assert!(s.may_start(&key(), 100));
    assert_eq!(
        s.queued(&key()),
        8,
        "their inputs wait for the next containers"
    );
    // Fenced ones stay (they may still run), the others are gone.
    assert_eq!(s.warm().count(), 4);
    assert!(s.warm().all(|w| w.phase == WarmPhase::Fenced));
}

#[test]
fn each_call_counts_its_inputs_not_yet_ended() {
    let mut s = state("");
    let call = CallId::from_sequence(1);
    s.placed(warm(1, 1));
    s.ready(&WarmId::from_sequence(1), 0, 0);
    let c = s.accept(inputs(1, 3, 0), 0);
    assert_eq!(s.open_inputs(&call), 3);
    let id = c.deliveries[0].input.id.clone();
    s.answered(
        &WarmId::from_sequence(1),
        &id,
        1,
        InputResult::Output(Payload::text("a")),
        1,
    );
    assert_eq!(s.open_inputs(&call), 2);
    s.cancel(&call, 2);
    assert_eq!(s.open_inputs(&call), 0);
    assert_eq!(s.open_inputs(&CallId::from_sequence(9)), 0);
}

#[test]
fn a_containers_setup_failure_counts_once() {
    let mut s = state("");
    s.accept(inputs(1, 1, 0), 0);
    for n in 1..=2u64 {
        s.placed(warm(n, 1));
        // Reported twice for one container: counted once.
        assert!(
            s.container_setup_failed(&WarmId::from_sequence(n), "bad", 1)
                .inputs
                .is_empty()
        );
        assert!(
            s.container_setup_failed(&WarmId::from_sequence(n), "bad", 1)
                .inputs
                .is_empty()
        );
    }
    assert_eq!(s.queued(&key()), 1, "two containers failed, not three");
    s.placed(warm(3, 1));
    let c = s.container_setup_failed(&WarmId::from_sequence(3), "bad", 1);
    assert_eq!(c.inputs.len(), 1, "the third fails the queued input");
}
