//! CRC-32C checksums (hardware-accelerated on x86-64 and aarch64), the one
//! checksum of shards and manifests.
//!
//! `crc32c_combine` lets the writer compute the whole-file checksum from the
//! header's and each tensor's checksum without a second pass over the data.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A CRC-32C value; written as `"crc32c:1a2b3c4d"` in JSON so a manifest
/// says which algorithm produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Checksum(pub u32);

const PREFIX: &str = "crc32c:";

impl Checksum {
    /// The checksum of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(crc32c::crc32c(data))
    }

    /// Continues this checksum over `more` bytes that follow.
    pub fn append(self, more: &[u8]) -> Self {
        Self(crc32c::crc32c_append(self.0, more))
    }

    /// The checksum of `A ++ B` given `self = crc(A)`, `next = crc(B)` and `len(B)`.
    pub fn combine(self, next: Checksum, next_len: usize) -> Self {
        Self(crc32c::crc32c_combine(self.0, next.0, next_len))
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{:08x}", self.0)
    }
}

impl std::str::FromStr for Checksum {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex =
            s.strip_prefix(PREFIX).ok_or_else(|| format!("checksum {s:?} does not start with {PREFIX:?}"))?;
        if hex.len() != 8 {
            return Err(format!("checksum {s:?} must have 8 hex digits"));
        }
        u32::from_str_radix(hex, 16).map(Checksum).map_err(|_| format!("checksum {s:?} is not hexadecimal"))
    }
}

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_equals_one_pass() {
        let a = b"hello, ";
        let b = b"world";
        let whole = Checksum::of(b"hello, world");
        assert_eq!(Checksum::of(a).combine(Checksum::of(b), b.len()), whole);
        assert_eq!(Checksum::of(a).append(b), whole);
    }

    #[test]
    fn text_round_trip_and_refusals() {
        let c = Checksum(0x1a2b3c4d);
        assert_eq!(c.to_string(), "crc32c:1a2b3c4d");
        assert_eq!("crc32c:1a2b3c4d".parse::<Checksum>().unwrap(), c);
        assert!("md5:00".parse::<Checksum>().is_err());
        assert!("crc32c:zz2b3c4d".parse::<Checksum>().is_err());
        assert!("crc32c:1a2b".parse::<Checksum>().is_err());
    }
}

/// The job's `final_digest`: XXH3-128 over every rank's digest in rank
/// order, so it changes if any rank's final variables do.
pub fn combine_digests<S: AsRef<str>>(rank_digests: &[S]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in rank_digests {
        h.update(d.as_ref().as_bytes());
        h.update(b"\n");
    }
    format!("{:032x}", h.digest128())
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn combined_digest_depends_on_every_rank_and_order() {
        let a = combine_digests(&["aa", "bb"]);
        assert_eq!(a.len(), 32);
        assert_eq!(a, combine_digests(&["aa".to_string(), "bb".to_string()]));
        assert_ne!(a, combine_digests(&["bb", "aa"]));
        assert_ne!(a, combine_digests(&["aa", "bc"]));
    }
}
