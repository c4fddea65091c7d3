//! Schedules end to end with real processes and containers: a function whose manifest has
//! a schedule is called by itself every period (each call an ordinary call with its own
//! history), and a job template scheduled with the CLI is submitted every period and runs;
//! `gantry schedules list` shows both with their last runs; a deleted schedule stops.

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use gantry_tests::netns::wait_until;
use serde_json::Value;

fn schedules(c: &TestCluster) -> Vec<Value> {
    let out = c.gantry(&["--output", "json", "schedules", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("schedules as JSON")
}

#[test]
fn a_scheduled_function_and_a_scheduled_job_run_by_themselves() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        busybox: true,
        echo: true,
        ..ClusterSpec::default()
    });
    c.deploy(
        r#"
app = "ticker"
[functions.tick]
image = "echo"
command = ["/app/runtime"]
cpu = "0.2"
memory = "64M"
schedule = { period = "1s" }
"#,
    );
    let job = c.dir.path().join("job.json");
    std::fs::write(
        &job,
        r#"{"name": "heartbeat", "image": "busybox", "command": ["true"],
            "resources": {"cpu": "0.2", "memory": "32M"}}"#,
    )
    .expect("job file");
    let out = c.gantry(&[
        "schedules",
        "create",
        "heartbeat",
        "--period",
        "1s",
        "--job",
        job.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Both run by themselves: the function's calls succeed (each an ordinary call), the
    // job template's jobs succeed.
    wait_until(
        "two scheduled calls and two scheduled jobs done",
        Duration::from_secs(60),
        || {
            let metrics = c.http().get(c.url("/metrics")).send().ok()?.text().ok()?;
            let calls = metrics
                .lines()
                .find(|l| {
                    l.starts_with(
                        "gantry_inputs_ended_total{function=\"ticker/tick\",outcome=\"succeeded\"}",
                    )
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0);
            let jobs: Value = c
                .http()
                .get(c.url("/v1/jobs?state=succeeded"))
                .bearer_auth(&c.admin)
                .send()
                .ok()?
                .json()
                .ok()?;
            let heartbeats = jobs["jobs"]
                .as_array()?
                .iter()
                .filter(|j| j["spec"]["name"] == "heartbeat")
                .count();
            (calls >= 2.0 && heartbeats >= 2).then_some(())
        },
    );
    let list = schedules(&c);
    assert_eq!(list.len(), 2, "{list:?}");
    for s in &list {
        assert!(s["last_run"]["id"].is_string(), "{s}");
        assert!(s["next_run_ms"].is_u64(), "{s}");
    }
    let text = String::from_utf8_lossy(&c.gantry(&["schedules", "list"]).stdout).into_owned();
    assert!(
        text.contains("function ticker/tick") && text.contains("job heartbeat"),
        "{text}"
    );

    // Deleted, the job schedule stops; a function's schedule goes with its manifest.
    let out = c.gantry(&["schedules", "delete", "heartbeat"]);
    assert!(out.status.success());
    c.deploy(
        r#"
app = "ticker"
[functions.tick]
image = "echo"
command = ["/app/runtime"]
cpu = "0.2"
memory = "64M"
"#,
    );
    wait_until("no schedule left", Duration::from_secs(10), || {
        schedules(&c).is_empty().then_some(())
    });
}
