//! `gantry secret`: create (from `KEY=VALUE` arguments or an env file), list (names and
//! keys, never values) and delete secrets; and `--secret NAME[:files]` for `gantry run`.

use std::collections::BTreeMap;
use std::path::Path;

use gantry_shared::secrets::{CreateSecret, SecretMount, SecretName, SecretUse, SecretView};

use crate::api::ApiClient as Client;

/// `NAME` (as environment variables) or `NAME:files` (files under `/run/secrets/NAME/`).
pub fn parse_use(text: &str) -> Result<SecretUse, String> {
    let (name, mount) = match text.rsplit_once(':') {
        Some((name, "files")) => (name, SecretMount::Files),
        Some((name, "env")) => (name, SecretMount::Env),
        Some((_, other)) => {
            return Err(format!(
                "`{other}` is not a way to give a secret: write NAME, NAME:env or NAME:files"
            ));
        }
        None => (text, SecretMount::Env),
    };
    Ok(SecretUse {
        name: SecretName::new(name).map_err(|e| e.to_string())?,
        mount,
    })
}

/// The values from `KEY=VALUE` arguments and an env file (`KEY=VALUE` lines; blank lines
/// and `#` comments skipped; an `export ` prefix and one pair of quotes around a value
/// taken off). A key given twice is refused.
pub fn values(
    pairs: &[String],
    env_file: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut values = BTreeMap::new();
    let mut add = |key: &str, value: &str, from: &str| -> anyhow::Result<()> {
        if values.insert(key.to_owned(), value.to_owned()).is_some() {
            anyhow::bail!("{from}: `{key}` is given twice");
        }
        Ok(())
    };
    if let Some(file) = env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let at = format!("{}:{}", file.display(), n + 1);
            let Some((key, value)) = line.split_once('=') else {
                anyhow::bail!("{at}: not KEY=VALUE");
            };
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                .unwrap_or(value);
            add(key.trim(), unquoted, &at)?;
        }
    }
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            anyhow::bail!(
                "`{}` is not KEY=VALUE",
                pair.split('=').next().unwrap_or_default()
            );
        };
        add(key, value, "the arguments")?;
    }
    if values.is_empty() {
        anyhow::bail!(
            "give the secret's values as KEY=VALUE arguments or with --from-env-file FILE"
        );
    }
    Ok(values)
}

pub async fn create(
    client: &Client,
    name: &str,
    values: BTreeMap<String, String>,
    replace: bool,
) -> anyhow::Result<SecretView> {
    let req = CreateSecret {
        name: SecretName::new(name)?,
        values,
        replace,
    };
    Ok(client.create_secret(&req).await?)
}

pub fn print_list(secrets: &[SecretView], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(secrets)?);
        return Ok(());
    }
    println!("{:<24} {:<20} KEYS", "NAME", "UPDATED");
    for s in secrets {
        println!(
            "{:<24} {:<20} {}",
            s.name,
            crate::print::ago(gantry_shared::now_ms(), s.updated_at_ms),
            s.keys.join(",")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_and_values_parse_with_clear_refusals() {
        let u = parse_use("db:files").expect("files");
        assert_eq!((u.name.as_str(), u.mount), ("db", SecretMount::Files));
        assert_eq!(parse_use("db").expect("env").mount, SecretMount::Env);
        assert!(
            parse_use("db:disk")
                .expect_err("disk")
                .contains("NAME:files")
        );
        assert!(parse_use("bad name").is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(".env");
        std::fs::write(&file, "# db\nexport HOST=db.local\nPASS=\"a=b c\"\n\n").expect("write");
        let v = values(&["EXTRA=1".into()], Some(&file)).expect("values");
        let pairs: Vec<_> = v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [("EXTRA", "1"), ("HOST", "db.local"), ("PASS", "a=b c")]
        );
        let e = values(&["HOST=x".into()], Some(&file))
            .expect_err("twice")
            .to_string();
        assert!(e.contains("`HOST` is given twice"), "{e}");
        assert!(values(&["novalue".into()], None).is_err());
        assert!(
            values(&[], None)
                .expect_err("none")
                .to_string()
                .contains("KEY=VALUE")
        );
    }
}
