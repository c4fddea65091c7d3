//! Image recipes: an image described as a base and steps (`gantry image build -f
//! recipe.toml`, and what the Python SDK's `Image` produces), built inside the cluster
//! into the embedded registry. Here: the recipe as written, checked where it enters; each
//! step's cache key (the hash of its parent's key and the step, so an unchanged prefix is
//! found again); the shell script a step runs; and the events a build streams.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Steps one recipe holds at most.
pub const MAX_STEPS: usize = 128;

/// Debian releases a `debian_slim` base is made from, by the Python version they ship.
pub const DEBIAN_PYTHONS: [(&str, &str); 2] = [("3.11", "bookworm"), ("3.13", "trixie")];

/// What the image starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Base {
    /// A minimal Debian with that Python (`"3.11"`), pip and CA certificates, made in the
    /// cluster with mmdebstrap once per release and Python version.
    DebianSlim(String),
    /// Any image: a short name in the cluster's registry, or a full reference.
    Image(String),
}

/// One step; each is one layer of the image (or, for `env`, `workdir`, `entrypoint` and
/// `cmd`, a change to its configuration only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Shell commands, run in order with `sh -e` (the first failure fails the step).
    RunCommands(Vec<String>),
    /// Debian packages (`apt-get install --no-install-recommends`).
    AptInstall(Vec<String>),
    /// Python packages (`pip install`), from PyPI or `index_url`.
    PipInstall(PipInstall),
    /// Environment variables of the image (and of the steps after this one).
    Env(BTreeMap<String, String>),
    /// The working directory of the image (and of the steps after this one).
    Workdir(String),
    /// A local file, uploaded by its content's hash, placed at `remote`.
    AddLocalFile(AddLocal),
    /// A local directory and everything in it, uploaded as one archive by its hash,
    /// placed at `remote`.
    AddLocalDir(AddLocal),
    Entrypoint(Vec<String>),
    Cmd(Vec<String>),
}

/// `pip_install = ["six"]` or `pip_install = { packages = ["six"], index_url = "…" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(from = "PipForm", into = "PipForm")]
pub struct PipInstall {
    pub packages: Vec<String>,
    pub index_url: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PipForm {
    List(Vec<String>),
    Table {
        packages: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index_url: Option<String>,
    },
}

impl From<PipForm> for PipInstall {
    fn from(f: PipForm) -> Self {
        match f {
            PipForm::List(packages) => Self {
                packages,
                index_url: None,
            },
            PipForm::Table {
                packages,
                index_url,
            } => Self {
                packages,
                index_url,
            },
        }
    }
}

impl From<PipInstall> for PipForm {
    fn from(p: PipInstall) -> Self {
        match p.index_url {
            None => PipForm::List(p.packages),
            index_url => PipForm::Table {
                packages: p.packages,
                index_url,
            },
        }
    }
}

/// A local file or directory: `local` is where the CLI reads it, `remote` where it goes
/// in the image; `digest` is the uploaded archive's (`sha256:…`), which the CLI fills in
/// and the build needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddLocal {
    pub local: String,
    pub remote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// An image recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub base: Base,
    #[serde(default)]
    pub steps: Vec<Step>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct RecipeError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> RecipeError {
    RecipeError {
        field: field.into(),
        message: message.into(),
    }
}

/// A Debian or Python package name: no spaces or shell characters (they go into a
/// command line). Versions and extras are allowed (`torch==2.4.0`, `uvicorn[standard]`).
fn package_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 256
        && !p.starts_with('-')
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+=<>!~:[],@/".contains(c))
}

/// `'text'` for `sh`, whatever it holds.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

impl Recipe {
    /// Checks what the recipe can get wrong on its own (not whether its base exists).
    /// `uploaded`: whether `add_local_*` steps must carry their digest (the API's view).
    pub fn validate(&self, uploaded: bool) -> Result<(), RecipeError> {
        match &self.base {
            Base::DebianSlim(py) => {
                debian_release(py).map_err(|m| err("base.debian_slim", m))?;
            }
            Base::Image(r) if r.trim().is_empty() || r.chars().any(char::is_whitespace) => {
                return Err(err(
                    "base.image",
                    "an image reference, such as `python:3.11`",
                ));
            }
            Base::Image(_) => {}
        }
        if self.steps.len() > MAX_STEPS {
            return Err(err(
                "steps",
                format!("at most {MAX_STEPS} steps; this has {}", self.steps.len()),
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}]");
            let list_ok = |items: &[String], what: &str| {
                if items.is_empty() {
                    return Err(err(&field, format!("name at least one {what}")));
                }
                match items.iter().find(|p| !package_ok(p)) {
                    Some(bad) => Err(err(
                        &field,
                        format!("`{bad}` is not a {what} name (no spaces or shell characters)"),
                    )),
                    None => Ok(()),
                }
            };
            match step {
                Step::RunCommands(c) if c.is_empty() => {
                    return Err(err(field, "name at least one command"));
                }
                Step::RunCommands(_) => {}
                Step::AptInstall(p) => list_ok(p, "package")?,
                Step::PipInstall(p) => {
                    list_ok(&p.packages, "package")?;
                    if let Some(url) = &p.index_url
                        && !(url.starts_with("http://") || url.starts_with("https://"))
                    {
                        return Err(err(field, "index_url is an http:// or https:// URL"));
                    }
                }
                Step::Env(vars) => {
                    for k in vars.keys() {
                        let ok = !k.is_empty()
                            && !k.starts_with(|c: char| c.is_ascii_digit())
                            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !ok {
                            return Err(err(field, format!("`{k}` is not a variable name")));
                        }
                    }
                }
                Step::Workdir(d) if !d.starts_with('/') => {
                    return Err(err(field, "workdir is an absolute path"));
                }
                Step::Workdir(_) => {}
                Step::AddLocalFile(a) | Step::AddLocalDir(a) => {
                    if !a.remote.starts_with('/')
                        || a.remote.split('/').any(|c| c == "..")
                        || a.remote.chars().any(char::is_control)
                    {
                        return Err(err(
                            field,
                            format!("remote `{}` is an absolute path without `..`", a.remote),
                        ));
                    }
                    if uploaded && !a.digest.as_deref().is_some_and(is_digest) {
                        return Err(err(
                            field,
                            "the local content's `digest` (sha256:…) is missing; `gantry image \
                             build` uploads it and fills it in",
                        ));
                    }
                }
                Step::Entrypoint(_) | Step::Cmd(_) => {}
            }
        }
        Ok(())
    }
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The Debian release that ships Python `py`.
pub fn debian_release(py: &str) -> Result<&'static str, String> {
    DEBIAN_PYTHONS
        .iter()
        .find(|(v, _)| *v == py)
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            let known: Vec<String> = DEBIAN_PYTHONS
                .iter()
                .map(|(v, r)| format!("{v} ({r})"))
                .collect();
            format!(
                "Python `{py}` is not one a Debian release ships; use {}, or base = {{ image = \
                 \"…\" }}",
                known.join(" or ")
            )
        })
}

impl Step {
    /// What it does, in one line: `apt_install curl git`.
    pub fn summary(&self) -> String {
        let list = |name: &str, items: &[String]| format!("{name} {}", items.join(" "));
        match self {
            Step::RunCommands(c) => list("run_commands", c),
            Step::AptInstall(p) => list("apt_install", p),
            Step::PipInstall(p) => list("pip_install", &p.packages),
            Step::Env(v) => format!("env {}", v.keys().cloned().collect::<Vec<_>>().join(" ")),
            Step::Workdir(d) => format!("workdir {d}"),
            Step::AddLocalFile(a) => format!("add_local_file {} → {}", a.local, a.remote),
            Step::AddLocalDir(a) => format!("add_local_dir {} → {}", a.local, a.remote),
            Step::Entrypoint(e) => list("entrypoint", e),
            Step::Cmd(c) => list("cmd", c),
        }
    }

    /// The script a step that runs in a container runs (`sh -e -c`); `None` for steps
    /// that only change the configuration or add uploaded files.
    pub fn script(&self) -> Option<String> {
        let quoted = |items: &[String]| {
            items
                .iter()
                .map(|p| shell_quote(p))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            Step::RunCommands(c) => Some(c.join("\n")),
            Step::AptInstall(p) => Some(format!(
                "export DEBIAN_FRONTEND=noninteractive\napt-get update -q\napt-get install -y -q \
                 --no-install-recommends {}\nrm -rf /var/lib/apt/lists/*",
                quoted(p)
            )),
            Step::PipInstall(p) => Some(format!(
                "python3 -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore{} {}",
                p.index_url
                    .as_ref()
                    .map(|u| format!(" --index-url {}", shell_quote(u)))
                    .unwrap_or_default(),
                quoted(&p.packages)
            )),
            _ => None,
        }
    }

    /// What the cache key covers: the step as the build sees it (an upload by its
    /// digest and destination, not by the local path it came from).
    fn key_text(&self) -> String {
        let mut step = self.clone();
        if let Step::AddLocalFile(a) | Step::AddLocalDir(a) = &mut step {
            a.local.clear();
        }
        serde_json::to_string(&step).unwrap_or_default()
    }
}

/// The cache key of a base from what identifies it: a `debian_slim` base's release and
/// Python, an image's manifest digest (so a tag pushed again is a new base).
pub fn base_key(identity: &str) -> String {
    hex::encode(Sha256::digest(format!("base\n{identity}")))
}

/// The cache key of `step` on top of the image whose key is `parent`.
pub fn step_key(parent: &str, step: &Step) -> String {
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    h.update(b"\n");
    h.update(step.key_text().as_bytes());
    hex::encode(h.finalize())
}

/// One line of a build's progress (`POST /v1/images/builds` streams them as JSON lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum BuildEvent {
    /// Step `index` (0 is the base) of `total` begins: found in the cache, or built
    /// (on `node`, for steps that run).
    Step {
        index: usize,
        total: usize,
        summary: String,
        cached: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// Output of the running step.
    Log { line: String },
    /// The build is done: `image` is the reference to run (`name:tag`), `digest` its
    /// manifest's.
    Done { image: String, digest: String },
    /// The build failed; nothing of the failing step was kept.
    Failed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        message: String,
    },
}

/// One piece of a build an agent runs (`Command::Build`); it answers with
/// [`BuildFrame`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BuildWork {
    /// Run `script` (`sh -e -c`) in a container of `image` (a short name is the cluster
    /// registry's) on the host's network, and send back what it wrote as a layer.
    Step {
        image: String,
        script: String,
        timeout_ms: u64,
    },
    /// Make a minimal Debian `release` root filesystem with mmdebstrap (python3, pip and
    /// CA certificates; pip may install into the system Python), from `mirror` or the
    /// host's apt sources, and send it back as a layer.
    DebianBase {
        release: String,
        mirror: Option<String>,
    },
    /// Pull `reference` from its registry and send its configuration and its layers back
    /// (a base from another registry, copied into the cluster's).
    Import { reference: String },
}

/// What an agent sends back for a [`BuildWork`], as frames: any number of `Log`, then
/// `Layer` followed by the layer's bytes (an uncompressed tar) to the end of the stream,
/// or `Failed`. An import answers `Image`, then for each layer (bottom first) `Sized`
/// followed by exactly that many bytes of its tar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum BuildFrame {
    Log {
        line: String,
    },
    Layer,
    Image {
        entrypoint: Vec<String>,
        cmd: Vec<String>,
        env: Vec<String>,
        workdir: Option<String>,
        user: Option<String>,
        layers: u32,
    },
    Sized {
        bytes: u64,
    },
    Failed {
        exit_code: Option<i32>,
        message: String,
    },
}

/// `POST /v1/images/builds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    pub recipe: Recipe,
    /// What to call the image (`name` or `name:tag`); by default `recipe:<key>`.
    #[serde(default)]
    pub name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(text: &str) -> Recipe {
        toml::from_str(text).expect("recipe parses")
    }

    const EXAMPLE: &str = r#"
base = { debian_slim = "3.11" }
[[steps]]
apt_install = ["curl"]
[[steps]]
pip_install = ["six"]
[[steps]]
run_commands = ["echo built > /built.txt"]
[[steps]]
env = { MODE = "prod" }
"#;

    #[test]
    fn the_issue_example_reads_and_validates() {
        let r = recipe(EXAMPLE);
        assert_eq!(r.base, Base::DebianSlim("3.11".into()));
        assert_eq!(r.steps.len(), 4);
        r.validate(false).expect("valid");
        let pip = recipe(
            "base = { image = \"busybox\" }\n[[steps]]\npip_install = { packages = [\"six\"], index_url = \"https://pypi.org/simple\" }\n",
        );
        let Step::PipInstall(p) = &pip.steps[0] else {
            panic!("pip");
        };
        assert_eq!(p.index_url.as_deref(), Some("https://pypi.org/simple"));
        assert!(
            pip.steps[0]
                .script()
                .expect("script")
                .contains("--index-url 'https://pypi.org/simple' 'six'")
        );
    }

    #[test]
    fn bad_recipes_say_where_and_why() {
        for (text, field) in [
            ("base = { debian_slim = \"2.7\" }", "base.debian_slim"),
            ("base = { image = \"\" }", "base.image"),
            (
                "base = { image = \"b\" }\n[[steps]]\napt_install = [\"curl; rm -rf /\"]",
                "steps[0]",
            ),
            (
                "base = { image = \"b\" }\n[[steps]]\nworkdir = \"app\"",
                "steps[0]",
            ),
            (
                "base = { image = \"b\" }\n[[steps]]\nenv = { \"1X\" = \"v\" }",
                "steps[0]",
            ),
            (
                "base = { image = \"b\" }\n[[steps]]\nadd_local_file = { local = \"a\", remote = \"/x/../../etc\" }",
                "steps[0]",
            ),
        ] {
            let e = recipe(text).validate(false).expect_err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
        // Two actions in one step, or an unknown one, do not parse.
        assert!(
            toml::from_str::<Recipe>(
                "base = { image = \"b\" }\n[[steps]]\ncmd = [\"a\"]\nenv = {}\n"
            )
            .is_err()
        );
        assert!(
            toml::from_str::<Recipe>("base = { image = \"b\" }\n[[steps]]\ncopy = \"x\"\n")
                .is_err()
        );
        // Uploads need their digest once they reach the API.
        let up = recipe(
            "base = { image = \"b\" }\n[[steps]]\nadd_local_file = { local = \"a\", remote = \"/a\" }\n",
        );
        up.validate(false).expect("before upload");
        assert!(up.validate(true).is_err());
    }

    #[test]
    fn keys_chain_so_only_what_changed_is_new() {
        let r = recipe(EXAMPLE);
        let keys = |r: &Recipe| {
            let mut k = base_key(&serde_json::to_string(&r.base).expect("json"));
            let mut out = vec![k.clone()];
            for s in &r.steps {
                k = step_key(&k, s);
                out.push(k.clone());
            }
            out
        };
        let a = keys(&r);
        assert_eq!(a, keys(&r.clone()), "deterministic");
        let mut changed = r.clone();
        changed.steps[3] = Step::Env(BTreeMap::from([("MODE".into(), "dev".into())]));
        let b = keys(&changed);
        assert_eq!(a[..4], b[..4], "the unchanged prefix keeps its keys");
        assert_ne!(a[4], b[4]);
        let mut rebased = r.clone();
        rebased.base = Base::Image("python:3.11".into());
        assert!(keys(&rebased).iter().zip(&a).all(|(x, y)| x != y));
        // An upload is keyed by its content, not where it was read from.
        let add = |local: &str, digest: &str| {
            Step::AddLocalFile(AddLocal {
                local: local.into(),
                remote: "/app/x.py".into(),
                digest: Some(digest.into()),
            })
        };
        let d1 = format!("sha256:{}", "a".repeat(64));
        let d2 = format!("sha256:{}", "b".repeat(64));
        assert_eq!(
            step_key("p", &add("./x.py", &d1)),
            step_key("p", &add("/abs/x.py", &d1))
        );
        assert_ne!(
            step_key("p", &add("./x.py", &d1)),
            step_key("p", &add("./x.py", &d2))
        );
    }

    #[test]
    fn scripts_quote_what_they_are_given() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        let apt = Step::AptInstall(vec!["curl".into()])
            .script()
            .expect("script");
        assert!(
            apt.contains("apt-get install -y -q --no-install-recommends 'curl'"),
            "{apt}"
        );
        assert_eq!(Step::Cmd(vec!["x".into()]).script(), None);
        assert_eq!(
            Step::RunCommands(vec!["a".into(), "b".into()])
                .script()
                .as_deref(),
            Some("a\nb")
        );
    }
}
