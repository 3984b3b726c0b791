//! The Flotilla worker: the agent that connects to the coordinator leader
//! ([`agent`]), the trainer thread ([`runner`]) driving a [`trainer`], the
//! snapshot pipeline ([`snapshot`]), device memory checks ([`device`]),
//! metrics, the `flotilla bench snapshot` harness ([`bench`]), and the node
//! agent that carries a host's ranks on one connection ([`node`]).

pub mod agent;
pub mod bench;
pub mod copies;
pub mod device;
pub mod error;
pub mod exec;
pub mod metrics;
pub mod node;
pub mod rank_machine;
pub mod runner;
pub mod shm;
pub mod snapshot;
pub mod trainer;

pub use error::{Result, WorkerError};
