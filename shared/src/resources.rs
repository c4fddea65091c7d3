//! Resource quantities a container or job asks for. Parsing is strict: a zero or negative
//! limit is an error that says which limit and what a valid value looks like, because a
//! container without limits is never started.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CPU in thousandths of a core (`500` = half a core), as Kubernetes and Nomad count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CpuMillis(pub u64);

impl FromStr for CpuMillis {
    type Err = ResourceError;
    /// Accepts cores (`0.5`, `2`) or millicores (`500m`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ResourceError::BadCpu {
            value: s.to_owned(),
        };
        let millis = if let Some(m) = s.strip_suffix('m') {
            m.parse::<u64>().map_err(|_| bad())?
        } else {
            let cores: f64 = s.parse().map_err(|_| bad())?;
            if !cores.is_finite() || cores < 0.0 {
                return Err(bad());
            }
            (cores * 1000.0).round() as u64
        };
        if millis == 0 {
            return Err(ResourceError::Zero { what: "cpu" });
        }
        Ok(Self(millis))
    }
}

impl fmt::Display for CpuMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

/// Limits for one container. Every field is always enforced through cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu: CpuMillis,
    /// Memory limit in bytes (also the swap limit: containers do not swap).
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads) in the container.
    pub pids: u64,
}

impl Resources {
    pub const DEFAULT_PIDS: u64 = 4096;

    /// Checks what a deserialized (not parsed) value could still get wrong.
    pub fn validate(&self) -> Result<(), ResourceError> {
        if self.cpu.0 == 0 {
            return Err(ResourceError::Zero { what: "cpu" });
        }
        if self.memory_bytes == 0 {
            return Err(ResourceError::Zero { what: "memory" });
        }
        if self.pids == 0 {
            return Err(ResourceError::Zero { what: "pids" });
        }
        Ok(())
    }
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu: CpuMillis(1000),
            memory_bytes: 512 << 20,
            pids: Self::DEFAULT_PIDS,
        }
    }
}

/// Parses a memory size the way `docker run --memory` and `podman` do: a number with an
/// optional binary unit (`k`, `m`, `g`, `t`, case-insensitive, optionally followed by `i`
/// and/or `b`), so `256M` is 256 MiB. Bare numbers are bytes.
pub fn parse_memory(s: &str) -> Result<u64, ResourceError> {
    let bad = || ResourceError::BadMemory {
        value: s.to_owned(),
    };
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    let bytes = bytes as u64;
    if bytes == 0 {
        return Err(ResourceError::Zero { what: "memory" });
    }
    Ok(bytes)
}

/// Memory in bytes, written as `docker run --memory` takes it (see [`parse_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemoryBytes(pub u64);

impl FromStr for MemoryBytes {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_memory(s).map(Self)
    }
}

/// A duration as people write it (`30m`, `1h30m`, `500ms`): the workspace's one duration
/// syntax, humantime's.
pub type HumanDuration = humantime::Duration;

/// A value parsed once, where it enters (the API, the CLI), from the text a user wrote.
/// It keeps that text, so what the API shows back is what was sent, and it serializes as
/// the text, so the JSON clients send and read is unchanged; code reads [`Parsed::value`]
/// and never parses again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<T> {
    text: String,
    value: T,
}

impl<T> Parsed<T> {
    /// A value whose text is known to parse to it (defaults).
    pub fn known(text: &str, value: T) -> Self {
        Self {
            text: text.to_owned(),
            value,
        }
    }

    pub fn value(&self) -> &T {
        &self.value
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<T: FromStr> FromStr for Parsed<T> {
    type Err = T::Err;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self {
            value: s.trim().parse()?,
            text: s.to_owned(),
        })
    }
}

impl<T: FromStr> TryFrom<String> for Parsed<T> {
    type Error = T::Err;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(Self {
            value: s.trim().parse()?,
            text: s,
        })
    }
}

impl<T> fmt::Display for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<T> Serialize for Parsed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    /// Text, or a bare number (`cpu = 2` in TOML, `"cpu": 0.5` in JSON) read as its text.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum TextOrNumber {
            Text(String),
            Int(i64),
            Float(f64),
        }
        let text = match TextOrNumber::deserialize(d)? {
            TextOrNumber::Text(t) => t,
            TextOrNumber::Int(n) => n.to_string(),
            TextOrNumber::Float(x) => x.to_string(),
        };
        Self::try_from(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("{what} limit must be greater than zero; every container runs with a {what} limit")]
    Zero { what: &'static str },
    #[error("cpu `{value}` is not a positive number of cores; use e.g. `0.5`, `2` or `500m`")]
    BadCpu { value: String },
    #[error("memory `{value}` is not a positive size; use e.g. `256M`, `2G` or a byte count")]
    BadMemory { value: String },
}

/// `80 GiB`, `1.5 GiB`, `512 MiB`, `100 bytes`.
pub fn bytes_text(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    let unit = |u: u64, name: &str| {
        if b.is_multiple_of(u) {
            format!("{} {name}", b / u)
        } else {
            format!("{:.1} {name}", b as f64 / u as f64)
        }
    };
    if b >= GIB {
        unit(GIB, "GiB")
    } else if b >= MIB {
        unit(MIB, "MiB")
    } else {
        format!("{b} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_cores_and_millis() {
        assert_eq!("0.5".parse::<CpuMillis>(), Ok(CpuMillis(500)));
        assert_eq!("2".parse::<CpuMillis>(), Ok(CpuMillis(2000)));
        assert_eq!("250m".parse::<CpuMillis>(), Ok(CpuMillis(250)));
    }

    #[test]
    fn cpu_rejects_zero_and_negative() {
        assert_eq!(
            "0".parse::<CpuMillis>(),
            Err(ResourceError::Zero { what: "cpu" })
        );
        assert!(matches!(
            "-1".parse::<CpuMillis>(),
            Err(ResourceError::BadCpu { .. })
        ));
        assert!(matches!(
            "abc".parse::<CpuMillis>(),
            Err(ResourceError::BadCpu { .. })
        ));
    }

    #[test]
    fn memory_parses_units() {
        assert_eq!(parse_memory("256M"), Ok(256 << 20));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("64KiB"), Ok(64 << 10));
        assert_eq!(parse_memory("1MiB"), Ok(1 << 20));
        assert_eq!(parse_memory("4096"), Ok(4096));
    }

    #[test]
    fn memory_rejects_zero_and_negative() {
        assert_eq!(
            parse_memory("0"),
            Err(ResourceError::Zero { what: "memory" })
        );
        assert!(matches!(
            parse_memory("-5M"),
            Err(ResourceError::BadMemory { .. })
        ));
        assert!(matches!(
            parse_memory("lots"),
            Err(ResourceError::BadMemory { .. })
        ));
    }

    #[test]
    fn parsed_values_keep_their_text_and_parse_once() {
        let cpu: Parsed<CpuMillis> = serde_json::from_str(r#""0.5""#).expect("cpu");
        assert_eq!((cpu.value(), cpu.as_str()), (&CpuMillis(500), "0.5"));
        assert_eq!(serde_json::to_string(&cpu).expect("json"), r#""0.5""#);
        let t: Parsed<HumanDuration> = serde_json::from_str(r#""1h30m""#).expect("duration");
        assert_eq!(t.value().as_secs(), 5_400);
        let e = serde_json::from_str::<Parsed<MemoryBytes>>(r#""0""#).expect_err("zero");
        assert!(e.to_string().contains("greater than zero"), "{e}");
        assert!(serde_json::from_str::<Parsed<HumanDuration>>(r#""soon""#).is_err());
    }

    #[test]
    fn validate_names_the_zero_limit() {
        let r = Resources {
            pids: 0,
            ..Resources::default()
        };
        assert_eq!(r.validate(), Err(ResourceError::Zero { what: "pids" }));
    }
}
