//! The coordinator's configuration file, TOML, by default `/etc/gantry/coordinator.toml`
//! (`systemd/coordinator.toml` is the commented default `systemd/install.sh` installs).
//! Every key is optional and has its default written next to it; a command-line flag wins
//! over the file. Unknown keys and bad values are rejected with the file, the key and the
//! reason (`gantry-coordinator config check` validates without starting anything).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_shared::config::{ConfigError, LogConfig, duration, host_port, phi};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PATH: &str = "/etc/gantry/coordinator.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorFile {
    /// The job database, the cluster CA and the API tokens.
    pub state_dir: PathBuf,
    /// The HTTP API.
    pub api_listen: SocketAddr,
    /// The QUIC control plane agents connect to.
    pub control_listen: SocketAddr,
    /// The embedded registry's address as nodes reach it (`host:port`).
    pub registry_address: Option<String>,
    pub gossip: GossipSection,
    pub liveness: LivenessSection,
    pub log: LogConfig,
}

impl Default for CoordinatorFile {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/gantry/coordinator".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            control_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            registry_address: None,
            gossip: GossipSection::default(),
            liveness: LivenessSection::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSection {
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub interval: String,
    pub phi_threshold: f64,
    pub dead_node_grace: String,
}

impl Default for GossipSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            interval: "200ms".into(),
            phi_threshold: 6.0,
            dead_node_grace: "10m".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessSection {
    /// A control session with nothing received for this long counts as silent.
    pub session_silence: String,
    /// After a start, how long nodes not heard from yet stay suspect (not down).
    pub startup_grace: String,
}

impl Default for LivenessSection {
    fn default() -> Self {
        Self {
            session_silence: "1500ms".into(),
            startup_grace: "15s".into(),
        }
    }
}

/// The file's values, checked and typed.
#[derive(Debug, Clone)]
pub struct Checked {
    pub state_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub registry_address: Option<String>,
    pub gossip_listen: SocketAddr,
    pub gossip_advertise: Option<SocketAddr>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace: Duration,
    pub session_silence: Duration,
    pub startup_grace: Duration,
    pub log: LogConfig,
}

impl CoordinatorFile {
    /// Reads and checks `file`; a missing file is the defaults unless `required`.
    pub fn load(file: &Path, required: bool) -> Result<Checked, ConfigError> {
        gantry_shared::config::load::<Self>(file, required)?.check(file)
    }

    pub fn check(self, file: &Path) -> Result<Checked, ConfigError> {
        if let Some(r) = &self.registry_address {
            host_port(
                file,
                "registry_address",
                r,
                "the registry as nodes reach it",
            )?;
        }
        let phi_threshold = phi(file, "gossip.phi_threshold", self.gossip.phi_threshold)?;
        self.log.validate(file)?;
        Ok(Checked {
            state_dir: self.state_dir,
            api_listen: self.api_listen,
            control_listen: self.control_listen,
            registry_address: self.registry_address,
            gossip_listen: self.gossip.listen,
            gossip_advertise: self.gossip.advertise,
            gossip_interval: duration(file, "gossip.interval", &self.gossip.interval)?,
            phi_threshold,
            dead_node_grace: duration(
                file,
                "gossip.dead_node_grace",
                &self.gossip.dead_node_grace,
            )?,
            session_silence: duration(
                file,
                "liveness.session_silence",
                &self.liveness.session_silence,
            )?,
            startup_grace: duration(file, "liveness.startup_grace", &self.liveness.startup_grace)?,
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Checked, ConfigError> {
        gantry_shared::config::parse::<CoordinatorFile>(Path::new("c.toml"), text)?
            .check(Path::new("c.toml"))
    }

    #[test]
    fn the_shipped_default_file_is_valid_and_means_the_defaults() {
        let text = include_str!("../../systemd/coordinator.toml");
        let shipped: CoordinatorFile =
            gantry_shared::config::parse(Path::new("c.toml"), text).expect("parses");
        assert_eq!(shipped, CoordinatorFile::default());
        let c = check(text).expect("valid");
        assert_eq!(c.startup_grace, Duration::from_secs(15));
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:7080");
    }

    #[test]
    fn values_are_read_and_bad_ones_name_their_key() {
        let c = check(
            "api_listen = \"0.0.0.0:8080\"\n[liveness]\nsession_silence = \"2s\"\n[log]\nformat = \"json\"\n",
        )
        .expect("valid");
        assert_eq!(c.api_listen.port(), 8080);
        assert_eq!(c.session_silence, Duration::from_secs(2));
        for (text, key) in [
            ("api_listen = \"localhost\"", "api_listen"),
            ("registry_address = \"x\"", "registry_address"),
            ("[gossip]\nphi_threshold = 0.0", "gossip.phi_threshold"),
            (
                "[liveness]\nstartup_grace = \"soon\"",
                "liveness.startup_grace",
            ),
            ("[liveness]\ngrace = \"1s\"", "liveness.grace"),
            ("state = \"/x\"", "state"),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
    }
}
