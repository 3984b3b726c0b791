//! The checkpoint layout on storage (SPEC §3):
//!
//! ```text
//! <root>/<job>/
//!   ckpt-00000007/
//!     rank-00000.safetensors   one shard per rank
//!     MANIFEST.json            written only once the checkpoint is committed
//!   LATEST                     id of the latest committed checkpoint
//! ```
//! The Raft ledger is the authority on what is committed; MANIFEST.json and
//! LATEST are written after commit as a convenience for offline tools, so a
//! directory without MANIFEST.json is never a committed checkpoint.

use crate::durable;
use crate::ids::{CheckpointId, Generation, JobName, Rank, Step};
use crate::shard::ShardManifest;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the committed-checkpoint manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// Name of the file holding the latest committed checkpoint id.
pub const LATEST_FILE: &str = "LATEST";

/// Directory name of checkpoint `id`: `ckpt-00000007`.
pub fn checkpoint_dir_name(id: CheckpointId) -> String {
    format!("ckpt-{:08}", id.0)
}

/// Parses `ckpt-00000007` back into an id.
pub fn parse_checkpoint_dir_name(name: &str) -> Option<CheckpointId> {
    let digits = name.strip_prefix("ckpt-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(CheckpointId)
}

/// File name of `rank`'s shard: `rank-00002.safetensors`.
pub fn shard_file_name(rank: Rank) -> String {
    format!("rank-{:05}.safetensors", rank.0)
}

/// Paths of one job's checkpoints under a checkpoint root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    dir: PathBuf,
}

impl JobDir {
    /// `<root>/<job>`.
    pub fn new(root: &Path, job: &JobName) -> Self {
        Self { dir: root.join(job.as_str()) }
    }

    /// A job directory given directly (e.g. by `flotilla inspect`).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The job directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `<root>/<job>/ckpt-<id, 8 digits>`.
    pub fn checkpoint_dir(&self, id: CheckpointId) -> PathBuf {
        self.dir.join(checkpoint_dir_name(id))
    }

    /// Where `rank` writes its shard of checkpoint `id`.
    pub fn shard_path(&self, id: CheckpointId, rank: Rank) -> PathBuf {
        self.checkpoint_dir(id).join(shard_file_name(rank))
    }

    /// `<root>/<job>/LATEST`.
    pub fn latest_path(&self) -> PathBuf {
        self.dir.join(LATEST_FILE)
    }

    /// The id in LATEST, or `None` when no checkpoint was ever committed.
    pub fn read_latest(&self) -> Result<Option<CheckpointId>, LayoutError> {
        let path = self.latest_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(|n| Some(CheckpointId(n))).map_err(|_| {
                LayoutError::Invalid { path, why: format!("{:?} is not a checkpoint id", text.trim()) }
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LayoutError::Io { path, source }),
        }
    }

    /// Durably points LATEST at `id`.
    pub fn write_latest(&self, id: CheckpointId) -> Result<(), LayoutError> {
        let path = self.latest_path();
        durable::write_atomic(&path, |f| writeln!(f, "{}", id.0))
            .map_err(|source| LayoutError::Io { path, source })
    }

    /// Every `ckpt-*` directory present, sorted by id (committed or not).
    pub fn list_checkpoint_dirs(&self) -> Result<Vec<(CheckpointId, PathBuf)>, LayoutError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LayoutError::Io { path: self.dir.clone(), source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| LayoutError::Io { path: self.dir.clone(), source })?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_checkpoint_dir_name) {
                out.push((id, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// MANIFEST.json: what a committed checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Job name.
    pub job: JobName,
    /// Checkpoint id.
    pub id: CheckpointId,
    /// Step every rank saved.
    pub step: Step,
    /// Generation the checkpoint was taken in.
    pub generation: Generation,
    /// Number of ranks (and shards).
    pub world_size: u32,
    /// Commit time, RFC 3339.
    pub created: String,
    /// Commit time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// One entry per rank, ordered by rank.
    pub ranks: Vec<ShardManifest>,
}

impl Manifest {
    /// Formats a commit time (ms since the epoch) for `created`.
    pub fn format_time(unix_ms: u64) -> String {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
    }

    /// Milliseconds since the epoch, now.
    pub fn now_unix_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// Total bytes of all shards (saturating: the figures come from a file).
    pub fn bytes(&self) -> u64 {
        self.ranks.iter().fold(0, |sum, r| sum.saturating_add(r.bytes))
    }

    /// Checks internal consistency: one shard per rank, in order.
    pub fn validate(&self) -> Result<(), ManifestMismatch> {
        if self.ranks.len() != self.world_size as usize {
            return Err(ManifestMismatch::Count { listed: self.ranks.len(), world_size: self.world_size });
        }
        for (i, shard) in self.ranks.iter().enumerate() {
            if shard.rank.0 as usize != i {
                return Err(ManifestMismatch::Order { entry: i, rank: shard.rank });
            }
        }
        Ok(())
    }

    /// Reads and validates `<dir>/MANIFEST.json`.
    pub fn read(checkpoint_dir: &Path) -> Result<Self, LayoutError> {
        let path = checkpoint_dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|source| LayoutError::Io { path: path.clone(), source })?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| LayoutError::Invalid { path: path.clone(), why: e.to_string() })?;
        manifest.validate().map_err(|e| LayoutError::Invalid { path, why: e.to_string() })?;
        Ok(manifest)
    }

    /// Durably writes `<dir>/MANIFEST.json`.
    pub fn write(&self, checkpoint_dir: &Path) -> Result<(), LayoutError> {
        let path = checkpoint_dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        durable::write_atomic(&path, |f| f.write_all(&json))
            .map_err(|source| LayoutError::Io { path, source })
    }
}

/// How a MANIFEST.json contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestMismatch {
    /// Not one shard per rank.
    #[error("lists {listed} shards for world_size {world_size}")]
    Count {
        /// Shards listed.
        listed: usize,
        /// The world size it states.
        world_size: u32,
    },
    /// The shards are not in rank order.
    #[error("entry {entry} is for rank {rank}")]
    Order {
        /// Position in the list.
        entry: usize,
        /// The rank found there.
        rank: Rank,
    },
}

/// A problem with the files of the layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file's contents are not what the layout defines.
    #[error("{path} is invalid: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Checksum;

    #[test]
    fn names() {
        assert_eq!(checkpoint_dir_name(CheckpointId(7)), "ckpt-00000007");
        assert_eq!(parse_checkpoint_dir_name("ckpt-00000007"), Some(CheckpointId(7)));
        assert_eq!(parse_checkpoint_dir_name("ckpt-123456789"), Some(CheckpointId(123_456_789)));
        assert_eq!(parse_checkpoint_dir_name("ckpt-7"), None);
        assert_eq!(parse_checkpoint_dir_name(".ckpt-00000007.tmp"), None);
        assert_eq!(shard_file_name(Rank(2)), "rank-00002.safetensors");
        let job = JobDir::new(Path::new("/data"), &JobName::new("demo").unwrap());
        assert_eq!(
            job.shard_path(CheckpointId(7), Rank(2)),
            Path::new("/data/demo/ckpt-00000007/rank-00002.safetensors")
        );
    }

    #[test]
    fn latest_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobDir::at(dir.path().join("demo"));
        assert_eq!(job.read_latest().unwrap(), None);
        assert!(job.list_checkpoint_dirs().unwrap().is_empty());
        durable::create_dir_all_durable(&job.checkpoint_dir(CheckpointId(12))).unwrap();
        durable::create_dir_all_durable(&job.checkpoint_dir(CheckpointId(3))).unwrap();
        job.write_latest(CheckpointId(12)).unwrap();
        assert_eq!(job.read_latest().unwrap(), Some(CheckpointId(12)));
        let ids: Vec<_> = job.list_checkpoint_dirs().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![CheckpointId(3), CheckpointId(12)]);
        std::fs::write(job.latest_path(), "x").unwrap();
        assert!(job.read_latest().unwrap_err().to_string().contains("not a checkpoint id"));
    }

    #[test]
    fn manifest_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let shard = |r| ShardManifest {
            rank: Rank(r),
            file: shard_file_name(Rank(r)),
            bytes: 10,
            checksum: Checksum(r),
            tensors: vec![],
        };
        let mut m = Manifest {
            job: JobName::new("demo").unwrap(),
            id: CheckpointId(7),
            step: Step(700),
            generation: Generation(1),
            world_size: 2,
            created: Manifest::format_time(1_700_000_000_123),
            created_unix_ms: 1_700_000_000_123,
            ranks: vec![shard(0), shard(1)],
        };
        assert_eq!(m.created, "2023-11-14T22:13:20.123Z");
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        assert_eq!(m.bytes(), 20);
        // a damaged manifest's figures saturate instead of overflowing
        // (regression, fuzz_decoders: `flotilla inspect` panicked in a debug build)
        let mut huge = m.clone();
        huge.ranks[0].bytes = u64::MAX;
        assert_eq!(huge.bytes(), u64::MAX);
        m.ranks.swap(0, 1);
        m.write(dir.path()).unwrap();
        assert!(Manifest::read(dir.path()).unwrap_err().to_string().contains("entry 0 is for rank 1"));
    }
}
