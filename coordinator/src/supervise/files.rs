//! Checkpoint files brought in line with the ledger: MANIFEST.json,
//! LATEST, condemned manifests removed, retired directories deleted and
//! forgotten ones swept. One thread does the work, in the order the
//! supervisor asked (a manifest before the LATEST that names it); a failure
//! is reported back so the supervisor asks again.

use super::task::SupervisorInput;
use super::{FileWork, Observation};
use crate::raft::node::NodeHandle;
use flotilla_shared::ids::{CheckpointId, JobName};
use flotilla_shared::layout::{JobDir, Manifest, MANIFEST_FILE};
use flotilla_shared::shard::read_header;
use std::time::Duration;
use tokio::sync::mpsc;

/// Starts the thread that brings checkpoint files in line with the ledger,
/// one piece of work at a time in the order the supervisor asked (a
/// manifest before the LATEST that names it).
pub(super) fn start_file_worker(
    node: NodeHandle,
    inputs: mpsc::Sender<SupervisorInput>,
) -> std::sync::mpsc::Sender<(JobName, FileWork)> {
    let (tx, rx) = std::sync::mpsc::channel::<(JobName, FileWork)>();
    let spawned = std::thread::Builder::new().name("flotilla-files".into()).spawn(move || {
        while let Ok((job, work)) = rx.recv() {
            if let Err(e) = file_work(&node, &job, work) {
                tracing::error!(%job, ?work, "checkpoint file work failed (retried): {e}");
                let _ =
                    inputs.blocking_send(SupervisorInput::Observe(Observation::FileWorkFailed { job, work }));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the checkpoint file thread: {e}");
    }
    tx
}

/// Fills in each rank's per-variable list (SPEC §3), which the ledger does
/// not keep, from the shard's header. The ledger's whole-file checksum
/// stays the authority: a header that was changed since makes `flotilla
/// inspect` fail on that checksum. A rank whose header cannot be read keeps
/// an empty list, and its shard is still verified by the whole-file checksum.
fn with_tensor_lists(m: &mut Manifest, checkpoint_dir: &std::path::Path) {
    for shard in m.ranks.iter_mut().filter(|s| s.tensors.is_empty()) {
        let label = format!("checkpoint {} rank {}", m.id, shard.rank);
        match read_header(&checkpoint_dir.join(&shard.file), &label).map(|h| h.records()) {
            Ok(Some(records)) => shard.tensors = records,
            Ok(None) => tracing::warn!(
                "{label}: its header has no checksums; MANIFEST.json lists no variables for it"
            ),
            Err(e) => tracing::warn!("{e}; MANIFEST.json lists no variables for it"),
        }
    }
}

fn file_work(node: &NodeHandle, job: &JobName, work: FileWork) -> std::io::Result<()> {
    let found = node.read_state(|st| {
        let j = st.jobs.get(job)?;
        let dir = JobDir::new(&j.spec.checkpoint.root, &j.spec.name);
        let manifest = match work {
            FileWork::Manifest(id) => j.checkpoints.get(&id).map(|c| {
                let at = c.ended_ms.unwrap_or_else(Manifest::now_unix_ms);
                Manifest {
                    job: job.clone(),
                    id,
                    step: c.step,
                    generation: c.generation,
                    world_size: j.spec.world_size,
                    created: Manifest::format_time(at),
                    created_unix_ms: at,
                    ranks: c.shards.clone(),
                }
            }),
            _ => None,
        };
        Some((dir, manifest))
    });
    let Some((dir, manifest)) = found else { return Ok(()) };
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    match work {
        FileWork::Manifest(id) => match manifest {
            Some(_) if !dir.checkpoint_dir(id).is_dir() => {
                tracing::error!(%job, checkpoint = %id, "committed checkpoint's directory {} is missing", dir.checkpoint_dir(id).display());
                Ok(())
            }
            Some(mut m) => {
                let ckpt = dir.checkpoint_dir(id);
                with_tensor_lists(&mut m, &ckpt);
                m.write(&ckpt).map_err(std::io::Error::other)
            }
            None => Ok(()),
        },
        FileWork::Condemn(id) => {
            tracing::warn!(%job, checkpoint = %id, "condemned: removing its MANIFEST.json");
            ignore_missing(std::fs::remove_file(dir.checkpoint_dir(id).join(MANIFEST_FILE)))
        }
        FileWork::Delete(id) => {
            let path = dir.checkpoint_dir(id);
            let result = ignore_missing(std::fs::remove_dir_all(&path));
            if result.is_ok() {
                tracing::debug!("deleted {}", path.display());
            }
            result
        }
        FileWork::Sweep(_) => {
            let known = node.read_state(|st| {
                st.jobs
                    .get(job)
                    .map(|j| (j.checkpoints.keys().copied().collect::<Vec<_>>(), j.next_checkpoint))
            });
            let Some((known, next)) = known else { return Ok(()) };
            for id in sweep(&dir, &known, next)? {
                tracing::debug!(%job, checkpoint = %id, "swept its directory");
            }
            Ok(())
        }
        FileWork::Latest(Some(id)) => dir.write_latest(id).map_err(std::io::Error::other),
        FileWork::Latest(None) => ignore_missing(std::fs::remove_file(dir.latest_path())),
    }
}

/// Deletes the directories of checkpoint ids the ledger handed out (below
/// `next`) and no longer knows (their tombstones were pruned); returns them.
fn sweep(dir: &JobDir, known: &[CheckpointId], next: CheckpointId) -> std::io::Result<Vec<CheckpointId>> {
    let mut swept = Vec::new();
    for (id, path) in dir.list_checkpoint_dirs().map_err(std::io::Error::other)? {
        if id < next && !known.contains(&id) {
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => swept.push(id),
            }
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_deletes_only_directories_of_forgotten_ids() {
        let root = tempfile::tempdir().unwrap();
        let dir = JobDir::new(root.path(), &JobName::new("a").unwrap());
        for id in 1..=6 {
            std::fs::create_dir_all(dir.checkpoint_dir(CheckpointId(id))).unwrap();
        }
        std::fs::write(dir.checkpoint_dir(CheckpointId(2)).join("rank-00000.safetensors"), b"x").unwrap();
        // known: 3 and 5; 6 is beyond what the ledger handed out (a
        // checkpoint being begun elsewhere is never swept)
        let known = [CheckpointId(3), CheckpointId(5)];
        let swept = sweep(&dir, &known, CheckpointId(6)).unwrap();
        assert_eq!(swept, [CheckpointId(1), CheckpointId(2), CheckpointId(4)]);
        let left: Vec<CheckpointId> =
            dir.list_checkpoint_dirs().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(left, [CheckpointId(3), CheckpointId(5), CheckpointId(6)]);
        // nothing left to do the second time; a missing root is no error
        assert!(sweep(&dir, &known, CheckpointId(6)).unwrap().is_empty());
        let gone = JobDir::new(&root.path().join("nowhere"), &JobName::new("a").unwrap());
        assert!(sweep(&gone, &known, CheckpointId(6)).unwrap().is_empty());
    }
}
