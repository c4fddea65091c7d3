//! The coordinator's embedded registry with a real client: `skopeo copy` into it and out
//! of it, authentication with API tokens, and an agent pulling from it and running it.

use std::path::Path;
use std::process::Command;

use gantry_tests::{Coordinator, binary, free_ports};

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A one-layer OCI image of the busybox rootfs, built with umoci.
fn busybox_layout(dir: &Path) -> std::path::PathBuf {
    let rootfs = dir.join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:v1", layout.display())));
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(bundle.join("rootfs")));
    run(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    run(Command::new("umoci")
        .args([
            "config",
            "--config.cmd",
            "sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "echo from-the-embedded-registry",
            "--image",
        ])
        .arg(format!("{}:v1", layout.display())));
    layout
}

#[test]
fn skopeo_copies_into_and_out_of_the_embedded_registry_and_agents_pull_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, control) = free_ports();
    let coordinator = Coordinator::start(&dir.path().join("coordinator"), &api, &control);
    let admin = coordinator.admin.clone().expect("admin token");
    let layout = busybox_layout(dir.path());
    let remote = format!("docker://{api}/team/busybox:v1");
    let creds = format!("gantry:{admin}");

    // Unauthenticated pushes are refused.
    let anon = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&remote)
        .output()
        .expect("skopeo");
    assert!(!anon.status.success(), "an anonymous push must fail");

    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&remote));
    let out = dir.path().join("copied");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
        ])
        .arg(&remote)
        .arg(format!("oci:{}:v1", out.display())));
    let inspect = |image: String, extra: &[&str]| -> serde_json::Value {
        let o = run(Command::new("skopeo").arg("inspect").args(extra).arg(image));
        serde_json::from_slice(&o.stdout).expect("inspect json")
    };
    let pushed = inspect(remote.clone(), &["--tls-verify=false", "--creds", &creds]);
    let copied = inspect(format!("oci:{}:v1", out.display()), &[]);
    assert_eq!(pushed["Layers"], copied["Layers"], "same layers in and out");
    let tags = inspect(remote.clone(), &["--tls-verify=false", "--creds", &creds]);
    assert!(
        tags["RepoTags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x == "v1")),
        "{tags}"
    );

    // An agent pulls it with a token and runs it.
    let agent_state = dir.path().join("agent");
    let reference = format!("{api}/team/busybox:v1");
    let agent = |args: &[&str]| {
        Command::new(binary("gantry-agent"))
            .env("GANTRY_STATE_DIR", &agent_state)
            .env("GANTRY_CONFIG", agent_state.join("agent.toml"))
            .args(args)
            .output()
            .expect("agent")
    };
    let pulled = agent(&[
        "image",
        "pull",
        &reference,
        "--username",
        "gantry",
        "--password",
        &admin,
    ]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let ran = agent(&["run", "--image", &reference]);
    assert_eq!(
        ran.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "from-the-embedded-registry\n"
    );
}
