//! The harness for tests, benchmarks and the demo, behind the `testkit`
//! feature so the product's library does not carry it: real coordinator and
//! worker processes on loopback ([`local`]) and `flotilla bench raft` /
//! `bench coordinator` ([`bench`]).

pub mod bench;
pub mod local;
