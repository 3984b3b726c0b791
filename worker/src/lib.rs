//! The Flotilla worker: trainers, the snapshot pipeline and the benchmark
//! harness of `flotilla bench snapshot`.

pub mod bench;
pub mod snapshot;
pub mod trainer;
