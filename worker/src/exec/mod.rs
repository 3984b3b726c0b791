//! The `--exec` trainer: the worker launches and keeps one training process
//! per rank (as torchrun's agent does) and speaks to it over a Unix socket
//! (docs/TRAINER_PROTOCOL.md). The process copies its tensors into a
//! shared-memory buffer the worker owns; the worker does the rest of a
//! checkpoint as for the built-in trainer (safetensors, CRC-32C, write,
//! fsync, rename, report), and runs every restore check before the process
//! sees a byte.
//!
//! ```text
//! Restore{G, from, rendezvous} ─► stop the process group (SIGTERM, grace, SIGKILL)
//!                                 rank 0: pick MASTER_PORT, offer it ─► leader ─► every rank
//!                                 start CMD in generation G (its own process group)
//!   hello ◄──────────── process   fresh start: Restored{G, 0}
//!   restore(like) ◄──── process   checks (model, device memory, checksums) ─► Restored{G, S}
//!                                 (answered once the job resumes)
//!   step(n) ◄────────── process   "checkpoint now?" (a Checkpoint{C, n} directive)
//!   save_begin/save_done          the copy into shared memory is the stall; the shard is
//!                                 written in the background ─► ShardSaved
//!   finish(digest) ◄─── process   Finished{G, digest}; exit 0
//!   exit ≠ 0, signal, exit without finish ─► TrainerFailed{G}: the job restores
//! ```
//! Everything runs on one thread fed by one channel: the agent's
//! directives, the process's requests, its exit. Helper threads only move
//! bytes (accept, read requests, forward output, wait for the exit).
//!
//! `protocol` is the wire with the process, `process` starts, watches
//! and stops it, and `driver` is the shell that carries out what the
//! rank's [`RankMachine`](crate::rank_machine::RankMachine) says.

mod driver;
mod process;
mod protocol;

pub use driver::ExecRunner;
pub use protocol::TRAINER_PROTOCOL_VERSION;
use std::time::Duration;

/// How `flotilla worker --exec` runs the training process.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// SIGTERM to SIGKILL when the worker stops the process.
    pub stop_grace: Duration,
    /// The host rank 0's rendezvous is reached at (default: the address this
    /// worker reaches its coordinator from).
    pub master_addr: Option<String>,
    /// `LOCAL_RANK`.
    pub local_rank: u32,
    /// `LOCAL_WORLD_SIZE`.
    pub local_world_size: u32,
    /// `--gpu`: the process's `CUDA_VISIBLE_DEVICES`.
    pub gpu: Option<String>,
}
