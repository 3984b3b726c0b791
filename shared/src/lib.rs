//! Definitions both sides of Flotilla import: ids, the job spec, the wire
//! protocol and its framing, the checkpoint layout on storage and the shard
//! format (safetensors with checksums in a manifest).
//!
//! Everything here is I/O-free except the small, explicit file helpers in
//! [`durable`], [`layout`] and [`shard`], which the coordinator and the worker
//! share so that a checkpoint has exactly one definition.

pub mod checksum;
pub mod durable;
pub mod frame;
pub mod ids;
pub mod inspect;
pub mod layout;
pub mod shard;
pub mod spec;
pub mod tls;
pub mod wire;

#[cfg(target_endian = "big")]
compile_error!(
    "flotilla writes safetensors (little-endian) by copying memory; big-endian hosts are not supported"
);
