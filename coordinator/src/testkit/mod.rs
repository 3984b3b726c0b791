//! The harness for tests, benchmarks and the demo, behind the `testkit`
//! feature so the product's library does not carry it: real coordinator and
//! worker processes on loopback ([`local`]) and `flotilla bench raft` /
//! `bench coordinator` ([`bench`]).

pub mod bench;
pub mod local;

/// Why a harness run (a local cluster, a benchmark) failed: what it was
/// doing and what went wrong, for the person reading the test or bench log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(String);

impl From<String> for HarnessError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for HarnessError {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl From<crate::client::CaError> for HarnessError {
    fn from(e: crate::client::CaError) -> Self {
        Self(e.to_string())
    }
}
