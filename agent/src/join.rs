//! `gantry-agent join`: trades a one-time token for this node's identity (certificate and
//! key, kept in the state directory) and records the coordinator's address in the
//! configuration file, so that `serve` needs no flags. Needs no local store.

use std::path::Path;

use gantry_shared::{IdError, NodeId};

use crate::config::RecordError;
use crate::control::{self, ControlError, ResolveError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("reading the host name")]
    HostName(#[source] nix::errno::Errno),
    #[error("the host name `{host}` is not a valid node name; pass --node")]
    NodeName {
        host: String,
        #[source]
        source: IdError,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Joins the cluster at `coordinator` (`host:port`) with `token` as `node` (default: the
/// host name), stores the identity under `state_dir` and records the coordinator (and a
/// state directory other than the default) in `config_file`.
pub async fn run(
    state_dir: &Path,
    config_file: &Path,
    coordinator: &str,
    token: &str,
    node: Option<NodeId>,
) -> Result<(), JoinError> {
    let addr = control::resolve(coordinator).await?;
    let node = match node {
        Some(n) => n,
        None => {
            let host = nix::unistd::gethostname()
                .map_err(JoinError::HostName)?
                .to_string_lossy()
                .to_lowercase();
            NodeId::new(host.clone()).map_err(|source| JoinError::NodeName { host, source })?
        }
    };
    let identity = control::join(addr, token, node, &state_dir.join("identity")).await?;
    println!(
        "joined cluster {} as node {}",
        identity.cluster, identity.node
    );
    crate::config::record_join(config_file, coordinator, state_dir)?;
    println!("coordinator recorded in {}", config_file.display());
    Ok(())
}
