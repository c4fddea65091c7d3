//! Secrets end to end with real processes and containers: created with the CLI, given to a
//! job as variables and as files (checked by their hashes, so the value is never in the
//! job's command or output), found nowhere in clear (both state directories, the daemons'
//! logs, the API's answers, the secrets tmpfs), still usable after a coordinator restart,
//! given to a function; a missing or wrong key file stops the coordinator with a clear
//! message and loses nothing; a job naming an unknown secret is refused.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use gantry_tests::cluster::{ClusterSpec, TestCluster};

/// The SHA-256 of `text`, as `sha256sum` prints it.
fn sha256(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Every regular file under `dir` whose bytes contain `needle` (symbolic links, sockets and
/// FIFOs are not followed or read).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let path = e.path();
        if t.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if t.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

/// `gantry [front…] run [--detach]` on busybox with secret `db` as variables and `keys`
/// as files, running `command`.
fn with_secrets(
    c: &TestCluster,
    front: &[&str],
    detach: bool,
    command: &[&str],
) -> std::process::Output {
    let mut all = front.to_vec();
    all.extend(["run", "--image", "busybox", "--memory", "64M"]);
    if detach {
        all.push("--detach");
    }
    all.extend(["--secret", "db", "--secret", "keys:files", "--"]);
    all.extend(command);
    c.gantry(&all)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn secrets_reach_containers_and_nothing_else() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 1,
        busybox: true,
        echo: true,
        logs_to_files: true,
        ..ClusterSpec::default()
    });
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let password = format!("pw-{nanos:x}-plain");
    let token = format!("tok-{nanos:x}-plain");

    // Created with the CLI: as arguments, and from an env file.
    let out = c.gantry(&["secret", "create", "db", &format!("PASSWORD={password}")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env_file = c.dir.path().join("keys.env");
    std::fs::write(&env_file, format!("# the API token\nTOKEN=\"{token}\"\n")).expect("env file");
    let out = c.gantry(&[
        "secret",
        "create",
        "keys",
        "--from-env-file",
        env_file.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&env_file).expect("rm env file");
    let out = c.gantry(&["secret", "create", "db", "PASSWORD=other"]);
    assert!(!out.status.success(), "a second create without --force");
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    let list = c.gantry(&["secret", "list"]);
    let text = stdout(&list);
    assert!(
        text.contains("db") && text.contains("PASSWORD") && text.contains("TOKEN"),
        "{text}"
    );

    // A job gets one as variables and one as files; it prints only their hashes.
    let run = |c: &TestCluster| {
        with_secrets(
            c,
            &[],
            false,
            &[
                "sh",
                "-c",
                "printf %s \"$PASSWORD\" | sha256sum; sha256sum < /run/secrets/keys/TOKEN; \
                 touch /run/secrets/keys/x 2>/dev/null && echo writable || echo read-only",
            ],
        )
    };
    let out = run(&c);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains(&sha256(&password)), "{printed}");
    assert!(printed.contains(&sha256(&token)), "{printed}");
    assert!(printed.contains("read-only"), "{printed}");

    // A job naming a secret that does not exist is refused at once.
    let out = c.gantry(&[
        "run", "--image", "busybox", "--secret", "nope", "--", "true",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("secret `nope` does not exist"),
        "{}",
        stderr(&out)
    );

    // A container with secrets that is still running: its spec is gone from the host
    // already, its files are on memory only (checked below with everything else).
    let out = with_secrets(&c, &["--output", "json"], true, &["sleep", "120"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the job as JSON");
    let sleeper = job["id"].as_str().expect("job id").to_owned();
    gantry_tests::netns::wait_until(
        "the job with secrets running",
        std::time::Duration::from_secs(30),
        || {
            let job: serde_json::Value = c
                .http()
                .get(c.url(&format!("/v1/jobs/{sleeper}")))
                .bearer_auth(&c.admin)
                .send()
                .ok()?
                .json()
                .ok()?;
            job["attempts"][0]["started_at_ms"].is_u64().then_some(())
        },
    );

    // Nowhere in clear: both state directories and the daemons' logs (all under the
    // cluster's directory), the secrets tmpfs, and every API answer.
    let mut answers = String::new();
    for path in ["/v1/jobs", "/v1/secrets", "/v1/nodes"] {
        answers.push_str(
            &c.http()
                .get(c.url(path))
                .bearer_auth(&c.admin)
                .send()
                .and_then(|r| r.text())
                .expect("API"),
        );
    }
    answers.push_str(&stdout(&c.gantry(&["jobs", "list"])));
    let memory = Path::new("/dev/shm/gantry-secrets");
    for value in [&password, &token] {
        let found = files_containing(c.dir.path(), value.as_bytes());
        assert!(found.is_empty(), "`{value}` in clear in {found:?}");
        assert!(
            !answers.contains(value.as_str()),
            "`{value}` in an API answer"
        );
    }
    // While it runs, only the files it mounts are on memory (no spec, no variables).
    assert!(files_containing(memory, password.as_bytes()).is_empty());
    assert_eq!(files_containing(memory, token.as_bytes()).len(), 1);
    let logs =
        std::fs::read_to_string(c.dir.path().join("logs/coordinator.log")).unwrap_or_default();
    assert!(
        logs.contains("secret written"),
        "the logs were captured: {logs}"
    );
    // Once it ends, nothing of them is left on the host.
    let out = c.gantry(&["jobs", "cancel", &sleeper]);
    assert!(out.status.success(), "{}", stderr(&out));
    gantry_tests::netns::wait_until(
        "the secrets of the ended container gone",
        std::time::Duration::from_secs(30),
        || {
            files_containing(memory, token.as_bytes())
                .is_empty()
                .then_some(())
        },
    );

    // A coordinator restart keeps them.
    c.restart_coordinator();
    let out = run(&c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&sha256(&password)),
        "{}",
        stdout(&out)
    );

    // A function's containers get them too.
    c.deploy(
        r#"
app = "secretive"
[functions.echo]
image = "echo"
command = ["/app/runtime"]
cpu = "0.2"
memory = "64M"
secrets = ["db"]
"#,
    );
    let out = c.gantry(&["call", "secretive", "echo", "--data", "env:PASSWORD"]);
    assert_eq!(stdout(&out).trim(), password, "{}", stderr(&out));
    let bad = "app = \"broken\"\n[functions.f]\nimage = \"echo\"\nsecrets = [\"nope\"]\n";
    let file = c.dir.path().join("broken.toml");
    std::fs::write(&file, bad).expect("manifest");
    let out = c.gantry(&["deploy", "-f", file.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("functions.f.secrets") && stderr(&out).contains("nope"),
        "{}",
        stderr(&out)
    );

    // Without its key file, or with another key, the coordinator refuses to start and
    // changes nothing; the right key brings everything back.
    let key = c.dir.path().join("coordinator/secrets.key");
    let right = std::fs::read(&key).expect("the key file");
    c.coordinator.kill9();
    std::fs::remove_file(&key).expect("rm key");
    let err = c.coordinator_refuses_to_start();
    assert!(err.contains("is missing, but secrets are stored"), "{err}");
    assert!(!key.exists(), "no new key made");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("another key");
    let err = c.coordinator_refuses_to_start();
    assert!(err.contains("does not decrypt the stored secrets"), "{err}");
    std::fs::write(&key, right).expect("restore the key");
    c.restart_coordinator();
    let out = run(&c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&sha256(&token)), "{}", stdout(&out));

    let out = c.gantry(&["secret", "delete", "keys"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = stdout(&c.gantry(&["secret", "list"]));
    assert!(!list.contains("keys"), "{list}");
}
