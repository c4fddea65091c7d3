//! Pulling from a real registry server on loopback: Debian's `docker-registry`
//! (distribution 2.8), with images built here as OCI layouts and pushed by `skopeo`.
//! Covers gzip and zstd layers, whiteouts and opaque directories, image config, index
//! resolution to linux/amd64, single-flight downloads, basic auth, and every way a pull
//! can fail (digest mismatch, unknown image, unsupported media type, unreachable).

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::TestHost;
use gantry_agent::image::{ImageError, ImageStore, PullConfig, RegistryAuth};
use gantry_agent::runtime::{ContainerRequest, Stream};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A `docker-registry` process on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    addr: String,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

/// How the test registry authenticates.
enum Auth<'a> {
    None,
    /// HTTP basic auth against an htpasswd file.
    Basic(&'a str, &'a str),
    /// Bearer tokens from `TokenServer` (distribution's token auth).
    Token(&'a TokenServer),
}

impl Registry {
    fn start(auth: Auth<'_>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Auth::Token(ts) = auth {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                ts.addr,
                ts.cert_file.display()
            ));
        }
        if let Auth::Basic(user, pass) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
                file.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).expect("write config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry must be installed (apt-get install docker-registry)");
        let reg = Self {
            child,
            addr,
            storage,
            _dir: dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&reg.addr).is_ok() {
                return reg;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("registry on {} did not come up", reg.addr);
    }

    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds an OCI image layout on disk, blob by blob.
struct Layout {
    dir: PathBuf,
}

#[derive(Clone)]
struct Desc {
    media_type: String,
    digest: String,
    size: usize,
}

impl Desc {
    fn json(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

impl Layout {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
        Self {
            dir: dir.to_owned(),
        }
    }

    fn blob(&self, media_type: &str, bytes: &[u8]) -> Desc {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).expect("write blob");
        Desc {
            media_type: media_type.into(),
            digest: format!("sha256:{hex}"),
            size: bytes.len(),
        }
    }

    fn manifest(&self, config: serde_json::Value, layers: &[Desc]) -> Desc {
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).expect("json"),
        );
        let m = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": layers.iter().map(Desc::json).collect::<Vec<_>>(),
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&m).expect("json"),
        )
    }

    /// Writes index.json naming `top` (a manifest or an index) under `tag`.
    fn tag(&self, top: &Desc, tag: &str) {
        let mut d = top.json();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "manifests": [d]});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("json"),
        )
        .expect("write");
    }

    fn push(&self, tag: &str, registry: &Registry, dest: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", self.dir.display()))
            .arg(format!("docker://{}/{dest}", registry.addr))
            .output()
            .expect("skopeo must be installed (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
}

fn tarball(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::File(path, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, path, *data).expect("append");
            }
            Entry::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, path, std::io::empty())
                    .expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn busybox_layer(dir: &Path) -> Vec<u8> {
    let rootfs = common::busybox_rootfs(dir);
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &rootfs).expect("tar rootfs");
    gzip(&b.into_inner().expect("tar"))
}

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The test image: busybox, a gzip layer with files, a zstd layer with a whiteout and an
/// opaque directory, and a config with env, workdir, user and cmd.
fn build_test_image(layout: &Layout, work: &Path) -> Desc {
    let base = layout.blob(GZ, &busybox_layer(work));
    let lower = layout.blob(
        GZ,
        &gzip(&tarball(&[
            Entry::Dir("data"),
            Entry::File("data/keep.txt", b"keep"),
            Entry::File("data/remove.txt", b"remove"),
            Entry::Dir("opaque"),
            Entry::File("opaque/old.txt", b"old"),
        ])),
    );
    let upper_tar = tarball(&[
        Entry::File("data/.wh.remove.txt", b""),
        Entry::File("data/added.txt", b"added"),
        Entry::File("opaque/.wh..wh..opq", b""),
        Entry::File("opaque/new.txt", b"new"),
    ]);
    let upper = layout.blob(ZSTD, &zstd::encode_all(&upper_tar[..], 3).expect("zstd"));
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=from-registry"],
            "WorkingDir": "/data",
            "User": "user",
            "Cmd": ["sh", "-c", "ls /data; ls /opaque; echo $GREETING; pwd; id -u"],
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    layout.manifest(config, &[base, lower, upper])
}

fn fresh_store(dir: &Path) -> ImageStore {
    let store = gantry_agent::store::LocalStore::open(&dir.join("db")).expect("store");
    ImageStore::open(&dir.join("images"), &store, PullConfig::default()).expect("images")
}

fn layer_count(images_dir: &Path) -> usize {
    std::fs::read_dir(images_dir.join("layers/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_and_run_an_image_with_whiteouts_zstd_and_config() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let manifest = build_test_image(&layout, work.path());
    // An index with an arm64 variant first: the pull must pick linux/amd64.
    let arm = layout.manifest(
        json!({"architecture": "arm64", "os": "linux", "config": {}}),
        &[layout.blob(GZ, &gzip(&tarball(&[Entry::File("arm", b"arm")])))],
    );
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": arm.media_type, "digest": arm.digest, "size": arm.size, "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": manifest.media_type, "digest": manifest.digest, "size": manifest.size, "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    });
    let index = layout.blob(
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).expect("json"),
    );
    layout.tag(&index, "v1");
    layout.push("v1", &registry, "team/tool:v1", None);

    let h = TestHost::new().await;
    let reference = format!("{}/team/tool:v1", registry.addr);
    let rec = h
        .images
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("pull");
    assert_eq!(
        rec.digest, manifest.digest,
        "resolved the amd64 manifest from the index"
    );
    assert_eq!(rec.layers.len(), 3);
    assert_eq!(rec.config.user.as_deref(), Some("user"));

    let id = h
        .runtime
        .start(ContainerRequest::new(reference.as_str()))
        .await
        .expect("start")
        .id;
    let exit = h.runtime.wait(&id).await.expect("wait");
    let out =
        String::from_utf8_lossy(&h.runtime.logs(&id, Stream::Stdout).expect("logs")).into_owned();
    let err =
        String::from_utf8_lossy(&h.runtime.logs(&id, Stream::Stderr).expect("logs")).into_owned();
    assert_eq!(exit.code(), 0, "{err}");
    // remove.txt is whited out, old.txt hidden by the opaque directory.
    assert_eq!(
        out,
        "added.txt\nkeep.txt\nnew.txt\nfrom-registry\n/data\n1000\n"
    );

    // Pulling again downloads nothing: the layers are cached by digest.
    let before = h.images.downloads();
    h.images
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .expect("second pull");
    assert_eq!(h.images.downloads(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_of_one_image_download_each_layer_once() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let manifest = build_test_image(&layout, work.path());
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "team/same:v1", None);
    let store = fresh_store(work.path());
    let reference = format!("{}/team/same:v1", registry.addr);
    let (a, b) = tokio::join!(
        store.pull(&reference, &RegistryAuth::Anonymous),
        store.pull(&reference, &RegistryAuth::Anonymous)
    );
    assert_eq!(a.expect("pull a").layers, b.expect("pull b").layers);
    assert_eq!(store.downloads(), 3, "three layers, each downloaded once");
    assert_eq!(layer_count(&work.path().join("images")), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_layer_is_rejected_and_nothing_is_stored() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let layer = layout.blob(
        GZ,
        &gzip(&tarball(&[Entry::File("payload.bin", &[7u8; 4096])])),
    );
    let manifest = layout.manifest(
        json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]}}),
        std::slice::from_ref(&layer),
    );
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "team/corrupt:v1", None);
    // Tamper with the blob on the registry's disk (same length, different bytes).
    let data = registry.blob_data(&layer.digest);
    let mut bytes = std::fs::read(&data).expect("registry blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).expect("tamper");

    let store = fresh_store(work.path());
    let reference = format!("{}/team/corrupt:v1", registry.addr);
    let err = store
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("digest mismatch");
    assert!(
        matches!(err, ImageError::DigestMismatch { ref digest, .. } if *digest == layer.digest),
        "{err}"
    );
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    assert_eq!(
        layer_count(&work.path().join("images")),
        0,
        "no layer stored"
    );
    assert!(store.list().expect("list").is_empty(), "no image recorded");
    let tmp: Vec<_> = std::fs::read_dir(work.path().join("images/tmp"))
        .expect("tmp")
        .collect();
    assert!(tmp.is_empty(), "no temp files left: {tmp:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_media_types_unknown_images_and_dead_registries_fail_clearly() {
    let registry = Registry::start(Auth::None);
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let odd = layout.blob(
        "application/vnd.example.layer.v1.tar+bzip2",
        b"BZh91AY&SY not really",
    );
    let manifest = layout.manifest(
        json!({"architecture": "amd64", "os": "linux", "config": {}}),
        std::slice::from_ref(&odd),
    );
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "team/odd:v1", None);
    let store = fresh_store(work.path());

    let err = store
        .pull(
            &format!("{}/team/odd:v1", registry.addr),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect_err("bzip2");
    assert!(
        matches!(err, ImageError::UnsupportedMediaType { ref media_type, .. } if media_type.contains("bzip2")),
        "{err}"
    );
    assert_eq!(store.downloads(), 0, "refused before downloading");

    let err = store
        .pull(
            &format!("{}/team/missing:v1", registry.addr),
            &RegistryAuth::Anonymous,
        )
        .await
        .expect_err("unknown");
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");

    // Nothing listens on port 1 of loopback.
    let err = store
        .pull("127.0.0.1:1/team/x:v1", &RegistryAuth::Anonymous)
        .await
        .expect_err("unreachable");
    assert!(err.to_string().contains("cannot reach registry"), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("connect"),
        "names the cause: {err}"
    );

    let err = store
        .pull("not a reference!", &RegistryAuth::Anonymous)
        .await
        .expect_err("bad ref");
    assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
    assert_eq!(layer_count(&work.path().join("images")), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_registries_need_credentials() {
    let registry = Registry::start(Auth::Basic("gantry", "s3cret"));
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let layer = layout.blob(GZ, &gzip(&tarball(&[Entry::File("hello.txt", b"hi")])));
    let manifest = layout.manifest(
        json!({"architecture": "amd64", "os": "linux", "config": {}}),
        &[layer],
    );
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "private/img:v1", Some("gantry:s3cret"));
    let store = fresh_store(work.path());
    let reference = format!("{}/private/img:v1", registry.addr);

    let err = store
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("anonymous refused");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("--username"), "{err}");
    let err = store
        .pull(
            &reference,
            &RegistryAuth::Basic("gantry".into(), "wrong".into()),
        )
        .await
        .expect_err("bad password");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");

    let rec = store
        .pull(
            &reference,
            &RegistryAuth::Basic("gantry".into(), "s3cret".into()),
        )
        .await
        .expect("pull with credentials");
    assert_eq!(rec.layers.len(), 1);
}

const SERVICE: &str = "gantry-test-registry";
const ISSUER: &str = "gantry-test-issuer";

/// A Docker-style token server on loopback, as registries behind Docker Hub-style auth
/// use: it checks basic credentials and answers with an ES256 JWT whose `x5c` header
/// carries the signing certificate, which the registry trusts through `rootcertbundle`.
struct TokenServer {
    addr: String,
    cert_file: PathBuf,
    key: jsonwebtoken::EncodingKey,
    cert_b64: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    fn start(user: &'static str, pass: &'static str) -> Self {
        use base64::Engine;
        let dir = tempfile::tempdir().expect("tempdir");
        let certified = rcgen::generate_simple_self_signed(vec![ISSUER.to_owned()]).expect("cert");
        let cert_file = dir.path().join("token-ca.pem");
        std::fs::write(&cert_file, certified.cert.pem()).expect("write cert");
        let key = jsonwebtoken::EncodingKey::from_ec_pem(
            certified.signing_key.serialize_pem().as_bytes(),
        )
        .expect("ec key");
        let cert_b64 = base64::engine::general_purpose::STANDARD.encode(certified.cert.der());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut server = Self {
            addr,
            cert_file,
            key,
            cert_b64,
            stop,
            thread: None,
            _dir: dir,
        };
        let (key, cert_b64, stop) = (
            server.key.clone(),
            server.cert_b64.clone(),
            server.stop.clone(),
        );
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        server.thread = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut conn, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let authorized = req.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("authorization") && v.trim() == expected
                    })
                });
                let response = if authorized {
                    let token = issue(&key, &cert_b64, &scopes(&req));
                    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = conn.write_all(response.as_bytes());
            }
        }));
        server
    }

    /// A token granting `actions` on `repo`, as the server would issue it.
    fn token_for(&self, repo: &str, actions: &[&str]) -> String {
        issue(
            &self.key,
            &self.cert_b64,
            &[(
                repo.to_owned(),
                actions.iter().map(|a| a.to_string()).collect(),
            )],
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `scope=repository:NAME:ACTIONS` parameters of a token request (percent-decoded).
fn scopes(request: &str) -> Vec<(String, Vec<String>)> {
    let target = request.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .map(|v| {
            v.replace("%3A", ":")
                .replace("%3a", ":")
                .replace("%2F", "/")
                .replace("%2f", "/")
                .replace("%2C", ",")
                .replace("%2c", ",")
                .replace('+', " ")
        })
        .flat_map(|v| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            (kind == "repository").then(|| {
                (
                    name.to_owned(),
                    actions.split(',').map(str::to_owned).collect(),
                )
            })
        })
        .collect()
}

fn issue(
    key: &jsonwebtoken::EncodingKey,
    cert_b64: &str,
    access: &[(String, Vec<String>)],
) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![cert_b64.to_owned()]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = json!({
        "iss": ISSUER, "sub": "gantry", "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access.iter().map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions})).collect::<Vec<_>>(),
    });
    jsonwebtoken::encode(&header, &claims, key).expect("sign token")
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_registries_work_through_the_token_exchange_and_with_a_token() {
    let tokens = TokenServer::start("gantry", "s3cret");
    let registry = Registry::start(Auth::Token(&tokens));
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let layer = layout.blob(GZ, &gzip(&tarball(&[Entry::File("hello.txt", b"hi")])));
    let manifest = layout.manifest(
        json!({"architecture": "amd64", "os": "linux", "config": {}}),
        &[layer],
    );
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "secure/img:v1", Some("gantry:s3cret"));
    let reference = format!("{}/secure/img:v1", registry.addr);

    // No credentials: the token server refuses, so the registry does too.
    let store = fresh_store(&work.path().join("a"));
    let err = store
        .pull(&reference, &RegistryAuth::Anonymous)
        .await
        .expect_err("anonymous refused");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    // Credentials exchanged for a bearer token at the registry's realm.
    let rec = store
        .pull(
            &reference,
            &RegistryAuth::Basic("gantry".into(), "s3cret".into()),
        )
        .await
        .expect("pull via token exchange");
    assert_eq!(rec.digest, manifest.digest);
    // A bearer token obtained out of band.
    let store = fresh_store(&work.path().join("b"));
    let token = tokens.token_for("secure/img", &["pull"]);
    let rec = store
        .pull(&reference, &RegistryAuth::Bearer(token))
        .await
        .expect("pull with a bearer token");
    assert_eq!(rec.digest, manifest.digest);
    // A token for another repository does not open this one.
    let store = fresh_store(&work.path().join("c"));
    let wrong = tokens.token_for("other/img", &["pull"]);
    let err = store
        .pull(&reference, &RegistryAuth::Bearer(wrong))
        .await
        .expect_err("wrong scope");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
}

#[test]
fn operator_commands_pull_list_and_run_a_registry_image() {
    let registry = Registry::start(Auth::Basic("gantry", "s3cret"));
    let work = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(&work.path().join("layout"));
    let manifest = build_test_image(&layout, work.path());
    layout.tag(&manifest, "v1");
    layout.push("v1", &registry, "team/cli:v1", Some("gantry:s3cret"));
    let state = work.path().join("state");
    let agent = |args: &[&str]| {
        Command::new(common::AGENT)
            .env("GANTRY_STATE_DIR", &state)
            .env_remove("GANTRY_REGISTRY_PASSWORD")
            .args(args)
            .output()
            .expect("gantry-agent")
    };
    let reference = format!("{}/team/cli:v1", registry.addr);
    let denied = agent(&["image", "pull", &reference]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("registry refused access"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let pulled = agent(&[
        "image",
        "pull",
        &reference,
        "--username",
        "gantry",
        "--password",
        "s3cret",
    ]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert!(String::from_utf8_lossy(&pulled.stdout).contains(&manifest.digest));
    let list = agent(&["image", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(&reference),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let run = agent(&["run", "--image", &reference]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "added.txt\nkeep.txt\nnew.txt\nfrom-registry\n/data\n1000\n"
    );
}
