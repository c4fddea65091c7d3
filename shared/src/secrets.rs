//! Secrets: named sets of `KEY=VALUE` pairs kept encrypted by the coordinator and given to
//! the containers of jobs and functions that name them, as environment variables or as
//! files under `/run/secrets/NAME/`. Here: their names, how a job or function names one,
//! the API's bodies, and the values on their way to an agent, which never print.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Keys one secret holds at most.
pub const MAX_KEYS: usize = 256;
/// The most one value may hold, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// The most one secret's values may hold together, in bytes.
pub const MAX_SECRET_BYTES: usize = 512 << 10;
/// Secrets one job or function uses at most.
pub const MAX_USES: usize = 32;
/// Where a secret used as files appears in the container: `/run/secrets/NAME/KEY`.
pub const FILES_DIR: &str = "/run/secrets";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error(
        "secret name `{0}` is not valid: 1 to 64 letters, digits, `-`, `_` and `.`, starting \
         with a letter or digit"
    )]
    BadName(String),
    #[error(
        "secret key `{0}` is not valid: keys become environment variables and file names, \
         so they are letters, digits and `_`, not starting with a digit, at most 128 bytes"
    )]
    BadKey(String),
    #[error("secret key `{0}` starts with `GANTRY_`, which Gantry keeps for itself")]
    Reserved(String),
    #[error("a secret holds 1 to {MAX_KEYS} keys; this one has {0}")]
    KeyCount(usize),
    #[error("the value of `{key}` is {bytes} bytes; a value holds at most {MAX_VALUE_BYTES}")]
    ValueTooLarge { key: String, bytes: usize },
    #[error("the values are {0} bytes together; a secret holds at most {MAX_SECRET_BYTES}")]
    TooLarge(usize),
    #[error("at most {MAX_USES} secrets per job or function; this names {0}")]
    TooManyUses(usize),
    #[error("secret `{0}` is named twice")]
    Twice(String),
}

/// A secret's name, checked where it enters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretName(String);

impl SecretName {
    pub fn new(name: impl Into<String>) -> Result<Self, SecretError> {
        let name = name.into();
        let ok = (1..=64).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if ok {
            Ok(Self(name))
        } else {
            Err(SecretError::BadName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SecretName {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SecretName> for String {
    fn from(n: SecretName) -> String {
        n.0
    }
}

impl std::fmt::Display for SecretName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a secret reaches a container.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SecretMount {
    /// Each key an environment variable (a secret's value wins over `env`).
    #[default]
    Env,
    /// Each key a file `/run/secrets/NAME/KEY`, read-only, on memory only.
    Files,
}

/// A job's or function's use of a secret: `"NAME"` (as environment variables) or
/// `{ name = "NAME", mount = "files" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "SecretUseForm", into = "SecretUseForm")]
pub struct SecretUse {
    #[schema(value_type = String)]
    pub name: SecretName,
    pub mount: SecretMount,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SecretUseForm {
    Name(SecretName),
    Table {
        name: SecretName,
        #[serde(default)]
        mount: SecretMount,
    },
}

impl From<SecretUseForm> for SecretUse {
    fn from(f: SecretUseForm) -> Self {
        match f {
            SecretUseForm::Name(name) => Self {
                name,
                mount: SecretMount::Env,
            },
            SecretUseForm::Table { name, mount } => Self { name, mount },
        }
    }
}

impl From<SecretUse> for SecretUseForm {
    fn from(u: SecretUse) -> Self {
        match u.mount {
            SecretMount::Env => SecretUseForm::Name(u.name),
            mount => SecretUseForm::Table {
                name: u.name,
                mount,
            },
        }
    }
}

/// Checks a job's or function's list of secrets: not too many, none twice.
pub fn check_uses(uses: &[SecretUse]) -> Result<(), SecretError> {
    if uses.len() > MAX_USES {
        return Err(SecretError::TooManyUses(uses.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for u in uses {
        if !seen.insert(&u.name) {
            return Err(SecretError::Twice(u.name.to_string()));
        }
    }
    Ok(())
}

/// A secret's values. Never printed: `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(BTreeMap<String, String>);

impl SecretValues {
    /// Checks keys and sizes.
    pub fn new(values: BTreeMap<String, String>) -> Result<Self, SecretError> {
        if values.is_empty() || values.len() > MAX_KEYS {
            return Err(SecretError::KeyCount(values.len()));
        }
        let mut total = 0;
        for (key, value) in &values {
            let ok = (1..=128).contains(&key.len())
                && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(SecretError::BadKey(key.clone()));
            }
            if key.starts_with("GANTRY_") {
                return Err(SecretError::Reserved(key.clone()));
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(SecretError::ValueTooLarge {
                    key: key.clone(),
                    bytes: value.len(),
                });
            }
            total += key.len() + value.len();
        }
        if total > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge(total));
        }
        Ok(Self(values))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// A secret with its values, on its way to the agent that starts a container using it
/// (over the node's mutual-TLS session; never stored on either side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretDelivery {
    pub name: SecretName,
    pub mount: SecretMount,
    pub values: SecretValues,
}

/// `POST /v1/secrets`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecret {
    #[schema(value_type = String)]
    pub name: SecretName,
    /// `KEY: VALUE` pairs; keys are letters, digits and `_`.
    #[schema(value_type = BTreeMap<String, String>)]
    pub values: BTreeMap<String, String>,
    /// Replace a secret of that name (containers started afterwards get the new values).
    #[serde(default)]
    pub replace: bool,
}

impl std::fmt::Debug for CreateSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSecret")
            .field("name", &self.name)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .field("replace", &self.replace)
            .finish()
    }
}

/// A secret as the API shows it: its name and keys, never its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    #[schema(value_type = String)]
    pub name: SecretName,
    pub keys: Vec<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_and_uses_are_checked_and_values_never_print() {
        assert!(SecretName::new("hf-token_v1.2").is_ok());
        for bad in ["", "-x", ".x", "a b", "x/y", &"x".repeat(65)] {
            assert!(SecretName::new(bad).is_err(), "{bad:?}");
        }
        let values = |pairs: &[(&str, &str)]| {
            SecretValues::new(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let ok = values(&[("HF_TOKEN", "hunter2"), ("_X1", "")]).expect("valid");
        assert_eq!(
            format!("{ok:?}"),
            r#"{"HF_TOKEN": "<redacted>", "_X1": "<redacted>"}"#
        );
        assert!(!format!("{ok:?}").contains("hunter2"));
        assert_eq!(values(&[]), Err(SecretError::KeyCount(0)));
        assert!(matches!(
            values(&[("1X", "v")]),
            Err(SecretError::BadKey(_))
        ));
        assert!(matches!(
            values(&[("A-B", "v")]),
            Err(SecretError::BadKey(_))
        ));
        assert!(matches!(
            values(&[("GANTRY_X", "v")]),
            Err(SecretError::Reserved(_))
        ));
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            values(&[("K", &big)]),
            Err(SecretError::ValueTooLarge { .. })
        ));

        // A use is a name, or a table with a mount.
        #[derive(Deserialize)]
        struct Uses {
            secrets: Vec<SecretUse>,
        }
        let u: Uses = toml::from_str(
            r#"secrets = ["db", { name = "keys", mount = "files" }, { name = "x" }]"#,
        )
        .expect("parse");
        let mounts: Vec<_> = u
            .secrets
            .iter()
            .map(|s| (s.name.as_str(), s.mount))
            .collect();
        assert_eq!(
            mounts,
            [
                ("db", SecretMount::Env),
                ("keys", SecretMount::Files),
                ("x", SecretMount::Env)
            ]
        );
        assert_eq!(check_uses(&u.secrets), Ok(()));
        let twice = [u.secrets[0].clone(), u.secrets[0].clone()];
        assert_eq!(check_uses(&twice), Err(SecretError::Twice("db".into())));
        assert!(toml::from_str::<Uses>(r#"secrets = ["bad name"]"#).is_err());
    }
}
