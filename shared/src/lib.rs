//! Definitions both sides of Flotilla import: ids, the job spec, the wire
//! protocol and its framing, the checkpoint layout on storage and the shard
//! format (safetensors with checksums in a manifest).
//!
//! Everything here is I/O-free except the small, explicit file helpers in
//! [`durable`], [`layout`] and [`shard`], which the coordinator and the worker
//! share so that a checkpoint has exactly one definition.

pub mod checksum;
pub mod durable;
pub mod error;
pub mod frame;
pub mod ids;
pub mod inspect;
pub mod layout;
pub mod shard;
pub mod spec;
pub mod tls;
pub mod wire;

pub use error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!(
    "flotilla writes safetensors (little-endian) by copying memory; big-endian hosts are not supported"
);

/// This build's version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this build came from (`unknown` without git or
/// `FLOTILLA_COMMIT`).
pub const COMMIT: &str = env!("FLOTILLA_COMMIT");

/// Registers what every Flotilla process exports besides its own series:
/// the `process_*` series (CPU, memory, file descriptors, start time) and
/// `flotilla_build_info{version,commit}`, always 1.
pub fn register_process_metrics(registry: &prometheus::Registry) {
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
        .expect("registered once");
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("flotilla_build_info", "Always 1; the labels name the build."),
        &["version", "commit"],
    )
    .expect("valid metric");
    info.with_label_values(&[VERSION, COMMIT]).set(1);
    registry.register(Box::new(info)).expect("registered once");
}
