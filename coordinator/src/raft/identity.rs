//! Whose a data dir is, and whether its replica may vote.
//!
//! `<data-dir>/IDENTITY.json` records the cluster (`--cluster-id`) and the
//! replica id that wrote the data dir, and whether the replica is still
//! *joining*. A replica whose data dir was
//! lost (a disk replaced, a pod recreated on an empty volume) must not vote:
//! its earlier acknowledgements may have counted toward a commit, so voting
//! with an empty log could elect a leader that lacks a committed entry.
//!
//! ```text
//! start ── IDENTITY.json names another --id or cluster ► refuse
//!       ── IDENTITY.json present ─────────────────────► as recorded
//!       ── no IDENTITY.json, a Raft log present ──────► a member (written now)
//!       ── empty data dir: ask every peer (Probe) ───┐
//!            a peer has a log ───────────────────────┴► joining: no votes, no
//!            a majority (itself included) is empty ───► campaigns until it holds
//!                                                        everything committed
//!                                                        (node::Node), then a member
//! ```
//! Only a fresh cluster, where a majority of replicas are empty, starts
//! voting at once; a lost data dir cannot look like one while a majority of
//! replicas keep theirs.

use flotilla_shared::durable;
use flotilla_shared::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file name inside the data dir.
pub const FILE: &str = "IDENTITY.json";

/// What a data dir records about its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The `--cluster-id` that wrote the data dir (empty in data dirs from
    /// before it was recorded: adopted at the next start).
    #[serde(default)]
    pub cluster: String,
    /// The `--id` that wrote the data dir.
    pub node_id: NodeId,
    /// Still catching up after starting on an empty data dir in an existing
    /// cluster: no votes, no campaigns.
    pub joining: bool,
}

/// Why a data dir's identity, or a `--cluster-id`, cannot be used. Each
/// names the file or flag and the way out.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// IDENTITY.json does not parse.
    #[error("{} is damaged ({source}); restore it from a backup, or remove the whole data dir to rejoin the cluster as an empty replica", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// IDENTITY.json could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// IDENTITY.json could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data dir belongs to another cluster.
    #[error("--data-dir {} belongs to cluster {found:?}, not --cluster-id {cluster:?}: start it with --cluster-id {found:?}, or give this cluster's replica a data dir of its own", .dir.display())]
    OtherCluster {
        /// The data dir.
        dir: PathBuf,
        /// The cluster it records.
        found: String,
        /// The cluster this replica was started for.
        cluster: String,
    },
    /// The data dir belongs to another replica.
    #[error("--data-dir {} belongs to coordinator --id {found}, not --id {id}: give every replica its own data dir (or remove this one to start replica {id} empty; it then catches up from the others before it votes)", .dir.display())]
    OtherReplica {
        /// The data dir.
        dir: PathBuf,
        /// The id it records.
        found: NodeId,
        /// This replica's id.
        id: NodeId,
    },
    /// `--cluster-id` is not a valid name.
    #[error("--cluster-id {0:?}: use 1 to 63 characters of a-z, 0-9, '-', '.' and '_'")]
    BadClusterId(String),
}

/// Reads the data dir's identity, if it has one.
pub fn read(dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|source| IdentityError::Damaged { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Durably records the identity (write, fsync, rename, fsync the dir).
pub fn write(dir: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let path = dir.join(FILE);
    let json = serde_json::to_vec_pretty(identity).expect("an identity serializes");
    durable::write_atomic(&path, |f| f.write_all(&json))
        .map_err(|source| IdentityError::Write { path, source })
}

/// Refuses a data dir written by another replica or another cluster.
pub fn check(dir: &Path, identity: &Identity, cluster: &str, id: NodeId) -> Result<(), IdentityError> {
    if !identity.cluster.is_empty() && identity.cluster != cluster {
        return Err(IdentityError::OtherCluster {
            dir: dir.to_path_buf(),
            found: identity.cluster.clone(),
            cluster: cluster.to_string(),
        });
    }
    if identity.node_id == id {
        return Ok(());
    }
    Err(IdentityError::OtherReplica { dir: dir.to_path_buf(), found: identity.node_id, id })
}

/// Checks a `--cluster-id`: 1 to 63 characters of `a-z`, `0-9`, `-`,
/// `.` and `_` (it names the cluster in files and errors).
pub fn check_cluster_id(id: &str) -> Result<(), IdentityError> {
    let ok = (1..=63).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadClusterId(id.to_string()))
    }
}

/// Whether the data dir holds a Raft log (from before identities were
/// recorded, or from a start that stopped before recording one).
pub fn has_log(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("raft-engine")).is_ok_and(|mut d| d.next().is_some())
}

/// How an empty replica starts, from its peers' answers to a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A peer has a log: join it without voting until caught up.
    Join,
    /// A majority of the voters, this one included, are empty: a new cluster.
    Bootstrap,
}

/// Decides from the probe answers so far (`Some(has_log)` per peer that
/// answered), or `None` to keep asking. `voters` counts every voter,
/// this one included.
pub fn decide(voters: usize, answers: &[Option<bool>]) -> Option<Start> {
    if answers.contains(&Some(true)) {
        return Some(Start::Join);
    }
    let empty = 1 + answers.iter().filter(|a| **a == Some(false)).count();
    (empty > voters / 2).then_some(Start::Bootstrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_replica_joins_if_any_peer_has_a_log_and_bootstraps_only_with_an_empty_majority() {
        assert_eq!(decide(1, &[]), Some(Start::Bootstrap));
        assert_eq!(decide(3, &[None, None]), None, "nobody answered: wait");
        assert_eq!(decide(3, &[Some(false), None]), Some(Start::Bootstrap));
        assert_eq!(decide(3, &[Some(false), Some(true)]), Some(Start::Join));
        assert_eq!(decide(3, &[None, Some(true)]), Some(Start::Join));
        assert_eq!(decide(5, &[Some(false), None, None, None]), None);
        assert_eq!(decide(5, &[Some(false), Some(false), None, None]), Some(Start::Bootstrap));
    }

    #[test]
    fn identity_round_trips_and_another_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let id = Identity { cluster: "prod-a".into(), node_id: NodeId(2), joining: true };
        write(dir.path(), &id).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(id.clone()));
        check(dir.path(), &id, "prod-a", NodeId(2)).unwrap();
        let e = check(dir.path(), &id, "prod-a", NodeId(1)).unwrap_err().to_string();
        assert!(e.contains("belongs to coordinator --id 2, not --id 1"), "{e}");
        let e = check(dir.path(), &id, "prod-b", NodeId(2)).unwrap_err().to_string();
        assert!(e.contains("belongs to cluster \"prod-a\", not --cluster-id \"prod-b\""), "{e}");
        // a data dir from before cluster ids were recorded is adopted
        std::fs::write(dir.path().join(FILE), br#"{"node_id": 2, "joining": false}"#).unwrap();
        let old = read(dir.path()).unwrap().unwrap();
        assert_eq!(old.cluster, "");
        check(dir.path(), &old, "prod-b", NodeId(2)).unwrap();
        check_cluster_id("prod-a.eu_1").unwrap();
        for bad in ["", "Prod", "a b", "x/y", &"a".repeat(64)] {
            assert!(check_cluster_id(bad).unwrap_err().to_string().contains("--cluster-id"), "{bad:?}");
        }
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("damaged"));
        assert!(!has_log(dir.path()));
    }
}
