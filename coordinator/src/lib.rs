//! The Flotilla coordinator: the replicated job ledger ([`state`]), its Raft
//! node ([`node`]) on a durable log ([`storage`]) with a TCP peer transport
//! ([`transport`]), the HTTP API ([`http`], [`api`]) and its client
//! ([`client`]), assembled by [`server`].

pub mod api;
pub mod bench;
pub mod client;
pub mod http;
pub mod identity;
pub mod local;
mod log;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod replica;
pub mod server;
pub mod state;
pub mod storage;
pub mod supervisor;
pub mod transport;
pub mod workers;
