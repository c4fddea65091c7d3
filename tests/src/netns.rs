//! Test hosts on one machine: network namespaces on a bridge, processes run in them, faults
//! done to them, and cleanup that survives failing tests and crashed runs.
//!
//! **Addressing.** A [`TestNet`] owns a bridge with `10.231.K.1/24` ([`TestNet::bridge_ip`], where
//! a coordinator in the root namespace binds). K is derived from the pid and a per-process
//! counter, skips subnets overlapping any IPv4 address in the root namespace, and is checked
//! again after the address is added (so two processes racing for one K both see the clash, or
//! the later one does, and move on). Host `n` (0-based, in [`TestNet::add_host`] order) is a
//! network namespace whose `eth0` has `10.231.K.(10+n)/24`; `lo` and `eth0` are up. There is
//! no default route and no NAT: hosts reach each other and the bridge address, nothing else.
//!
//! **Naming.** Every name starts with a tag `gt<pid:06x><counter:02x>` (10 characters), unique
//! per process and net: bridge `<tag>b`, host-side veth `<tag>h<n:02x>`, netns `<tag>n<n:02x>`;
//! all fit IFNAMSIZ. A marker file `/run/gantry-tests/<tag>` holds the creating pid and its
//! start time, and the cleanup directories and cgroups registered since.
//!
//! **Processes.** [`Host::command`] gives a `Command` whose child joins the host's network
//! namespace (only that one; mounts, pids and cgroups are shared with the test) before exec;
//! everything it starts inherits it. "The processes of a host" are the processes whose
//! `/proc/<pid>/ns/net` is the host's namespace, plus their descendants (so a container with a
//! network namespace of its own, started by a host's process, is part of that host).
//!
//! **Faults.** [`Host::kill`] (SIGKILL until none is left), [`Host::pause`] / [`Host::resume`]
//! (SIGSTOP / SIGCONT), [`Host::partition`] / [`Host::heal`] (host-side veth down / up). A killed
//! process that is a child of the test process stays a zombie until whoever owns its
//! `std::process::Child` waits for it (zombies are not counted as left over).
//!
//! **Cleanup.** Dropping a [`TestNet`] (also while unwinding from a panic) kills the processes
//! of every host, lazily unmounts everything at or below each [`TestNet::register_cleanup_dir`]
//! directory (deepest first), kills the tasks of and removes each [`TestNet::register_cgroup`]
//! path in every cgroup hierarchy (deepest first), then deletes the namespaces, veths, bridge
//! and marker. Every wait is bounded; failures are printed to stderr, never panicked.
//! [`TestNet::new`] first does the same for leftovers of runs whose process is gone (pid dead,
//! or reused: the marker's start time differs), under [`sweep_lock`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where the markers of live and crashed nets are kept.
const MARKER_DIR: &str = "/run/gantry-tests";
/// Where `ip netns add` bind-mounts the namespaces.
const NETNS_DIR: &str = "/run/netns";
/// How long killing, stopping or continuing the processes of a host may take.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long removing a cgroup tree may take (killed tasks take a moment to leave).
const CGROUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Host `n` gets `10.231.K.(FIRST_HOST + n)`.
const FIRST_HOST: u8 = 10;

static NET_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Polls `f` every 50 ms until it returns `Some`; panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `ip <args>`; panics with the command line and its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ip <args>`, returning stdout, or the command line and stderr as the error.
fn try_ip(args: &[&str]) -> Result<String, String> {
    let line = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`{line}` could not start: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A bridge and the test hosts on it; dropping it removes everything (see the module docs).
pub struct TestNet {
    tag: String,
    subnet: u8,
    hosts: Vec<Host>,
    /// Agents' state directories: mounts below them go when the net does.
    cleanup_dirs: Vec<PathBuf>,
    /// Cgroup paths relative to each hierarchy root, removed when the net goes.
    cgroups: Vec<PathBuf>,
}

impl TestNet {
    /// Sweeps leftovers of dead runs, then creates the bridge with a free `10.231.K.1/24`.
    pub fn new() -> Self {
        let pid = std::process::id();
        let n = NET_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("gt{pid:06x}{:02x}", n % 256);
        sweep_dead_runs();
        let start = start_time(pid).expect("reading this process's start time");
        write_marker(&tag, &format!("pid {pid} {start}\n"), false);
        // From here on, Drop cleans up whatever exists.
        let mut net = TestNet {
            tag,
            subnet: 0,
            hosts: Vec::new(),
            cleanup_dirs: Vec::new(),
            cgroups: Vec::new(),
        };
        let bridge = net.bridge_name();
        ip(&[
            "link",
            "add",
            "name",
            &bridge,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        ip(&["link", "set", &bridge, "up"]);
        net.subnet = claim_subnet(
            &bridge,
            pid.wrapping_mul(37).wrapping_add(n.wrapping_mul(101)),
        );
        net
    }

    /// The bridge's address, reachable from every host.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 1)
    }

    /// The bridge's interface name.
    pub fn bridge_name(&self) -> String {
        format!("{}b", self.tag)
    }

    /// The hosts added so far, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Adds host `name` (unique in this net): a netns with `eth0` on the bridge. The returned
    /// handle is a cheap clone; it is valid until the net is dropped.
    pub fn add_host(&mut self, name: &str) -> Host {
        assert!(
            self.hosts.iter().all(|h| h.name != name),
            "host {name} added twice"
        );
        let n = self.hosts.len();
        let last = usize::from(FIRST_HOST) + n;
        assert!(last < 255, "at most {} hosts per net", 255 - FIRST_HOST);
        let host = Host {
            name: name.to_owned(),
            ip: Ipv4Addr::new(10, 231, self.subnet, last as u8),
            netns: format!("{}n{n:02x}", self.tag),
            veth: format!("{}h{n:02x}", self.tag),
        };
        // Registered first so that a failure below is cleaned up too.
        self.hosts.push(host.clone());
        let (ns, veth, peer) = (&host.netns, &host.veth, format!("{}p{n:02x}", self.tag));
        ip(&["netns", "add", ns]);
        ip(&["link", "add", veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", ns, "name", "eth0"]);
        ip(&["link", "set", veth, "master", &self.bridge_name(), "up"]);
        let addr = format!("{}/24", host.ip);
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        host.wait_link_ready();
        host
    }

    /// Registers a directory (an agent's state directory) whose mounts, at or below it, are
    /// lazily unmounted when the net is dropped, after the hosts' processes are killed.
    pub fn register_cleanup_dir(&mut self, dir: impl Into<PathBuf>) {
        let dir = dir.into();
        assert!(dir.is_absolute(), "{} is not absolute", dir.display());
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        write_marker(&self.tag, &format!("dir {}\n", dir.display()), true);
        self.cleanup_dirs.push(dir);
    }

    /// Registers a cgroup path relative to the hierarchy roots (`gantry/1a2b3c4d`); when the
    /// net is dropped, its tasks are killed and the tree is removed from every hierarchy under
    /// `/sys/fs/cgroup` (each v1 controller and the unified one).
    pub fn register_cgroup(&mut self, relative: impl AsRef<Path>) {
        let rel = relative.as_ref();
        let rel: PathBuf = rel
            .components()
            .filter(|c| *c != Component::RootDir)
            .collect();
        assert!(
            !rel.as_os_str().is_empty()
                && rel.components().all(|c| matches!(c, Component::Normal(_))),
            "cgroup path {} must be relative, non-empty and without `..`",
            relative.as_ref().display()
        );
        write_marker(&self.tag, &format!("cgroup {}\n", rel.display()), true);
        self.cgroups.push(rel);
    }

    fn leftovers(&self) -> Leftovers {
        Leftovers {
            tag: self.tag.clone(),
            netns: self.hosts.iter().map(|h| h.netns.clone()).collect(),
            links: self
                .hosts
                .iter()
                .map(|h| h.veth.clone())
                .chain([self.bridge_name()])
                .collect(),
            dirs: self.cleanup_dirs.clone(),
            cgroups: self.cgroups.clone(),
        }
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for e in self.leftovers().remove() {
            eprintln!("gantry-tests: cleaning up net {}: {e}", self.tag);
        }
    }
}

/// One test host: a network namespace with `eth0` on the net's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    veth: String,
}

impl Host {
    /// The name given to [`TestNet::add_host`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address of the host's `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The namespace's name, for `ip -n <name> …`.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// The host-side end of the veth pair (on the bridge).
    pub fn veth_name(&self) -> &str {
        &self.veth
    }

    /// A `Command` whose child joins this host's network namespace (and only it) before exec.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let path = netns_path(&self.netns);
        // Opened here, before the fork; the fd is close-on-exec and goes with the Command.
        let ns = File::open(&path)
            .unwrap_or_else(|e| panic!("opening {} for host {}: {e}", path.display(), self.name));
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd it owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        cmd
    }

    /// The pids of this host's processes (see the module docs), zombies excluded.
    pub fn pids(&self) -> Vec<u32> {
        let ino = netns_inode(&self.netns).unwrap_or_else(|e| panic!("host {}: {e}", self.name));
        host_procs(ino).into_iter().map(|p| p.pid).collect()
    }

    /// SIGKILLs every process of the host, again until none is left (panics after 5 s, naming
    /// what is left). Children of the test process stay zombies until their `Child` is waited.
    pub fn kill(&self) {
        let ino = netns_inode(&self.netns).unwrap_or_else(|e| panic!("host {}: {e}", self.name));
        kill_all(ino).unwrap_or_else(|e| panic!("killing host {}: {e}", self.name));
    }

    /// SIGSTOPs every process of the host, scanning again until every one is stopped (so
    /// processes forked meanwhile are caught); panics after 5 s.
    pub fn pause(&self) {
        self.signal_until(Signal::SIGSTOP, |state| state == 'T' || state == 't');
    }

    /// SIGCONTs every process of the host until none is stopped; panics after 5 s.
    pub fn resume(&self) {
        self.signal_until(Signal::SIGCONT, |state| state != 'T');
    }

    fn signal_until(&self, signal: Signal, done: impl Fn(char) -> bool) {
        let ino = netns_inode(&self.netns).unwrap_or_else(|e| panic!("host {}: {e}", self.name));
        let deadline = Instant::now() + SIGNAL_TIMEOUT;
        loop {
            let pending: Vec<ProcInfo> = host_procs(ino)
                .into_iter()
                .filter(|p| !done(p.state))
                .collect();
            if pending.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{signal} to host {}: after {SIGNAL_TIMEOUT:?} still not done: {}",
                self.name,
                describe(&pending)
            );
            for p in &pending {
                let _ = kill(Pid::from_raw(p.pid as i32), signal);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Cuts the host off: its veth end on the bridge goes down. Frames in either direction are
    /// dropped; connections are not reset (as with a pulled cable). Neighbour (ARP) entries that
    /// failed meanwhile can cost a retry after [`Host::heal`]: poll with [`wait_until`].
    pub fn partition(&self) {
        ip(&["link", "set", &self.veth, "down"]);
    }

    /// Undoes [`Host::partition`]; returns once the link forwards again.
    pub fn heal(&self) {
        ip(&["link", "set", &self.veth, "up"]);
        self.wait_link_ready();
    }

    /// Waits until both veth ends are operationally up and the bridge port forwards. The
    /// kernel applies carrier changes asynchronously (linkwatch), so right after `up` a bridge
    /// port may still drop frames for a while: long enough to lose the first ARP request.
    fn wait_link_ready(&self) {
        let sys = Path::new("/sys/class/net").join(&self.veth);
        let read = |f: &str| std::fs::read_to_string(sys.join(f)).unwrap_or_default();
        wait_until(
            &format!("host {}: veth {} up and forwarding", self.name, self.veth),
            SIGNAL_TIMEOUT,
            || {
                // brport/state 3 is BR_STATE_FORWARDING.
                let here = read("operstate").trim() == "up" && read("brport/state").trim() == "3";
                let there = here
                    && ip(&["-n", &self.netns, "-o", "link", "show", "eth0"]).contains("state UP");
                there.then_some(())
            },
        );
    }
}

/// What one net (live or from a dead run) leaves behind, and how to remove it.
#[derive(Default)]
struct Leftovers {
    tag: String,
    netns: Vec<String>,
    links: Vec<String>,
    dirs: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
}

impl Leftovers {
    /// Removes everything, in order; returns what went wrong instead of panicking.
    fn remove(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for ns in &self.netns {
            match netns_inode(ns) {
                Ok(ino) => errors.extend(kill_all(ino).err()),
                Err(_) if !netns_path(ns).exists() => {}
                Err(e) => errors.push(e),
            }
        }
        for dir in &self.dirs {
            errors.extend(unmount_below(dir).err());
        }
        if !self.cgroups.is_empty() {
            match cgroup_hierarchies() {
                Ok(roots) => {
                    for rel in &self.cgroups {
                        for root in &roots {
                            errors.extend(remove_cgroup_tree(&root.join(rel)).err());
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for ns in &self.netns {
            if netns_path(ns).exists() {
                errors.extend(try_ip(&["netns", "del", ns]).err());
            }
        }
        let existing = link_names().unwrap_or_default();
        for link in self.links.iter().filter(|l| existing.contains(*l)) {
            // A veth is gone with its peer's namespace; a second look avoids a false error.
            match try_ip(&["link", "del", link]) {
                Err(e) if link_names().is_ok_and(|names| names.contains(link)) => errors.push(e),
                _ => {}
            }
        }
        let marker = Path::new(MARKER_DIR).join(&self.tag);
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                errors.push(format!("removing {}: {e}", marker.display()));
            }
            _ => {}
        }
        errors
    }
}

/// An exclusive lock on `/run/gantry-tests/sweep.lock`, held while leftovers of dead runs are
/// swept (so sweeps of concurrent test processes do not interleave); released on drop. A test
/// that fabricates leftovers holds it while it does.
pub fn sweep_lock() -> nix::fcntl::Flock<File> {
    std::fs::create_dir_all(MARKER_DIR)
        .unwrap_or_else(|e| panic!("creating {MARKER_DIR}: {e} (the harness runs as root)"));
    let path = Path::new(MARKER_DIR).join("sweep.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", path.display()))
}

/// Removes what nets of processes no longer alive left behind (crashed or killed runs).
fn sweep_dead_runs() {
    let _lock = sweep_lock();
    let mut tags: BTreeMap<String, Leftovers> = BTreeMap::new();
    let links = link_names().unwrap_or_default();
    let namespaces = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let markers = std::fs::read_dir(MARKER_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for name in &links {
        if let Some(tag) = tag_of(name) {
            leftovers_for(&mut tags, tag).links.push(name.clone());
        }
    }
    for name in &namespaces {
        if let Some(tag) = tag_of(name) {
            leftovers_for(&mut tags, tag).netns.push(name.clone());
        }
    }
    for name in &markers {
        if let Some(tag) = tag_of(name).filter(|t| t.len() == name.len()) {
            leftovers_for(&mut tags, tag);
        }
    }
    for (tag, mut left) in tags {
        if run_alive(&tag) {
            continue;
        }
        if let Ok(marker) = std::fs::read_to_string(Path::new(MARKER_DIR).join(&tag)) {
            for line in marker.lines() {
                if let Some(dir) = line.strip_prefix("dir ") {
                    left.dirs.push(dir.into());
                } else if let Some(cg) = line.strip_prefix("cgroup ") {
                    left.cgroups.push(cg.into());
                }
            }
        }
        // Bridges last: remove() deletes links in order.
        left.links.sort_by_key(|l| l.ends_with('b'));
        eprintln!("gantry-tests: removing leftovers of dead run {tag}");
        for e in left.remove() {
            eprintln!("gantry-tests: sweeping {tag}: {e}");
        }
    }
}

fn leftovers_for<'a>(tags: &'a mut BTreeMap<String, Leftovers>, tag: &str) -> &'a mut Leftovers {
    tags.entry(tag.to_owned()).or_insert_with(|| Leftovers {
        tag: tag.to_owned(),
        ..Leftovers::default()
    })
}

/// The tag (`gt` and 8 hex digits) a harness name starts with.
fn tag_of(name: &str) -> Option<&str> {
    let tag = name.get(..10)?;
    (tag.starts_with("gt") && tag[2..].bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
}

/// Whether the process that created `tag` is still the one running under its pid.
fn run_alive(tag: &str) -> bool {
    let Ok(pid) = u32::from_str_radix(&tag[2..8], 16) else {
        return false;
    };
    let Some(now) = start_time(pid) else {
        return false;
    };
    let marker = std::fs::read_to_string(Path::new(MARKER_DIR).join(tag)).unwrap_or_default();
    let recorded = marker.lines().find_map(|l| {
        let mut f = l.strip_prefix("pid ")?.split_whitespace();
        Some((
            f.next()?.parse::<u32>().ok()?,
            f.next()?.parse::<u64>().ok()?,
        ))
    });
    match recorded {
        Some((p, start)) => p == pid && start == now,
        // Without a marker the pid alone decides (it may have been reused: keep, to be safe).
        None => true,
    }
}

fn write_marker(tag: &str, line: &str, append: bool) {
    let path = Path::new(MARKER_DIR).join(tag);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(line.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Adds `10.231.K.1/24` to `bridge` for the first K from `seed` that clashes with nothing.
fn claim_subnet(bridge: &str, seed: u32) -> u8 {
    for i in 0..254u32 {
        let k = ((seed.wrapping_add(i)) % 254 + 1) as u8;
        let net = Ipv4Addr::new(10, 231, k, 0);
        if addresses()
            .iter()
            .any(|(_, a, len)| overlaps(net, 24, *a, *len))
        {
            continue;
        }
        let addr = format!("10.231.{k}.1/24");
        ip(&["addr", "add", &addr, "dev", bridge]);
        // Another process may have added the same subnet meanwhile; whoever looks last sees both.
        let clash = addresses()
            .iter()
            .any(|(dev, a, len)| dev != bridge && overlaps(net, 24, *a, *len));
        if !clash {
            return k;
        }
        ip(&["addr", "del", &addr, "dev", bridge]);
    }
    panic!("no free subnet 10.231.K.0/24: every one overlaps an address in `ip -o -4 addr`")
}

/// IPv4 addresses in the root namespace: (device, address, prefix length).
fn addresses() -> Vec<(String, Ipv4Addr, u8)> {
    ip(&["-o", "-4", "addr", "show"])
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let dev = f.nth(1)?.to_owned();
            let (addr, len) = f.skip_while(|w| *w != "inet").nth(1)?.split_once('/')?;
            Some((dev, addr.parse().ok()?, len.parse().ok()?))
        })
        .collect()
}

fn overlaps(a: Ipv4Addr, alen: u8, b: Ipv4Addr, blen: u8) -> bool {
    let len = alen.min(blen).min(32);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(b) & mask
}

/// Interface names in the root namespace (without the `@peer` suffix).
fn link_names() -> Result<BTreeSet<String>, String> {
    Ok(try_ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_owned())
        })
        .collect())
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The inode of a named network namespace, as `/proc/<pid>/ns/net` shows it (`net:[<ino>]`).
fn netns_inode(name: &str) -> Result<u64, String> {
    let path = netns_path(name);
    std::fs::metadata(&path)
        .map(|m| m.ino())
        .map_err(|e| format!("stat {}: {e}", path.display()))
}

#[derive(Clone, Debug)]
struct ProcInfo {
    pid: u32,
    state: char,
    comm: String,
}

fn describe(procs: &[ProcInfo]) -> String {
    let mut s = String::new();
    for p in procs {
        let _ = write!(s, "{} ({}, state {}) ", p.pid, p.comm, p.state);
    }
    s
}

/// The processes in the network namespace with inode `ino`, and their descendants; zombies,
/// pid 1 and this process excluded.
fn host_procs(ino: u64) -> Vec<ProcInfo> {
    let me = std::process::id();
    let want = format!("net:[{ino}]");
    let mut all = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Gone or a zombie (whose namespaces are released): either way not running.
        let Some((comm, state, ppid)) = stat_of(pid) else {
            continue;
        };
        if state == 'Z' || state == 'X' {
            continue;
        }
        let in_ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|l| l.as_os_str() == want.as_str());
        all.push((ProcInfo { pid, state, comm }, ppid, in_ns));
    }
    let mut host: BTreeSet<u32> = all.iter().filter(|p| p.2).map(|p| p.0.pid).collect();
    // Descendants: grow until no process has a parent in the set.
    loop {
        let before = host.len();
        for (p, ppid, _) in &all {
            if host.contains(ppid) {
                host.insert(p.pid);
            }
        }
        if host.len() == before {
            break;
        }
    }
    all.into_iter()
        .map(|p| p.0)
        .filter(|p| host.contains(&p.pid) && p.pid != me && p.pid != 1)
        .collect()
}

/// (comm, state, ppid) from `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(String, char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// A live process's start time (clock ticks since boot), which tells a reused pid apart;
/// `None` for a process that is gone or a zombie (a killed run whose parent has not reaped it).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `)` of comm start at field 3: the state, ..., field 22 the start time.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    if matches!(*fields.first()?, "Z" | "X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// SIGKILLs the processes of a namespace until none is left, bounded by [`SIGNAL_TIMEOUT`].
fn kill_all(ino: u64) -> Result<(), String> {
    let deadline = Instant::now() + SIGNAL_TIMEOUT;
    // Frozen first, as a crashing machine would be: no process (a shim) gets to see
    // another (its container) die and record it.
    for p in host_procs(ino) {
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGSTOP);
    }
    loop {
        let procs = host_procs(ino);
        if procs.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {SIGNAL_TIMEOUT:?} still alive: {}",
                describe(&procs)
            ));
        }
        for p in &procs {
            let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Decodes the octal escapes (`\040`) of a path in `/proc/self/mountinfo`.
fn unescape_mount_path(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// (mount point, filesystem type) of every mount in this mount namespace.
fn mounts() -> Result<Vec<(PathBuf, String)>, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((unescape_mount_path(point), fstype.to_owned()))
        })
        .collect())
}

/// Lazily unmounts every mount at or below `dir`, deepest first, until none is left.
fn unmount_below(dir: &Path) -> Result<(), String> {
    for _ in 0..20 {
        let mut below: Vec<PathBuf> = mounts()?
            .into_iter()
            .map(|m| m.0)
            .filter(|p| p.starts_with(dir))
            .collect();
        if below.is_empty() {
            return Ok(());
        }
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in &below {
            match nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
                // EINVAL: no longer a mount point (went with its parent).
                Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(e) => return Err(format!("umount2({}, MNT_DETACH): {e}", p.display())),
            }
        }
    }
    Err(format!("mounts below {} keep coming back", dir.display()))
}

/// The mount points of every cgroup (v1) and cgroup2 hierarchy.
fn cgroup_hierarchies() -> Result<Vec<PathBuf>, String> {
    Ok(mounts()?
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(p, _)| p)
        .collect())
}

/// Kills the tasks of the cgroup tree at `top` and removes its directories, deepest first,
/// retrying until [`CGROUP_TIMEOUT`] while the killed tasks leave.
fn remove_cgroup_tree(top: &Path) -> Result<(), String> {
    let deadline = Instant::now() + CGROUP_TIMEOUT;
    let me = std::process::id();
    loop {
        if !top.exists() {
            return Ok(());
        }
        let mut dirs = vec![top.to_path_buf()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(e.path());
                    }
                }
            }
            i += 1;
        }
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        let mut last_err = None;
        for d in &dirs {
            // Frozen tasks do not die until thawed (v1 freezer, v2 cgroup.freeze).
            let _ = std::fs::write(d.join("freezer.state"), "THAWED");
            let _ = std::fs::write(d.join("cgroup.freeze"), "0");
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if pid != me && pid != 1 {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            match std::fs::remove_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    last_err = Some(format!("rmdir {}: {e}", d.display()));
                }
                _ => {}
            }
        }
        match last_err {
            None => return Ok(()),
            Some(e) if Instant::now() >= deadline => {
                return Err(format!("{e} (after {CGROUP_TIMEOUT:?})"));
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/tmp/a\040b\011c\134d"),
            PathBuf::from("/tmp/a b\tc\\d")
        );
        assert_eq!(unescape_mount_path(r"/x\04"), PathBuf::from(r"/x\04"));
    }

    #[test]
    fn subnets_overlap() {
        let n = |s: &str| s.parse::<Ipv4Addr>().expect("addr");
        assert!(overlaps(n("10.231.5.0"), 24, n("10.231.5.7"), 24));
        assert!(overlaps(n("10.231.5.0"), 24, n("10.0.0.1"), 8));
        assert!(!overlaps(n("10.231.5.0"), 24, n("10.231.6.1"), 24));
        assert!(!overlaps(n("10.231.5.0"), 24, n("192.0.2.2"), 24));
    }

    #[test]
    fn tags_are_recognised() {
        assert_eq!(tag_of("gt00123401b"), Some("gt00123401"));
        assert_eq!(tag_of("gt00123401h00"), Some("gt00123401"));
        assert_eq!(tag_of("gtxx123401b"), None);
        assert_eq!(tag_of("eth0"), None);
    }
}
