//! Code mounts end to end: files uploaded as blobs to the cluster's registry reach a
//! function's containers without a network or a new image. The runtime itself is a
//! mounted file (executable) on a plain busybox image, and it reads a data file from a
//! second mount; both are read-only in the container and in the agent's cache; a digest that was never uploaded
//! and a path that climbs out of its mount are refused at deploy.

use std::os::unix::fs::PermissionsExt;

use gantry_shared::code::BlobDigest;
use gantry_tests::cluster::{ClusterSpec, TestCluster};
use serde_json::{Value, json};

fn digest(bytes: &[u8]) -> String {
    BlobDigest::of(bytes).to_string()
}

/// `POST /v2/gantry-code/blobs/uploads/?digest=…` with the bytes: a monolithic upload.
fn upload(c: &TestCluster, bytes: Vec<u8>) -> String {
    let d = digest(&bytes);
    let r = c
        .http()
        .post(c.url(&format!("/v2/gantry-code/blobs/uploads/?digest={d}")))
        .bearer_auth(&c.admin)
        .body(bytes)
        .send()
        .expect("upload");
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text());
    d
}

/// `POST /v1/apps/code/deployments` with `mounts` on function `read`: status and body.
fn deploy(c: &TestCluster, mounts: Value) -> (u16, Value) {
    let manifest = json!({
        "app": "code",
        "functions": {"read": {
            "image": "busybox",
            "command": ["/opt/code/bin/runtime"],
            "cpu": "0.2",
            "memory": "64M",
            "mounts": mounts,
        }},
    });
    let r = c
        .http()
        .post(c.url("/v1/apps/code/deployments"))
        .bearer_auth(&c.admin)
        .json(&manifest)
        .send()
        .expect("deploy");
    (r.status().as_u16(), r.json().expect("json"))
}

#[test]
fn uploaded_files_are_mounted_read_only_into_a_functions_containers() {
    let c = TestCluster::start(ClusterSpec {
        agents: 1,
        busybox: true,
        echo: true,
        ..ClusterSpec::default()
    });
    let runtime = std::fs::read(gantry_tests::functions_fixture::echo_runtime()).expect("runtime");
    let runtime = upload(&c, runtime);
    let hello = upload(&c, b"hello from an uploaded file\n".to_vec());

    // A digest nobody uploaded: 422 naming the file and how to upload it.
    let never = digest(b"never uploaded");
    let (status, body) = deploy(
        &c,
        json!([{"path": "/root", "files": [{"path": "data/missing.txt", "digest": never}]}]),
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "code_missing", "{body}");
    assert_eq!(body["error"]["field"], "functions.read.mounts", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for part in [
        "data/missing.txt",
        never.as_str(),
        "/v2/gantry-code/blobs/uploads/",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }

    // A path that leaves its mount: 400 naming the field.
    let (status, body) = deploy(
        &c,
        json!([{"path": "/root", "files": [{"path": "../x", "digest": hello}]}]),
    );
    assert_eq!(status, 400, "{body}");
    let field = body["error"]["field"].as_str().unwrap_or_default();
    assert!(field.starts_with("functions.read.mounts"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`../x`"),
        "{body}"
    );

    // The manifest as users write it: the runtime is a mounted file on plain busybox.
    c.deploy(&format!(
        r#"
app = "code"
[functions.read]
image = "busybox"
command = ["/opt/code/bin/runtime"]
cpu = "0.2"
memory = "64M"
[[functions.read.mounts]]
path = "/opt/code"
files = [{{ path = "bin/runtime", digest = "{runtime}", executable = true }}]
[[functions.read.mounts]]
path = "/root"
files = [{{ path = "data/hello.txt", digest = "{hello}" }}]
"#
    ));
    let out = c.gantry(&[
        "call",
        "code",
        "read",
        "--data",
        "file:/root/data/hello.txt",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from an uploaded file\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // In the container both mounts are read-only (the runtime's own mount table).
    let runtime_pid = std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"/opt/code/bin/runtime\0"))
        })
        .expect("the runtime's process");
    let mounts = std::fs::read_to_string(format!("/proc/{runtime_pid}/mountinfo")).expect("mounts");
    for at in ["/opt/code", "/root"] {
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at))
            .unwrap_or_else(|| panic!("no mount at {at}: {mounts}"));
        let options = line.split(' ').nth(5).unwrap_or_default();
        assert!(options.split(',').any(|o| o == "ro"), "{line}");
    }

    // On the node: two trees, read-only, and each blob once.
    let code = c.agents[0].state.join("code");
    let trees: Vec<_> = std::fs::read_dir(code.join("trees"))
        .expect("trees")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(trees.len(), 2, "{trees:?}");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    for tree in &trees {
        assert_eq!(mode(tree), 0o555, "{}", tree.display());
        if tree.join("data/hello.txt").exists() {
            assert_eq!(mode(&tree.join("data/hello.txt")), 0o444);
        } else {
            assert_eq!(mode(&tree.join("bin/runtime")), 0o555);
        }
    }
    assert_eq!(
        std::fs::read_dir(code.join("blobs"))
            .expect("blobs")
            .count(),
        2
    );
    assert_eq!(std::fs::read_dir(code.join("tmp")).expect("tmp").count(), 0);
}
