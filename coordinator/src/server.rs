//! Running a coordinator: opens its state directory (database, cluster CA), prints the
//! admin token on first start, serves the HTTP API and the QUIC control endpoint until
//! cancelled, then drains both.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, ApiState};
use crate::ca::ClusterCa;
use crate::config::RegistryAddress;
use crate::control::{ControlConfig, ControlServer};
use crate::functions::FunctionService;
use crate::images::{ImageCheck, PushTo};
use crate::jobs::service::JobService;
use crate::nodes::Nodes;
use crate::nodes::liveness::{Cluster, ClusterConfig};
use crate::nodes::service::NodeService;
use crate::reconcile;
use crate::registry::RegistryState;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub state_dir: PathBuf,
    /// The key that encrypts secrets at rest; default `<state_dir>/secrets.key`.
    pub secrets_key_file: Option<PathBuf>,
    /// The Debian mirror `debian_slim` bases come from; `None`: the building node's apt
    /// sources.
    pub debian_mirror: Option<String>,
    pub api: ApiConfig,
    pub control: ControlConfig,
    /// Web endpoints' HTTP ingress.
    pub ingress: IngressConfig,
    /// The registry address nodes use (`host:port`, its scheme that of the API unless
    /// it names one); default: the API's bound address unless it listens on all
    /// interfaces.
    pub registry_address: Option<RegistryAddress>,
    /// Gossip and the node liveness view. A wildcard gossip address without an advertised
    /// one advertises the control address's IP, or else the host's first non-loopback
    /// IPv4 address.
    pub cluster: ClusterConfig,
}

/// The ingress's address and its host-name domain (see [`crate::ingress`]).
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub listen: std::net::SocketAddr,
    pub domain: Option<String>,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7081)),
            domain: None,
        }
    }
}

/// Where a started coordinator listens, reported once every endpoint is bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub api: std::net::SocketAddr,
    /// The API serves HTTPS (only).
    pub api_tls: bool,
    pub control: std::net::SocketAddr,
    pub gossip: std::net::SocketAddr,
    /// Web endpoints' ingress (HTTPS when the API serves it).
    pub ingress: std::net::SocketAddr,
}

impl Bound {
    /// The API's URL as clients use it (`GANTRY_ADDR`).
    pub fn api_url(&self) -> String {
        let scheme = if self.api_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.api)
    }
}

/// Runs the coordinator until `cancel` fires. `on_bound` is called once it serves (with
/// the admin token on the very first start).
pub async fn run(
    cfg: CoordinatorConfig,
    cancel: CancellationToken,
    on_bound: impl FnOnce(Bound, Option<String>),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    let store = Store::open(&cfg.state_dir.join("db"))?;
    let key_file = cfg
        .secrets_key_file
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("secrets.key"));
    store.open_secrets(&key_file)?;
    let ca = Arc::new(ClusterCa::load_or_create(&cfg.state_dir.join("ca"))?);
    // The API's certificate, before anything listens or the admin token is made: a bad
    // file stops the start and a fixed one gets the first start's token.
    let tls = cfg
        .api
        .tls
        .as_ref()
        .map(|t| api::server_config(t, &ca))
        .transpose()?;
    let tokens = store.api_tokens()?;
    let admin = tokens.bootstrap_admin()?;
    let join = store.join_tokens(ca.ca_sha256())?;
    let nodes = Nodes::default();
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} for the API: {e}; pick a free port",
                cfg.api.listen
            )
        })?;
    // Nodes reach the embedded registry at the API's address, unless told otherwise.
    let api_addr = listener.local_addr()?;
    let ingress_listener = tokio::net::TcpListener::bind(cfg.ingress.listen)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {} for the web ingress: {e}; pick a free port (`ingress_listen`)",
                    cfg.ingress.listen
                ),
            )
        })?;
    let mut control_cfg = cfg.control.clone();
    control_cfg.registry = match &cfg.registry_address {
        Some(r) => Some(r.host_port.as_str().to_owned()),
        None => (!api_addr.ip().is_unspecified()).then(|| api_addr.to_string()),
    };
    control_cfg.registry_tls = cfg
        .registry_address
        .as_ref()
        .and_then(|r| r.tls)
        .unwrap_or(tls.is_some());
    // Users push where nodes pull, unless the API listens on every interface.
    let push_to = PushTo {
        address: match &control_cfg.registry {
            Some(address) => address.clone(),
            None => format!("COORDINATOR:{}", api_addr.port()),
        },
        tls: control_cfg.registry_tls,
    };
    let mut cluster_cfg = cfg.cluster.clone();
    if cluster_cfg.membership.advertise.is_none()
        && cluster_cfg.membership.listen.ip().is_unspecified()
    {
        let ip = if cfg.control.listen.ip().is_unspecified() {
            host_ip().ok_or_else(|| {
                anyhow::anyhow!(
                    "gossip listens on {} and this host has no non-loopback IPv4 address to \
                     advertise; set the gossip advertise address",
                    cluster_cfg.membership.listen
                )
            })?
        } else {
            cfg.control.listen.ip()
        };
        cluster_cfg.membership.advertise = Some(std::net::SocketAddr::new(
            ip,
            cluster_cfg.membership.listen.port(),
        ));
    }
    let node_admin = store.node_admin()?;
    let cluster = Cluster::start(
        cluster_cfg,
        (ca.cluster(), ca.gossip_key()),
        (&cfg.control.listen.to_string(), &api_addr.to_string()),
        nodes.clone(),
        join.clone(),
        node_admin.clone(),
        cancel.clone(),
    )
    .await?;
    control_cfg.gossip = Some(cluster.gossip_addr());
    let (functions, outbound) =
        FunctionService::open(store.functions()?, nodes.changed.clone(), cancel.clone())?;
    let control = ControlServer::bind(
        control_cfg,
        ca.clone(),
        join.clone(),
        tokens.clone(),
        store.clone(),
        nodes.clone(),
    )?
    .with_functions(functions.clone());
    let bound = Bound {
        api: listener.local_addr()?,
        api_tls: tls.is_some(),
        control: control.local_addr()?,
        gossip: cluster.gossip_addr(),
        ingress: ingress_listener.local_addr()?,
    };
    tracing::info!(cluster = %ca.cluster(), api = %bound.api_url(), control = %bound.control, "coordinator serving");
    on_bound(bound, admin);
    let registry = RegistryState::open(&cfg.state_dir.join("registry"), tokens.clone())?;
    let jobs = JobService::new(
        store.clone(),
        cluster.clone(),
        nodes.clone(),
        cancel.clone(),
    );
    let schedules_task = tokio::spawn(crate::schedules::run(
        crate::schedules::ScheduleService::new(store.clone(), functions.clone(), jobs.clone()),
        cancel.clone(),
    ));
    let builds = crate::builds::BuildService::new(
        registry.clone(),
        nodes.clone(),
        cluster.clone(),
        cfg.debian_mirror.clone(),
    );
    let router = api::router(
        ApiState::new(
            jobs,
            functions.clone(),
            NodeService::new(store.clone(), cluster.clone(), nodes.clone(), node_admin),
            ImageCheck::new(registry.clone(), cluster.clone(), push_to),
            tokens.clone(),
            join,
            cfg.api.clone(),
        )
        .with_builds(builds),
    )
    .merge(crate::registry::router(registry));
    let ingress = crate::ingress::Ingress::new(
        functions.clone(),
        nodes.clone(),
        tokens,
        cfg.ingress.domain.clone(),
    )
    .router();
    let ingress_task = tokio::spawn(api::serve(
        ingress_listener,
        tls.clone(),
        ingress,
        cancel.clone(),
    ));
    let control_task = tokio::spawn(control.serve(cancel.clone()));
    let changed = nodes.changed.clone();
    let link = reconcile::QuicLink { nodes };
    let router_task = tokio::spawn(crate::functions::service::run_router(
        functions.clone(),
        link.clone(),
        outbound,
        cancel.clone(),
    ));
    let scheduler = tokio::spawn(reconcile::run(
        store.clone(),
        link,
        Some(functions),
        cluster,
        changed,
        cancel.clone(),
    ));
    api::serve(listener, tls, router, cancel.clone()).await?;
    ingress_task.await??;
    schedules_task.await?;
    control_task.await?;
    scheduler.await?;
    router_task.await?;
    store.flush()?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The host's first non-loopback IPv4 address.
fn host_ip() -> Option<std::net::IpAddr> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        .find(|ip| !ip.is_loopback())
        .map(std::net::IpAddr::V4)
}
