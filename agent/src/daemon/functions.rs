//! Function containers on this node, as the daemon sees them: their runtime API servers
//! (opened before a container starts, closed when it ends), the servers' link to the rest
//! of the daemon (events into the outbox, stops through the runtime), the coordinator's
//! commands for them (deliver, cancel an input, drain), and the sending of their answers
//! to the coordinator on the control session.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use gantry_shared::calls::LeasedInput;
use gantry_shared::protocol::{
    CommandReply, Event, FunctionRuntime, Refusal, RefusalCode, Response,
};
use gantry_shared::{AttemptRef, ContainerId, Generation, InputId, Owner};
use tokio_util::task::TaskTracker;

use super::outbox::Outbox;
use crate::control::Session;
use crate::invoke::{Container, FunctionServer, Invoke, InvokeError, StopReason};
use crate::runtime::Runtime;

/// Answers in flight to the coordinator at once.
const MAX_IN_FLIGHT: usize = 32;
/// Wait before sending again an answer the coordinator neither noted nor refused.
const RESEND_DELAY: Duration = Duration::from_millis(500);
/// Longest a container's end waits for its answers to reach the coordinator, so the
/// coordinator hears of the answers before it leases the inputs again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct Functions {
    invoke: Invoke,
    runtime: Runtime,
    outbox: Outbox,
    /// Stops asked for by the servers.
    tasks: TaskTracker,
}

impl Functions {
    pub(super) fn new(invoke: Invoke, runtime: Runtime, outbox: Outbox) -> Self {
        Self {
            invoke,
            runtime,
            outbox,
            tasks: TaskTracker::new(),
        }
    }

    pub(super) fn invoke(&self) -> &Invoke {
        &self.invoke
    }

    /// Serves container `id`'s runtime API (before it starts).
    pub(super) fn open(
        &self,
        id: &ContainerId,
        attempt: AttemptRef,
        runtime: &FunctionRuntime,
    ) -> Result<Arc<FunctionServer>, InvokeError> {
        let link = Link {
            id: id.clone(),
            outbox: self.outbox.clone(),
            runtime: self.runtime.clone(),
            tasks: self.tasks.clone(),
        };
        self.invoke.open(id, attempt, runtime, Arc::new(link))
    }

    /// Container `id` ended (or never started): its server stops and its directory goes;
    /// then its answers get up to [`SETTLE_TIMEOUT`] to reach the coordinator.
    pub(super) async fn close(&self, id: &ContainerId, attempt: &AttemptRef) {
        self.invoke.close(id).await;
        let outputs = self.invoke.outputs();
        if tokio::time::timeout(SETTLE_TIMEOUT, outputs.settled(attempt))
            .await
            .is_err()
        {
            tracing::warn!(container = %id, "answers not yet sent to the coordinator; reporting the container's end anyway");
        }
    }

    fn server(&self, owner: &Owner, generation: Generation) -> Option<Arc<FunctionServer>> {
        self.invoke.get(&owner.container_id(generation)?)
    }

    /// `Command::Deliver`: accepted once queued for the container.
    pub(super) fn deliver(
        &self,
        owner: &Owner,
        generation: Generation,
        input: LeasedInput,
    ) -> CommandReply {
        let Some(server) = self.server(owner, generation) else {
            return CommandReply::NotRunning;
        };
        match server.deliver(input) {
            Ok(()) => CommandReply::Accepted,
            Err(e) => CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("{owner} generation {generation}: {e}"),
            )),
        }
    }

    /// `Command::CancelInput`.
    pub(super) fn cancel_input(
        &self,
        owner: &Owner,
        generation: Generation,
        input: &InputId,
        grace: Duration,
    ) -> CommandReply {
        match self.server(owner, generation) {
            Some(server) => {
                server.cancel_input(input, grace);
                CommandReply::Accepted
            }
            None => CommandReply::NotRunning,
        }
    }

    /// `Command::Drain`.
    pub(super) fn drain(
        &self,
        owner: &Owner,
        generation: Generation,
        grace: Duration,
    ) -> CommandReply {
        match self.server(owner, generation) {
            Some(server) => {
                server.drain(grace);
                CommandReply::Accepted
            }
            None => CommandReply::NotRunning,
        }
    }

    /// Sends the containers' answers on `session` until each is noted (or refused, which
    /// is logged and drops it). Returns when the session fails; unsent answers stay for the
    /// next session.
    pub(super) async fn send_outputs(&self, session: &Session) {
        let outputs = self.invoke.outputs();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut sends = FuturesUnordered::new();
        loop {
            let pushed = outputs.pushed();
            let room = MAX_IN_FLIGHT.saturating_sub(in_flight.len());
            for (seq, report) in outputs.pending(&in_flight, room) {
                in_flight.insert(seq);
                sends.push(async move {
                    let answer = session.request(&report.to_request()).await;
                    (seq, report.input, answer)
                });
            }
            tokio::select! {
                Some((seq, input, answer)) = sends.next(), if !sends.is_empty() => {
                    match answer {
                        Ok(Response::Noted) => {
                            outputs.done(seq);
                            in_flight.remove(&seq);
                        }
                        Ok(Response::Refused(refusal)) if refusal.code == RefusalCode::Unavailable => {
                            // It could not record it now (its store): it asks for it again.
                            tracing::warn!(%input, %refusal, "the coordinator cannot record an answer now; will resend");
                            tokio::time::sleep(RESEND_DELAY).await;
                            in_flight.remove(&seq);
                        }
                        Ok(Response::Refused(refusal)) => {
                            tracing::warn!(%input, %refusal, "the coordinator refused an answer; dropping it");
                            outputs.done(seq);
                            in_flight.remove(&seq);
                        }
                        Ok(other) => {
                            tracing::warn!(%input, answer = ?other, "answer not noted; will resend");
                            tokio::time::sleep(RESEND_DELAY).await;
                            in_flight.remove(&seq);
                        }
                        Err(e) => {
                            tracing::warn!(%input, error = %e, "sending an answer failed");
                            return;
                        }
                    }
                }
                _ = pushed => {}
            }
        }
    }

    /// The agent stops: servers stop serving (containers keep running), stops asked for
    /// finish.
    pub(super) async fn shutdown(&self) {
        self.invoke.shutdown().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A server's link to the daemon.
struct Link {
    id: ContainerId,
    outbox: Outbox,
    runtime: Runtime,
    tasks: TaskTracker,
}

impl Container for Link {
    fn event(&self, event: Event) {
        if let Err(e) = self.outbox.push(event) {
            tracing::error!(container = %self.id, error = %e, "cannot record an event");
        }
    }

    fn stop(&self, reason: StopReason) {
        let (rt, id) = (self.runtime.clone(), self.id.clone());
        self.tasks.spawn(async move {
            if let Err(e) = rt.stop(&id, Duration::ZERO).await {
                tracing::warn!(container = %id, %reason, error = %e, "cannot stop the function container");
            }
        });
    }
}
