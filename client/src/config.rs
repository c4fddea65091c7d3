//! Where the CLI finds the coordinator (`~/.config/gantry/config.json`, written by
//! `gantry dev`; GANTRY_ADDR, GANTRY_TOKEN and GANTRY_CA override it), and the files
//! `gantry dev` keeps beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::api::{ApiClient, ClientError};

/// Where the CLI finds the coordinator: `gantry dev` writes it; GANTRY_ADDR, GANTRY_TOKEN
/// and GANTRY_CA override it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CliConfig {
    /// `host:port` (plain HTTP) or `http://…` / `https://…`.
    pub addr: String,
    pub token: String,
    /// The CA certificate (PEM) an https:// coordinator's certificate is verified with;
    /// the system's roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl CliConfig {
    pub fn path() -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("/etc"));
        base.join("gantry").join("config.json")
    }

    /// The file (if any) overridden by the environment.
    pub fn load() -> anyhow::Result<Self> {
        let file: Option<CliConfig> = match std::fs::read(Self::path()) {
            Ok(b) => Some(serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is not valid; delete it or rerun `gantry dev`",
                    Self::path().display()
                )
            })?),
            Err(_) => None,
        };
        let addr = std::env::var("GANTRY_ADDR")
            .ok()
            .or_else(|| file.as_ref().map(|f| f.addr.clone()));
        let token = std::env::var("GANTRY_TOKEN")
            .ok()
            .or_else(|| file.as_ref().map(|f| f.token.clone()));
        let ca_file = std::env::var_os("GANTRY_CA")
            .map(PathBuf::from)
            .or_else(|| file.as_ref().and_then(|f| f.ca_file.clone()));
        match (addr, token) {
            (Some(addr), Some(token)) => Ok(Self {
                addr,
                token,
                ca_file,
            }),
            _ => bail!(
                "no coordinator configured: start one with `gantry dev`, or set GANTRY_ADDR and GANTRY_TOKEN"
            ),
        }
    }

    /// The file only, without environment overrides (what `gantry dev` just wrote).
    pub fn load_from_file() -> anyhow::Result<Self> {
        let bytes = std::fs::read(Self::path())
            .with_context(|| format!("reading {}", Self::path().display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn save(&self) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    pub fn client(&self) -> Result<ApiClient, ClientError> {
        ApiClient::new(&self.addr, &self.token, self.ca_file.as_deref())
    }
}

/// A sibling binary of the running one (`gantry-coordinator`, `gantry-agent`), else PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Reads the admin token `gantry dev` kept from the coordinator's first start.
pub fn read_secret(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
