//! Identifiers as newtypes, so a rank is never passed where a step belongs.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident($inner:ty), $label:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl $name {
            /// The kind of id, as it appears in messages (`rank 2`, `checkpoint 7`).
            pub const LABEL: &'static str = $label;
        }
    };
}

numeric_id!(
    /// A worker's position in the job, `0..world_size`.
    Rank(u32), "rank");
numeric_id!(
    /// A checkpoint's id, unique within a job and increasing.
    CheckpointId(u64), "checkpoint");
numeric_id!(
    /// A job's generation: 1 at submission, +1 with every whole-job restore.
    /// Every message carries it; anything from an older generation is fenced.
    Generation(u64), "generation");
numeric_id!(
    /// A training step (the number of steps completed).
    Step(u64), "step");
numeric_id!(
    /// One life of a worker process; a new incarnation means the old one died.
    Incarnation(u64), "incarnation");
numeric_id!(
    /// A coordinator replica's Raft id (≥ 1).
    NodeId(u64), "node");

/// A job's name: `[a-z0-9-]{1,63}`, so it is safe as a path component, a
/// Prometheus label value and a Kubernetes name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct JobName(String);

/// Why a string is not a valid job name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job name {name:?}: {why}; use 1 to 63 characters of a-z, 0-9 and '-'")]
pub struct InvalidJobName {
    /// The refused name.
    pub name: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl JobName {
    /// Validates and wraps a job name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidJobName> {
        let name = name.into();
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > 63 {
            Some("it is longer than 63 characters")
        } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            Some("it has a character outside a-z, 0-9 and '-'")
        } else {
            None
        };
        match why {
            Some(why) => Err(InvalidJobName { name, why }),
            None => Ok(Self(name)),
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobName::new(s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for JobName {
    type Err = InvalidJobName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        assert!(JobName::new("demo-1").is_ok());
        assert!(JobName::new("a".repeat(63)).is_ok());
        for bad in ["", "Demo", "a_b", "a/b", "..", &"a".repeat(64)] {
            let err = JobName::new(bad).unwrap_err();
            assert!(err.to_string().contains("a-z, 0-9 and '-'"), "{err}");
        }
    }

    #[test]
    fn job_name_deserialize_validates() {
        let err = serde_json::from_str::<JobName>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("invalid job name"), "{err}");
    }
}
