//! `systemd/install.sh` and the systemd units: the tree the installer writes into a DESTDIR
//! (with stand-in binaries, since this tests the installer, not the daemons), that it keeps
//! an operator's configuration and is idempotent, that a role installs only its pieces, that
//! a missing binary is named, and that `systemd-analyze verify` accepts both units.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BINARIES: [&str; 3] = ["gantry-agent", "gantry-coordinator", "gantry"];
const UNITS: [&str; 2] = ["gantry-agent.service", "gantry-coordinator.service"];

/// The repository's `systemd/` directory.
fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn repo_file(name: &str) -> Vec<u8> {
    let path = systemd_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A directory holding executable stand-ins for the named binaries.
fn fake_binaries(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir for binaries");
    for name in names {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho {name} stand-in\n"))
            .expect("write a stand-in binary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750))
            .expect("make a stand-in executable");
    }
    dir
}

/// Runs the installer (directly, so a lost executable bit fails here too) with `DESTDIR`.
fn install(destdir: &Path, bin_dir: &Path, args: &[&str]) -> Output {
    let script = systemd_dir().join("install.sh");
    let out = Command::new(&script)
        .args(args)
        .arg("--bin-dir")
        .arg(bin_dir)
        .env("DESTDIR", destdir)
        .output()
        .unwrap_or_else(|e| panic!("running {} (is it executable?): {e}", script.display()));
    eprintln!(
        "install.sh {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn install_ok(destdir: &Path, bin_dir: &Path, args: &[&str]) -> String {
    let out = install(destdir, bin_dir, args);
    assert!(out.status.success(), "install.sh {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One entry of an installed tree: its permission bits and, for a file, its contents
/// (`None` for a directory).
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: u32,
    contents: Option<Vec<u8>>,
}

/// Every file and directory under `root`, by path relative to it. Anything else (a symlink
/// from `systemctl enable`, a device) fails the test: the installer writes neither.
fn tree(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(
                    rel,
                    Entry {
                        mode,
                        contents: None,
                    },
                );
                walk(root, &path, out);
            } else {
                assert!(meta.is_file(), "{rel} is neither a file nor a directory");
                let contents = std::fs::read(&path).expect("read an installed file");
                out.insert(
                    rel,
                    Entry {
                        mode,
                        contents: Some(contents),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The tree the installer should write for `binaries`, `units` and `configs`, with the
/// stand-in binaries from `bin_dir`.
fn expected_tree(
    bin_dir: &Path,
    binaries: &[&str],
    units: &[&str],
    configs: &[&str],
) -> BTreeMap<String, Entry> {
    let dir = |mode| Entry {
        mode,
        contents: None,
    };
    let file = |mode, contents| Entry {
        mode,
        contents: Some(contents),
    };
    let mut t = BTreeMap::new();
    for d in [
        "usr",
        "usr/local",
        "usr/local/bin",
        "etc",
        "etc/systemd",
        "etc/systemd/system",
        "etc/gantry",
        "var",
        "var/lib",
    ] {
        t.insert(d.to_owned(), dir(0o755));
    }
    t.insert("var/lib/gantry".to_owned(), dir(0o700));
    for b in binaries {
        let contents = std::fs::read(bin_dir.join(b)).expect("read a stand-in");
        t.insert(format!("usr/local/bin/{b}"), file(0o755, contents));
    }
    for u in units {
        t.insert(format!("etc/systemd/system/{u}"), file(0o644, repo_file(u)));
    }
    for c in configs {
        t.insert(format!("etc/gantry/{c}"), file(0o644, repo_file(c)));
    }
    t
}

#[test]
fn installs_the_whole_tree_and_keeps_an_operators_config() {
    let bins = fake_binaries(&BINARIES);
    let dest = tempfile::tempdir().expect("tempdir for DESTDIR");
    let stdout = install_ok(dest.path(), bins.path(), &[]);
    let first = tree(dest.path());
    assert_eq!(
        first,
        expected_tree(
            bins.path(),
            &BINARIES,
            &UNITS,
            &["agent.toml", "coordinator.toml"]
        ),
        "the default (all) installs every binary, unit and configuration"
    );
    assert!(
        stdout.contains("not running systemctl"),
        "with DESTDIR it says systemctl is skipped: {stdout}"
    );
    assert!(
        stdout.contains("gantry-agent join --coordinator") && stdout.contains("admin token"),
        "it prints the next steps for both roles: {stdout}"
    );

    // An operator's edit survives a reinstall; everything else comes out the same.
    let agent_toml = dest.path().join("etc/gantry/agent.toml");
    let edited = b"coordinator = \"10.0.0.1:7443\"\n".to_vec();
    std::fs::write(&agent_toml, &edited).expect("edit agent.toml");
    let stdout = install_ok(dest.path(), bins.path(), &["all"]);
    assert!(
        stdout.contains(&format!("kept {}", agent_toml.display())),
        "it says the configuration was kept: {stdout}"
    );
    let mut expected = first;
    expected
        .get_mut("etc/gantry/agent.toml")
        .expect("agent.toml in the tree")
        .contents = Some(edited);
    assert_eq!(
        tree(dest.path()),
        expected,
        "a second run changes nothing but keeps the edited agent.toml"
    );
}

#[test]
fn a_role_installs_only_its_pieces() {
    let bins = fake_binaries(&BINARIES);

    let dest = tempfile::tempdir().expect("tempdir for DESTDIR");
    install_ok(dest.path(), bins.path(), &["agent"]);
    assert_eq!(
        tree(dest.path()),
        expected_tree(
            bins.path(),
            &["gantry-agent"],
            &["gantry-agent.service"],
            &["agent.toml"]
        ),
        "`install.sh agent` installs the agent's binary, unit and configuration only"
    );

    let dest = tempfile::tempdir().expect("tempdir for DESTDIR");
    install_ok(dest.path(), bins.path(), &["coordinator"]);
    assert_eq!(
        tree(dest.path()),
        expected_tree(
            bins.path(),
            &["gantry-coordinator", "gantry"],
            &["gantry-coordinator.service"],
            &["coordinator.toml"]
        ),
        "`install.sh coordinator` installs the coordinator, the CLI, its unit and configuration only"
    );
}

#[test]
fn a_missing_binary_is_named_and_nothing_is_written() {
    let bins = fake_binaries(&["gantry-agent", "gantry"]);
    let dest = tempfile::tempdir().expect("tempdir for DESTDIR");
    let out = install(dest.path(), bins.path(), &["all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "install.sh succeeded without gantry-coordinator"
    );
    assert!(
        stderr.contains("gantry-coordinator")
            && stderr.contains("cargo build --release --workspace"),
        "the error names the binary and how to build it: {stderr}"
    );
    assert!(
        tree(dest.path()).is_empty(),
        "a failed check leaves DESTDIR untouched"
    );

    // The agent alone needs only gantry-agent.
    install_ok(dest.path(), bins.path(), &["agent"]);

    let unknown = install(dest.path(), bins.path(), &["worker"]);
    assert!(!unknown.status.success(), "an unknown role is refused");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("worker"));
}

/// `systemd-analyze verify` on both units as installed.
///
/// verify insists that ExecStart's binary exists and is executable, and `--root=DESTDIR`
/// does not help: it then also looks for systemd's own units (sysinit.target) and
/// `/bin/kill` inside DESTDIR, which an installer tree has no business containing. So the
/// test verifies copies of the installed units, under their own names, whose
/// `/usr/local/bin/` is rewritten to the DESTDIR's `usr/local/bin/` (the stand-ins the
/// installer put there); everything else, including the host's systemd units that the
/// dependencies resolve to, is checked as it is. verify exits 0 even for unknown or
/// misspelt directives (it only warns), so its output is searched for our units' names.
#[test]
fn systemd_analyze_verify_accepts_both_units() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze is not installed: install Debian's `systemd` package \
                 (`apt-get install -y systemd`; .ci/run does) to check the unit files"
            )
        });

    let bins = fake_binaries(&BINARIES);
    let dest = tempfile::tempdir().expect("tempdir for DESTDIR");
    install_ok(dest.path(), bins.path(), &[]);
    let installed_bin = dest.path().join("usr/local/bin");

    let copies = tempfile::tempdir().expect("tempdir for unit copies");
    let mut paths = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(dest.path().join("etc/systemd/system").join(unit))
            .expect("read an installed unit");
        assert!(
            text.contains("\nExecStart=/usr/local/bin/"),
            "{unit} runs its daemon from /usr/local/bin, where install.sh puts it"
        );
        let rewritten = text.replace("/usr/local/bin/", &format!("{}/", installed_bin.display()));
        let path = copies.path().join(unit);
        std::fs::write(&path, rewritten).expect("write a unit copy");
        paths.push(path);
    }

    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("run systemd-analyze verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "systemd-analyze verify: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    // It may warn about the host's own units; only lines about ours count.
    let ours: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the units: {ours:#?}"
    );
}

/// The choices the units exist for, which verify cannot see: containers outlive an agent
/// restart, and the coordinator can write only its state directory.
#[test]
fn the_units_keep_containers_and_sandbox_the_coordinator() {
    let directives = |unit: &str| -> Vec<String> {
        String::from_utf8(repo_file(unit))
            .expect("a unit is UTF-8")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    let agent = directives("gantry-agent.service");
    for d in [
        "Type=notify",
        "ExecStart=/usr/local/bin/gantry-agent serve",
        "KillMode=process",
        "Delegate=yes",
        "TasksMax=infinity",
        "LimitNOFILE=1048576",
    ] {
        assert!(
            agent.iter().any(|l| l == d),
            "gantry-agent.service lacks {d}"
        );
    }
    for d in [
        "ProtectSystem",
        "PrivateTmp",
        "PrivateDevices",
        "DynamicUser",
    ] {
        assert!(
            !agent.iter().any(|l| l.starts_with(&format!("{d}="))),
            "gantry-agent.service must not set {d}= (containers need the real system)"
        );
    }
    let coordinator = directives("gantry-coordinator.service");
    for d in [
        "Type=notify",
        "ExecStart=/usr/local/bin/gantry-coordinator serve",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/gantry/coordinator",
        "StateDirectory=gantry/coordinator",
        "NoNewPrivileges=yes",
        "LimitNOFILE=65536",
    ] {
        assert!(
            coordinator.iter().any(|l| l == d),
            "gantry-coordinator.service lacks {d}"
        );
    }
}
