//! Helpers shared by the end-to-end tests: build real checkpoints on disk
//! with the product's own writer, and run the real `flotilla` binary.

#![allow(dead_code)]

use flotilla_shared::ids::{CheckpointId, Generation, JobName, Rank, Step};
use flotilla_shared::layout::{JobDir, Manifest};
use flotilla_shared::shard::{write_shard, ShardManifest, ShardMeta};
use flotilla_shared::spec::TrainerSpec;
use flotilla_worker::trainer::{BuiltinTrainer, Trainer};
use std::path::Path;
use std::process::{Command, Output};

pub mod exec;

/// A small trainer spec: a few hundred KiB per rank.
pub fn small_spec() -> TrainerSpec {
    TrainerSpec { params_per_rank_bytes: 256 << 10, layers: 2, seed: 11, ..TrainerSpec::default() }
}

/// A trainer for `rank` advanced to `step`, and its snapshot bytes.
pub fn trained(rank: u32, step: u64) -> (BuiltinTrainer, Vec<u8>) {
    let mut t = BuiltinTrainer::new(&small_spec(), Rank(rank));
    for _ in 0..step {
        t.step();
    }
    let mut buf = vec![0u8; t.snapshot_bytes()];
    t.snapshot_into(&mut buf);
    (t, buf)
}

/// Writes checkpoint `id` of job `name` with `world_size` ranks under
/// `root`; `committed` adds MANIFEST.json and LATEST as the coordinator does
/// after a commit.
pub fn write_checkpoint(
    root: &Path,
    name: &str,
    id: u64,
    world_size: u32,
    committed: bool,
) -> Vec<ShardManifest> {
    let job = JobName::new(name).unwrap();
    let dir = JobDir::new(root, &job);
    std::fs::create_dir_all(dir.checkpoint_dir(CheckpointId(id))).unwrap();
    let step = 10 * id;
    let mut shards = Vec::new();
    for rank in 0..world_size {
        let (t, buf) = trained(rank, step);
        let meta = ShardMeta {
            job: job.clone(),
            checkpoint: CheckpointId(id),
            rank: Rank(rank),
            step: Step(step),
            generation: Generation(1),
        };
        shards.push(
            write_shard(&dir.shard_path(CheckpointId(id), Rank(rank)), &meta, t.variables(), &buf).unwrap(),
        );
    }
    if committed {
        let now = Manifest::now_unix_ms();
        Manifest {
            job,
            id: CheckpointId(id),
            step: Step(step),
            generation: Generation(1),
            world_size,
            created: Manifest::format_time(now),
            created_unix_ms: now,
            ranks: shards.clone(),
        }
        .write(&dir.checkpoint_dir(CheckpointId(id)))
        .unwrap();
        dir.write_latest(CheckpointId(id)).unwrap();
    }
    shards
}

/// Runs the `flotilla` binary built for these tests.
pub fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("run flotilla")
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The `flotilla` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// A job spec with a checkpoint root under `root`.
pub fn job_toml(name: &str, world_size: u32, root: &Path) -> String {
    format!(
        "name = \"{name}\"\nworld_size = {world_size}\n\n[checkpoint]\nevery_steps = 10\nroot = \"{}\"\n",
        root.display()
    )
}

/// Polls `probe` every 20 ms until it yields a value; panics with `what`
/// and the last observation after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}
