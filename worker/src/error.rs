//! The worker crate's errors, and its one [`Result`].
//!
//! Every message is what people read in the log, in status and in the
//! coordinator's reasons: each variant spells it out once.

use crate::device::{human_bytes, DeviceError};
use crate::snapshot::SnapshotError;
use flotilla_shared::ids::Rank;
use flotilla_shared::wire::RestoreFailureKind;

/// The worker crate's result: [`WorkerError`] unless a seam says otherwise.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad flags or environment.
    #[error("{0}")]
    Config(String),
    /// A newer process of this rank took over.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The coordinator refused the job or rank.
    #[error("{0}")]
    Refused(String),
    /// The device memory reader could not be opened (`--gpu`, `--require-gpu`).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Why the built-in trainer's memory and snapshot buffer were not provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The host's memory figures cannot be read.
    #[error("rank {rank}: {source}")]
    Device {
        /// The rank.
        rank: Rank,
        /// Why.
        source: DeviceError,
    },
    /// The host has less memory free than the start needs.
    #[error(
        "rank {rank} on {device}: start needs {} (trainer.params_per_rank_bytes = {params}: weights, optimizer \
         state and the snapshot buffer), {} free; lower trainer.params_per_rank_bytes or free memory on the host",
        human_bytes(*need),
        human_bytes(*free)
    )]
    TooLittle {
        /// The rank.
        rank: Rank,
        /// The device as people name it.
        device: String,
        /// Bytes needed, headroom included.
        need: u64,
        /// `trainer.params_per_rank_bytes`.
        params: u64,
        /// Bytes free.
        free: u64,
    },
    /// An allocation was refused although the figures allowed it.
    #[error(
        "rank {rank} on {device}: the host refused {what} (trainer.params_per_rank_bytes = {params}), {} free; \
         lower trainer.params_per_rank_bytes or free memory on the host",
        human_bytes(*free)
    )]
    Refused {
        /// The rank.
        rank: Rank,
        /// The device as people name it.
        device: String,
        /// What was refused.
        what: String,
        /// `trainer.params_per_rank_bytes`.
        params: u64,
        /// Bytes free.
        free: u64,
    },
    /// The snapshot pipeline could not be built.
    #[error("rank {rank}: {source}")]
    Snapshot {
        /// The rank.
        rank: Rank,
        /// Why.
        source: SnapshotError,
    },
}

/// A restore refused: what it means for the job, and why in words.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RestoreRefusal {
    /// What it means for the job.
    pub kind: RestoreFailureKind,
    /// Why.
    pub message: String,
}

impl RestoreRefusal {
    /// A refusal of `kind`.
    pub fn new(kind: RestoreFailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Why a request of the trainer process was not understood.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A frame larger than the protocol allows.
    #[error("a frame of {len} bytes exceeds {max}")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The largest allowed.
        max: usize,
    },
    /// A frame that is no request.
    #[error("malformed request: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Why the tensors a trainer declared are not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclError {
    /// A tensor without a name.
    #[error("a tensor has an empty name")]
    EmptyName,
    /// Two tensors of one name.
    #[error("tensor {0} is named twice")]
    NamedTwice(String),
    /// A dtype not in safetensors' list.
    #[error(
        "tensor {name} has dtype {dtype:?}; use one of BOOL U8 I8 I16 U16 I32 U32 I64 U64 F16 BF16 F32 F64"
    )]
    Dtype {
        /// The tensor.
        name: String,
        /// The dtype given.
        dtype: String,
    },
    /// A tensor larger than the worker takes.
    #[error("tensor {name} of shape {shape:?} is larger than this worker takes (1 TiB)")]
    TooLarge {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// Why a node agent stopped, or a connection of it ended.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad flags.
    #[error("{0}")]
    Config(&'static str),
    /// The worker protocol's handshake or framing failed.
    #[error(transparent)]
    Session(#[from] flotilla_shared::frame::SessionError),
    /// A local worker broke the node agent's rules.
    #[error("{0}")]
    Local(&'static str),
    /// The node session could not be opened.
    #[error("{0}")]
    Open(String),
}

/// Why a trainer process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its socket could not be made.
    #[error("cannot listen on {}: {source}", socket.display())]
    Listen {
        /// The socket's path.
        socket: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The command could not be run.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words people read are those the worker wrote before its errors
    /// were typed.
    #[test]
    fn messages_read_as_before() {
        let rank = Rank(3);
        let too_little = ProvisionError::TooLittle {
            rank,
            device: "host memory".into(),
            need: 3 << 30,
            params: 1 << 30,
            free: 1 << 30,
        };
        assert_eq!(
            too_little.to_string(),
            format!(
                "rank {rank} on host memory: start needs 3.0 GiB (trainer.params_per_rank_bytes = {}: weights, \
                 optimizer state and the snapshot buffer), 1.0 GiB free; lower trainer.params_per_rank_bytes or \
                 free memory on the host",
                1u64 << 30
            )
        );
        let refused = ProvisionError::Refused {
            rank,
            device: "host memory".into(),
            what: "the trainer's memory".into(),
            params: 10,
            free: 512,
        };
        assert_eq!(
            refused.to_string(),
            format!(
                "rank {rank} on host memory: the host refused the trainer's memory (trainer.params_per_rank_bytes = 10), \
                 512 B free; lower trainer.params_per_rank_bytes or free memory on the host"
            )
        );
        let dtype = DeclError::Dtype { name: "w".into(), dtype: "float32".into() };
        assert_eq!(
            dtype.to_string(),
            "tensor w has dtype \"float32\"; use one of BOOL U8 I8 I16 U16 I32 U32 I64 U64 F16 BF16 F32 F64"
        );
        let large = DeclError::TooLarge { name: "w".into(), shape: vec![2, 3] };
        assert_eq!(large.to_string(), "tensor w of shape [2, 3] is larger than this worker takes (1 TiB)");
        let frame = ProtocolError::FrameTooLarge { len: 20, max: 16 };
        assert_eq!(frame.to_string(), "a frame of 20 bytes exceeds 16");
        let spawn = StartError::Spawn { command: "x y".into(), source: std::io::Error::other("gone") };
        assert_eq!(spawn.to_string(), "cannot start `x y`: gone");
    }
}
