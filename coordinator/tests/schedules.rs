//! Schedules with a clock the test sets: passes of the schedule service at chosen times
//! over real job and function services (no nodes, so jobs stay pending). A due tick
//! submits the template once (with its idempotency key); a tick while the last run is still
//! going is skipped under `overlap = "skip"` and runs under `"allow"`; after a long gap one
//! catch-up run, not one per missed tick; schedules survive a restart of the service; a
//! deleted schedule stops.

mod support;

use gantry_coordinator::schedules::ScheduleService;
use gantry_shared::api::JobState;
use gantry_shared::schedules::{CreateJobSchedule, LastRun, ScheduleTarget};

fn request(name: &str, schedule: &str) -> CreateJobSchedule {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "schedule": toml::from_str::<toml::Value>(schedule).expect("schedule"),
        "job": {"name": name, "image": "busybox", "command": ["true"]},
    }))
    .expect("request")
}

fn last(service: &ScheduleService, name: &str) -> Option<LastRun> {
    service
        .list()
        .expect("list")
        .into_iter()
        .find(|s| s.target == ScheduleTarget::Job { name: name.into() })
        .and_then(|s| s.last_run)
}

#[tokio::test]
async fn ticks_run_skip_overlaps_and_catch_up_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = support::services(dir.path()).await;
    let service = ScheduleService::new(s.store.clone(), s.functions.clone(), s.jobs.clone());
    let t0 = 1_000_000;
    service
        .put_job(request("nightly", "period = \"10s\""), t0)
        .expect("skip schedule");
    service
        .put_job(
            request("eager", "period = \"10s\"\noverlap = \"allow\""),
            t0,
        )
        .expect("allow schedule");
    let jobs = |n: usize| {
        let (all, _) = s.jobs.list(None, None, 100).expect("jobs");
        assert_eq!(all.len(), n, "{all:?}");
        assert!(all.iter().all(|j| j.state == JobState::Pending));
    };

    // Not due yet.
    service.pass(t0 + 9_999).await.expect("pass");
    jobs(0);
    // Due: each submits its template.
    service.pass(t0 + 10_000).await.expect("pass");
    jobs(2);
    let first = last(&service, "nightly").expect("ran");
    assert!(first.id.is_some() && first.skipped.is_none(), "{first:?}");
    // The next tick while those jobs are still pending (no nodes): `skip` skips, `allow`
    // submits another.
    service.pass(t0 + 20_000).await.expect("pass");
    jobs(3);
    let skipped = last(&service, "nightly").expect("ticked");
    assert_eq!(skipped.id, None);
    assert!(skipped.skipped.is_some(), "{skipped:?}");

    // A restarted service over the same store, after a long gap: one catch-up run for the
    // ten missed ticks, then the schedule keeps to its period from there.
    let restarted = ScheduleService::new(s.store.clone(), s.functions.clone(), s.jobs.clone());
    restarted.pass(t0 + 130_000).await.expect("pass");
    jobs(4);
    restarted.pass(t0 + 135_000).await.expect("pass");
    jobs(4);
    let view = restarted.list().expect("list");
    let eager = view
        .iter()
        .find(|v| {
            v.target
                == ScheduleTarget::Job {
                    name: "eager".into(),
                }
        })
        .expect("eager");
    assert_eq!(eager.next_run_ms, Some(t0 + 140_000));

    // Deleted, it stops.
    restarted.delete_job("eager").expect("delete");
    restarted.delete_job("nightly").expect("delete");
    restarted.pass(t0 + 1_000_000).await.expect("pass");
    jobs(4);
    assert!(restarted.delete_job("eager").is_err(), "already gone");
}
