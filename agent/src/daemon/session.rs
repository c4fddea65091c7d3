//! The control session: connect (reconnecting with backoff), route the coordinator's
//! commands to the attempts, the GPU guard, the function containers and the output, send
//! the outbox's events until acknowledged and the function containers' answers until
//! noted, report a spot notice, and say so when the agent stops to be restarted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::protocol::{
    self, Command, CommandReply, Refusal, RefusalCode, Request, Response,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::attempts::Attempts;
use super::functions::Functions;
use super::gpus::GpuGuard;
use super::outbox::Outbox;
use super::{DaemonError, output};
use crate::config::AgentConfig;
use crate::control::{self, ControlError, HelloInfo, NodeIdentity, Session};
use crate::gossip::Publisher;
use crate::runtime::Runtime;
use crate::volumes::{self, Volumes};

/// Where a session's commands go, and where its events come from.
#[derive(Clone)]
pub(super) struct Router {
    pub(super) attempts: Arc<Attempts>,
    pub(super) gpus: Arc<GpuGuard>,
    pub(super) outbox: Outbox,
    pub(super) runtime: Runtime,
    pub(super) functions: Arc<Functions>,
    pub(super) volumes: Volumes,
    /// How this node runs its share of image builds.
    pub(super) builds: super::build::BuildConfig,
}

/// Longest wait between reconnection attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Who to open sessions to, as whom, and what to say at hello.
pub(super) struct Link<'a> {
    pub(super) coordinator: SocketAddr,
    pub(super) identity: &'a NodeIdentity,
    pub(super) hello: HelloInfo,
}

/// Keeps a control session open (reconnecting with backoff) until `cancel` fires.
pub(super) async fn sessions(
    config: &AgentConfig,
    link: &Link<'_>,
    publisher: &Publisher,
    router: Router,
    cancel: &CancellationToken,
) -> Result<(), DaemonError> {
    let Link {
        coordinator,
        identity,
        hello,
    } = *link;
    let changed = router.attempts.changed();
    // The spot watcher's deadline, once a notice came; sent on every session until noted.
    let (notice_tx, notice_rx) = watch::channel::<Option<u64>>(None);
    if let Some(url) = config.spot_notice.url.clone() {
        let (interval, cancel) = (config.spot_notice.interval, cancel.clone());
        let functions = router.functions.clone();
        tokio::spawn(async move {
            if let Some(deadline) =
                crate::preemption::wait_for_notice(&url, interval, &cancel).await
            {
                // Function containers hear it now, not after the coordinator's round trip.
                functions.preempt_all(deadline);
                let _ = notice_tx.send(Some(deadline));
            }
        });
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            s = control::connect(coordinator, identity, hello) => s,
        };
        match session {
            Ok(session) => {
                tracing::info!(%coordinator, node = %identity.node, "control session open");
                backoff = Duration::from_millis(200);
                super::gossip_key::compare(&session, identity, &config.state_dir);
                router.attempts.set_registry(
                    session
                        .registry()
                        .map(|registry| (registry, identity.registry_token.clone())),
                );
                if let Some(addr) = session.coordinator_gossip() {
                    publisher.contact(addr);
                }
                // A coordinator restored from a backup lost events it had acknowledged:
                // the ends of attempts among them go again.
                match router.outbox.recall(session.events_applied()) {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        applied = session.events_applied(),
                        ends = n,
                        "the coordinator lost events it had acknowledged (restored from a backup?); sending the ends of attempts again"
                    ),
                    Err(e) => tracing::error!(error = %e, "cannot read the acknowledged ends"),
                }
                let pokes = async {
                    loop {
                        changed.notified().await;
                        publisher.poke();
                    }
                };
                let notices = report_notice(&session, notice_rx.clone());
                tokio::select! {
                    _ = router.serve(&session, cancel, config.restart_hold) => {}
                    _ = pokes => {}
                    _ = notices => {}
                }
                if cancel.is_cancelled() {
                    return Ok(());
                }
                tracing::warn!("control session lost; reconnecting");
            }
            Err(e) if fatal(&e) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the coordinator")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A refusal that trying again cannot change: this agent must stop and say why.
pub(super) fn fatal(e: &ControlError) -> bool {
    matches!(
        e,
        ControlError::Refused(r) if matches!(
            r.code,
            RefusalCode::Cluster
                | RefusalCode::Identity
                | RefusalCode::ProtocolVersion
                | RefusalCode::DuplicateNode
        )
    )
}

impl Router {
    /// Serves one session: commands from the coordinator, events to it. On `cancel`, says
    /// it is restarting (for `restart_hold`) before closing the session.
    async fn serve(&self, session: &Session, cancel: &CancellationToken, restart_hold: Duration) {
        let conn = session.connection().clone();
        let commands = async {
            loop {
                let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
                    return;
                };
                let router = self.clone();
                tokio::spawn(async move {
                    let (mut logs, mut web) = (None, None);
                    let reply = match control::read_frame::<Command>(&mut rx).await {
                        Ok(Command::Build(work)) => {
                            // Answered with its own frames (and a layer) on the stream.
                            super::build::serve(
                                &router.attempts,
                                &router.runtime,
                                &router.builds,
                                work,
                                &mut tx,
                            )
                            .await;
                            let _ = tx.finish();
                            return;
                        }
                        Ok(Command::Volume { name, backend, op }) => {
                            // Answered with its own reply (and bytes) on the stream.
                            volumes::serve::serve(
                                &router.volumes,
                                name,
                                backend,
                                op,
                                &mut rx,
                                &mut tx,
                            )
                            .await;
                            let _ = tx.finish();
                            return;
                        }
                        Ok(Command::Logs {
                            owner,
                            generation,
                            follow,
                        }) => {
                            let (reply, l) =
                                output::logs(&router.runtime, &owner, generation, follow);
                            logs = l;
                            reply
                        }
                        Ok(Command::Web { owner, generation }) => {
                            match router.functions.web(&owner, generation).await {
                                Ok(conn) => {
                                    web = Some(conn);
                                    CommandReply::Accepted
                                }
                                Err(reply) => reply,
                            }
                        }
                        Ok(cmd) => router.route(cmd),
                        Err(e) => CommandReply::Refused(Refusal::new(RefusalCode::NoSession, e)),
                    };
                    if let Ok(frame) = protocol::encode(&reply) {
                        let _ = tx.write_all(&frame).await;
                    }
                    if let Some((id, follow)) = logs {
                        output::stream(&router.runtime, &mut tx, &id, follow).await;
                    }
                    if let Some((connection, request)) = web {
                        // The rest of the stream is the request's connection.
                        connection.serve(tokio::io::join(rx, tx)).await;
                        drop(request);
                        return;
                    }
                    let _ = tx.finish();
                });
            }
        };
        let events = async {
            loop {
                match self.outbox.pending(256) {
                    Ok(batch) if !batch.is_empty() => {
                        match session.request(&Request::Events { events: batch }).await {
                            Ok(Response::EventsAck { upto }) => {
                                if let Err(e) = self.outbox.ack(upto) {
                                    tracing::error!(error = %e, "cannot trim the event outbox");
                                }
                                continue;
                            }
                            Ok(other) => {
                                tracing::warn!(answer = ?other, "events not acknowledged; will resend")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "sending events failed");
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read the event outbox"),
                }
                tokio::select! {
                    _ = self.outbox.pushed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                say_restarting(session, restart_hold).await;
                conn.close(0u32.into(), b"agent shutting down");
            }
            _ = commands => {}
            _ = events => {}
            _ = self.functions.send_outputs(session) => {}
        }
    }

    /// A command other than those that stream on their own (logs, web, volumes, builds), to whom
    /// it concerns.
    fn route(&self, cmd: Command) -> CommandReply {
        match cmd {
            Command::Ping => CommandReply::Accepted,
            Command::ClearGpu { index } => self.gpus.clear(index),
            Command::Stop {
                owner,
                generation,
                grace_ms,
            } => self
                .attempts
                .stop(&owner, generation, Duration::from_millis(grace_ms)),
            Command::Start(spec) => self.attempts.take_start(spec),
            Command::Logs { .. }
            | Command::Web { .. }
            | Command::Volume { .. }
            | Command::Build(_) => CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                "logs, web connections, volumes and builds are served on their own stream",
            )),
            Command::Deliver {
                owner,
                generation,
                inputs,
            } => self.functions.deliver(&owner, generation, inputs),
            Command::CancelInput {
                owner,
                generation,
                input,
                grace_ms,
            } => self.functions.cancel_input(
                &owner,
                generation,
                &input,
                Duration::from_millis(grace_ms),
            ),
            Command::Drain {
                owner,
                generation,
                grace_ms,
                preempt_deadline_ms,
            } => self.functions.drain(
                &owner,
                generation,
                Duration::from_millis(grace_ms),
                preempt_deadline_ms,
            ),
        }
    }
}

/// Tells the coordinator that this agent stops to be restarted, so the node's work stays
/// while it is away (bounded: a second at most, a stop must not hang on it).
async fn say_restarting(session: &Session, hold: Duration) {
    if hold.is_zero() {
        return;
    }
    let request = Request::Restarting {
        back_within_ms: hold.as_millis() as u64,
    };
    // Generous: a notice lost to a busy machine turns a restart into a lost node.
    match tokio::time::timeout(Duration::from_secs(3), session.request(&request)).await {
        Ok(Ok(Response::Noted)) => {
            tracing::info!(hold = ?hold, "told the coordinator this agent is restarting")
        }
        Ok(Ok(other)) => tracing::warn!(answer = ?other, "restart notice not taken"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot send the restart notice"),
        Err(_) => tracing::warn!("the coordinator did not answer the restart notice in time"),
    }
}

/// Tells the coordinator about a spot-interruption notice, then waits for the session's
/// end (it never completes on its own, so it never ends the session).
async fn report_notice(session: &Session, mut notice: watch::Receiver<Option<u64>>) {
    let mut noted = false;
    loop {
        if noted {
            return std::future::pending().await;
        }
        let deadline = *notice.borrow_and_update();
        if let Some(deadline_ms) = deadline {
            match session.request(&Request::Preempting { deadline_ms }).await {
                Ok(Response::Noted) => {
                    noted = true;
                    continue;
                }
                Ok(other) => tracing::warn!(answer = ?other, "spot notice not taken; retrying"),
                Err(e) => tracing::warn!(error = %e, "cannot send the spot notice; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if notice.changed().await.is_err() {
            // No watcher (or it ended without a notice).
            return std::future::pending().await;
        }
    }
}
