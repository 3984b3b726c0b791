//! The Flotilla coordinator, in the three layers of docs/ARCHITECTURE.md
//! plus the doors:
//!
//! - [`ledger`]: the replicated job ledger, a pure state machine;
//! - [`raft`]: the Raft node that replicates it, on a durable log, with its
//!   peer transport and the replica's identity;
//! - [`supervise`]: the leader's reconciler (pure) and the task that
//!   carries out its actions, checkpoint files included;
//! - [`serve`]: one replica assembled: the HTTP API, the worker API;
//! - [`api`], [`client`] and [`metrics`]: the API's JSON shapes, the CLI's
//!   client, and the Prometheus registry;
//! - `testkit` (feature `testkit`): real processes on loopback for tests,
//!   benchmarks and the demo.

pub mod api;
pub mod client;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod raft;
pub mod serve;
pub mod supervise;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::{Error, Result};
