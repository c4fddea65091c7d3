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

use crate::api::{ApiConfig, ApiTls};
use crate::control::ControlConfig;
use crate::nodes::liveness::ClusterConfig;
use crate::server::{CoordinatorConfig, IngressConfig};

pub const DEFAULT_PATH: &str = "/etc/gantry/coordinator.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// The job database, the cluster CA and the API tokens.
    pub state_dir: PathBuf,
    /// The HTTP API.
    pub api_listen: SocketAddr,
    /// `[api]`: TLS for the HTTP API and the embedded registry on it.
    pub api: ApiSettings,
    /// The QUIC control plane agents connect to.
    pub control_listen: SocketAddr,
    /// Web endpoints' HTTP ingress; default: the API's address with the next port
    /// (127.0.0.1:7081), or port 0 when the API's is 0. HTTPS when the API serves it.
    pub ingress_listen: Option<SocketAddr>,
    /// With a domain, `APP--LABEL.DOMAIN` names a web endpoint by host (besides
    /// `/APP/LABEL/` by path).
    pub ingress_domain: Option<String>,
    /// The embedded registry's address as nodes reach it (`host:port`, or with a scheme);
    /// default: the API address, unless it listens on all interfaces.
    pub registry_address: Option<RegistryAddress>,
    pub gossip: GossipSettings,
    pub liveness: LivenessSettings,
    /// `[secrets]`: where the key that encrypts secrets at rest is.
    pub secrets: SecretsSettings,
    /// `[images]`: how images are built from recipes.
    pub images: ImagesSettings,
    pub log: LogConfig,
}

/// `[images]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSettings {
    /// The Debian mirror `debian_slim` bases are made from (`http://deb.debian.org/debian`);
    /// default: the building node's own apt sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debian_mirror: Option<String>,
}

/// `[secrets]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSettings {
    /// The AES-256 key file (64 hex digits, 0600), made on the first start; default
    /// `<state_dir>/secrets.key`. Without it the stored secrets cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/gantry/coordinator".into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            api: ApiSettings::default(),
            control_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            ingress_listen: None,
            ingress_domain: None,
            registry_address: None,
            gossip: GossipSettings::default(),
            liveness: LivenessSettings::default(),
            secrets: SecretsSettings::default(),
            images: ImagesSettings::default(),
            log: LogConfig::default(),
        }
    }
}

/// `[api]`: how the HTTP API (and the embedded registry on it) is served. With TLS it
/// serves HTTPS only; without, plain HTTP (loopback, or behind a TLS-terminating proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ApiTable", into = "ApiTable")]
pub struct ApiSettings {
    pub tls: Option<ApiTls>,
}

/// `[api]` as written: the pairs are checked when it becomes [`ApiSettings`].
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ApiTable {
    /// The certificate chain (PEM, leaf first) and its private key (PEM): both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// Instead of the files: DNS names and IP addresses for a certificate the cluster CA
    /// issues at each start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tls_names: Vec<String>,
}

impl TryFrom<ApiTable> for ApiSettings {
    type Error = String;

    fn try_from(t: ApiTable) -> Result<Self, String> {
        let tls = match (t.tls_cert, t.tls_key, t.tls_names.is_empty()) {
            (None, None, true) => None,
            (None, None, false) => Some(ApiTls::ClusterCa { names: t.tls_names }),
            (Some(cert), Some(key), true) => Some(ApiTls::Files { cert, key }),
            (Some(_), Some(_), false) => {
                return Err(
                    "`tls_names` (a certificate from the cluster CA) and `tls_cert` + \
                            `tls_key` (your own) exclude each other: keep one"
                        .into(),
                );
            }
            (cert, _, _) => {
                let (set, missing) = match cert {
                    Some(_) => ("tls_cert", "tls_key"),
                    None => ("tls_key", "tls_cert"),
                };
                return Err(format!(
                    "`{set}` is set without `{missing}`: give both (the certificate chain \
                     and its private key, PEM files) or neither"
                ));
            }
        };
        Ok(Self { tls })
    }
}

impl From<ApiSettings> for ApiTable {
    fn from(s: ApiSettings) -> Self {
        match s.tls {
            None => Self::default(),
            Some(ApiTls::Files { cert, key }) => Self {
                tls_cert: Some(cert),
                tls_key: Some(key),
                ..Self::default()
            },
            Some(ApiTls::ClusterCa { names }) => Self {
                tls_names: names,
                ..Self::default()
            },
        }
    }
}

/// `registry_address`: `host:port` as nodes reach the embedded registry, optionally with a
/// scheme: `https://` where they reach it through a TLS-terminating proxy, `http://` for
/// plain HTTP; without one, the API's own scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegistryAddress {
    pub host_port: HostPort,
    /// HTTPS (`Some(true)`), plain HTTP (`Some(false)`), or as the API (`None`).
    pub tls: Option<bool>,
}

impl std::str::FromStr for RegistryAddress {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        let (tls, rest) = match v.split_once("://") {
            Some(("https", rest)) => (Some(true), rest),
            Some(("http", rest)) => (Some(false), rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "`{v}`: the scheme `{scheme}` is neither `https` nor `http`"
                ));
            }
            None => (None, v),
        };
        let host_port = rest.parse().map_err(|e| {
            format!("{e} (write `host:port`, or `https://host:port` behind a TLS proxy)")
        })?;
        Ok(Self { host_port, tls })
    }
}

impl TryFrom<String> for RegistryAddress {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        v.parse()
    }
}

impl From<RegistryAddress> for String {
    fn from(r: RegistryAddress) -> String {
        match r.tls {
            None => r.host_port.into(),
            Some(true) => format!("https://{}", r.host_port.as_str()),
            Some(false) => format!("http://{}", r.host_port.as_str()),
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
            secrets_key_file: self.secrets.key_file.clone(),
            debian_mirror: self.images.debian_mirror.clone(),
            api: ApiConfig {
                listen: self.api_listen,
                tls: self.api.tls.clone(),
                ..ApiConfig::default()
            },
            control: ControlConfig {
                listen: self.control_listen,
                ..ControlConfig::default()
            },
            ingress: IngressConfig {
                listen: self.ingress_listen.unwrap_or_else(|| {
                    let mut at = self.api_listen;
                    // (Port 0 stays 0: any free port; 65535 wraps to it.)
                    if at.port() != 0 {
                        at.set_port(at.port().wrapping_add(1));
                    }
                    at
                }),
                domain: self.ingress_domain.clone(),
            },
            registry_address: self.registry_address.clone(),
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

    #[test]
    fn api_tls_is_a_pair_of_files_or_names_for_the_cluster_ca() {
        let c =
            check("[api]\ntls_cert = \"/etc/gantry/api.crt\"\ntls_key = \"/etc/gantry/api.key\"\n")
                .expect("valid");
        assert_eq!(
            c.server().api.tls,
            Some(ApiTls::Files {
                cert: "/etc/gantry/api.crt".into(),
                key: "/etc/gantry/api.key".into()
            })
        );
        let c = check("[api]\ntls_names = [\"gantry.example\", \"10.0.0.1\"]\n").expect("valid");
        assert_eq!(
            c.server().api.tls,
            Some(ApiTls::ClusterCa {
                names: vec!["gantry.example".into(), "10.0.0.1".into()]
            })
        );
        let both = "[api]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\ntls_names = [\"x\"]";
        for (text, says) in [
            (
                "\n[api]\ntls_cert = \"/c.pem\"",
                "`tls_cert` is set without `tls_key`",
            ),
            (
                "\n[api]\ntls_key = \"/k.pem\"",
                "`tls_key` is set without `tls_cert`",
            ),
            (both, "exclude each other"),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some("api"), "{text}: {e}");
            let e = e.to_string();
            assert!(e.starts_with("c.toml: `api`:") && e.contains(says), "{e}");
        }
        let e = check("\n[api]\ntls_key = \"/k.pem\"").expect_err("half a pair");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = check("[api]\ntls_crt = \"/c.pem\"").expect_err("unknown key");
        assert_eq!(e.key.as_deref(), Some("api.tls_crt"), "{e}");
    }

    #[test]
    fn the_registry_address_may_name_its_scheme() {
        for (text, tls) in [
            ("registry_address = \"r.example:5000\"", None),
            ("registry_address = \"https://r.example:443\"", Some(true)),
            ("registry_address = \"http://10.0.0.1:7080\"", Some(false)),
        ] {
            let c = check(text).expect(text);
            let r = c.server().registry_address.expect("set");
            assert_eq!(r.tls, tls, "{text}");
            assert!(r.host_port.as_str().ends_with(char::is_numeric), "{text}");
        }
        for text in [
            "registry_address = \"ftp://r.example:21\"",
            "registry_address = \"https://r.example\"",
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.key.as_deref(), Some("registry_address"), "{e}");
        }
    }
}
