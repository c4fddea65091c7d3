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
    CommandReply, Event, FunctionRuntime, Refusal, RefusalCode, Request, Response, WebRuntime,
    batches,
};
use gantry_shared::{AttemptRef, ContainerId, Generation, InputId, Owner};
use tokio_util::task::TaskTracker;

use super::outbox::Outbox;
use crate::control::Session;
use crate::invoke::{
    Container, FunctionServer, Invoke, InvokeError, Report, StopReason, WebConnection, WebRequest,
};
use crate::runtime::Runtime;

/// Batches of answers in flight to the coordinator at once: while one waits for its
/// commit, the answers arriving meanwhile gather into the next batch (the busier the
/// node, the larger the batches and the fewer the commits; an answer alone goes at once).
const MAX_BATCHES_IN_FLIGHT: usize = 1;
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
        inputs: Vec<LeasedInput>,
    ) -> CommandReply {
        let Some(server) = self.server(owner, generation) else {
            return CommandReply::NotRunning;
        };
        match server.deliver(inputs) {
            Ok(()) => CommandReply::Accepted,
            Err(e) => CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("{owner} generation {generation}: {e}"),
            )),
        }
    }

    /// A web endpoint's container runs: an HTTP server's is probed until ready (see
    /// [`FunctionServer::serve_web`]); one taking requests as inputs says `ready` itself.
    pub(super) async fn serve_web(
        &self,
        id: &ContainerId,
        server: &FunctionServer,
        web: &WebRuntime,
    ) {
        let WebRuntime::Port { port, readiness } = web else {
            return;
        };
        let path = self.runtime.cgroup_path(id);
        match crate::runtime::cgroup::pids(&path).first() {
            Some(&pid) => server.serve_web(pid, *port, readiness).await,
            // It ended already; its end is reported as any other.
            None => tracing::warn!(container = %id, "web endpoint container has no process left"),
        }
    }

    /// `Command::Web`: where one request's stream goes (the container's server, or the
    /// agent taking it as an input). `NotRunning` when the container is gone; refused (`Unavailable`) when it
    /// is not ready, draining, or its server does not accept: the ingress tries another.
    pub(super) async fn web(
        &self,
        owner: &Owner,
        generation: Generation,
    ) -> Result<(WebConnection, WebRequest), CommandReply> {
        let Some(server) = self.server(owner, generation) else {
            return Err(CommandReply::NotRunning);
        };
        server.web_connect().await.map_err(|e| {
            CommandReply::Refused(Refusal::new(
                RefusalCode::Unavailable,
                format!("{owner} generation {generation}: {e}"),
            ))
        })
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

    /// `Command::Drain` (with a preemption's deadline, if any).
    pub(super) fn drain(
        &self,
        owner: &Owner,
        generation: Generation,
        grace: Duration,
        preempt_deadline_ms: Option<u64>,
    ) -> CommandReply {
        match self.server(owner, generation) {
            Some(server) => {
                match preempt_deadline_ms {
                    Some(deadline) => server.preempt(deadline),
                    None => server.drain(grace),
                }
                CommandReply::Accepted
            }
            None => CommandReply::NotRunning,
        }
    }

    /// This node's spot-interruption watcher saw a notice: every function container hears
    /// the deadline at once and drains until it (the coordinator's drains follow).
    pub(super) fn preempt_all(&self, deadline_ms: u64) {
        for server in self.invoke.all() {
            server.preempt(deadline_ms);
        }
    }

    /// Sends the containers' answers and streamed chunks on `session`, in batches (one request and one commit
    /// for all the answers waiting), until each is noted (or refused, which is logged and
    /// drops it). Returns when the session fails; unsent answers stay for the next session.
    pub(super) async fn send_outputs(&self, session: &Session) {
        let outputs = self.invoke.outputs();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut sends = FuturesUnordered::new();
        loop {
            let pushed = outputs.pushed();
            if sends.len() < MAX_BATCHES_IN_FLIGHT {
                let waiting = outputs.pending(&in_flight, usize::MAX);
                let free = MAX_BATCHES_IN_FLIGHT - sends.len();
                for batch in batches(waiting, |(_, r)| r.size()).into_iter().take(free) {
                    let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
                    in_flight.extend(seqs.iter().copied());
                    // The coordinator applies a batch's chunks before its answers, which
                    // keeps each input's chunks before its answer (a chunk is never
                    // queued after its input's answer).
                    let mut outputs = Vec::new();
                    let mut chunks = Vec::new();
                    for (_, r) in &batch {
                        match r {
                            Report::Output(o) => outputs.push(o.to_item()),
                            Report::Chunk(c) => chunks.push(c.to_item()),
                        }
                    }
                    let request = Request::Outputs { outputs, chunks };
                    sends.push(async move { (seqs, session.request(&request).await) });
                }
            }
            tokio::select! {
                Some((seqs, answer)) = sends.next(), if !sends.is_empty() => {
                    let n = seqs.len();
                    match answer {
                        Ok(Response::Noted) => {
                            for seq in &seqs {
                                outputs.done(*seq);
                            }
                        }
                        Ok(Response::Refused(refusal)) if refusal.code == RefusalCode::Unavailable => {
                            // It could not record them now (its store): it asks for them again.
                            tracing::warn!(answers = n, %refusal, "the coordinator cannot record answers now; will resend");
                            tokio::time::sleep(RESEND_DELAY).await;
                        }
                        Ok(Response::Refused(refusal)) => {
                            tracing::warn!(answers = n, %refusal, "the coordinator refused answers; dropping them");
                            for seq in &seqs {
                                outputs.done(*seq);
                            }
                        }
                        Ok(other) => {
                            tracing::warn!(answers = n, answer = ?other, "answers not noted; will resend");
                            tokio::time::sleep(RESEND_DELAY).await;
                        }
                        Err(e) => {
                            tracing::warn!(answers = n, error = %e, "sending answers failed");
                            return;
                        }
                    }
                    for seq in &seqs {
                        in_flight.remove(seq);
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
