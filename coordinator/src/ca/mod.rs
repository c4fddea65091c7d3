//! The cluster certificate authority: created on the coordinator's first start, it signs
//! the coordinator's own server certificate at every start and each node's client
//! certificate at join time. Node certificates carry exactly one name,
//! `<node-id>.node.gantry`, whatever the request asked for. Beside it lives the cluster's
//! other secret, the key gossip is authenticated with (`gossip_key`).

mod gossip_key;

use std::path::{Path, PathBuf};

use gantry_shared::protocol::{COORDINATOR_DNS_NAME, node_dns_name};
use gantry_shared::{BadGossipKey, ClusterId, GossipKey, NodeId};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// How long node certificates are valid. Renewal arrives with the operations work; a
/// year keeps a cluster from expiring under its users in the meantime.
const NODE_CERT_DAYS: i64 = 365;
const CA_DAYS: i64 = 10 * 365;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cluster CA file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cluster CA in {dir} is unreadable ({source}); restore it from backup or move the directory aside to create a new cluster"
    )]
    Corrupt { dir: PathBuf, source: rcgen::Error },
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error("cannot issue certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error(
        "the cluster's gossip key {path} is unreadable ({source}); restore it from backup (a \
         new one, made if the file is removed, reaches each agent at its next connection and \
         is used once that agent restarts)"
    )]
    GossipKey { path: PathBuf, source: BadGossipKey },
}

/// The CA, loaded or created in the coordinator's state directory.
pub struct ClusterCa {
    cluster: ClusterId,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    gossip_key: GossipKey,
}

/// A certificate and its private key, ready for rustls.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ClusterCa {
    /// Loads `ca.pem`, `ca.key`, `cluster-id` and `gossip.key` from `dir`, or creates a new
    /// cluster (and a gossip key, for a cluster created before there was one).
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert_path, key_path, id_path) = (
            dir.join("ca.pem"),
            dir.join("ca.key"),
            dir.join("cluster-id"),
        );
        if !cert_path.exists() {
            let cluster = ClusterId::generate();
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("Gantry cluster CA {cluster}"));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = time_in_days(CA_DAYS);
            let cert = params.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
            write_file(&id_path, cluster.as_str().as_bytes()).map_err(io(&id_path))?;
            // The certificate last: its presence marks a complete CA.
            write_file(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
        }
        let corrupt = |source| CaError::Corrupt {
            dir: dir.to_owned(),
            source,
        };
        let ca_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let id = std::fs::read_to_string(&id_path).map_err(io(&id_path))?;
        let cluster = ClusterId::new(id.trim()).map_err(|e| CaError::Io {
            path: id_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(corrupt)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(corrupt)?;
        let ca_der =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| CaError::Io {
                path: cert_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
        let gossip_key = gossip_key::load_or_create(dir)?;
        Ok(Self {
            cluster,
            ca_pem,
            ca_der,
            issuer,
            gossip_key,
        })
    }

    pub fn cluster(&self) -> &ClusterId {
        &self.cluster
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The key every gossip datagram of this cluster is authenticated with.
    pub fn gossip_key(&self) -> &GossipKey {
        &self.gossip_key
    }

    /// SHA-256 of the CA certificate (hex): what join tokens pin.
    pub fn ca_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.ca_der.as_ref()))
    }

    /// A fresh server certificate for this coordinator's control endpoint, chained to the
    /// CA.
    pub fn server_identity(&self) -> Result<Identity, CaError> {
        self.issue_server(vec![COORDINATOR_DNS_NAME.to_owned()], "Gantry coordinator")
    }

    /// A fresh server certificate for the HTTP API (`api.tls_names`): DNS names and IP
    /// addresses as clients reach it. Issued at every start, so it never outlives a
    /// restart by more than [`NODE_CERT_DAYS`].
    pub fn api_identity(&self, names: &[String]) -> Result<Identity, CaError> {
        self.issue_server(names.to_vec(), "Gantry API")
    }

    fn issue_server(&self, names: Vec<String>, common_name: &str) -> Result<Identity, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = time_in_days(NODE_CERT_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.ca_der.clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }

    /// Signs a node's CSR. The certificate names `node` and nothing else, and is good for
    /// client authentication only.
    pub fn sign_node(&self, csr_pem: &str, node: &NodeId) -> Result<String, CaError> {
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let name = node_dns_name(node);
        csr.params.subject_alt_names = vec![SanType::DnsName(name.clone().try_into()?)];
        csr.params.distinguished_name = rcgen::DistinguishedName::new();
        csr.params.distinguished_name.push(DnType::CommonName, name);
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        csr.params.not_after = time_in_days(NODE_CERT_DAYS);
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

fn time_in_days(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ClusterCa::load_or_create(dir.path()).expect("create");
        let b = ClusterCa::load_or_create(dir.path()).expect("reload");
        assert_eq!(a.cluster(), b.cluster());
        assert_eq!(a.ca_sha256(), b.ca_sha256());
        assert_eq!(a.gossip_key(), b.gossip_key());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca.key"))
                .expect("key")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    }

    #[test]
    fn node_certificates_name_only_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("create");
        let key = KeyPair::generate().expect("key");
        // The request asks for another name; the certificate ignores it.
        let csr = CertificateParams::new(vec!["coordinator.gantry".to_owned()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let node = NodeId::new("gpu-1").expect("id");
        let pem = ca.sign_node(&csr.pem().expect("pem"), &node).expect("sign");
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
        let cert = webpki::EndEntityCert::try_from(&der).expect("parse");
        let name = |n: &str| rustls_pki_types::ServerName::try_from(n.to_owned()).expect("name");
        assert!(
            cert.verify_is_valid_for_subject_name(&name("gpu-1.node.gantry"))
                .is_ok()
        );
        assert!(
            cert.verify_is_valid_for_subject_name(&name("coordinator.gantry"))
                .is_err()
        );
    }

    #[test]
    fn api_certificates_name_what_they_were_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("create");
        let names = ["10.0.0.1".to_owned(), "gantry.example".to_owned()];
        let id = ca.api_identity(&names).expect("issue");
        assert_eq!(id.chain[1], *ca.ca_der(), "chained to the cluster CA");
        let cert = webpki::EndEntityCert::try_from(&id.chain[0]).expect("parse");
        let name = |n: &str| rustls_pki_types::ServerName::try_from(n.to_owned()).expect("name");
        for ok in ["10.0.0.1", "gantry.example"] {
            assert!(
                cert.verify_is_valid_for_subject_name(&name(ok)).is_ok(),
                "{ok}"
            );
        }
        for not in ["10.0.0.2", "coordinator.gantry"] {
            assert!(
                cert.verify_is_valid_for_subject_name(&name(not)).is_err(),
                "{not}"
            );
        }
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_create(dir.path()).expect("create");
        let err = ca.sign_node(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &NodeId::new("n").expect("id"),
        );
        assert!(matches!(err, Err(CaError::BadCsr(_))));
    }
}
