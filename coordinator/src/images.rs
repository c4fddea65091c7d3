//! Whether the image a job or a function names can be found anywhere, judged when it is
//! submitted, so a short name that exists nowhere is refused with how to push it instead of
//! failing later on a node with advice for that node's operator. Likewise for the blobs a
//! function's code mounts name: each must be in the embedded registry at deploy.
//!
//! A qualified name (`registry.example.com/x`) is pulled from its own registry and not
//! judged here. A short one (`busybox`, `team/x:v1`) resolves on a node to an image in the
//! node's own store, else to the cluster's embedded registry; so it is refused only when
//! the registry lacks it and every node that is up has said through gossip which images it
//! holds ([`gantry_shared::gossip::LocalImages`]) and none holds it. Whenever that cannot be
//! told (no node up yet, a node that has not gossiped or did not list its images: too many,
//! or an older agent) the image is accepted, as before this check: a wrong refusal would
//! block work that runs.

use gantry_shared::NodeId;
use gantry_shared::code::CodeMount;
use gantry_shared::image_name::{is_qualified, registry_path};

use crate::nodes::liveness::{Cluster, Liveness, NodeStatus};
use crate::registry::RegistryState;

/// What the nodes say about a short image name ([`on_nodes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnNodes {
    /// This node holds it in its own store.
    Held(NodeId),
    /// No node is up, or one that is up has not listed its images.
    CannotTell,
    /// Every node that is up listed its images, and none has it.
    Nowhere,
}

/// Where the short `image` is among `nodes`' own images. Down nodes are left out: nothing
/// runs there until they return, and then they gossip again.
pub fn on_nodes(image: &str, nodes: &[NodeStatus]) -> OnNodes {
    let mut up = false;
    let mut cannot_tell = false;
    for n in nodes.iter().filter(|n| n.liveness != Liveness::Down) {
        up = true;
        match n.gossip.as_ref().and_then(|g| g.images.holds(image)) {
            Some(true) => return OnNodes::Held(n.id.clone()),
            Some(false) => {}
            None => cannot_tell = true,
        }
    }
    match up && !cannot_tell {
        true => OnNodes::Nowhere,
        false => OnNodes::CannotTell,
    }
}

/// A short image name found neither in the cluster's registry nor on any node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "image `{image}` is not in the cluster's registry and no node has it; push it there \
     first: `gantry image import DIR|TAR --name {image}` (a root filesystem) or \
     `skopeo copy {tls}--dest-creds gantry:$GANTRY_TOKEN SOURCE docker://{addr}/{image}`; an \
     image in another registry needs its full name (`registry.example.com/team/x:v1`)",
    addr = .registry.address,
    tls = .registry.skopeo_tls_flag()
)]
pub struct ImageNotFound {
    pub image: String,
    pub registry: PushTo,
}

/// A code mount's file whose blob is not in the cluster's registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "file `{path}` ({digest}) is not in the cluster's registry; upload it first: `POST \
     {scheme}://{addr}/v2/gantry-code/blobs/uploads/?digest={digest}` with the file as the \
     body and a submitter token (`Authorization: Bearer $GANTRY_TOKEN`), then deploy again",
    addr = .registry.address,
    scheme = if .registry.tls { "https" } else { "http" }
)]
pub struct CodeMissing {
    pub path: String,
    pub digest: String,
    pub registry: PushTo,
}

/// Where users push images: the API's address, which serves the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTo {
    /// `host:port`.
    pub address: String,
    /// Served over HTTPS.
    pub tls: bool,
}

impl PushTo {
    /// What skopeo needs to push to it: nothing for HTTPS, a flag for plain HTTP.
    fn skopeo_tls_flag(&self) -> &'static str {
        match self.tls {
            true => "",
            false => "--dest-tls-verify=false ",
        }
    }
}

/// Judges images at submission against the cluster view and the embedded registry.
/// Cheap to clone.
#[derive(Clone)]
pub struct ImageCheck {
    registry: RegistryState,
    cluster: Cluster,
    /// The registry's address as users reach it, for the refusal's advice.
    push_to: PushTo,
}

impl ImageCheck {
    pub fn new(registry: RegistryState, cluster: Cluster, push_to: PushTo) -> Self {
        Self {
            registry,
            cluster,
            push_to,
        }
    }

    /// Refuses `image` if it is short and is neither on a node nor in the registry (the
    /// registry is only read when the nodes have said they lack it).
    pub async fn require(&self, image: &str) -> Result<(), ImageNotFound> {
        if is_qualified(image) || on_nodes(image, &self.cluster.statuses()) != OnNodes::Nowhere {
            return Ok(());
        }
        let (repo, reference) = registry_path(image);
        if self.registry.has_manifest(repo, reference).await {
            return Ok(());
        }
        Err(ImageNotFound {
            image: image.to_owned(),
            registry: self.push_to.clone(),
        })
    }

    /// Refuses code mounts that name a blob the registry lacks (the first such file).
    pub async fn require_code(&self, mounts: &[CodeMount]) -> Result<(), CodeMissing> {
        let files: Vec<(String, String)> = mounts
            .iter()
            .flat_map(|m| &m.files)
            .map(|f| (f.path.to_string(), f.digest.to_string()))
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let registry = self.registry.clone();
        // Up to 20,000 files a function: their checks are file-system calls.
        let missing = tokio::task::spawn_blocking(move || {
            let mut seen = std::collections::HashSet::new();
            files
                .into_iter()
                .find(|(_, digest)| seen.insert(digest.clone()) && !registry.has_blob(digest))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match missing {
            None => Ok(()),
            Some((path, digest)) => Err(CodeMissing {
                path,
                digest,
                registry: self.push_to.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::gossip::{AgentGossip, LocalImages};

    fn node(name: &str, liveness: Liveness, images: Option<LocalImages>) -> NodeStatus {
        NodeStatus {
            id: NodeId::new(name).expect("id"),
            liveness,
            reason: "",
            since_ms: 0,
            last_seen_ms: None,
            connected: liveness != Liveness::Down,
            capacity: None,
            gossip: images.map(|images| AgentGossip {
                addr: "10.0.0.1".parse().expect("ip"),
                labels: Default::default(),
                resources: Default::default(),
                free_gpus: Vec::new(),
                gpus: Vec::new(),
                images,
            }),
            gossip_error: None,
            admin: None,
        }
    }

    fn listed(names: &[&str]) -> Option<LocalImages> {
        Some(LocalImages::from_stored(
            names.iter().map(|n| n.to_string()),
        ))
    }

    #[test]
    fn the_refusal_names_the_image_and_how_to_push_it() {
        let e = |tls| ImageNotFound {
            image: "team/x:v1".into(),
            registry: PushTo {
                address: "10.0.0.1:7080".into(),
                tls,
            },
        };
        let plain = e(false).to_string();
        assert!(plain.contains("image `team/x:v1`"), "{plain}");
        assert!(
            plain.contains("gantry image import DIR|TAR --name team/x:v1"),
            "{plain}"
        );
        let skopeo = "skopeo copy --dest-tls-verify=false --dest-creds gantry:$GANTRY_TOKEN \
                      SOURCE docker://10.0.0.1:7080/team/x:v1";
        assert!(plain.contains(skopeo), "{plain}");
        assert!(!e(true).to_string().contains("tls-verify"));
    }

    #[test]
    fn refused_only_when_every_node_up_listed_its_images_without_it() {
        use Liveness::*;
        let a = || node("a", Up, listed(&["busybox:latest"]));
        let b = || node("b", Suspect, listed(&["echo:latest"]));
        assert_eq!(on_nodes("echo", &[a(), b()]), OnNodes::Held(b().id));
        assert_eq!(
            on_nodes("busybox:latest", &[a(), b()]),
            OnNodes::Held(a().id)
        );
        assert_eq!(on_nodes("nope", &[a(), b()]), OnNodes::Nowhere);
        // A down node's images do not count, whatever they are.
        let gone = node("c", Down, listed(&["nope:latest"]));
        assert_eq!(on_nodes("nope", &[a(), gone.clone()]), OnNodes::Nowhere);
        // Nobody up: a node may be joining with it.
        assert_eq!(on_nodes("nope", &[]), OnNodes::CannotTell);
        assert_eq!(on_nodes("nope", &[gone]), OnNodes::CannotTell);
        // A node not heard through gossip yet, or one that did not list its images.
        for unknown in [
            None,
            Some(LocalImages::Unreported),
            Some(LocalImages::Unlisted),
        ] {
            let c = node("c", Suspect, unknown);
            assert_eq!(on_nodes("nope", &[a(), c]), OnNodes::CannotTell);
        }
    }
}
