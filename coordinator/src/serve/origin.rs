//! The checkpoint a job starts from when its spec names another job's
//! (`[checkpoint] resume_from`): read from storage by the replica that
//! submits the job, before the submission is proposed.

use crate::ledger::Origin;
use flotilla_shared::layout::{JobDir, LayoutError, Manifest};
use flotilla_shared::shard::ShardManifest;
use flotilla_shared::spec::JobSpec;
use std::path::PathBuf;

/// Why the `resume_from` checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// Its LATEST or MANIFEST.json is unreadable or damaged.
    #[error("checkpoint.resume_from: {0}")]
    Layout(#[from] LayoutError),
    /// The directory has no committed checkpoint.
    #[error(
        "checkpoint.resume_from = {}: no committed checkpoint there (no LATEST); point it at a job's checkpoint directory, <root>/<job>",
        .0.display()
    )]
    NoLatest(PathBuf),
}

/// Reads the committed checkpoint a spec's `[checkpoint] resume_from` names
/// (the latest of that job), for [`crate::ledger::Command::SubmitJob`].
pub fn read_origin(spec: &JobSpec) -> Result<Option<Box<Origin>>, OriginError> {
    let Some(from) = &spec.checkpoint.resume_from else { return Ok(None) };
    let dir = JobDir::at(from);
    let id = dir.read_latest()?.ok_or_else(|| OriginError::NoLatest(from.clone()))?;
    let m = Manifest::read(&dir.checkpoint_dir(id))?;
    // the whole-file checksums are enough to verify (see ShardDigest)
    let shards = m.ranks.iter().map(ShardManifest::digest).collect();
    Ok(Some(Box::new(Origin { job: m.job, id, step: m.step, dir: dir.checkpoint_dir(id), shards })))
}
