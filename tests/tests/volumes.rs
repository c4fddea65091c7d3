//! Volumes end to end with real processes, containers and loop-mounted filesystems: a
//! local volume of a fixed size on one node, filled from the CLI, written by a job and
//! read by a later function (both placed on the volume's node), a writer stopped at the
//! size with ENOSPC, files fetched and removed through the coordinator, a symbolic link a
//! container leaves that points out of the volume refused, deletion refused while a
//! deployed function mounts it and leaving no mount behind once done; a shared volume
//! written on one node and read on another.

use std::time::Duration;

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use gantry_tests::netns::wait_until;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `gantry run` of busybox with `volume` mounted at /data, running `script`; returns the
/// output and the node the job ran on.
fn run_with(c: &TestCluster, volume: &str, script: &str) -> (std::process::Output, String) {
    let mount = format!("{volume}:/data");
    let out = c.gantry(&[
        "run", "--image", "busybox", "--memory", "64M", "--volume", &mount, "--", "sh", "-c",
        script,
    ]);
    let id = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("submitted "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no job id: {}", stderr(&out)));
    let job: serde_json::Value = c
        .http()
        .get(c.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(&c.admin)
        .send()
        .expect("job")
        .json()
        .expect("json");
    let node = job["attempts"][0]["node"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (out, node)
}

/// Whether anything is mounted under `dir`.
fn mounted_under(dir: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    table.contains(&*dir.to_string_lossy())
}

#[test]
fn a_local_volume_keeps_files_between_containers_on_its_node() {
    let mut c = TestCluster::start(ClusterSpec {
        agents: 2,
        busybox: true,
        echo: true,
        ..ClusterSpec::default()
    });
    // On the second node: without the volume, CPU jobs go to node-0 (ties to the lower
    // id), so running on node-1 is the volume's doing.
    let out = c.gantry(&[
        "volume", "create", "data", "--node", "node-1", "--size", "16M",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("node node-1"), "{}", stdout(&out));
    let out = c.gantry(&["volume", "create", "data"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    let data_dir = c.agents[1].state.join("volumes/data");

    // Filled from the CLI: a directory tree, then listed.
    let local = c.dir.path().join("model");
    std::fs::create_dir_all(local.join("cfg")).expect("mkdir");
    std::fs::write(local.join("weights.bin"), vec![42u8; 300_000]).expect("write");
    std::fs::write(local.join("cfg/hello.txt"), "hello from the CLI").expect("write");
    let out = c.gantry(&["volume", "put", "data", local.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("put 2 file(s)"), "{}", stderr(&out));
    let ls = stdout(&c.gantry(&["volume", "ls", "data", "-r"]));
    assert!(
        ls.contains("model/cfg/hello.txt") && ls.contains("model/weights.bin"),
        "{ls}"
    );

    // A job reads what the CLI put and writes for later.
    let (out, node) = run_with(
        &c,
        "data",
        "cat /data/model/cfg/hello.txt; echo; echo 'written by a job' > /data/out.txt",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("hello from the CLI"),
        "{}",
        stdout(&out)
    );
    assert_eq!(node, "node-1", "placement follows the volume");

    // A later function reads it.
    c.deploy(
        r#"
app = "reader"
[functions.read]
image = "echo"
command = ["/app/runtime"]
cpu = "0.2"
memory = "64M"
volumes = { "/data" = "data" }
"#,
    );
    let out = c.gantry(&["call", "reader", "read", "--data", "file:/data/out.txt"]);
    assert_eq!(stdout(&out).trim(), "written by a job", "{}", stderr(&out));

    // Past its size a writer gets ENOSPC; what fits stays readable.
    let (out, _) = run_with(&c, "data", "dd if=/dev/zero of=/data/big bs=1M count=64");
    assert!(!out.status.success(), "a 64 MiB write into 16 MiB");
    assert!(
        stdout(&out).contains("No space left on device")
            || stderr(&out).contains("No space left on device"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = c.gantry(&["volume", "rm", "data", "big"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A put past the size is refused as a whole: nothing of it is left behind.
    let big = c.dir.path().join("big.bin");
    std::fs::write(&big, vec![1u8; 24 << 20]).expect("write");
    let out = c.gantry(&["volume", "put", "data", big.to_str().expect("utf-8")]);
    assert!(!out.status.success(), "24 MiB into 16 MiB");
    assert!(
        stderr(&out).contains("the volume is full"),
        "{}",
        stderr(&out)
    );
    let ls = stdout(&c.gantry(&["volume", "ls", "data"]));
    assert!(!ls.contains("big"), "{ls}");
    // A gang cannot share a local volume.
    let out = c.gantry(&[
        "run",
        "--image",
        "busybox",
        "--nodes",
        "2",
        "--volume",
        "data:/data",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("local to one node"),
        "{}",
        stderr(&out)
    );

    // Fetched through the coordinator: a file, and a whole directory.
    let fetched = c.dir.path().join("out.txt");
    let out = c.gantry(&[
        "volume",
        "get",
        "data",
        "out.txt",
        fetched.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&fetched).expect("fetched"),
        "written by a job\n"
    );
    let tree = c.dir.path().join("tree");
    let out = c.gantry(&[
        "volume",
        "get",
        "data",
        "model",
        tree.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(tree.join("weights.bin")).expect("weights"),
        vec![42u8; 300_000]
    );

    // A link a container leaves that points out of the volume is not followed.
    let (out, _) = run_with(&c, "data", "ln -s /etc/hostname /data/escape");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.gantry(&["volume", "get", "data", "escape", "-"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("leads out of the volume"),
        "{}",
        stderr(&out)
    );

    // A job naming a volume that does not exist is refused at once.
    let out = c.gantry(&[
        "run",
        "--image",
        "busybox",
        "--volume",
        "nope:/data",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("volume `nope` does not exist"),
        "{}",
        stderr(&out)
    );

    // The volume outlives a coordinator restart.
    c.restart_coordinator();
    assert!(stdout(&c.gantry(&["volume", "list"])).contains("data"));

    // Deleting it while a deployed function mounts it is refused; once the app is
    // stopped and its containers are gone, it goes, and so does its mount.
    let out = c.gantry(&["volume", "delete", "data"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by function reader/read"),
        "{}",
        stderr(&out)
    );
    assert!(mounted_under(&data_dir), "still mounted while refused");
    let out = c.gantry(&["apps", "stop", "reader"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the volume deleted", Duration::from_secs(60), || {
        c.gantry(&["volume", "delete", "data"])
            .status
            .success()
            .then_some(())
    });
    assert!(!data_dir.exists(), "its files are gone");
    assert!(!mounted_under(&data_dir), "no mount is left behind");
    assert!(!stdout(&c.gantry(&["volume", "list"])).contains("data"));
}

#[test]
fn a_shared_volume_is_seen_from_every_node() {
    let c = TestCluster::start(ClusterSpec {
        agents: 2,
        busybox: true,
        shared_volumes: true,
        ..ClusterSpec::default()
    });
    let out = c.gantry(&["volume", "create", "common", "--shared"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("shared"), "{}", stdout(&out));
    let out = c.gantry(&["volume", "create", "sized", "--shared", "--size", "1G"]);
    assert!(!out.status.success(), "a shared volume takes no size");

    // Written on one node, read on the other: each run has the other node drained.
    let drain = |node: &str, on: bool| {
        let verb = if on { "drain" } else { "undrain" };
        let out = c.gantry(&["nodes", verb, node]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    drain("node-0", true);
    let (out, node) = run_with(&c, "common", "echo 'from one node' > /data/note.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node, "node-1");
    drain("node-0", false);
    drain("node-1", true);
    let (out, node) = run_with(&c, "common", "cat /data/note.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node, "node-0");
    assert_eq!(stdout(&out).trim(), "from one node");
    drain("node-1", false);
    // The file is on the shared path itself.
    assert_eq!(
        std::fs::read_to_string(c.dir.path().join("shared/common/note.txt")).expect("shared"),
        "from one node\n"
    );
    let out = c.gantry(&["volume", "delete", "common"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!c.dir.path().join("shared/common").exists());
}
