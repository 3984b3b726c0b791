//! Checkpoint files brought in line with the ledger: MANIFEST.json,
//! LATEST, condemned manifests removed, retired directories deleted and
//! forgotten ones swept, and a deleted job's directory removed when asked. Each job has its own thread, which does the job's
//! work in the order the supervisor asked (a manifest before the LATEST that
//! names it); a failure is reported back so the supervisor asks again, and
//! backs off that job only: a slow or failing root holds up no other job.

use super::input::SupervisorInput;
use super::{FileWork, Observation};
use crate::raft::node::NodeHandle;
use flotilla_shared::ids::{CheckpointId, JobName};
use flotilla_shared::layout::{JobDir, Manifest, MANIFEST_FILE};
use flotilla_shared::shard::{read_header, ShardManifest};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// A job's file thread waits this long after a failure, doubling up to
/// [`MAX_BACKOFF`] while failures continue.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Shard headers read at once for one MANIFEST.json: half the cores, at
/// most 8. The work is off every round's path, and a leader on two cores
/// keeps one for the rounds.
fn header_readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 8))
}

/// The file threads, one per job, started on the job's first work.
pub(super) struct Files {
    node: NodeHandle,
    inputs: mpsc::Sender<SupervisorInput>,
    jobs: HashMap<JobName, std::sync::mpsc::Sender<FileWork>>,
}

impl Files {
    pub(super) fn new(node: NodeHandle, inputs: mpsc::Sender<SupervisorInput>) -> Self {
        Self { node, inputs, jobs: HashMap::new() }
    }

    /// Queues `work` on `job`'s thread (started if it has none).
    pub(super) fn send(&mut self, job: JobName, mut work: FileWork) {
        if let Some(tx) = self.jobs.get(&job) {
            match tx.send(work) {
                Ok(()) => return,
                // its thread ended: a new one takes the work
                Err(std::sync::mpsc::SendError(back)) => work = back,
            }
        }
        let (tx, rx) = std::sync::mpsc::channel::<FileWork>();
        let (node, inputs, name) = (self.node.clone(), self.inputs.clone(), job.clone());
        let spawned = std::thread::Builder::new().name(format!("files-{job}")).spawn(move || {
            let mut backoff = FIRST_BACKOFF;
            while let Ok(work) = rx.recv() {
                match file_work(&node, &name, &work) {
                    Ok(()) => backoff = FIRST_BACKOFF,
                    Err(e) => {
                        tracing::error!(job = %name, ?work, "checkpoint file work failed (retried in {backoff:?}): {e}");
                        let failed = Observation::FileWorkFailed { job: name.clone(), work };
                        let _ = inputs.blocking_send(SupervisorInput::Observe(failed));
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
        match spawned {
            Ok(_) => {
                let _ = tx.send(work);
                self.jobs.insert(job, tx);
            }
            Err(e) => {
                tracing::error!(%job, "cannot start the checkpoint file thread: {e}");
                let failed = Observation::FileWorkFailed { job, work };
                let _ = self.inputs.try_send(SupervisorInput::Observe(failed));
            }
        }
    }
}

/// Fills in each rank's per-variable list (SPEC §3), which the ledger does
/// not keep, from the shard's header (read by [`header_readers`] threads
/// at once). The ledger's whole-file checksum stays the authority:
/// a header that was changed since makes `flotilla inspect` fail on that
/// checksum. A rank whose header cannot be read keeps an empty list, and its
/// shard is still verified by the whole-file checksum.
fn with_tensor_lists(m: &mut Manifest, checkpoint_dir: &std::path::Path) {
    let id = m.id;
    let fill = |shard: &mut ShardManifest| {
        let label = format!("checkpoint {id} rank {}", shard.rank);
        match read_header(&checkpoint_dir.join(&shard.file), &label).map(|h| h.records()) {
            Ok(Some(records)) => shard.tensors = records,
            Ok(None) => tracing::warn!(
                "{label}: its header has no checksums; MANIFEST.json lists no variables for it"
            ),
            Err(e) => tracing::warn!("{e}; MANIFEST.json lists no variables for it"),
        }
    };
    let per_reader = m.ranks.len().div_ceil(header_readers()).max(1);
    std::thread::scope(|scope| {
        for part in m.ranks.chunks_mut(per_reader) {
            scope.spawn(|| part.iter_mut().filter(|s| s.tensors.is_empty()).for_each(fill));
        }
    });
}

fn file_work(node: &NodeHandle, job: &JobName, work: &FileWork) -> std::io::Result<()> {
    if let FileWork::RemoveJob(path) = work {
        // the ledger no longer knows the job; a job of that name submitted
        // since keeps whatever is there
        if node.read_state(|st| st.jobs.contains_key(job)) {
            tracing::warn!(%job, "job submitted again before its old directory was removed; keeping {}", path.display());
            return Ok(());
        }
        return remove_job_dir(path);
    }
    let work = work.clone();
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
                    ranks: c.shards.iter().cloned().map(ShardManifest::from).collect(),
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
                st.jobs.get(job).map(|j| {
                    let mut known: Vec<CheckpointId> = j.checkpoints.keys().copied().collect();
                    // a job resumed from a deleted job of its name starts
                    // from a directory of that job's: it is never swept
                    known.extend(j.origin.as_ref().filter(|o| o.job == *job).map(|o| o.id));
                    (known, j.next_checkpoint)
                })
            });
            let Some((known, next)) = known else { return Ok(()) };
            for id in sweep(&dir, &known, next)? {
                tracing::debug!(%job, checkpoint = %id, "swept its directory");
            }
            Ok(())
        }
        FileWork::Latest(Some(id)) => dir.write_latest(id).map_err(std::io::Error::other),
        FileWork::Latest(None) => ignore_missing(std::fs::remove_file(dir.latest_path())),
        FileWork::RemoveJob(_) => Ok(()),
    }
}

/// Removes a deleted job's directory (gone already is no error).
fn remove_job_dir(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => {
            tracing::info!("removed the deleted job's directory {}", path.display());
            Ok(())
        }
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
    fn a_deleted_jobs_directory_is_removed_and_gone_already_is_no_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = JobDir::new(root.path(), &JobName::new("a").unwrap());
        std::fs::create_dir_all(dir.checkpoint_dir(CheckpointId(1))).unwrap();
        std::fs::write(dir.latest_path(), b"1").unwrap();
        let other = JobDir::new(root.path(), &JobName::new("b").unwrap());
        std::fs::create_dir_all(other.checkpoint_dir(CheckpointId(1))).unwrap();
        remove_job_dir(dir.path()).unwrap();
        assert!(!dir.path().exists());
        assert!(other.checkpoint_dir(CheckpointId(1)).is_dir(), "another job's files stay");
        remove_job_dir(dir.path()).unwrap();
    }

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
