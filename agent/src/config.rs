//! The agent's settings, once: [`AgentConfig`] is read from the TOML configuration file
//! (by default `/etc/gantry/agent.toml`; `systemd/agent.toml` is the commented default that
//! `systemd/install.sh` installs), typed as it is read, and the command-line flags are laid
//! over it in one place (the binary's `ServeArgs::overlay`). Every key is optional and has
//! the default written next to it in the shipped file. Unknown keys and bad values are
//! rejected with the file, the dotted key, the reason and the line (`gantry-agent config
//! check` validates without starting anything).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_membership::MembershipConfig;

use crate::gpu::GpuConfig;
use gantry_shared::config::{ConfigError, LogConfig, duration_text, host_port, phi};
use gantry_shared::{CpuMillis, parse_memory};
use serde::Deserialize;

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/gantry/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gantry/agent";

/// Everything `gantry-agent serve` can be told, from the file and then the flags.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The coordinator's control address, `host:port` (written by `gantry-agent join`).
    pub coordinator: Option<String>,
    /// Images, containers, the node's identity and its database.
    pub state_dir: PathBuf,
    /// CPU offered to jobs (`16`, `15.5`, `15500m`); all cores when absent.
    #[serde(deserialize_with = "cpus")]
    pub cpus: Option<CpuMillis>,
    /// Memory offered to jobs in bytes (written `200G`); all of it when absent.
    #[serde(deserialize_with = "memory")]
    pub memory: Option<u64>,
    /// Simulated GPUs instead of NVML (`8xH100-80GB,nvlink=4,numa=2`); for testing.
    pub simulate_gpus: Option<String>,
    /// Where real GPUs' driver files and CDI specs are (`[gpu]`).
    pub gpu: GpuConfig,
    /// The address other nodes and containers reach this node at; by default the one this
    /// host reaches the coordinator from.
    pub address: Option<IpAddr>,
    /// Labels for placement (`rack = "r12"`, `spot = "true"`).
    pub labels: BTreeMap<String, String>,
    /// How this node gossips: the `[gossip]` section is the membership settings
    /// themselves (its `interval` is their `gossip_interval`).
    #[serde(with = "GossipSection")]
    pub gossip: MembershipConfig,
    pub spot_notice: SpotNoticeConfig,
    pub registry: RegistrySettings,
    pub volumes: VolumeSettings,
    pub builds: BuildSettings,
    /// On a clean stop (SIGTERM), how long the coordinator keeps this node's work in place
    /// waiting for the agent to come back ("0s": re-place it as soon as the node is down).
    #[serde(with = "duration_text")]
    pub restart_hold: Duration,
    pub log: LogConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            coordinator: None,
            state_dir: DEFAULT_STATE_DIR.into(),
            cpus: None,
            memory: None,
            simulate_gpus: None,
            gpu: GpuConfig::default(),
            address: None,
            labels: BTreeMap::new(),
            gossip: MembershipConfig::default(),
            spot_notice: SpotNoticeConfig::default(),
            registry: RegistrySettings::default(),
            volumes: VolumeSettings::default(),
            builds: BuildSettings::default(),
            restart_hold: Duration::from_secs(15),
            log: LogConfig::default(),
        }
    }
}

/// The `[gossip]` section, read into [`MembershipConfig`] (whose defaults are the agent's).
#[derive(Deserialize)]
#[serde(
    remote = "MembershipConfig",
    deny_unknown_fields,
    default = "MembershipConfig::default"
)]
struct GossipSection {
    /// UDP address to gossip on.
    listen: SocketAddr,
    /// Address peers gossip with this node at; the node address and the port by default.
    advertise: Option<SocketAddr>,
    /// Further members to contact at start (the coordinator's is learned at connect).
    seeds: Vec<String>,
    #[serde(rename = "interval", with = "duration_text")]
    gossip_interval: Duration,
    /// Suspicion at which a peer is dead.
    phi_threshold: f64,
    /// How long a dead peer's state is kept.
    #[serde(with = "duration_text")]
    dead_node_grace: Duration,
}

/// The cloud's spot-interruption notice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpotNoticeConfig {
    /// The cloud's spot-interruption metadata URL; no watcher when absent.
    pub url: Option<String>,
    /// How often to poll it.
    #[serde(with = "duration_text")]
    pub interval: Duration,
}

impl Default for SpotNoticeConfig {
    fn default() -> Self {
        Self {
            url: None,
            interval: Duration::from_secs(2),
        }
    }
}

/// `[registry]`: how images are pulled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// CA certificates (PEM) trusted for registries over HTTPS besides the system's roots
    /// and the cluster CA: for the embedded registry when the coordinator's API
    /// certificate comes from a private CA, or for a private registry.
    pub ca_file: Option<PathBuf>,
}

/// `[volumes]`: where volumes' files live besides the state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeSettings {
    /// A directory on a filesystem every node that declares it mounts alike (NFS,
    /// CephFS): shared volumes live under it, and this node may run what mounts them.
    /// Without it the node holds local volumes only.
    pub shared_path: Option<PathBuf>,
}

/// `[builds]`: how steps of image builds run on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildSettings {
    /// CA certificates (PEM) a build step's container trusts for HTTPS (pip, curl, git):
    /// mounted read-only while the step runs, never part of the image. By default the
    /// host's bundle, so steps reach what the host reaches through a TLS-inspecting proxy
    /// or a private mirror; `""` for none (the image's own certificates only).
    pub ca_file: PathBuf,
}

impl Default for BuildSettings {
    fn default() -> Self {
        Self {
            ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
        }
    }
}

impl AgentConfig {
    /// Reads and checks `file`; a missing file is the defaults unless `required`.
    pub fn load(file: &Path, required: bool) -> Result<Self, ConfigError> {
        let config = gantry_shared::config::load::<Self>(file, required)?;
        config.check(file)?;
        Ok(config)
    }

    /// Checks what typing alone does not (a `host:port`, a GPU spec, label syntax, the
    /// phi threshold, the log filter); the first bad value is the error.
    pub fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::new(file, key, reason);
        if let Some(c) = &self.coordinator {
            host_port(file, "coordinator", c, "the coordinator's control address")?;
        }
        if let Some(spec) = &self.simulate_gpus {
            crate::gpu::simulated::parse_spec(spec, "check")
                .map_err(|e| bad("simulate_gpus", e.to_string()))?;
        }
        let gpu = &self.gpu;
        let paths = [("gpu.ld_cache", std::slice::from_ref(&gpu.ld_cache))]
            .into_iter()
            .chain([
                ("gpu.cdi_dirs", gpu.cdi_dirs.as_slice()),
                ("gpu.lib_dirs", gpu.lib_dirs.as_slice()),
                ("gpu.bin_dirs", gpu.bin_dirs.as_slice()),
            ]);
        let ca = &self.builds.ca_file;
        if !ca.as_os_str().is_empty() && !ca.is_absolute() {
            return Err(bad(
                "builds.ca_file",
                format!("`{}` is not an absolute path", ca.display()),
            ));
        }
        if let Some(p) = self
            .volumes
            .shared_path
            .as_ref()
            .filter(|p| !p.is_absolute())
        {
            return Err(bad(
                "volumes.shared_path",
                format!("`{}` is not an absolute path", p.display()),
            ));
        }
        if let Some(p) = self.registry.ca_file.as_ref().filter(|p| !p.is_absolute()) {
            return Err(bad(
                "registry.ca_file",
                format!("`{}` is not an absolute path", p.display()),
            ));
        }
        for (key, list) in paths {
            if let Some(p) = list.iter().find(|p| !p.is_absolute()) {
                return Err(bad(
                    key,
                    format!("`{}` is not an absolute path", p.display()),
                ));
            }
        }
        for (k, v) in &self.labels {
            gantry_shared::gossip::parse_label(&format!("{k}={v}"))
                .map_err(|e| bad(&format!("labels.{k}"), e))?;
        }
        phi(file, "gossip.phi_threshold", self.gossip.phi_threshold)?;
        self.log.validate(file)
    }
}

/// CPU as cores (`15.5`) or millicores (`15500m`).
fn cpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<CpuMillis>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|c| {
            c.parse::<CpuMillis>()
                .map_err(|e| serde::de::Error::custom(format!("`{c}`: {e}")))
        })
        .transpose()
}

/// Memory as `docker run --memory` takes it (`200G`).
fn memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|m| parse_memory(&m).map_err(|e| serde::de::Error::custom(format!("`{m}`: {e}"))))
        .transpose()
}

/// Until the process ends: each SIGHUP re-reads `file` and applies its `log.level`; a bad
/// file is reported and changes nothing. (Other settings take a restart.)
pub async fn reload_log_on_hangup(file: PathBuf, reload: gantry_shared::config::LogReload) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install a SIGHUP handler; log level reload is off");
        return;
    };
    while hangups.recv().await.is_some() {
        reload.apply(AgentConfig::load(&file, false).map(|c| c.log));
    }
}

/// Why `gantry-agent join` could not record the coordinator in the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid TOML; fix or remove it", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: toml_edit::TomlError,
    },
    #[error("creating {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replacing {}", path.display())]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sets `coordinator` (and `state_dir`, when not the default) in the config file at
/// `file`, keeping everything else in it (comments included); creates it if missing.
/// Written to a temporary file and renamed, so a crash leaves the old file or the new.
pub fn record_join(file: &Path, coordinator: &str, state_dir: &Path) -> Result<(), RecordError> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(RecordError::Read {
                path: file.to_owned(),
                source,
            });
        }
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|source| RecordError::Toml {
        path: file.to_owned(),
        source,
    })?;
    doc["coordinator"] = toml_edit::value(coordinator);
    if state_dir != Path::new(DEFAULT_STATE_DIR) {
        doc["state_dir"] = toml_edit::value(state_dir.display().to_string());
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RecordError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, doc.to_string()).map_err(|source| RecordError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, file).map_err(|source| RecordError::Replace {
        path: file.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<AgentConfig, ConfigError> {
        let file = Path::new("agent.toml");
        let config = gantry_shared::config::parse::<AgentConfig>(file, text)?;
        config.check(file)?;
        Ok(config)
    }

    #[test]
    fn the_shipped_default_file_is_valid_and_means_the_defaults() {
        let text = include_str!("../../systemd/agent.toml");
        let shipped = check(text).expect("valid");
        assert_eq!(shipped, AgentConfig::default());
        assert_eq!(shipped.gossip.gossip_interval, Duration::from_millis(200));
        assert_eq!(shipped.gossip.dead_node_grace, Duration::from_secs(600));
        assert_eq!(shipped.restart_hold, Duration::from_secs(15));
        assert_eq!(shipped.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn every_section_is_read() {
        let c = check(
            r#"
coordinator = "10.0.0.1:7443"
cpus = "15.5"
memory = "200G"
simulate_gpus = "2xA100-40GB"
restart_hold = "1m"
[labels]
rack = "r12"
[gossip]
interval = "300ms"
seeds = ["10.0.0.2:7946"]
dead_node_grace = "1h"
[spot_notice]
url = "http://169.254.169.254/latest/meta-data/spot/instance-action"
interval = "5s"
[log]
level = "debug"
format = "json"
[gpu]
cdi_dirs = ["/etc/cdi"]
cdi_hooks = false
ld_cache = "/run/ld.so.cache"
lib_dirs = ["/opt/nvidia/lib"]
bin_dirs = ["/opt/nvidia/bin"]
[registry]
ca_file = "/etc/gantry/registry-ca.pem"
"#,
        )
        .expect("valid");
        assert_eq!(c.coordinator.as_deref(), Some("10.0.0.1:7443"));
        assert_eq!(c.cpus, Some(CpuMillis(15_500)));
        assert_eq!(c.memory, Some(200 << 30));
        assert_eq!(c.restart_hold, Duration::from_secs(60));
        assert_eq!(c.labels, [("rack".into(), "r12".into())].into());
        assert_eq!(c.gossip.gossip_interval, Duration::from_millis(300));
        assert_eq!(c.gossip.seeds, ["10.0.0.2:7946"]);
        assert_eq!(c.gossip.dead_node_grace, Duration::from_secs(3600));
        assert!(c.spot_notice.url.is_some());
        assert_eq!(c.spot_notice.interval, Duration::from_secs(5));
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.gpu.cdi_dirs, [Path::new("/etc/cdi")]);
        assert!(!c.gpu.cdi_hooks);
        assert_eq!(c.gpu.ld_cache, Path::new("/run/ld.so.cache"));
        assert_eq!(c.gpu.lib_dirs, [Path::new("/opt/nvidia/lib")]);
        assert_eq!(c.gpu.bin_dirs, [Path::new("/opt/nvidia/bin")]);
        assert_eq!(c.gpu.dev, Path::new("/dev"), "not configurable");
        assert_eq!(
            c.registry.ca_file.as_deref(),
            Some(Path::new("/etc/gantry/registry-ca.pem"))
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("coordinator = \"nohost\"", "coordinator"),
            ("cpus = \"lots\"", "cpus"),
            ("memory = \"-1G\"", "memory"),
            ("restart_hold = \"soon\"", "restart_hold"),
            ("simulate_gpus = \"8xWHAT\"", "simulate_gpus"),
            ("[labels]\n\"bad key\" = \"x\"", "labels.bad key"),
            ("[gossip]\ninterval = \"fast\"", "gossip.interval"),
            ("[gossip]\nphi_threshold = -1.0", "gossip.phi_threshold"),
            ("[gossip]\nlisten = \"nowhere\"", "gossip.listen"),
            (
                "[gossip]\ngossip_interval = \"1s\"",
                "gossip.gossip_interval",
            ),
            (
                "[spot_notice]\ninterval = \"2 parsecs\"",
                "spot_notice.interval",
            ),
            ("[log]\nlevel = \"=[\"", "log.level"),
            ("[gpu]\nld_cache = \"ld.so.cache\"", "gpu.ld_cache"),
            ("[gpu]\ncdi_dirs = [\"/etc/cdi\", \"cdi\"]", "gpu.cdi_dirs"),
            ("[gpu]\ndev = \"/tmp\"", "gpu.dev"),
            ("[registry]\nca_file = \"ca.pem\"", "registry.ca_file"),
            ("[registry]\ninsecure = true", "registry.insecure"),
            ("cpu = \"4\"", "cpu"),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
    }

    #[test]
    fn typed_values_say_what_is_wrong_and_where() {
        let e = check("[log]\nlevel = \"info\"\n[gossip]\ninterval = \"often\"\n")
            .expect_err("invalid");
        assert!(e.reason.contains("`often` is not a duration"), "{e}");
        assert!(e.reason.contains("line 4"), "{e}");
        let e = check("cpus = \"lots\"").expect_err("invalid");
        assert!(e.reason.contains("`lots`"), "{e}");
        assert!(e.reason.contains("line 1"), "{e}");
    }

    #[test]
    fn join_records_the_coordinator_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gantry/agent.toml");
        record_join(&file, "10.0.0.1:7443", Path::new(DEFAULT_STATE_DIR)).expect("new file");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read").trim(),
            "coordinator = \"10.0.0.1:7443\""
        );
        std::fs::write(&file, "# the rack\n[labels]\nrack = \"r1\"\n").expect("write");
        record_join(&file, "10.0.0.9:7443", Path::new("/srv/gantry")).expect("update");
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(text.contains("# the rack"), "{text}");
        let c = check(&text).expect("valid");
        assert_eq!(c.coordinator.as_deref(), Some("10.0.0.9:7443"));
        assert_eq!(c.state_dir, Path::new("/srv/gantry"));
        assert_eq!(c.labels, [("rack".into(), "r1".into())].into());
    }
}
