//! CRC-32C checksums (hardware-accelerated on x86-64 and aarch64), the one
//! checksum of shards and manifests.
//!
//! [`Checksum::combine`] lets the writer compute the whole-file checksum from
//! the header's and each tensor's checksum without a second pass over the
//! data, and a parallel verify join its pieces.

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
    ///
    /// `crc(A)` shifted past `len(B)` zero bytes is `crc(A)` times
    /// x^(8·len(B)) modulo the polynomial; that power is the product of the
    /// tabled powers x^(2^k) for the set bits of 8·len(B), so a combine costs
    /// a few dozen 32-bit carry-less products (0.07-0.09 µs here). The crc32c
    /// crate's (zlib's old method, 32×32 matrix squarings per bit) takes
    /// 30–120 µs, and a shard of 577 tensors, or a parallel verify of many
    /// pieces, combines once per tensor and piece. Checked against it below.
    pub fn combine(self, next: Checksum, next_len: usize) -> Self {
        if next_len == 0 {
            // nothing follows (whatever `next` says, as the crate has it)
            return self;
        }
        Self(gf2::times_x_pow_8n(self.0, next_len as u64) ^ next.0)
    }
}

/// Arithmetic modulo the CRC-32C polynomial, bit-reflected as the CRC is
/// (bit 31 is x^0).
mod gf2 {
    /// The CRC-32C (Castagnoli) polynomial, reflected.
    const POLY: u32 = 0x82F6_3B78;
    /// x^0 in the reflected representation.
    const ONE: u32 = 1 << 31;

    /// a·b mod POLY.
    const fn mul(a: u32, mut b: u32) -> u32 {
        let mut product = 0;
        let mut bit = ONE;
        while bit != 0 {
            if a & bit != 0 {
                product ^= b;
            }
            bit >>= 1;
            b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        }
        product
    }

    /// x^(2^k) mod POLY for k = 0..67: enough for x^(8n), n < 2^64.
    const POWERS: [u32; 67] = {
        let mut t = [0u32; 67];
        t[0] = ONE >> 1; // x^1
        let mut k = 1;
        while k < 67 {
            t[k] = mul(t[k - 1], t[k - 1]);
            k += 1;
        }
        t
    };

    /// crc · x^(8n) mod POLY: `crc` carried past n zero bytes.
    pub fn times_x_pow_8n(crc: u32, mut n: u64) -> u32 {
        // 8n = n << 3: the bits of n are the powers 2^(k+3)
        let mut k = 3;
        let mut acc = crc;
        while n != 0 {
            if n & 1 != 0 {
                acc = mul(POWERS[k], acc);
            }
            n >>= 1;
            k += 1;
        }
        acc
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
    fn combine_agrees_with_the_crc32c_crate_at_every_scale() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let random: Vec<u64> = (0..2000).map(|_| next() >> (next() % 64)).collect();
        let powers = (0..64).map(|b| 1u64 << b);
        for len in powers.chain(random).chain([0, 1, 2, 3, 7, 8, 1023, 1024, 1025, u64::MAX]) {
            let (a, b) = (next() as u32, next() as u32);
            let ours = Checksum(a).combine(Checksum(b), len as usize).0;
            assert_eq!(ours, crc32c::crc32c_combine(a, b, len as usize), "len {len}");
        }
    }

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
