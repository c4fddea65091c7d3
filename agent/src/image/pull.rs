//! Pulling images from OCI/Docker registries with `oci-client`: manifest lists resolved to
//! linux/amd64, layers downloaded once per digest (single flight), digests verified by the
//! client before anything is unpacked into the cache.

use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, linux_amd64_resolver,
};
use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::{Client, Reference};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use super::{Compression, ImageConfig, ImageError, ImageRecord, ImageStore, unix_now};

pub use oci_client::secrets::RegistryAuth;

/// How the agent talks to registries.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Registries (`host:port`) spoken to over plain HTTP. Loopback registries
    /// (`localhost`, `127.x.x.x`, `[::1]`) always are, as Docker does.
    pub insecure_registries: Vec<String>,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// CA certificates trusted for registries over HTTPS besides the system's roots: the
    /// cluster CA (the embedded registry's certificate may come from it) and
    /// `registry.ca_file`.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            max_concurrent_downloads: 3,
            extra_roots: Vec::new(),
        }
    }
}

/// How a pull speaks to its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HTTPS, except loopback registries and `insecure_registries` (plain HTTP), as
    /// Docker does.
    Auto,
    /// Plain HTTP: the embedded registry of a coordinator that serves no TLS.
    Http,
    /// HTTPS even on loopback: the embedded registry of a coordinator that serves TLS.
    Https,
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// The registries a client for `registry` speaks plain HTTP to.
fn plain_http(cfg: &PullConfig, registry: &str, scheme: Scheme) -> Vec<String> {
    let mut insecure = cfg.insecure_registries.clone();
    insecure.retain(|r| scheme != Scheme::Https || r != registry);
    let plain = match scheme {
        Scheme::Auto => is_loopback(registry),
        Scheme::Http => true,
        Scheme::Https => false,
    };
    if plain {
        insecure.push(registry.to_owned());
    }
    insecure
}

/// A CA file for registries could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use {} (`registry.ca_file`) as CA certificates for registries: {reason}", path.display())]
pub struct CaFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// The certificates in a PEM file (`registry.ca_file`), to trust for registries.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let bad = |reason: String| CaFileError {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let roots = pem_roots(&pem).map_err(bad)?;
    if roots.is_empty() {
        return Err(bad("no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(roots)
}

/// The certificates in PEM text.
pub fn pem_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))
}

/// The parts of an OCI image config file Gantry uses.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

impl From<Option<RunConfig>> for ImageConfig {
    fn from(c: Option<RunConfig>) -> Self {
        let Some(c) = c else {
            return ImageConfig::default();
        };
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            workdir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
        }
    }
}

impl ImageStore {
    fn client(&self, registry: &str, scheme: Scheme) -> Client {
        let cfg = &self.inner.pull;
        // DER was parsed when the roots were read: the client cannot fail on them (and
        // would fall back to a default configuration if it did).
        let extra_root_certificates = cfg
            .extra_roots
            .iter()
            .map(|der| Certificate {
                encoding: CertificateEncoding::Der,
                data: der.to_vec(),
            })
            .collect();
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http(cfg, registry, scheme)),
            extra_root_certificates,
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            max_concurrent_download: cfg.max_concurrent_downloads.max(1),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        })
    }

    /// `reference` parsed, and a client for its registry.
    fn client_for(
        &self,
        reference: &str,
        scheme: Scheme,
    ) -> Result<(Reference, Client), ImageError> {
        let image: Reference =
            reference
                .parse()
                .map_err(|e: oci_client::ParseError| ImageError::BadReference {
                    reference: reference.to_owned(),
                    reason: e.to_string(),
                })?;
        let client = self.client(image.resolve_registry(), scheme);
        Ok((image, client))
    }

    /// Pulls `reference` and records it under its full name (`registry/repo:tag`).
    pub async fn pull(
        &self,
        reference: &str,
        auth: &RegistryAuth,
    ) -> Result<ImageRecord, ImageError> {
        self.pull_from(reference, auth, Scheme::Auto).await
    }

    /// [`ImageStore::pull`] with the scheme given: the cluster's embedded registry is
    /// spoken to as the coordinator says it serves it.
    pub async fn pull_from(
        &self,
        reference: &str,
        auth: &RegistryAuth,
        scheme: Scheme,
    ) -> Result<ImageRecord, ImageError> {
        let (image, client) = self.client_for(reference, scheme)?;
        let registry_err = |e: OciDistributionError| registry_error(reference, e);
        let (manifest, digest, config) = client
            .pull_manifest_and_config(&image, auth)
            .await
            .map_err(registry_err)?;
        let config: ConfigFile =
            serde_json::from_str(&config).map_err(|source| ImageError::BadConfig {
                reference: reference.to_owned(),
                source,
            })?;
        // Refuse unsupported layers before downloading anything.
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                Compression::from_media_type(&l.media_type)
                    .map(|c| (l.clone(), c))
                    .ok_or_else(|| ImageError::UnsupportedMediaType {
                        reference: reference.to_owned(),
                        digest: l.digest.clone(),
                        media_type: l.media_type.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Owned per-layer futures: borrowing closures here would not be provably `Send`
        // for every lifetime when the pull runs inside a spawned task.
        futures_util::stream::iter(layers.into_iter().map(|(layer, compression)| {
            let (this, client, image, reference) = (
                self.clone(),
                client.clone(),
                image.clone(),
                reference.to_owned(),
            );
            async move {
                this.fetch_layer(&client, &image, &reference, &layer, compression)
                    .await
            }
        }))
        .buffer_unordered(self.inner.pull.max_concurrent_downloads.max(1))
        .try_collect::<Vec<()>>()
        .await?;
        let rec = ImageRecord {
            name: image.whole(),
            digest,
            source: reference.to_owned(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            config: config.config.into(),
            created: unix_now(),
        };
        self.put_record(&rec)?;
        Ok(rec)
    }

    /// Streams blob `digest` from the registry and repository `reference` names
    /// (`host:port/repo`; every repository of the embedded registry reaches every blob)
    /// into `out`; the client checks the bytes against the digest as they come. A blob the
    /// registry does not have is [`ImageError::BlobNotFound`].
    pub async fn pull_blob_from<W: tokio::io::AsyncWrite + Send>(
        &self,
        reference: &str,
        auth: &RegistryAuth,
        scheme: Scheme,
        digest: &str,
        out: W,
    ) -> Result<(), ImageError> {
        let (image, client) = self.client_for(reference, scheme)?;
        client
            .auth(&image, auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| registry_error(reference, e))?;
        client
            .pull_blob(&image, digest, out)
            .await
            .map_err(|e| match e {
                OciDistributionError::RegistryError { ref envelope, .. }
                    if has_code(envelope, &[OciErrorCode::BlobUnknown]) =>
                {
                    ImageError::BlobNotFound {
                        reference: reference.to_owned(),
                        digest: digest.to_owned(),
                    }
                }
                OciDistributionError::DigestError(DigestError::VerificationError {
                    actual,
                    ..
                }) => ImageError::DigestMismatch {
                    reference: reference.to_owned(),
                    digest: digest.to_owned(),
                    actual,
                },
                e => registry_error(reference, e),
            })
    }

    async fn fetch_layer(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        layer: &oci_client::manifest::OciDescriptor,
        compression: Compression,
    ) -> Result<(), ImageError> {
        let dest = self.layer_dir(&layer.digest)?;
        let lock = self.layer_lock(&layer.digest);
        let _guard = lock.lock().await;
        if dest.is_dir() {
            return Ok(());
        }
        let blob: PathBuf = self.tmp_path("blob");
        let result = async {
            let file = tokio::fs::File::create(&blob)
                .await
                .map_err(|source| ImageError::Io {
                    path: blob.clone(),
                    source,
                })?;
            let mut out = tokio::io::BufWriter::new(file);
            self.inner
                .downloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            client
                .pull_blob(image, layer, &mut out)
                .await
                .map_err(|e| match e {
                    OciDistributionError::DigestError(DigestError::VerificationError {
                        actual,
                        ..
                    }) => ImageError::DigestMismatch {
                        reference: reference.to_owned(),
                        digest: layer.digest.clone(),
                        actual,
                    },
                    e => registry_error(reference, e),
                })?;
            self.install_layer(&layer.digest, blob.clone(), compression)
                .await
        }
        .await;
        let _ = tokio::fs::remove_file(&blob).await;
        result
    }
}

fn has_code(envelope: &OciEnvelope, codes: &[OciErrorCode]) -> bool {
    envelope.errors.iter().any(|e| codes.contains(&e.code))
}

fn registry_error(reference: &str, e: OciDistributionError) -> ImageError {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound {
            name: reference.to_owned(),
        },
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => ImageError::Unauthorized {
            reference: reference.to_owned(),
            message: e.to_string(),
        },
        OciDistributionError::RegistryError { ref envelope, .. }
            if has_code(
                envelope,
                &[OciErrorCode::Unauthorized, OciErrorCode::Denied],
            ) =>
        {
            ImageError::Unauthorized {
                reference: reference.to_owned(),
                message: e.to_string(),
            }
        }
        OciDistributionError::RegistryError { ref envelope, .. }
            if has_code(
                envelope,
                &[OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown],
            ) =>
        {
            ImageError::NotFound {
                name: reference.to_owned(),
            }
        }
        e => {
            // reqwest hides the root cause (connection refused, DNS) in its source chain.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            ImageError::Registry {
                reference: reference.to_owned(),
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("registry.example.com:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn the_scheme_decides_plain_http() {
        let cfg = PullConfig {
            insecure_registries: vec!["10.0.0.9:5000".into()],
            ..PullConfig::default()
        };
        let plain =
            |registry, scheme| plain_http(&cfg, registry, scheme).contains(&registry.to_owned());
        assert!(plain("127.0.0.1:7080", Scheme::Auto), "loopback, as Docker");
        assert!(!plain("registry.example:443", Scheme::Auto));
        assert!(plain("10.0.0.9:5000", Scheme::Auto), "listed insecure");
        assert!(
            plain("10.0.0.1:7080", Scheme::Http),
            "a plain embedded registry"
        );
        // A coordinator serving TLS is spoken HTTPS to, on loopback or listed alike.
        assert!(!plain("127.0.0.1:7080", Scheme::Https));
        assert!(!plain("10.0.0.9:5000", Scheme::Https));
    }

    #[test]
    fn roots_are_read_from_pem_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".to_owned()]).expect("ca");
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem().repeat(2)).expect("write");
        assert_eq!(read_roots(&good).expect("roots").len(), 2);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").expect("write");
        for path in [empty, dir.path().join("missing.pem")] {
            let e = read_roots(&path).expect_err("refused").to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("`registry.ca_file`"), "{e}");
        }
    }

    #[test]
    fn image_config_is_extracted() {
        let json = r#"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=b"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000"}}"#;
        let c: ConfigFile = serde_json::from_str(json).expect("parse");
        let c: ImageConfig = c.config.into();
        assert_eq!(c.cmd, vec!["sh"]);
        assert_eq!(c.env, vec!["PATH=/bin", "A=b"]);
        assert_eq!(c.workdir.as_deref(), Some("/w"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert!(c.entrypoint.is_empty());
    }
}
