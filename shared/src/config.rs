//! Loading the daemons' TOML configuration files (`/etc/gantry/agent.toml`,
//! `/etc/gantry/coordinator.toml`): unknown keys and bad values are errors that name the
//! file, the key and the reason, and nothing starts on a bad file. The structs themselves
//! live with each daemon; this is the parsing they share, plus the log settings both have.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What is wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The key, dotted (`gossip.interval`); `None` for the file as a whole.
    pub key: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: `{key}`: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            key: Some(key.into()),
            reason: reason.into(),
        }
    }
}

/// Reads `file`. A missing file is the defaults when `required` is false (a daemon run
/// with flags only); an explicitly named file must exist.
pub fn load<T: DeserializeOwned + Default>(file: &Path, required: bool) -> Result<T, ConfigError> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(T::default());
        }
        Err(e) => {
            return Err(ConfigError {
                file: file.to_owned(),
                key: None,
                reason: format!("cannot read it: {e}"),
            });
        }
    };
    parse(file, &text)
}

/// Parses `text` (the contents of `file`).
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        key: None,
        reason: match line_of(e.span()) {
            Some(line) => format!("line {line}: {}", e.message()),
            None => e.message().to_owned(),
        },
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = match line_of(inner.span()) {
            Some(line) => format!("{} (line {line})", inner.message()),
            None => inner.message().to_owned(),
        };
        ConfigError {
            file: file.to_owned(),
            key: (path != ".").then_some(path),
            reason,
        }
    })
}

/// A duration setting (`200ms`, `1m30s`).
pub fn duration(file: &Path, key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        ConfigError::new(
            file,
            key,
            format!("`{value}` is not a duration ({e}); write it like `200ms`, `15s` or `10m`"),
        )
    })
}

/// A `host:port` setting.
pub fn host_port(file: &Path, key: &str, value: &str, what: &str) -> Result<(), ConfigError> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ConfigError::new(
            file,
            key,
            format!("`{value}` is not `host:port` ({what})"),
        )),
    }
}

/// A phi threshold (failure-detector suspicion): a positive number.
pub fn phi(file: &Path, key: &str, value: f64) -> Result<f64, ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(ConfigError::new(
            file,
            key,
            format!("{value} must be a positive number (6 is the default)"),
        ))
    }
}

/// Serde for a duration setting written as humantime text (`200ms`, `15s`, `10m`), so a
/// settings struct holds a `Duration` and a bad value names its key and how to write one.
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = String::deserialize(d)?;
        humantime::parse_duration(&v).map_err(|e| {
            D::Error::custom(format!(
                "`{v}` is not a duration ({e}); write it like `200ms`, `15s` or `10m`"
            ))
        })
    }
}

/// A phi threshold (failure-detector suspicion) as a setting: a positive number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Phi(f64);

impl Phi {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for Phi {
    /// 6: chitchat's default, and Gantry's.
    fn default() -> Self {
        Phi(6.0)
    }
}

impl TryFrom<f64> for Phi {
    type Error = String;

    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 {
            Ok(Phi(v))
        } else {
            Err(format!("{v} must be a positive number (6 is the default)"))
        }
    }
}

impl From<Phi> for f64 {
    fn from(p: Phi) -> f64 {
        p.0
    }
}

/// A `host:port` setting (a name or an address, and a port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort(String);

impl HostPort {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        match v.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(HostPort(v.to_owned()))
            }
            _ => Err(format!("`{v}` is not `host:port`")),
        }
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        v.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.0
    }
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise (journald, files, pipes).
    #[default]
    Auto,
    Json,
    Text,
}

/// The `[log]` section both daemons have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `warn`, `gantry_agent=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

impl LogConfig {
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| {
                ConfigError::new(
                    file,
                    "log.level",
                    format!(
                        "`{}` is not a log filter ({e}); use e.g. `info`, `warn` or `gantry_agent=debug,info`",
                        self.level
                    ),
                )
            })
    }
}

/// Changes the log filter of a running daemon (SIGHUP re-reads `log.level`).
pub struct LogReload(
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
);

impl LogReload {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }

    /// Applies the log level of a configuration file just read again (SIGHUP), logging
    /// what happened; a file that did not load changes nothing.
    pub fn apply(&self, loaded: Result<LogConfig, ConfigError>) {
        match loaded {
            Ok(log) => match self.set_level(&log.level) {
                Ok(()) => tracing::warn!(filter = %log.level, "log level reloaded"),
                Err(e) => tracing::error!(error = %e, "cannot apply the log level"),
            },
            Err(e) => tracing::error!(error = %e, "configuration not reloaded"),
        }
    }
}

/// Sets up logging to stderr: `level` as a tracing filter (an invalid one falls back to
/// `info`), JSON lines when `format` asks or (`auto`) when stderr is not a terminal.
pub fn init_logging(level: &str, format: LogFormat) -> LogReload {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Json => true,
        LogFormat::Text => false,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        registry.with(layer.json().flatten_event(true)).init();
    } else {
        registry.with(layer).init();
    }
    LogReload(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        name: String,
        log: LogConfig,
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        let f = Path::new("/etc/gantry/x.toml");
        let e =
            parse::<Example>(f, "name = \"a\"\n[log]\nlevle = \"info\"\n").expect_err("invalid");
        assert_eq!(e.key.as_deref(), Some("log.levle"), "{e}");
        assert!(e.reason.contains("unknown field `levle`"), "{e}");
        assert!(e.reason.contains("line 3"), "{e}");
        assert!(
            e.to_string()
                .starts_with("/etc/gantry/x.toml: `log.levle`: "),
            "{e}"
        );
        let e = parse::<Example>(f, "[log]\nformat = \"xml\"\n").expect_err("invalid");
        assert_eq!(e.key.as_deref(), Some("log.format"), "{e}");
        assert!(e.reason.contains("unknown variant `xml`"), "{e}");
        let e = parse::<Example>(f, "name = \n").expect_err("invalid");
        assert_eq!(e.key, None);
        assert!(e.reason.starts_with("line 1:"), "{e}");
    }

    #[test]
    fn a_missing_optional_file_is_the_defaults() {
        let e: Example = load(Path::new("/nonexistent/gantry.toml"), false).expect("defaults");
        assert_eq!(e, Example::default());
        let err =
            load::<Example>(Path::new("/nonexistent/gantry.toml"), true).expect_err("invalid");
        assert!(err.reason.contains("cannot read it"), "{err}");
    }

    #[test]
    fn log_levels_and_durations_are_checked() {
        let f = Path::new("c.toml");
        let bad = LogConfig {
            level: "info,=[".into(),
            ..LogConfig::default()
        };
        assert_eq!(
            bad.validate(f).expect_err("invalid").key.as_deref(),
            Some("log.level")
        );
        assert_eq!(
            duration(f, "gossip.interval", "200ms"),
            Ok(Duration::from_millis(200))
        );
        let e = duration(f, "gossip.interval", "fast").expect_err("invalid");
        assert!(e.to_string().contains("`gossip.interval`"), "{e}");
    }
}
