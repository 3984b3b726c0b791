//! Replication: one task owns the raft-rs `RawNode` ([`node`]) on a durable
//! log ([`storage`]), speaking to its peers over [`transport`]; what a
//! replica says of itself ([`replica`]) and who it is on disk ([`identity`]).
//! It applies the [`crate::ledger`] and knows nothing of supervision or HTTP.

pub mod identity;
mod log;
pub mod node;
pub mod replica;
pub mod storage;
pub mod transport;
