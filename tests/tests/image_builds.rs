//! Images built from recipes inside the cluster, end to end with real processes and
//! containers, offline (the base is busybox pushed to the embedded registry): a recipe
//! with a step that runs (writing a file, deleting one, replacing a directory), `env`, an
//! uploaded local file, `workdir` and `cmd` builds and a job runs on it; building again
//! takes every step from the cache, and changing the last step rebuilds only that one; a
//! failing step reports its output and exit code and leaves no image; two identical
//! builds at once build their step once.

use std::path::Path;

use gantry_tests::cluster::{ClusterSpec, TestCluster};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn build(c: &TestCluster, recipe: &Path, name: &str) -> std::process::Output {
    c.gantry(&[
        "image",
        "build",
        "-f",
        recipe.to_str().expect("utf-8"),
        "--name",
        name,
    ])
}

/// The progress lines of a build that say a step was built (not cached).
fn built_steps(out: &std::process::Output) -> Vec<String> {
    stderr(out)
        .lines()
        .filter(|l| l.starts_with('[') && l.contains(": building"))
        .map(str::to_owned)
        .collect()
}

/// A cluster of `agents` nodes with busybox pushed to its registry as `base`.
fn with_base(agents: usize) -> TestCluster {
    let c = TestCluster::start(ClusterSpec {
        agents,
        busybox: true,
        ..ClusterSpec::default()
    });
    let rootfs = c.dir.path().join("rootfs");
    let out = c.gantry(&[
        "image",
        "import",
        rootfs.to_str().expect("utf-8"),
        "--name",
        "base",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    c
}

const RECIPE: &str = r#"
base = { image = "base" }
[[steps]]
run_commands = [
  "echo built > /built.txt",
  "rm /bin/vi",
  "rm -rf /home/user && mkdir -p /home/user && echo x > /home/user/new",
  "echo step done",
]
[[steps]]
env = { MODE = "prod" }
[[steps]]
add_local_file = { local = "hello.txt", remote = "/app/hello.txt" }
[[steps]]
add_local_dir = { local = "conf", remote = "/etc/app" }
[[steps]]
workdir = "/app"
[[steps]]
cmd = ["cat", "hello.txt"]
"#;

#[test]
fn recipes_build_in_the_cluster_and_rebuild_only_what_changed() {
    let c = with_base(1);
    let dir = c.dir.path().join("app");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("hello.txt"), "hello from a local file\n").expect("write");
    std::fs::create_dir_all(dir.join("conf/sub")).expect("mkdir");
    std::fs::write(dir.join("conf/sub/a.conf"), "a=1\n").expect("write");
    let recipe = dir.join("recipe.toml");
    std::fs::write(&recipe, RECIPE).expect("recipe");

    // The first build builds every step; the step that runs says what it printed.
    let out = build(&c, &recipe, "app:v1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("app:v1 sha256:"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("step done"), "{}", stderr(&out));
    assert_eq!(built_steps(&out).len(), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("[1/6] run_commands"),
        "{}",
        stderr(&out)
    );

    // A job runs on it: the step's file, the deletion, the replaced directory, the
    // variable, the uploaded file and the working directory are all there.
    let out = c.gantry(&[
        "run",
        "--image",
        "app:v1",
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "cat /built.txt; echo $MODE; pwd; cat hello.txt; test -e /bin/vi && echo vi || echo no-vi; ls /home/user; cat /etc/app/sub/a.conf",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "built\nprod\n/app\nhello from a local file\nno-vi\nnew\na=1\n"
    );
    // Its command is the recipe's.
    let out = c.gantry(&["run", "--image", "app:v1", "--memory", "64M"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a local file\n");

    // Again: everything from the cache.
    let out = build(&c, &recipe, "app:v1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(built_steps(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).matches(": cached").count(),
        7,
        "{}",
        stderr(&out)
    );

    // Only the last step changed: only it is built.
    std::fs::write(
        &recipe,
        RECIPE.replace("cmd = [\"cat\", \"hello.txt\"]", "cmd = [\"pwd\"]"),
    )
    .expect("recipe");
    let out = build(&c, &recipe, "app:v2");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(built_steps(&out).len(), 1, "{}", stderr(&out));
    assert!(
        built_steps(&out)[0].starts_with("[6/6] cmd pwd"),
        "{}",
        stderr(&out)
    );
    let out = c.gantry(&["run", "--image", "app:v2", "--memory", "64M"]);
    assert_eq!(stdout(&out), "/app\n", "{}", stderr(&out));

    // A failing step: its output and exit code, and no image.
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        "base = { image = \"base\" }\n[[steps]]\nrun_commands = [\"echo oops-from-the-step\", \"exit 3\"]\n",
    )
    .expect("recipe");
    let out = build(&c, &broken, "broken:v1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("oops-from-the-step"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("exit code 3"), "{}", stderr(&out));
    let images = stdout(&c.gantry(&["image", "list"]));
    assert!(!images.contains("broken"), "{images}");

    // Two identical builds at once build their step once.
    let concurrent = dir.join("concurrent.toml");
    std::fs::write(
        &concurrent,
        "base = { image = \"base\" }\n[[steps]]\nrun_commands = [\"sleep 1\", \"date > /when\"]\n",
    )
    .expect("recipe");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| build(&c, &concurrent, "twice:a"));
        let b = s.spawn(|| build(&c, &concurrent, "twice:b"));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert!(
        a.status.success() && b.status.success(),
        "{}{}",
        stderr(&a),
        stderr(&b)
    );
    assert_eq!(
        built_steps(&a).len() + built_steps(&b).len(),
        1,
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
}

/// A `debian_slim` base made with mmdebstrap, `apt_install` from Debian's mirror and
/// `pip_install` from PyPI (the builder containers are on the host's network, so this
/// test runs on `gantry dev`, whose agent is on this machine's), an uploaded file, then a
/// job on the image; a second build with only the last step changed rebuilds only it.
#[test]
fn a_debian_slim_recipe_installs_from_apt_and_pypi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = gantry_tests::dev::DevCluster::start(dir.path(), "builder");
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).expect("mkdir");
    std::fs::write(
        app.join("main.py"),
        "import subprocess, six\nprint('six', six.__version__ != '')\nprint(subprocess.run(['jq', '--version'], capture_output=True, text=True).stdout.strip().startswith('jq-'))\n",
    )
    .expect("main.py");
    let recipe = |last: &str| {
        format!(
            "base = {{ debian_slim = \"3.11\" }}\n[[steps]]\napt_install = [\"jq\"]\n[[steps]]\npip_install = [\"six\"]\n[[steps]]\nadd_local_file = {{ local = \"main.py\", remote = \"/app/main.py\" }}\n[[steps]]\n{last}\n"
        )
    };
    let file = app.join("recipe.toml");
    std::fs::write(&file, recipe("cmd = [\"python3\", \"/app/main.py\"]")).expect("recipe");
    let build = |name: &str| {
        dev.gantry(&[
            "image",
            "build",
            "-f",
            file.to_str().expect("utf-8"),
            "--name",
            name,
        ])
    };
    let out = build("pyapp:v1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("[0/4] debian_slim 3.11 (bookworm, mmdebstrap): building"),
        "{}",
        stderr(&out)
    );
    let run = dev.gantry(&["run", "--image", "pyapp:v1", "--memory", "256M"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(stdout(&run), "six True\nTrue\n");

    std::fs::write(&file, recipe("env = { READY = \"1\" }")).expect("recipe");
    let out = build("pyapp:v2");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(built_steps(&out).len(), 1, "{}", stderr(&out));
    assert!(
        built_steps(&out)[0].starts_with("[4/4] env READY"),
        "{}",
        stderr(&out)
    );
}

/// A node that dies in the middle of a step: the step is built again on the other node
/// and the build succeeds; nothing of the interrupted step was kept.
#[test]
fn a_step_whose_node_dies_is_built_again_elsewhere() {
    let mut c = with_base(2);
    let recipe = c.dir.path().join("slow.toml");
    std::fs::write(
        &recipe,
        "base = { image = \"base\" }\n[[steps]]\nrun_commands = [\"sleep 4\", \"echo done > /done\"]\n",
    )
    .expect("recipe");
    let (out, busy) = std::thread::scope(|s| {
        let build = s.spawn(|| build(&c, &recipe, "slow:v1"));
        // The step's container appears on one node: that host dies.
        let busy = gantry_tests::netns::wait_until(
            "a build step running",
            std::time::Duration::from_secs(30),
            || {
                (0..2).find(|i| {
                    std::fs::read_dir(c.agents[*i].state.join("containers"))
                        .is_ok_and(|mut d| d.next().is_some())
                })
            },
        );
        c.agents[busy].host.kill();
        (build.join().expect("build"), busy)
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("trying again"), "{}", stderr(&out));
    let other = format!("node-{}", 1 - busy);
    assert!(
        stderr(&out).contains(&format!("building on {other}")),
        "{}",
        stderr(&out)
    );
    c.kill_host(busy);
    let run = c.gantry(&[
        "run", "--image", "slow:v1", "--memory", "64M", "--", "cat", "/done",
    ]);
    assert_eq!(stdout(&run), "done\n", "{}", stderr(&run));
}

/// A base from another registry (Debian's `docker-registry` on loopback, anonymous): a
/// node pulls it and copies it into the cluster's registry once; steps build on it.
#[test]
fn a_base_from_another_registry_is_copied_in_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = gantry_tests::dev::DevCluster::start(dir.path(), "importer");
    let rootfs = dir.path().join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let out = dev.gantry(&[
        "image",
        "import",
        rootfs.to_str().expect("utf-8"),
        "--name",
        "base",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Another registry, holding a copy of that image.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("registry").display()
        ),
    )
    .expect("config");
    let mut other = gantry_tests::Proc::spawn({
        let mut c = std::process::Command::new("docker-registry");
        c.arg("serve")
            .arg(&config)
            .stderr(std::process::Stdio::null());
        c
    });
    gantry_tests::netns::wait_until(
        "the other registry up",
        std::time::Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        },
    );
    let cli: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dev.home.join(".config/gantry/config.json")).expect("the CLI's config"),
    )
    .expect("json");
    let (addr, token) = (
        cli["addr"]
            .as_str()
            .expect("addr")
            .trim_start_matches("http://"),
        cli["token"].as_str().expect("token"),
    );
    let copied = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--src-creds",
        ])
        .arg(format!("gantry:{token}"))
        .arg(format!("docker://{addr}/base:latest"))
        .arg(format!("docker://127.0.0.1:{port}/tools/busybox:1"))
        .output()
        .expect("skopeo");
    assert!(copied.status.success(), "{}", stderr(&copied));

    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "base = {{ image = \"127.0.0.1:{port}/tools/busybox:1\" }}\n[[steps]]\nrun_commands = [\"echo from-elsewhere > /x\"]\n"
        ),
    )
    .expect("recipe");
    let build = || {
        dev.gantry(&[
            "image",
            "build",
            "-f",
            recipe.to_str().expect("utf-8"),
            "--name",
            "elsewhere:v1",
        ])
    };
    let out = build();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("copied into the cluster's registry): building on importer"),
        "{}",
        stderr(&out)
    );
    let run = dev.gantry(&[
        "run",
        "--image",
        "elsewhere:v1",
        "--memory",
        "64M",
        "--",
        "cat",
        "/x",
    ]);
    assert_eq!(stdout(&run), "from-elsewhere\n", "{}", stderr(&run));
    // The copy is kept: the other registry is not needed again.
    other.kill9();
    let out = build();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(built_steps(&out).is_empty(), "{}", stderr(&out));
}
