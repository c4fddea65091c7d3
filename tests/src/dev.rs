//! `gantry dev` as a user runs it, for tests that need what the network-namespace test
//! hosts do not have: an agent on the host's own network (image builds that reach Debian
//! and PyPI mirrors). Stopped with SIGTERM when dropped, as a user's Ctrl-C would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, binary, free_ports};

pub struct DevCluster {
    pub proc: Proc,
    /// `HOME` for the CLI (where `gantry dev` wrote its address and token).
    pub home: PathBuf,
    /// The cluster's state directory.
    pub state: PathBuf,
}

impl DevCluster {
    /// Starts `gantry dev` with its state under `dir`, one agent named `node`, on free
    /// loopback ports; returns once it runs.
    pub fn start(dir: &Path, node: &str) -> Self {
        let home = dir.join("home");
        let state = dir.join("dev");
        let (api, control) = free_ports();
        let mut cmd = Command::new(binary("gantry"));
        cmd.env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GANTRY_CONFIG")
            .args([
                "dev",
                "--node",
                node,
                "--api-listen",
                &api,
                "--control-listen",
                &control,
                "--state-dir",
            ])
            .arg(&state);
        let mut proc = Proc::spawn(cmd);
        proc.line_after("gantry dev is running");
        let dev = Self { proc, home, state };
        // Its agent connects a moment later.
        crate::netns::wait_until("the dev node ready", Duration::from_secs(30), || {
            let out = dev.gantry(&["nodes", "list"]);
            String::from_utf8_lossy(&out.stdout)
                .contains("ready")
                .then_some(())
        });
        dev
    }

    /// `gantry ARGS` against this cluster.
    pub fn gantry(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("gantry"))
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("GANTRY_ADDR")
            .env_remove("GANTRY_TOKEN")
            .args(args)
            .output()
            .expect("gantry")
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc.kill9();
    }
}
