//! What a worker connection (one rank's, or a node session's) hands the
//! supervisor, shared by both kinds.

use crate::supervise::input::{Outbox, SupervisorInput};
use crate::supervise::{ConnId, Observation, Registration};
use flotilla_shared::tls::Stream;
use flotilla_shared::wire::{CoordinatorMessage, WorkerMessage};
use tokio::sync::mpsc;

/// A worker connection's frames.
pub(super) type WorkerConn = flotilla_shared::frame::Connection<Stream, WorkerMessage, CoordinatorMessage>;

/// What a connection tells the supervisor.
pub(super) struct Inputs(pub(super) mpsc::Sender<SupervisorInput>);

impl Inputs {
    /// A rank registered on `conn` (`msg` is its `Register`); false when
    /// the supervisor is gone.
    pub(super) async fn register(&self, conn: ConnId, tx: &Outbox, msg: WorkerMessage) -> bool {
        let WorkerMessage::Register { job, rank, incarnation, generation, step, host, http_addr } = msg
        else {
            return true;
        };
        let registration = Registration { conn, job, rank, incarnation, generation, step, host, http_addr };
        self.0.send(SupervisorInput::Connected { conn, tx: tx.clone() }).await.is_ok()
            && self.0.send(SupervisorInput::Observe(Observation::Registered(registration))).await.is_ok()
    }

    pub(super) async fn message(&self, conn: ConnId, msg: WorkerMessage) -> bool {
        self.0.send(SupervisorInput::Observe(Observation::Message { conn, msg })).await.is_ok()
    }

    pub(super) async fn disconnected(&self, conn: ConnId) {
        let _ = self.0.send(SupervisorInput::Observe(Observation::Disconnected { conn })).await;
    }
}
