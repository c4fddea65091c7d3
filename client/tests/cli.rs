//! The `gantry` binary on its own, with no coordinator: what a user sees when nothing is
//! configured, when the coordinator is away, and when a flag's value is wrong.
//!
//! These tests are also why `cargo nextest run --workspace` builds `gantry`: cargo builds a
//! package's binaries for its integration tests, and the end-to-end tests in `tests/` run it.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `gantry ARGS` with a config home of its own (empty unless a test writes there) and
/// none of the caller's GANTRY_* variables.
fn gantry(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.args(args)
        .env("XDG_CONFIG_HOME", home)
        .env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_TOKEN")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run gantry")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

#[test]
fn with_no_coordinator_configured_it_says_how_to_get_one() {
    let home = tempfile::tempdir().expect("tempdir");
    let out = gantry(home.path(), &[], &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("no coordinator configured"), "{err}");
    assert!(
        err.contains("gantry dev") && err.contains("GANTRY_ADDR"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_unreachable_coordinator_is_named_in_the_error() {
    let home = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", closed_port());
    let env = [("GANTRY_ADDR", addr.as_str()), ("GANTRY_TOKEN", "t")];
    // `--cpus` and its alias `--cpu` both parse; the run then fails only on the connection.
    for flag in ["--cpus", "--cpu"] {
        let out = gantry(
            home.path(),
            &env,
            &["run", flag, "0.5", "--image", "busybox", "--", "true"],
        );
        assert_eq!(out.status.code(), Some(1), "{flag}: {out:?}");
        let err = stderr(&out);
        assert!(err.contains("cannot reach the coordinator at"), "{err}");
        assert!(err.contains(&addr), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_bad_resource_value_names_the_field_before_anything_is_sent() {
    let home = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", closed_port());
    let env = [("GANTRY_ADDR", addr.as_str()), ("GANTRY_TOKEN", "t")];
    let out = gantry(
        home.path(),
        &env,
        &[
            "run", "--memory", "lots", "--image", "busybox", "--", "true",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("resources.memory"), "{err}");
    // It failed on the value, not on the (closed) coordinator.
    assert!(!err.contains("cannot reach"), "{err}");
}

#[test]
fn a_config_file_that_is_not_json_is_named_with_what_to_do() {
    let home = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(home.path().join("gantry")).expect("mkdir");
    std::fs::write(home.path().join("gantry/config.json"), "{not json").expect("write");
    let out = gantry(home.path(), &[], &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("config.json is not valid"), "{err}");
    assert!(err.contains("gantry dev"), "{err}");
}

#[test]
fn a_bad_manifest_is_named_by_file_function_and_field_before_anything_is_sent() {
    let home = tempfile::tempdir().expect("tempdir");
    let file = home.path().join("gantry.toml");
    let path = file.to_str().expect("utf-8 path");
    std::fs::write(
        &file,
        "app = \"embed\"\n[functions.encode]\nimage = \"busybox\"\nmax_containers = 0\n",
    )
    .expect("write");
    // No coordinator is configured: the manifest is judged first.
    let out = gantry(home.path(), &[], &["deploy", "-f", path]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("functions.encode.max_containers"), "{err}");
    assert!(err.contains("gantry.toml"), "{err}");
    std::fs::write(
        &file,
        "app = \"embed\"\n[functions.encode]\nimage = \"busybox\"\nmax_container = 3\n",
    )
    .expect("write");
    let err = stderr(&gantry(home.path(), &[], &["deploy", "-f", path]));
    assert!(
        err.contains("max_container") && err.contains("line 4"),
        "{err}"
    );
    let missing = home.path().join("nope.toml");
    let err = stderr(&gantry(
        home.path(),
        &[],
        &["deploy", "-f", missing.to_str().expect("utf-8")],
    ));
    assert!(
        err.contains("cannot read") && err.contains("-f FILE"),
        "{err}"
    );
}
