//! The multi-host harness itself (`gantry_tests::netns`): reachability, faults and cleanup.
//! Runs as root (as CI does) and uses only `sleep`, `sh`, `unshare` and `/bin/busybox`.

use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gantry_tests::netns::{Host, TestNet, ip, sweep_lock, wait_until};

const BUSYBOX: &str = "/bin/busybox";

fn require_root_and_busybox() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the harness tests need root (network namespaces, mounts, cgroups)"
    );
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: apt-get install -y busybox-static"
    );
}

/// One ping from `from` to `to`, waiting at most a second for the reply.
fn ping(from: &Host, to: Ipv4Addr) -> bool {
    from.command(BUSYBOX)
        .args(["ping", "-c1", "-W1", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running busybox ping")
        .success()
}

/// `sh -c 'sleep 1000 & sleep 1000 & wait'` on `host`, once all three processes exist.
fn sleepers(host: &Host) -> Child {
    let child = host
        .command("sh")
        .args(["-c", "sleep 1000 & sleep 1000 & wait"])
        .spawn()
        .expect("spawning sh");
    wait_until("sh and its two sleeps", Duration::from_secs(5), || {
        (host.pids().len() == 3).then_some(())
    });
    child
}

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running ip")
        .success()
}

fn netns_exists(name: &str) -> bool {
    ip(&["netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn mounts_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("reading mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(dir.to_str().expect("utf-8 path")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn hosts_reach_each_other_and_the_bridge_but_nothing_else() {
    require_root_and_busybox();
    let mut net = TestNet::new();
    let a = net.add_host("a");
    let b = net.add_host("b");
    let k = net.bridge_ip().octets()[2];
    assert_eq!(net.bridge_ip(), Ipv4Addr::new(10, 231, k, 1));
    assert_eq!(a.ip(), Ipv4Addr::new(10, 231, k, 10));
    assert_eq!(b.ip(), Ipv4Addr::new(10, 231, k, 11));
    for name in [net.bridge_name().as_str(), a.veth_name(), b.veth_name()] {
        assert!(name.len() <= 15, "{name} does not fit IFNAMSIZ");
    }

    assert!(ping(&a, b.ip()), "a cannot reach b");
    assert!(ping(&b, a.ip()), "b cannot reach a");
    assert!(ping(&a, net.bridge_ip()), "a cannot reach the bridge");

    for h in [&a, &b] {
        let routes = ip(&["-n", h.netns_name(), "route"]);
        assert!(!routes.contains("default"), "{}: {routes}", h.name());
        let addrs = ip(&[
            "-n",
            h.netns_name(),
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            "eth0",
        ]);
        assert!(addrs.contains(&format!("{}/24", h.ip())), "{addrs}");
    }

    // Only the network namespace is joined: the mount namespace is the test's.
    let out = a
        .command(BUSYBOX)
        .args([
            "sh",
            "-c",
            "readlink /proc/self/ns/mnt; readlink /proc/self/ns/net",
        ])
        .output()
        .expect("running busybox readlink");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mine = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
    assert_eq!(out.lines().next(), mine.to_str(), "{out}");
    let ours = std::fs::read_link("/proc/self/ns/net").expect("own net namespace");
    assert_ne!(out.lines().nth(1), ours.to_str(), "{out}");

    // A second net in the same process gets its own names and subnet.
    let other = TestNet::new();
    assert_ne!(other.bridge_name(), net.bridge_name());
    assert_ne!(other.bridge_ip(), net.bridge_ip());
}

#[test]
fn partition_cuts_a_host_off_and_heal_restores_it() {
    require_root_and_busybox();
    let mut net = TestNet::new();
    let a = net.add_host("a");
    let b = net.add_host("b");
    assert!(ping(&b, a.ip()), "b cannot reach a before the partition");

    a.partition();
    assert!(!ping(&b, a.ip()), "b still reaches a across the partition");
    assert!(!ping(&a, net.bridge_ip()), "a still reaches the bridge");

    a.heal();
    // Neighbour entries that failed during the partition may cost a retry.
    wait_until("b reaching a after heal", Duration::from_secs(5), || {
        ping(&b, a.ip()).then_some(())
    });
    wait_until(
        "a reaching the bridge after heal",
        Duration::from_secs(5),
        || ping(&a, net.bridge_ip()).then_some(()),
    );
}

#[test]
fn kill_takes_down_every_process_of_the_host() {
    require_root_and_busybox();
    let mut net = TestNet::new();
    let a = net.add_host("a");
    let b = net.add_host("b");
    let mut tree = sleepers(&a);
    // A descendant in a network namespace of its own (a container) belongs to the host too.
    // (`; true` keeps sh from exec'ing unshare, so the sleep's parent is in the host.)
    let mut own_ns = a
        .command("sh")
        .args(["-c", "unshare -n sleep 1000; true"])
        .spawn()
        .expect("spawning sh with unshare");
    let mut bystander = sleepers(&b);
    let netns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let host_ns = netns_of(tree.id());
    wait_until(
        "the unshared sleep, in a namespace of its own",
        Duration::from_secs(5),
        || {
            let pids = a.pids();
            let foreign = pids.iter().filter(|&&p| netns_of(p) != host_ns).count();
            (pids.len() == 5 && foreign == 1).then_some(())
        },
    );

    a.kill();
    assert_eq!(a.pids(), Vec::<u32>::new());
    // The test's own children are reaped by their owner.
    let status = tree.wait().expect("waiting for sh");
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let status = own_ns.wait().expect("waiting for sh with unshare");
    assert_eq!(status.signal(), Some(9), "{status:?}");

    // Other hosts are untouched.
    assert_eq!(b.pids().len(), 3);
    assert!(bystander.try_wait().expect("polling").is_none());
}

#[test]
fn pause_stops_the_host_and_resume_continues_it() {
    require_root_and_busybox();
    let mut net = TestNet::new();
    let a = net.add_host("a");
    let mut tree = sleepers(&a);
    let pids = a.pids();

    a.pause();
    for &pid in &pids {
        assert_eq!(state(pid), Some('T'), "pid {pid} is not stopped");
    }
    a.resume();
    for &pid in &pids {
        let s = state(pid);
        assert!(
            matches!(s, Some('S' | 'R')),
            "pid {pid} did not continue: {s:?}"
        );
    }
    assert!(tree.try_wait().expect("polling").is_none());
}

#[test]
fn dropping_the_net_cleans_up_even_when_a_test_panics() {
    require_root_and_busybox();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("agent state");
    let cgroup_rel = format!("gantry-harness-test/{}", std::process::id());
    let cgroup_parent = Path::new("/sys/fs/cgroup/pids/gantry-harness-test");
    let cgroup = Path::new("/sys/fs/cgroup/pids").join(&cgroup_rel);
    let mut names: Option<(String, String, String)> = None;
    let mut in_cgroup: Option<Child> = None;
    let mut in_host: Option<Child> = None;

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut net = TestNet::new();
        let a = net.add_host("a");
        names = Some((
            a.netns_name().to_owned(),
            a.veth_name().to_owned(),
            net.bridge_name().to_owned(),
        ));
        net.register_cleanup_dir(&state);
        // Nested mounts, one below a path with a space (octal-escaped in mountinfo).
        let inner = state.join("run").join("rootfs");
        std::fs::create_dir_all(&inner).expect("creating state dirs");
        tmpfs(&state.join("run"));
        std::fs::create_dir_all(&inner).expect("creating rootfs dir");
        tmpfs(&inner);
        assert_eq!(mounts_below(tmp.path()).len(), 2);

        net.register_cgroup(&cgroup_rel);
        let leaf = cgroup.join("job");
        std::fs::create_dir_all(&leaf).expect("creating cgroup");
        // A process outside the host's netns that only the cgroup ties to the test.
        let child = Command::new("sleep")
            .arg("1000")
            .spawn()
            .expect("spawning sleep");
        std::fs::write(leaf.join("cgroup.procs"), child.id().to_string())
            .expect("moving sleep into the cgroup");
        in_cgroup = Some(child);
        in_host = Some(sleepers(&a));
        panic!("deliberate panic with a net alive");
    }));
    assert!(result.is_err());

    for (what, child) in [
        ("the cgroup's sleep", in_cgroup),
        ("the host's sh", in_host),
    ] {
        let mut child = child.unwrap_or_else(|| panic!("{what} was not started"));
        let status = child.wait().expect("waiting for a child");
        assert_eq!(status.signal(), Some(9), "{what}: {status:?}");
    }
    let (ns, veth, bridge) = names.expect("the net was built");
    assert!(!netns_exists(&ns), "netns {ns} left behind");
    assert!(!Path::new("/run/netns").join(&ns).exists());
    assert!(!link_exists(&veth), "veth {veth} left behind");
    assert!(!link_exists(&bridge), "bridge {bridge} left behind");
    assert_eq!(mounts_below(tmp.path()), Vec::<String>::new());
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    let _ = std::fs::remove_dir(cgroup_parent);
}

#[test]
fn new_sweeps_leftovers_of_dead_runs() {
    require_root_and_busybox();
    // A pid that is gone: a finished child's.
    let mut done = Command::new("true").spawn().expect("spawning true");
    let dead = done.id();
    done.wait().expect("waiting for true");
    let tag = format!("gt{dead:06x}fe");
    // Other test processes sweep too: hold off their sweeps while the leftovers are made.
    let lock = sweep_lock();
    let (bridge, ns) = (format!("{tag}b"), format!("{tag}n00"));
    ip(&["link", "add", "name", &bridge, "type", "bridge"]);
    ip(&["netns", "add", &ns]);
    let marker = PathBuf::from("/run/gantry-tests").join(&tag);
    std::fs::create_dir_all("/run/gantry-tests").expect("marker dir");
    std::fs::write(&marker, format!("pid {dead} 1\n")).expect("writing marker");
    drop(lock);

    let _net = TestNet::new();
    assert!(!link_exists(&bridge), "{bridge} not swept");
    assert!(!netns_exists(&ns), "{ns} not swept");
    assert!(!marker.exists(), "{} not swept", marker.display());
}

fn tmpfs(at: &Path) {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap_or_else(|e| panic!("mounting tmpfs on {}: {e}", at.display()));
}
