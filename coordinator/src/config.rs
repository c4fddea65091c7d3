//! The coordinator's settings: one typed struct with its defaults, read from the TOML file
//! (by default `/etc/gantry/coordinator.toml`; `systemd/coordinator.toml` is the commented
//! default `systemd/install.sh` installs), with the command line's flags laid over it in
//! one place (the binary's). Every key is optional; unknown keys and bad values are
//! rejected with the file, the key and the reason (`gantry-coordinator config check`
//! validates without starting anything).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_shared::config::{ConfigError, HostPort, LogConfig, Phi, duration_text};
use serde::{Deserialize, Serialize};

use crate::api::ApiConfig;
use crate::control::ControlConfig;
use crate::nodes::liveness::ClusterConfig;
use crate::server::CoordinatorConfig;

pub const DEFAULT_PATH: &str = "/etc/gantry/coordinator.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// The job database, the cluster CA and the API tokens.
    pub state_dir: PathBuf,
    /// The HTTP API.
    pub api_listen: SocketAddr,
    /// The QUIC control plane agents connect to.
    pub control_listen: SocketAddr,
    /// The embedded registry's address as nodes reach it (`host:port`); default: the API
    /// address, unless it listens on all interfaces.
    pub registry_address: Option<HostPort>,
    pub gossip: GossipSettings,
    pub liveness: LivenessSettings,
    pub log: LogConfig,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/gantry/coordinator".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            control_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            registry_address: None,
            gossip: GossipSettings::default(),
            liveness: LivenessSettings::default(),
            log: LogConfig::default(),
        }
    }
}

/// `[gossip]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSettings {
    /// UDP address to gossip on (port 0: any free port).
    pub listen: SocketAddr,
    /// Address agents gossip with the coordinator at (default: the control address's IP,
    /// or the host's first non-loopback IPv4 address).
    pub advertise: Option<SocketAddr>,
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// Suspicion (silence over the mean heartbeat interval) at which a member is dead.
    pub phi_threshold: Phi,
    /// How long a dead member's state is kept before it is forgotten.
    #[serde(with = "duration_text")]
    pub dead_node_grace: Duration,
}

impl Default for GossipSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            interval: Duration::from_millis(200),
            phi_threshold: Phi::default(),
            dead_node_grace: Duration::from_secs(600),
        }
    }
}

/// `[liveness]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessSettings {
    /// A control session with nothing received for this long counts as silent.
    #[serde(with = "duration_text")]
    pub session_silence: Duration,
    /// After a start, how long nodes not heard from yet stay suspect (not down).
    #[serde(with = "duration_text")]
    pub startup_grace: Duration,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        Self {
            session_silence: Duration::from_millis(1500),
            startup_grace: Duration::from_secs(15),
        }
    }
}

impl CoordinatorSettings {
    /// Reads and checks `file`; a missing file is the defaults unless `required`.
    pub fn load(file: &Path, required: bool) -> Result<Self, ConfigError> {
        let settings: Self = gantry_shared::config::load(file, required)?;
        settings.log.validate(file)?;
        Ok(settings)
    }

    /// What the server runs with.
    pub fn server(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            state_dir: self.state_dir.clone(),
            api: ApiConfig {
                listen: self.api_listen,
                ..ApiConfig::default()
            },
            control: ControlConfig {
                listen: self.control_listen,
                ..ControlConfig::default()
            },
            registry_address: self
                .registry_address
                .as_ref()
                .map(|r| r.as_str().to_owned()),
            cluster: ClusterConfig {
                membership: gantry_membership::MembershipConfig {
                    listen: self.gossip.listen,
                    advertise: self.gossip.advertise,
                    seeds: Vec::new(),
                    gossip_interval: self.gossip.interval,
                    phi_threshold: self.gossip.phi_threshold.get(),
                    dead_node_grace: self.gossip.dead_node_grace,
                },
                session_silence: self.liveness.session_silence,
                startup_grace: self.liveness.startup_grace,
                ..ClusterConfig::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<CoordinatorSettings, ConfigError> {
        let settings: CoordinatorSettings =
            gantry_shared::config::parse(Path::new("c.toml"), text)?;
        settings.log.validate(Path::new("c.toml"))?;
        Ok(settings)
    }

    #[test]
    fn the_shipped_default_file_is_valid_and_means_the_defaults() {
        let text = include_str!("../../systemd/coordinator.toml");
        let shipped = check(text).expect("valid");
        assert_eq!(shipped, CoordinatorSettings::default());
        assert_eq!(shipped.liveness.startup_grace, Duration::from_secs(15));
        assert_eq!(shipped.api_listen.to_string(), "127.0.0.1:7080");
    }

    #[test]
    fn values_are_read_and_bad_ones_name_their_key() {
        let c = check(
            "api_listen = \"0.0.0.0:8080\"\n[liveness]\nsession_silence = \"2s\"\n[log]\nformat = \"json\"\n",
        )
        .expect("valid");
        assert_eq!(c.api_listen.port(), 8080);
        assert_eq!(c.liveness.session_silence, Duration::from_secs(2));
        assert_eq!(
            c.server().cluster.session_silence,
            Duration::from_secs(2),
            "what the file says is what the server runs with"
        );
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
            ("[log]\nlevel = \"[\"", "log.level"),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
        let e = check("[gossip]\ninterval = \"often\"").expect_err("bad duration");
        assert!(e.to_string().contains("is not a duration"), "{e}");
    }
}
