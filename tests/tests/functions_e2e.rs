//! Functions end to end with real processes and real containers: a deployed function
//! scales from zero, answers calls and maps through the CLI, reports its errors, drains
//! when idle; and inputs held by an agent that is killed finish elsewhere, each recorded
//! once.

use std::time::{Duration, Instant};

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use gantry_tests::netns::wait_until;
use serde_json::{Value, json};

fn cluster(agents: usize) -> TestCluster {
    TestCluster::start(ClusterSpec {
        agents,
        echo: true,
        ..ClusterSpec::default()
    })
}

fn get(c: &TestCluster, path: &str) -> Value {
    c.http()
        .get(format!("http://{}{path}", c.api))
        .bearer_auth(&c.admin)
        .send()
        .expect("get")
        .json()
        .expect("json")
}

fn post(c: &TestCluster, path: &str, body: Value) -> Value {
    let r = c
        .http()
        .post(format!("http://{}{path}", c.api))
        .bearer_auth(&c.admin)
        .json(&body)
        .send()
        .expect("post");
    let status = r.status();
    let v: Value = r.json().expect("json");
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

/// The app's containers of `function`, counted over every state.
fn containers(c: &TestCluster, app: &str) -> u64 {
    let v = get(c, &format!("/v1/apps/{app}"));
    v["functions"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    ["starting", "idle", "busy", "draining"]
                        .iter()
                        .map(|k| f[*k].as_u64().unwrap_or(0))
                        .sum::<u64>()
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_function_scales_from_zero_answers_calls_and_maps_and_drains_when_idle() {
    let c = cluster(1);
    c.deploy(
        r#"
app = "demo"
[functions.echo]
image = "echo"
command = ["/app/runtime"]
cpu = "0.25"
memory = "64M"
max_inputs = 2
scaledown_window = "2s"
retries = 1
env = { GREETING = "hi there" }
"#,
    );
    assert_eq!(containers(&c, "demo"), 0, "nothing runs before a call");

    // The first call scales from zero and prints its output.
    let started = Instant::now();
    let out = c.gantry(&["call", "demo", "echo", "--data", "hello"]);
    assert!(
        out.status.success(),
        "call: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    eprintln!(
        "scale from zero to the first output: {:?}",
        started.elapsed()
    );

    // The function's environment reaches it; a failing input says why and exits 1.
    let out = c.gantry(&["call", "demo", "echo", "--data", "env:GREETING"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi there");
    let out = c.gantry(&["call", "demo", "echo", "--data", "fail:boom"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EchoError") && err.contains("boom"), "{err}");
    // Its retry ran 1 s later by itself (nothing else happened meanwhile to hand it out).
    let call = post(
        &c,
        "/v1/apps/demo/functions/echo/calls",
        json!({"input": {"text": "fail:twice"}}),
    );
    assert_eq!(
        (&call["state"], &call["results"][0]["attempt"]),
        (&json!("failed"), &json!(2)),
        "{call}"
    );

    // Every input records where its time went.
    let call = post(
        &c,
        "/v1/apps/demo/functions/echo/calls",
        json!({"input": {"text": "timed"}}),
    );
    assert_eq!(call["state"], "succeeded", "{call}");
    let t = &call["results"][0]["timings"];
    assert!(t["run_ms"].is_u64() && t["total_ms"].is_u64(), "{call}");
    let id = call["id"].as_str().expect("id");
    let show = c.gantry(&["calls", "show", id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("succeeded") && text.contains("RUN"), "{text}");

    // A map, streamed into one open call in chunks (more than the 1,000 a map holds
    // outstanding): one output per line, in input order.
    let inputs: Vec<String> = (0..1_200).map(|i| format!("\"item-{i}\"")).collect();
    let file = c.dir.path().join("inputs.jsonl");
    std::fs::write(&file, inputs.join("\n")).expect("inputs");
    let out = c.gantry(&[
        "map",
        "demo",
        "echo",
        "--input-file",
        file.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "map: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines, inputs);
    // As they complete: each line is `INDEX<TAB>OUTPUT`, every input once.
    let out = c.gantry(&[
        "map",
        "demo",
        "echo",
        "--unordered",
        "--input-file",
        file.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "map --unordered: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.contains("item-"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut got: Vec<(usize, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (i, o) = l.split_once('\t').expect("INDEX<TAB>OUTPUT");
            (i.parse().expect("index"), o.to_owned())
        })
        .collect();
    got.sort();
    assert_eq!(got, inputs.iter().cloned().enumerate().collect::<Vec<_>>());

    // Functions show their inputs per second and latency; /metrics has every phase.
    let out = c.gantry(&["functions", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo/echo") && text.contains("ms"), "{text}");
    let metrics = c
        .http()
        .get(format!("http://{}/metrics", c.api))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    for phase in ["queued", "run", "total"] {
        let series =
            format!("gantry_input_phase_seconds_count{{function=\"demo/echo\",phase=\"{phase}\"}}");
        assert!(metrics.contains(&series), "{series} missing from /metrics");
    }

    // A function no node could ever hold fails its input saying so, not queued forever.
    c.deploy(
        "app = \"huge\"\n[functions.big]\nimage = \"echo\"\ncommand = [\"/app/runtime\"]\ncpu = \"64\"\n",
    );
    let out = c.gantry(&["call", "huge", "big", "--data", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no node could ever hold"), "{err}");

    // Idle past the scaledown window: drained to zero, and the next call starts again.
    wait_until("idle containers drained", Duration::from_secs(30), || {
        (containers(&c, "demo") == 0).then_some(())
    });
    let out = c.gantry(&["call", "demo", "echo", "--data", "again"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "again");
}

#[test]
fn inputs_held_by_a_killed_agent_finish_elsewhere_each_recorded_once() {
    let mut c = cluster(2);
    c.deploy(
        r#"
app = "slow"
[functions.work]
image = "echo"
command = ["/app/runtime"]
cpu = "0.25"
memory = "64M"
min_containers = 2
max_containers = 2
max_inputs = 2
"#,
    );
    wait_until("two warm containers", Duration::from_secs(30), || {
        let v = get(&c, "/v1/apps/slow");
        (v["functions"][0]["idle"] == 2).then_some(())
    });
    // Four inputs that take a while: two per container, on both nodes.
    let call = post(
        &c,
        "/v1/apps/slow/functions/work/calls",
        json!({"inputs": (0..4).map(|_| json!({"text": "sleep:4000"})).collect::<Vec<_>>(), "wait": false}),
    );
    let id = call["id"].as_str().expect("id").to_owned();
    let running = wait_until("inputs running", Duration::from_secs(20), || {
        let v = get(&c, &format!("/v1/calls/{id}"));
        let rs = v["results"].as_array().cloned().unwrap_or_default();
        rs.iter().all(|r| r["state"] == "running").then_some(rs)
    });
    let victim = running[0]["node"].as_str().expect("node").to_owned();
    let index = c
        .agents
        .iter()
        .position(|a| a.node == victim)
        .expect("victim agent");
    c.kill_host(index);
    let done = wait_until("every input ended", Duration::from_secs(60), || {
        let v = get(&c, &format!("/v1/calls/{id}"));
        (v["state"] != "running").then_some(v)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    let results = done["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    for r in results {
        assert_eq!(r["output"]["text"], "slept 4000", "{r}");
        assert_ne!(r["node"], victim.as_str(), "{r}");
    }
    assert!(
        results.iter().any(|r| r["attempt"].as_u64() >= Some(2)),
        "an input re-ran after its node died: {done}"
    );
}

#[test]
fn a_new_version_takes_new_calls_while_inputs_in_flight_finish_on_the_old_one() {
    let c = cluster(1);
    let manifest = |greeting: &str| {
        format!(
            r#"
app = "ver"
[functions.echo]
image = "echo"
command = ["/app/runtime"]
cpu = "0.25"
memory = "64M"
env = {{ GREETING = "{greeting}" }}
"#
        )
    };
    c.deploy(&manifest("one"));
    // An input in flight on version 1.
    let slow = post(
        &c,
        "/v1/apps/ver/functions/echo/calls",
        json!({"input": {"text": "sleep:2500"}, "wait": false}),
    );
    let slow_id = slow["id"].as_str().expect("id").to_owned();
    wait_until("the slow input running", Duration::from_secs(20), || {
        let v = get(&c, &format!("/v1/calls/{slow_id}"));
        (v["results"][0]["state"] == "running").then_some(())
    });
    c.deploy(&manifest("two"));
    // New calls go to version 2.
    let out = c.gantry(&["call", "ver", "echo", "--data", "env:GREETING"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "two");
    // The one in flight finishes on version 1.
    let done = get(&c, &format!("/v1/calls/{slow_id}?wait=30s"));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["version"], 1);
    assert_eq!(done["results"][0]["output"]["text"], "slept 2500");
    // Version 1's container drains once idle; version 2's stays for its window.
    wait_until("version 1 drained", Duration::from_secs(30), || {
        let v = get(&c, "/v1/apps/ver");
        let fs = v["functions"].as_array().cloned().unwrap_or_default();
        let live = |f: &Value| {
            ["starting", "idle", "busy", "draining"]
                .iter()
                .map(|k| f[*k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        fs.iter()
            .all(|f| f["version"] != 1 || live(f) == 0)
            .then_some(())
    });
    // Rollback: calls go to version 1 again.
    let out = c.gantry(&["apps", "rollback", "ver"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.gantry(&["call", "ver", "echo", "--data", "env:GREETING"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "one");
    // Stopped: calls are refused with what to do.
    let out = c.gantry(&["apps", "stop", "ver"]);
    assert!(out.status.success());
    let out = c.gantry(&["call", "ver", "echo", "--data", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped"));
}

#[test]
fn a_running_input_streams_chunks_read_in_order_with_done_after_the_answer() {
    let c = cluster(1);
    c.deploy(
        r#"
app = "streams"
[functions.echo]
image = "echo"
command = ["/app/runtime"]
cpu = "0.25"
memory = "64M"
"#,
    );
    let call = post(
        &c,
        "/v1/apps/streams/functions/echo/calls",
        json!({"input": {"text": "stream:5"}, "wait": false}),
    );
    let id = call["id"].as_str().expect("id").to_owned();
    // Read as a client does: from the previous page's `next`, long-polling, until done.
    let mut texts = Vec::new();
    let mut from = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no end of the stream: {texts:?}");
        let page = get(&c, &format!("/v1/calls/{id}/stream?from={from}&wait=30s"));
        for chunk in page["chunks"].as_array().expect("chunks") {
            assert_eq!(chunk["seq"], json!(from), "{page}");
            assert_eq!(
                (&chunk["attempt"], &chunk["content_type"]),
                (&json!(1), &json!("text/plain")),
                "{page}"
            );
            texts.push(chunk["text"].as_str().expect("text").to_owned());
            from += 1;
        }
        assert_eq!(page["next"], json!(from), "{page}");
        if page["done"] == json!(true) {
            break;
        }
    }
    let want: Vec<String> = (0..5).map(|n| format!("chunk-{n}")).collect();
    assert_eq!(texts, want);
    // Done means the input ended: its answer is there.
    let view = get(&c, &format!("/v1/calls/{id}"));
    assert_eq!(view["results"][0]["output"]["text"], "streamed 5", "{view}");
    // Read again from the start: all of it at once, done.
    let page = get(&c, &format!("/v1/calls/{id}/stream"));
    assert_eq!(page["chunks"].as_array().map(Vec::len), Some(5), "{page}");
    assert_eq!((&page["next"], &page["done"]), (&json!(5), &json!(true)));
    // No such input, no such call.
    for path in [
        format!("/v1/calls/{id}/stream?index=1"),
        "/v1/calls/fc-00000000deadbeef/stream".to_owned(),
    ] {
        let r = c
            .http()
            .get(format!("http://{}{path}", c.api))
            .bearer_auth(&c.admin)
            .send()
            .expect("get");
        assert_eq!(r.status(), 404, "{path}");
    }
}
