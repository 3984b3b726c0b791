//! Offline inspection of checkpoints (`flotilla inspect`), no coordinator
//! needed: resolves a path to a checkpoint, lists every rank's variables
//! from the shard headers and, on request, verifies every checksum against
//! MANIFEST.json.

use crate::layout::{parse_checkpoint_dir_name, JobDir, LayoutError, Manifest, MANIFEST_FILE};
use crate::shard::{read_header, Shard, ShardError, ShardHeader};
use std::path::{Path, PathBuf};

/// What `inspect` found at a path.
#[derive(Debug)]
pub struct Inspection {
    /// The checkpoint directory inspected.
    pub dir: PathBuf,
    /// MANIFEST.json, present only for a committed checkpoint.
    pub manifest: Option<Manifest>,
    /// Each shard's file and parsed header, by rank order.
    pub shards: Vec<(PathBuf, ShardHeader)>,
}

/// Why a path could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The path is not a checkpoint, a job's checkpoint root or a shard.
    #[error("{0}")]
    NotACheckpoint(String),
    /// A layout file (LATEST, MANIFEST.json) is unreadable or invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A shard is unreadable, damaged or fails verification.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

fn shard_label(manifest: Option<&Manifest>, file: &Path) -> String {
    match (manifest, file.file_name().and_then(|n| n.to_str())) {
        (Some(m), Some(name)) => match m.ranks.iter().find(|r| r.file == name) {
            Some(r) => format!("checkpoint {} rank {}", m.id, r.rank),
            None => file.display().to_string(),
        },
        _ => file.display().to_string(),
    }
}

/// Resolves `path` (a job's checkpoint root, a checkpoint directory or one
/// shard file) and reads the headers of the shards there.
pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let manifest = read_manifest_if_any(&dir)?;
        let header = read_header(path, &shard_label(manifest.as_ref(), path))?;
        return Ok(Inspection { dir, manifest, shards: vec![(path.to_path_buf(), header)] });
    }
    if !path.is_dir() {
        return Err(InspectError::NotACheckpoint(format!("{} does not exist", path.display())));
    }
    let job = JobDir::at(path);
    let dir = if job.latest_path().exists() {
        let id = job.read_latest()?.expect("LATEST exists");
        job.checkpoint_dir(id)
    } else {
        let is_ckpt = path.join(MANIFEST_FILE).exists()
            || path.file_name().and_then(|n| n.to_str()).and_then(parse_checkpoint_dir_name).is_some();
        if !is_ckpt {
            let dirs = job.list_checkpoint_dirs()?;
            let hint = match dirs.last() {
                Some((_, last)) => {
                    format!("; inspect one checkpoint directly, e.g. {}", last.display())
                }
                None => String::from("; pass a job's checkpoint root (<root>/<job>) or a ckpt-* directory"),
            };
            return Err(InspectError::NotACheckpoint(format!(
                "{} has no LATEST, so no checkpoint there was ever committed{hint}",
                path.display()
            )));
        }
        path.to_path_buf()
    };
    let manifest = read_manifest_if_any(&dir)?;
    let files: Vec<PathBuf> = match &manifest {
        Some(m) => m.ranks.iter().map(|r| dir.join(&r.file)).collect(),
        None => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|source| LayoutError::Io { path: dir.clone(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("rank-") && n.ends_with(".safetensors"))
                })
                .collect();
            files.sort();
            files
        }
    };
    let mut shards = Vec::with_capacity(files.len());
    for file in files {
        let header = read_header(&file, &shard_label(manifest.as_ref(), &file))?;
        shards.push((file, header));
    }
    Ok(Inspection { dir, manifest, shards })
}

fn read_manifest_if_any(dir: &Path) -> Result<Option<Manifest>, LayoutError> {
    if dir.join(MANIFEST_FILE).exists() {
        Manifest::read(dir).map(Some)
    } else {
        Ok(None)
    }
}

impl Inspection {
    /// Re-reads every shard and checks every checksum against the manifest.
    /// Returns the number of variables verified.
    pub fn verify(&self) -> Result<usize, InspectError> {
        let manifest = self.manifest.as_ref().ok_or_else(|| {
            InspectError::NotACheckpoint(format!(
                "cannot verify {}: it has no {MANIFEST_FILE}, so it was never committed and there are no checksums to check against",
                self.dir.display()
            ))
        })?;
        let mut variables = 0;
        for (file, _) in &self.shards {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let entry = manifest.ranks.iter().find(|r| r.file == name).ok_or_else(|| {
                InspectError::NotACheckpoint(format!("{} is not listed in {MANIFEST_FILE}", file.display()))
            })?;
            let shard = Shard::read_verified(
                file,
                &format!("checkpoint {} rank {}", manifest.id, entry.rank),
                entry,
            )?;
            variables += shard.header.tensors.len();
        }
        Ok(variables)
    }
}
