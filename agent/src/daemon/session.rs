//! The control session: connect (reconnecting with backoff), serve it, report a spot notice,
//! and say so when the agent stops to be restarted.

use super::*;

/// Keeps a control session open (reconnecting with backoff) until `cancel` fires.
pub(super) async fn sessions(
    cfg: &DaemonConfig,
    identity: &NodeIdentity,
    hello: HelloInfo,
    publisher: &Publisher,
    agent: Arc<Agent>,
    cancel: &CancellationToken,
) -> Result<(), DaemonError> {
    let changed = agent.changed.clone();
    // The spot watcher's deadline, once a notice came; sent on every session until noted.
    let (notice_tx, notice_rx) = tokio::sync::watch::channel::<Option<u64>>(None);
    if let Some(watcher) = cfg.spot_notice.clone() {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Some(deadline) = crate::preemption::wait_for_notice(&watcher, &cancel).await {
                let _ = notice_tx.send(Some(deadline));
            }
        });
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            s = control::connect(cfg.coordinator, identity, hello) => s,
        };
        match session {
            Ok(session) => {
                tracing::info!(coordinator = %cfg.coordinator, node = %identity.node, "control session open");
                backoff = Duration::from_millis(200);
                *agent.registry.lock().unwrap_or_else(|e| e.into_inner()) = session
                    .registry()
                    .map(|addr| (addr, identity.registry_token.clone()));
                if let Some(addr) = session.coordinator_gossip() {
                    publisher.contact(addr);
                }
                let pokes = async {
                    loop {
                        changed.notified().await;
                        publisher.poke();
                    }
                };
                let notices = report_notice(&session, notice_rx.clone());
                tokio::select! {
                    _ = agent.clone().serve(&session, cancel, cfg.restart_hold) => {}
                    _ = pokes => {}
                    _ = notices => {}
                }
                if cancel.is_cancelled() {
                    return Ok(());
                }
                tracing::warn!("control session lost; reconnecting");
            }
            Err(ControlError::Refused(r))
                if matches!(
                    r.code,
                    RefusalCode::Cluster
                        | RefusalCode::Identity
                        | RefusalCode::ProtocolVersion
                        | RefusalCode::DuplicateNode
                ) =>
            {
                return Err(ControlError::Refused(r).into());
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the coordinator")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// Tells the coordinator that this agent stops to be restarted, so the node's work stays
/// while it is away (bounded: a second at most, a stop must not hang on it).
pub(super) async fn say_restarting(session: &Session, hold: Duration) {
    if hold.is_zero() {
        return;
    }
    let request = Request::Restarting {
        back_within_ms: hold.as_millis() as u64,
    };
    match tokio::time::timeout(Duration::from_secs(1), session.request(&request)).await {
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
pub(super) async fn report_notice(
    session: &Session,
    mut notice: tokio::sync::watch::Receiver<Option<u64>>,
) {
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
