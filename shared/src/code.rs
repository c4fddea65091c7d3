//! Code mounts: a function's files, named by the hash of their content, that the agent
//! mounts read-only into its containers so code reaches them without a network or a new
//! image. The client uploads each file as a blob to the cluster's embedded registry and
//! lists it in the manifest by path and digest; here are those lists, their checks, and
//! the key a mount's tree is cached under on agents.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::volumes::{MountPath, VolumeMounts, string_newtype};

/// Code mounts one function has at most.
pub const MAX_MOUNTS: usize = 8;
/// Files one function's code mounts list at most, together.
pub const MAX_FILES: usize = 20_000;
/// The longest path of a file inside its mount, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("digest `{0}` is not valid: it must be `sha256:` and 64 lowercase hex digits")]
    BadDigest(String),
    #[error("file path `{path}` is not valid: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("at most {MAX_MOUNTS} code mounts per function; this has {0}")]
    TooManyMounts(usize),
    #[error("at most {MAX_FILES} files per function in its code mounts; this lists {0}")]
    TooManyFiles(usize),
    #[error("two code mounts at {0}; put their files in one")]
    DuplicateMount(String),
    #[error("{0} is both a volume's and a code mount's path; mount one of them elsewhere")]
    MountIsVolume(String),
    #[error("the code mount at {mount} lists `{path}` twice")]
    DuplicateFile { mount: String, path: String },
    #[error(
        "the code mount at {mount} lists `{path}` as a file and as a directory of another \
         file; rename one of them"
    )]
    FileIsDirectory { mount: String, path: String },
}

/// A blob's digest: `sha256:` and 64 lowercase hex digits, checked where it enters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobDigest(String);

impl BlobDigest {
    pub fn new(digest: impl Into<String>) -> Result<Self, CodeError> {
        let digest = digest.into();
        let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        match ok {
            true => Ok(Self(digest)),
            false => Err(CodeError::BadDigest(digest)),
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits alone (a blob's file name).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

string_newtype!(BlobDigest, CodeError);

/// A file's path inside its mount: relative, plain non-empty components joined by `/`
/// (no `.`, no `..`, no NUL), at most [`MAX_PATH_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CodePath(String);

impl CodePath {
    pub fn new(path: impl Into<String>) -> Result<Self, CodeError> {
        let path = path.into();
        let bad = |why| CodeError::BadPath {
            path: path.clone(),
            why,
        };
        if path.is_empty() || path.len() > MAX_PATH_BYTES {
            return Err(bad("it must have 1 to 4096 bytes"));
        }
        if path.contains('\0') {
            return Err(bad("it must not contain NUL"));
        }
        if path.starts_with('/') {
            return Err(bad(
                "it must be relative to the mount, such as `app/main.py`",
            ));
        }
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("no empty, `.` or `..` components and no trailing `/`"));
        }
        Ok(Self(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its directories, outermost first (`a/b/c` → `a`, `a/b`).
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(move |(i, _)| &self.0[..i])
    }
}

string_newtype!(CodePath, CodeError);

/// One file of a code mount: where it goes and the blob that holds its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeFile {
    /// Relative to the mount (`pkg/main.py`).
    #[schema(value_type = String)]
    pub path: CodePath,
    /// The blob's digest in the cluster's registry (`sha256:…`).
    #[schema(value_type = String)]
    pub digest: BlobDigest,
    /// Mode 0555 instead of 0444.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
}

/// A directory tree of files mounted read-only at `path` in each container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeMount {
    /// Where it appears in the container (absolute; as a volume's mount path).
    #[schema(value_type = String)]
    pub path: MountPath,
    pub files: Vec<CodeFile>,
}

impl CodeMount {
    /// The key its tree is cached under: SHA-256 (hex) over its files sorted by path, each
    /// as path, digest and executable bit. The same files give the same key wherever they
    /// are mounted and in whatever order they are listed.
    pub fn key(&self) -> String {
        let mut files: Vec<&CodeFile> = self.files.iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut h = Sha256::new();
        h.update(b"gantry-code-tree/1\n");
        for f in files {
            // A path holds no NUL, so the fields cannot run into each other.
            h.update(f.path.as_str().as_bytes());
            h.update(b"\0");
            h.update(f.digest.as_str().as_bytes());
            h.update(if f.executable { b"\0x\n" } else { b"\0-\n" });
        }
        hex::encode(h.finalize())
    }

    /// The distinct blobs its files name.
    pub fn digests(&self) -> BTreeSet<&BlobDigest> {
        self.files.iter().map(|f| &f.digest).collect()
    }

    /// Its files' paths are each listed once, and none is a directory of another.
    fn check_files(&self) -> Result<(), CodeError> {
        let mount = || self.path.as_str().to_owned();
        let mut files = HashSet::with_capacity(self.files.len());
        let mut dirs = HashSet::new();
        for f in &self.files {
            if !files.insert(f.path.as_str()) {
                return Err(CodeError::DuplicateFile {
                    mount: mount(),
                    path: f.path.to_string(),
                });
            }
            dirs.extend(f.path.parents());
        }
        if let Some(path) = files.iter().find(|p| dirs.contains(*p)) {
            return Err(CodeError::FileIsDirectory {
                mount: mount(),
                path: (*path).to_owned(),
            });
        }
        Ok(())
    }
}

/// Checks a function's code mounts: how many, where (not twice, not where one of its
/// `volumes` is) and their files.
pub fn check_mounts(mounts: &[CodeMount], volumes: &VolumeMounts) -> Result<(), CodeError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(CodeError::TooManyMounts(mounts.len()));
    }
    let files: usize = mounts.iter().map(|m| m.files.len()).sum();
    if files > MAX_FILES {
        return Err(CodeError::TooManyFiles(files));
    }
    let mut paths = HashSet::new();
    for m in mounts {
        if !paths.insert(&m.path) {
            return Err(CodeError::DuplicateMount(m.path.as_str().to_owned()));
        }
        if volumes.contains_key(&m.path) {
            return Err(CodeError::MountIsVolume(m.path.as_str().to_owned()));
        }
        m.check_files()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> BlobDigest {
        BlobDigest::new(format!("sha256:{}", c.to_string().repeat(64))).expect("digest")
    }

    fn file(path: &str, c: char, executable: bool) -> CodeFile {
        CodeFile {
            path: CodePath::new(path).expect("path"),
            digest: digest(c),
            executable,
        }
    }

    fn mount(path: &str, files: Vec<CodeFile>) -> CodeMount {
        CodeMount {
            path: MountPath::new(path).expect("mount path"),
            files,
        }
    }

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        assert!(BlobDigest::new(format!("sha256:{}", "0a".repeat(32))).is_ok());
        for bad in [
            String::new(),
            "sha256:".into(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}g", "a".repeat(63)),
        ] {
            assert!(BlobDigest::new(bad.clone()).is_err(), "{bad}");
        }
        let d = BlobDigest::of(b"hello\n");
        assert_eq!(
            d.hex(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn file_paths_are_relative_plain_components() {
        for ok in ["a", "a/b.py", "pkg/sub/__init__.py", ".hidden", "a..b"] {
            assert!(CodePath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "../x", "a/../b", "./a", "a//b", "a/", "a/.", "a\0b",
        ] {
            let e = CodePath::new(bad).expect_err(bad);
            assert!(matches!(e, CodeError::BadPath { .. }), "{bad}: {e}");
        }
        assert!(CodePath::new("a".repeat(MAX_PATH_BYTES)).is_ok());
        assert!(CodePath::new("a".repeat(MAX_PATH_BYTES + 1)).is_err());
        let p = CodePath::new("a/b/c.py").expect("path");
        assert_eq!(p.parents().collect::<Vec<_>>(), ["a", "a/b"]);
    }

    #[test]
    fn the_key_is_the_sorted_content_not_the_order_or_place() {
        let a = mount(
            "/root",
            vec![file("a.py", 'a', false), file("b/c", 'b', true)],
        );
        let b = mount(
            "/opt",
            vec![file("b/c", 'b', true), file("a.py", 'a', false)],
        );
        assert_eq!(a.key(), b.key());
        assert_eq!(a.key().len(), 64);
        let exec = mount(
            "/root",
            vec![file("a.py", 'a', true), file("b/c", 'b', true)],
        );
        assert_ne!(a.key(), exec.key());
        let renamed = mount(
            "/root",
            vec![file("a2.py", 'a', false), file("b/c", 'b', true)],
        );
        assert_ne!(a.key(), renamed.key());
        let other = mount(
            "/root",
            vec![file("a.py", 'c', false), file("b/c", 'b', true)],
        );
        assert_ne!(a.key(), other.key());
    }

    #[test]
    fn mounts_are_checked() {
        let none = VolumeMounts::new();
        let ok = vec![
            mount(
                "/root",
                vec![file("app.py", 'a', false), file("pkg/m.py", 'b', false)],
            ),
            mount("/opt/code", vec![file("bin/run", 'c', true)]),
        ];
        assert_eq!(check_mounts(&ok, &none), Ok(()));

        let many: Vec<_> = (0..=MAX_MOUNTS)
            .map(|i| mount(&format!("/m{i}"), vec![]))
            .collect();
        assert_eq!(
            check_mounts(&many, &none),
            Err(CodeError::TooManyMounts(MAX_MOUNTS + 1))
        );

        let files: Vec<_> = (0..=MAX_FILES)
            .map(|i| file(&format!("f{i}"), 'a', false))
            .collect();
        let big = vec![mount("/root", files)];
        assert_eq!(
            check_mounts(&big, &none),
            Err(CodeError::TooManyFiles(MAX_FILES + 1))
        );

        let twice = vec![mount("/root", vec![]), mount("/root", vec![])];
        assert!(matches!(
            check_mounts(&twice, &none),
            Err(CodeError::DuplicateMount(p)) if p == "/root"
        ));

        let volumes: VolumeMounts = toml::from_str("\"/root\" = \"v\"\n").expect("volumes");
        assert!(matches!(
            check_mounts(&[mount("/root", vec![])], &volumes),
            Err(CodeError::MountIsVolume(p)) if p == "/root"
        ));

        let dup = vec![mount(
            "/root",
            vec![file("a", 'a', false), file("a", 'b', false)],
        )];
        assert!(matches!(
            check_mounts(&dup, &none),
            Err(CodeError::DuplicateFile { path, .. }) if path == "a"
        ));

        let dir = vec![mount(
            "/root",
            vec![
                file("a", 'a', false),
                file("a-b", 'a', false),
                file("a/c", 'b', false),
            ],
        )];
        assert!(matches!(
            check_mounts(&dir, &none),
            Err(CodeError::FileIsDirectory { path, .. }) if path == "a"
        ));
        // The same path in two mounts is two files.
        let apart = vec![
            mount("/root", vec![file("a", 'a', false)]),
            mount("/opt", vec![file("a/b", 'a', false)]),
        ];
        assert_eq!(check_mounts(&apart, &none), Ok(()));
    }

    #[test]
    fn the_json_shape_parses_at_the_edge() {
        let json = format!(
            r#"[{{"path": "/root", "files": [{{"path": "app.py", "digest": "{}"}},
                {{"path": "bin/run", "digest": "{}", "executable": true}}]}}]"#,
            digest('a'),
            digest('b')
        );
        let mounts: Vec<CodeMount> = serde_json::from_str(&json).expect("parses");
        assert_eq!(mounts[0].files.len(), 2);
        assert!(!mounts[0].files[0].executable && mounts[0].files[1].executable);
        let back = serde_json::to_value(&mounts[0].files[0]).expect("json");
        assert!(
            back.get("executable").is_none(),
            "false is left out: {back}"
        );
        let bad = json.replace("app.py", "../x");
        let e = serde_json::from_str::<Vec<CodeMount>>(&bad).expect_err("refused");
        assert!(e.to_string().contains("`../x`"), "{e}");
        let unknown = json.replace("\"executable\"", "\"mode\"");
        assert!(serde_json::from_str::<Vec<CodeMount>>(&unknown).is_err());
    }
}
