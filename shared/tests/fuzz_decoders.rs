//! Fuzz targets, one per decoder of bytes that reach Flotilla from outside:
//!
//! | target | decoder | inputs |
//! |---|---|---|
//! | `frame_*`, `*_handshake_*` | [`FrameCodec`], [`server_handshake`], [`client_handshake`] | arbitrary streams, mutated valid frames, over an in-memory duplex |
//! | `wire_*` | the MessagePack bodies of every message type | generated messages, arbitrary and mutated bodies |
//! | `spec_*` | [`JobSpec::from_toml`] | TOML-ish text, valid specs, valid specs with one key broken, mutated text |
//! | `shard_*` | [`read_header`], [`Shard::read_verified`], [`write_shard`] | arbitrary files, structured headers, mutated real shards |
//! | `manifest_*` | [`Manifest::read`] (MANIFEST.json) | valid manifests, JSON-level and byte-level mutations |
//!
//! Each asserts what matters for that decoder: no panic and no hang on any
//! input; no buffer grown past the frame limit before a refusal; valid
//! values round-trip; damage a checksum covers is always detected, and named;
//! a refusal names what is wrong.
//!
//! Seeds, case counts and replaying a failure: see `support/fuzz.rs`
//! (`FLOTILLA_FUZZ_SEED`, `FLOTILLA_FUZZ_CASES`, `FLOTILLA_FUZZ_SCALE`).

#[path = "support/fuzz.rs"]
mod fuzz;

use bytes::BytesMut;
use flotilla_shared::checksum::Checksum;
use flotilla_shared::frame::{
    client_handshake, server_handshake, FrameCodec, FrameError, HandshakeError, Tokens, DEFAULT_MAX_FRAME,
    HELLO_MAX_FRAME,
};
use flotilla_shared::ids::{CheckpointId, Generation, Incarnation, JobName, NodeId, Rank, Step};
use flotilla_shared::layout::{Manifest, MANIFEST_FILE};
use flotilla_shared::shard::{
    read_header, write_shard, Dtype, Shard, ShardDigest, ShardErrorKind, ShardManifest, ShardMeta,
    TensorRecord, VariableSpec,
};
use flotilla_shared::spec::{CheckpointSpec, FailureSpec, JobSpec, TrainerSpec};
use flotilla_shared::wire::{
    CoordinatorMessage, ErrorCode, ErrorReply, ForRank, Hello, HelloReply, PeerMessage, PeerRole,
    RestoreFailureKind, RestorePoint, RestoreSource, ShardFailureKind, WorkerMessage, WorkerStatus,
    PROTOCOL_VERSION,
};
use futures::{SinkExt, StreamExt};
use fuzz::check;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::{self, Debug};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// Value generators, weighted towards small values and the edges of each type.
mod gen {
    use super::*;

    pub fn num() -> BoxedStrategy<u64> {
        prop_oneof![
            6 => 0u64..16,
            1 => Just(u64::MAX),
            1 => Just(i64::MAX as u64),
            1 => Just(u64::from(u32::MAX) + 1),
            2 => any::<u64>(),
        ]
        .boxed()
    }

    pub fn num32() -> BoxedStrategy<u32> {
        prop_oneof![6 => 0u32..16, 1 => Just(u32::MAX), 2 => any::<u32>()].boxed()
    }

    pub fn dim() -> BoxedStrategy<usize> {
        prop_oneof![8 => 0usize..8, 1 => Just(usize::MAX), 1 => Just(1usize << 33), 1 => any::<usize>()]
            .boxed()
    }

    pub fn text() -> BoxedStrategy<String> {
        prop_oneof![3 => "[a-z0-9/._-]{0,12}", 1 => "(?s).{0,24}"].boxed()
    }

    pub fn path() -> BoxedStrategy<PathBuf> {
        text().prop_map(PathBuf::from).boxed()
    }

    pub fn job_name() -> BoxedStrategy<JobName> {
        prop_oneof![4 => "[a-z0-9-]{1,8}", 1 => "[a-z0-9-]{63}"]
            .prop_map(|s| JobName::new(s).expect("the pattern is a valid job name"))
            .boxed()
    }

    /// Every dtype safetensors 0.6 knows.
    pub const DTYPES: [Dtype; 19] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    pub fn dtype() -> BoxedStrategy<Dtype> {
        select(DTYPES.to_vec()).boxed()
    }

    pub fn tensor_record() -> BoxedStrategy<TensorRecord> {
        (text(), dtype(), vec(dim(), 0..4), num(), any::<u32>())
            .prop_map(|(name, dtype, shape, bytes, crc)| TensorRecord {
                name,
                dtype,
                shape,
                bytes,
                checksum: Checksum(crc),
            })
            .boxed()
    }

    pub fn shard_manifest() -> BoxedStrategy<ShardManifest> {
        (num32(), text(), num(), any::<u32>(), vec(tensor_record(), 0..4))
            .prop_map(|(rank, file, bytes, crc, tensors)| ShardManifest {
                rank: Rank(rank),
                file,
                bytes,
                checksum: Checksum(crc),
                tensors,
            })
            .boxed()
    }

    /// Any spec, in range or not (messages carry specs the ledger validated,
    /// but a decoder must not care).
    pub fn any_spec() -> BoxedStrategy<JobSpec> {
        let checkpoint =
            (option::of(num()), option::of(num()), num32(), path(), num(), option::of(path()), any::<bool>())
                .prop_map(
                    |(every_steps, every_seconds, keep_last, root, timeout_seconds, resume_from, at_end)| {
                        CheckpointSpec {
                            every_steps,
                            every_seconds,
                            keep_last,
                            root,
                            timeout_seconds,
                            resume_from,
                            memory_copies: keep_last % 3,
                            at_end,
                        }
                    },
                );
        let failure =
            (num(), num(), num32(), num(), num()).prop_map(|(hi, ht, mr, hang, head)| FailureSpec {
                heartbeat_interval_ms: hi,
                heartbeat_timeout_ms: ht,
                max_restarts: mr,
                hang_timeout_seconds: hang,
                memory_headroom_bytes: head,
                spares: (hi % 4) as u32,
            });
        let trainer = option::of((num(), num(), num32(), num(), num()).prop_map(
            |(total_steps, params_per_rank_bytes, layers, step_time_ms, seed)| TrainerSpec {
                total_steps,
                params_per_rank_bytes,
                layers,
                step_time_ms,
                seed,
            },
        ));
        (job_name(), num32(), checkpoint, failure, trainer)
            .prop_map(|(name, world_size, checkpoint, failure, trainer)| JobSpec {
                name,
                world_size,
                checkpoint,
                failure,
                trainer,
            })
            .boxed()
    }

    pub fn worker_status() -> BoxedStrategy<WorkerStatus> {
        select(vec![
            WorkerStatus::Waiting,
            WorkerStatus::Running,
            WorkerStatus::Checkpointing,
            WorkerStatus::Restoring,
            WorkerStatus::Finished,
            WorkerStatus::Failed,
            WorkerStatus::Spare,
            WorkerStatus::SpareStarting,
        ])
        .boxed()
    }

    pub fn error_reply() -> BoxedStrategy<ErrorReply> {
        let code = select(vec![
            ErrorCode::Unauthorized,
            ErrorCode::VersionMismatch,
            ErrorCode::Fenced,
            ErrorCode::Stale,
            ErrorCode::UnknownJob,
            ErrorCode::InvalidRequest,
            ErrorCode::Unavailable,
        ]);
        (code, text()).prop_map(|(code, message)| ErrorReply { code, message }).boxed()
    }

    pub fn peer_role() -> BoxedStrategy<PeerRole> {
        prop_oneof![
            Just(PeerRole::Worker),
            (num(), "[a-z0-9.-]{0,12}")
                .prop_map(|(n, cluster)| PeerRole::Coordinator { node: NodeId(n), cluster })
        ]
        .boxed()
    }

    pub fn token() -> BoxedStrategy<Option<String>> {
        option::of(prop_oneof![
            3 => Just("s3cret".to_string()),
            1 => Just("s3creT".to_string()),
            1 => Just(String::new()),
            1 => text(),
        ])
        .boxed()
    }

    pub fn hello() -> BoxedStrategy<Hello> {
        let version = prop_oneof![4 => Just(PROTOCOL_VERSION), 1 => any::<u8>()];
        (version, peer_role(), token())
            .prop_map(|(version, role, token)| Hello { version, role, token })
            .boxed()
    }

    pub fn hello_reply() -> BoxedStrategy<HelloReply> {
        prop_oneof![
            num().prop_map(|n| HelloReply::Welcome { node: NodeId(n) }),
            error_reply().prop_map(HelloReply::Refused),
        ]
        .boxed()
    }

    fn generation() -> BoxedStrategy<Generation> {
        num().prop_map(Generation).boxed()
    }

    fn step() -> BoxedStrategy<Step> {
        num().prop_map(Step).boxed()
    }

    fn ckpt() -> BoxedStrategy<CheckpointId> {
        num().prop_map(CheckpointId).boxed()
    }

    pub fn worker_message() -> BoxedStrategy<WorkerMessage> {
        let restore_kind = select(vec![
            RestoreFailureKind::Corrupt,
            RestoreFailureKind::ModelMismatch,
            RestoreFailureKind::DeviceMemory,
            RestoreFailureKind::Unavailable,
        ]);
        let shard_kind = select(vec![ShardFailureKind::PastStep, ShardFailureKind::Write]);
        prop_oneof![
            (
                job_name(),
                option::of(num32()),
                num(),
                option::of(text()),
                option::of(generation()),
                step(),
                option::of(text())
            )
                .prop_map(|(job, rank, inc, http_addr, generation, step, host)| {
                    WorkerMessage::Register {
                        job,
                        rank: rank.map(Rank),
                        incarnation: Incarnation(inc),
                        http_addr,
                        generation,
                        step,
                        host,
                    }
                }),
            (generation(), step(), worker_status())
                .prop_map(|(generation, step, status)| WorkerMessage::Heartbeat { generation, step, status }),
            (generation(), ckpt(), shard_manifest().prop_map(ShardDigest::from)).prop_map(
                |(generation, checkpoint, manifest)| {
                    WorkerMessage::ShardSaved { generation, checkpoint, manifest }
                }
            ),
            (generation(), ckpt(), shard_kind, text()).prop_map(|(generation, checkpoint, kind, reason)| {
                WorkerMessage::ShardFailed { generation, checkpoint, kind, reason }
            }),
            (
                generation(),
                step(),
                option::of(prop_oneof![
                    Just(RestoreSource::Memory),
                    Just(RestoreSource::Peer),
                    Just(RestoreSource::Storage)
                ])
            )
                .prop_map(|(generation, step, source)| WorkerMessage::Restored {
                    generation,
                    step,
                    source
                }),
            (generation(), option::of(ckpt()), restore_kind, text()).prop_map(
                |(generation, checkpoint, kind, message)| WorkerMessage::RestoreFailed {
                    generation,
                    checkpoint,
                    kind,
                    message
                }
            ),
            (generation(), text())
                .prop_map(|(generation, reason)| WorkerMessage::TrainerFailed { generation, reason }),
            (generation(), text())
                .prop_map(|(generation, addr)| WorkerMessage::Rendezvous { generation, addr }),
            (generation(), step(), text()).prop_map(|(generation, step, digest)| WorkerMessage::Finished {
                generation,
                step,
                digest
            }),
            Just(WorkerMessage::Left),
        ]
        .boxed()
        // a node session's frames: batches of the above, for several ranks
        .prop_recursive(1, 16, 8, |leaf| {
            proptest::collection::vec((num32(), leaf), 0..8).prop_map(|items| {
                WorkerMessage::Batch(
                    items.into_iter().map(|(rank, msg)| ForRank { rank: Rank(rank), msg }).collect(),
                )
            })
        })
        .boxed()
    }

    pub fn coordinator_message() -> BoxedStrategy<CoordinatorMessage> {
        let point = (ckpt(), step(), path(), shard_manifest().prop_map(ShardDigest::from)).prop_map(
            |(checkpoint, step, dir, shard)| RestorePoint { checkpoint, step, dir, shard, peers: Vec::new() },
        );
        prop_oneof![
            (any_spec(), generation(), num(), any::<bool>()).prop_map(|(spec, generation, term, spare)| {
                CoordinatorMessage::Registered { spec, generation, term, spare }
            }),
            (num32(), generation())
                .prop_map(|(rank, generation)| CoordinatorMessage::Assign { rank: Rank(rank), generation }),
            option::of(text()).prop_map(|leader| CoordinatorMessage::NotLeader { leader }),
            (generation(), ckpt(), step(), path()).prop_map(|(generation, checkpoint, step, dir)| {
                CoordinatorMessage::Checkpoint { generation, checkpoint, step, dir }
            }),
            (generation(), ckpt()).prop_map(|(generation, checkpoint)| CoordinatorMessage::AbortCheckpoint {
                generation,
                checkpoint
            }),
            (generation(), option::of(point), option::of(text())).prop_map(
                |(generation, from, rendezvous)| {
                    CoordinatorMessage::Restore { generation, from, rendezvous }
                }
            ),
            (generation(), step())
                .prop_map(|(generation, step)| CoordinatorMessage::Resume { generation, step }),
            Just(CoordinatorMessage::Alive),
            text().prop_map(|reason| CoordinatorMessage::Stop { reason }),
            error_reply().prop_map(CoordinatorMessage::Error),
        ]
        .boxed()
        .prop_recursive(1, 16, 8, |leaf| {
            proptest::collection::vec((num32(), leaf), 0..8).prop_map(|items| {
                CoordinatorMessage::Batch(
                    items.into_iter().map(|(rank, msg)| ForRank { rank: Rank(rank), msg }).collect(),
                )
            })
        })
        .boxed()
    }

    pub fn peer_message() -> BoxedStrategy<PeerMessage> {
        prop_oneof![
            vec(vec(any::<u8>(), 0..32).prop_map(serde_bytes::ByteBuf::from), 0..4)
                .prop_map(PeerMessage::Raft),
            Just(PeerMessage::Probe),
            any::<bool>().prop_map(|has_log| PeerMessage::ProbeReply { has_log }),
            (num(), vec(any::<u8>(), 0..32)).prop_map(|(total, bytes)| PeerMessage::Chunk {
                total,
                bytes: serde_bytes::ByteBuf::from(bytes)
            }),
        ]
        .boxed()
    }
}

/// Byte-level damage: what a bad disk, a bad network or an attacker does.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Remove up to n bytes.
    Delete(Index, u8),
    /// Cut the tail off.
    Truncate(Index),
    /// Overwrite with a sequence that means something to the format.
    Splice(Index, &'static [u8]),
}

/// MessagePack prefixes that announce huge or odd things.
const MSGPACK_EDGES: &[&[u8]] = &[
    &[0xc1],                         // never used
    &[0xc0],                         // nil
    &[0xdd, 0xff, 0xff, 0xff, 0xff], // array32 of 4 G elements
    &[0xdf, 0xff, 0xff, 0xff, 0xff], // map32 of 4 G entries
    &[0xc6, 0xff, 0xff, 0xff, 0xff], // bin32 of 4 GiB
    &[0xdb, 0xff, 0xff, 0xff, 0xff], // str32 of 4 GiB
    &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0],
    &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
    &[0xa3, 0xff, 0xfe, 0xfd],             // str of invalid UTF-8
    &[0x91, 0x91, 0x91, 0x91],
    &[0x81, 0xa1, b'x', 0x80],
    &[0xd4, 0x01, 0x00], // fixext
];

/// JSON fragments that stress a parser.
const JSON_EDGES: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"\\ud800\"",
    b"\"__metadata__\"",
    b"[[[[[[[[[[[[[[[[",
    b"\xff\xfe",
];

fn mutation(edges: &'static [&'static [u8]]) -> BoxedStrategy<Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1u8..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), select(edges)).prop_map(|(i, e)| Mutation::Splice(i, e)),
    ]
    .boxed()
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i, mask) if len > 0 => bytes[i.index(len)] ^= mask,
        Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
        Mutation::Insert(i, more) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, more.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let at = i.index(len);
            bytes.drain(at..(at + usize::from(*n)).min(len));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Mutation::Splice(i, edge) => {
            let at = i.index(len + 1);
            bytes.splice(at..(at + edge.len()).min(len), edge.iter().copied());
        }
        _ => {}
    }
}

fn mutated(mut bytes: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        mutate(&mut bytes, m);
    }
    bytes
}

/// Deterministic filler bytes (a shrinkable seed instead of a shrinkable Vec).
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Frames: the codec
// ---------------------------------------------------------------------------

/// How a decoded stream ended.
#[derive(Debug)]
enum End {
    /// End of input with nothing left over.
    Clean,
    /// An error before the end of input (the connection would be closed).
    Refused(FrameError),
    /// An error at the end of input (a frame cut short).
    AtEof(FrameError),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Clean => f.write_str("clean end"),
            End::Refused(e) => write!(f, "refused: {e}"),
            End::AtEof(e) => write!(f, "at end of input: {e}"),
        }
    }
}

/// What a receiver got out of a stream of bytes.
#[derive(Debug)]
struct Decoded<T> {
    items: Vec<T>,
    end: End,
}

/// Feeds `bytes` to a fresh codec the way `FramedRead` does (a chunk at a
/// time, decoding until it asks for more, `decode_eof` at the end), split at
/// `cuts`. Fails the case if the read buffer grows past what the bytes fed
/// so far and one frame of `max` bytes can justify, or grows at all while
/// refusing an oversized frame.
fn decode_stream<T: DeserializeOwned>(
    bytes: &[u8],
    cuts: &[Index],
    max: usize,
) -> Result<Decoded<T>, TestCaseError> {
    let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    ends.dedup();
    let mut codec = FrameCodec::<T, ()>::new(max);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut fed = 0;
    for end in ends {
        buf.extend_from_slice(&bytes[fed..end]);
        fed = end;
        loop {
            let before = buf.capacity();
            let got = codec.decode(&mut buf);
            // Vec-style doubling may double what was fed plus one frame; a
            // hostile 4 GiB length must not get anywhere near that
            let bound = 2 * (fed + max + 8) + 64;
            prop_assert!(
                buf.capacity() <= bound,
                "read buffer grew to {} bytes after {fed} bytes fed, limit {max}",
                buf.capacity()
            );
            match got {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => {
                    if matches!(e, FrameError::TooLarge { .. }) {
                        prop_assert_eq!(buf.capacity(), before, "the buffer grew while refusing: {}", e);
                    }
                    return Ok(Decoded { items, end: End::Refused(e) });
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return Ok(Decoded { items, end: End::Clean }),
            Err(e) => return Ok(Decoded { items, end: End::AtEof(e) }),
        }
    }
}

/// Whether `bytes` is exactly a sequence of whole frames, by their length
/// prefixes alone (what a clean end of stream must mean).
fn whole_frames(bytes: &[u8]) -> bool {
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 4) else { return false };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        at += 4 + len;
    }
    at == bytes.len()
}

/// One frame holding `msg`, as a sender writes it.
fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, TestCaseError> {
    let mut buf = BytesMut::new();
    FrameCodec::<(), &T>::new(DEFAULT_MAX_FRAME)
        .encode(msg, &mut buf)
        .map_err(|e| TestCaseError::fail(format!("a generated message does not encode: {e}")))?;
    Ok(buf.to_vec())
}

/// `msg` survives a frame and a bare MessagePack body (as Raft entries and
/// snapshots carry values) unchanged.
fn round_trips<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = frame(msg)?;
    let got = decode_stream::<T>(&bytes, &[], DEFAULT_MAX_FRAME)?;
    prop_assert!(matches!(got.end, End::Clean), "{}", got.end);
    prop_assert_eq!(got.items.len(), 1);
    prop_assert_eq!(&got.items[0], msg);
    let body = rmp_serde::to_vec_named(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = rmp_serde::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);
    Ok(())
}

/// The same bytes decoded whole and in chunks give the same messages and the
/// same ending; a clean ending means whole frames; every message decoded
/// re-encodes to itself.
fn consistent_stream<T>(bytes: &[u8], cuts: &[Index], max: usize) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let whole = decode_stream::<T>(bytes, &[], max)?;
    let chunked = decode_stream::<T>(bytes, cuts, max)?;
    prop_assert_eq!(&whole.items, &chunked.items);
    prop_assert_eq!(whole.end.to_string(), chunked.end.to_string());
    if matches!(whole.end, End::Clean) {
        prop_assert!(whole_frames(bytes), "a stream ending mid-frame was taken for a clean end");
    }
    for item in &whole.items {
        round_trips(item)?;
    }
    Ok(())
}

/// A piece of a generated stream.
#[derive(Debug, Clone)]
enum Segment {
    Worker(WorkerMessage),
    Coordinator(CoordinatorMessage),
    Hello(Hello),
    Peer(PeerMessage),
    Raw(Vec<u8>),
    /// A length prefix and version byte that may lie about what follows.
    Head {
        len: u32,
        version: u8,
        body: Vec<u8>,
    },
}

fn segment() -> BoxedStrategy<Segment> {
    let len = prop_oneof![
        4 => 0u32..48,
        1 => Just(u32::MAX),
        1 => Just(DEFAULT_MAX_FRAME as u32),
        1 => Just(DEFAULT_MAX_FRAME as u32 + 1),
        1 => any::<u32>(),
    ];
    let version = prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u8>()];
    prop_oneof![
        2 => gen::worker_message().prop_map(Segment::Worker),
        1 => gen::coordinator_message().prop_map(Segment::Coordinator),
        1 => gen::hello().prop_map(Segment::Hello),
        1 => gen::peer_message().prop_map(Segment::Peer),
        2 => vec(any::<u8>(), 0..24).prop_map(Segment::Raw),
        2 => (len, version, vec(any::<u8>(), 0..24)).prop_map(|(len, version, body)| Segment::Head {
            len,
            version,
            body
        }),
    ]
    .boxed()
}

fn render(segments: &[Segment]) -> Result<Vec<u8>, TestCaseError> {
    let mut out = Vec::new();
    for s in segments {
        match s {
            Segment::Worker(m) => out.extend(frame(m)?),
            Segment::Coordinator(m) => out.extend(frame(m)?),
            Segment::Hello(m) => out.extend(frame(m)?),
            Segment::Peer(m) => out.extend(frame(m)?),
            Segment::Raw(b) => out.extend_from_slice(b),
            Segment::Head { len, version, body } => {
                out.extend_from_slice(&len.to_be_bytes());
                out.push(*version);
                out.extend_from_slice(body);
            }
        }
    }
    Ok(out)
}

fn max_frame() -> BoxedStrategy<usize> {
    select(vec![0usize, 1, 5, 64, 1024, DEFAULT_MAX_FRAME]).boxed()
}

#[test]
fn frame_decoder_survives_arbitrary_streams() {
    let input = (
        prop_oneof![
            1 => vec(any::<u8>(), 0..256).prop_map(|b| vec![Segment::Raw(b)]),
            3 => vec(segment(), 0..6),
        ],
        vec(mutation(MSGPACK_EDGES), 0..3),
        vec(any::<Index>(), 0..6),
        max_frame(),
    );
    check("frame_decoder_survives_arbitrary_streams", 8192, input, |(segments, muts, cuts, max)| {
        let bytes = mutated(render(&segments)?, &muts);
        consistent_stream::<WorkerMessage>(&bytes, &cuts, max)?;
        consistent_stream::<CoordinatorMessage>(&bytes, &cuts, max)?;
        consistent_stream::<Hello>(&bytes, &cuts, max)?;
        consistent_stream::<HelloReply>(&bytes, &cuts, max)?;
        consistent_stream::<PeerMessage>(&bytes, &cuts, max)?;
        Ok(())
    });
}

/// One precise piece of damage to a stream of valid frames.
#[derive(Debug, Clone)]
enum FrameDamage {
    None,
    /// Cut the stream at a point before its end.
    Truncate(Index),
    /// Frame `k` gets another version byte.
    Version(Index, u8),
    /// Frame `k` announces more than the limit.
    Length(Index, u32),
    /// Frame `k` announces zero bytes.
    ZeroLength(Index),
    /// One byte of frame `k`'s body flipped.
    FlipBody(Index, Index, u8),
    /// Any byte flipped.
    FlipAny(Index, u8),
}

fn frame_damage() -> BoxedStrategy<FrameDamage> {
    prop_oneof![
        1 => Just(FrameDamage::None),
        3 => any::<Index>().prop_map(FrameDamage::Truncate),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(k, v)| FrameDamage::Version(k, v)),
        1 => (any::<Index>(), any::<u32>()).prop_map(|(k, l)| FrameDamage::Length(k, l)),
        1 => any::<Index>().prop_map(FrameDamage::ZeroLength),
        2 => (any::<Index>(), any::<Index>(), 1u8..=255).prop_map(|(k, p, m)| FrameDamage::FlipBody(k, p, m)),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| FrameDamage::FlipAny(i, m)),
    ]
    .boxed()
}

#[test]
fn frame_valid_streams_round_trip_and_damage_is_refused_precisely() {
    let input = (
        vec(gen::worker_message(), 1..5),
        frame_damage(),
        vec(any::<Index>(), 0..6),
        select(vec![0usize, 1, 1000, DEFAULT_MAX_FRAME]),
    );
    check(
        "frame_valid_streams_round_trip_and_damage_is_refused_precisely",
        2048,
        input,
        |(msgs, damage, cuts, slack)| {
            let frames: Vec<Vec<u8>> = msgs.iter().map(frame).collect::<Result<_, _>>()?;
            let mut starts = vec![0usize];
            for f in &frames {
                starts.push(starts.last().unwrap() + f.len());
            }
            let total = *starts.last().unwrap();
            let largest = frames.iter().map(|f| f.len() - 4).max().unwrap_or(0);
            // the limit is at least the largest body: every frame is legal
            let max = largest.saturating_add(slack).min(u32::MAX as usize);
            let mut bytes = frames.concat();
            let k_of = |k: &Index| k.index(frames.len());
            // (messages a receiver must get intact, what must end the stream)
            let (intact, want_end): (usize, Option<String>) = match &damage {
                FrameDamage::None => (msgs.len(), None),
                FrameDamage::Truncate(t) => {
                    let cut = t.index(total);
                    bytes.truncate(cut);
                    let complete = starts.iter().filter(|&&s| s <= cut).count() - 1;
                    let at_boundary = starts.contains(&cut);
                    let end =
                        if at_boundary { None } else { Some("at end of input: connection closed".into()) };
                    (complete, end)
                }
                FrameDamage::Version(k, v) if *v != PROTOCOL_VERSION => {
                    let k = k_of(k);
                    bytes[starts[k] + 4] = *v;
                    (k, Some(format!("refused: frame has protocol version {v}")))
                }
                FrameDamage::Length(k, len) if (*len as usize) > max => {
                    let k = k_of(k);
                    bytes[starts[k]..starts[k] + 4].copy_from_slice(&len.to_be_bytes());
                    (k, Some(format!("refused: frame of {len} bytes exceeds the limit of {max} bytes")))
                }
                FrameDamage::ZeroLength(k) => {
                    let k = k_of(k);
                    bytes[starts[k]..starts[k] + 4].copy_from_slice(&0u32.to_be_bytes());
                    (k, Some("refused: empty frame".into()))
                }
                FrameDamage::FlipBody(k, p, mask) => {
                    let k = k_of(k);
                    let body = starts[k] + 5..starts[k + 1];
                    if !body.is_empty() {
                        bytes[body.start + p.index(body.len())] ^= mask;
                    }
                    // anything may follow, but never a panic or a bad value
                    (k, Some(String::new()))
                }
                FrameDamage::FlipAny(i, mask) => {
                    let i = i.index(total);
                    bytes[i] ^= mask;
                    (starts.iter().filter(|&&s| s <= i).count() - 1, Some(String::new()))
                }
                // a no-op damage: the stream is intact
                FrameDamage::Version(..) | FrameDamage::Length(..) => (msgs.len(), None),
            };
            let got = decode_stream::<WorkerMessage>(&bytes, &cuts, max)?;
            prop_assert!(got.items.len() >= intact, "lost intact frames: {:?}", got.end);
            prop_assert_eq!(&got.items[..intact], &msgs[..intact]);
            for item in &got.items[intact..] {
                round_trips(item)?;
            }
            match want_end {
                None => {
                    prop_assert_eq!(got.items.len(), intact);
                    prop_assert!(matches!(got.end, End::Clean), "{}", got.end);
                }
                Some(want) if want.is_empty() => {}
                Some(want) => {
                    prop_assert_eq!(got.items.len(), intact);
                    let end = got.end.to_string();
                    prop_assert!(end.starts_with(&want), "wanted {want:?}, got {end:?}");
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Frames: the handshake, over an in-memory duplex with paused time
// ---------------------------------------------------------------------------

/// A runtime whose clock advances by itself whenever every task waits, so
/// `HELLO_TIMEOUT` elapses at once and a hang shows as a timeout.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

/// Longer than any timeout the handshake may legitimately wait.
const HANG: Duration = Duration::from_secs(3600);

/// What a handshake must do with the first frame (or the lack of one).
#[derive(Debug, PartialEq)]
enum Want<T> {
    Accept(T),
    Reject(ErrorCode),
    Refused(ErrorReply),
    Frame(String),
    Closed,
    Timeout,
}

/// What a handshake must do when the first frame is missing.
fn want_without_frame<T>(end: &End, closed: bool) -> Want<T> {
    match end {
        End::Refused(e) => Want::Frame(e.to_string()),
        End::AtEof(e) if closed => Want::Frame(e.to_string()),
        End::Clean if closed => Want::Closed,
        _ => Want::Timeout,
    }
}

/// Bytes a peer might send: a (maybe damaged) valid frame, then anything.
fn peer_bytes<T: Debug + Clone + 'static>(
    valid: BoxedStrategy<T>,
) -> BoxedStrategy<(Option<T>, Vec<u8>, Vec<Mutation>)> {
    (
        option::weighted(0.8, valid),
        prop_oneof![3 => Just(Vec::new()), 1 => vec(any::<u8>(), 0..48)],
        prop_oneof![2 => Just(Vec::new()), 1 => vec(mutation(MSGPACK_EDGES), 1..3)],
    )
        .boxed()
}

fn server_case(
    first: Option<Hello>,
    tail: Vec<u8>,
    muts: Vec<Mutation>,
    close: bool,
    token: Option<String>,
    max: usize,
) -> Result<(), TestCaseError> {
    let mut bytes = match &first {
        Some(h) => frame(h)?,
        None => Vec::new(),
    };
    bytes.extend(tail);
    let bytes = mutated(bytes, &muts);
    // the handshake reads at most HELLO_MAX_FRAME, whatever the connection's limit
    let sent = decode_stream::<Hello>(&bytes, &[], max.min(HELLO_MAX_FRAME))?;
    let want = match sent.items.first() {
        Some(h) if h.version != PROTOCOL_VERSION => Want::Reject(ErrorCode::VersionMismatch),
        Some(h) => match &token {
            Some(t) if h.token.as_ref() != Some(t) => Want::Reject(ErrorCode::Unauthorized),
            _ => Want::Accept(h.clone()),
        },
        None => want_without_frame(&sent.end, close),
    };
    let tokens = token.clone().map(Tokens::one);
    let (served, reply) = paused_runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serve = tokio::time::timeout(
            HANG,
            server_handshake::<_, WorkerMessage, CoordinatorMessage>(
                server,
                NodeId(1),
                tokens.as_ref(),
                max,
                |_, _| Ok(()),
            ),
        );
        let send = async {
            let _ = client.write_all(&bytes).await;
            if close {
                let _ = client.shutdown().await;
            }
        };
        let (served, ()) = tokio::join!(serve, send);
        // the connection is dropped here whatever happened: the reply ends
        let served = served.map(|r| r.map(|(_conn, hello)| hello));
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(HANG, client.read_to_end(&mut reply)).await;
        (served, reply)
    });
    let served = served.map_err(|_| TestCaseError::fail("server_handshake hung"))?;
    let replies = decode_stream::<HelloReply>(&reply, &[], DEFAULT_MAX_FRAME)?;
    prop_assert!(
        matches!(replies.end, End::Clean),
        "the server's reply is not whole frames: {}",
        replies.end
    );
    // the server sends nothing bigger than its own limit: a limit too small
    // for the answer (tens of bytes) leaves the client without one
    let fits = |r: &HelloReply| frame(r).map(|f| f.len() - 4 <= max);
    let welcome = HelloReply::Welcome { node: NodeId(1) };
    match (want, served) {
        (Want::Accept(h), Ok(hello)) => {
            prop_assert!(fits(&welcome)?);
            prop_assert_eq!(hello, h);
            prop_assert_eq!(replies.items, vec![welcome]);
        }
        (Want::Accept(_), Err(HandshakeError::Frame(FrameError::TooLarge { .. }))) if !fits(&welcome)? => {
            prop_assert!(replies.items.is_empty());
        }
        (Want::Reject(code), Err(HandshakeError::Rejected(r))) => {
            prop_assert_eq!(r.code, code);
            prop_assert!(!r.message.is_empty());
            let refused = HelloReply::Refused(r);
            let sent = if fits(&refused)? { vec![refused] } else { Vec::new() };
            prop_assert_eq!(replies.items, sent);
        }
        (Want::Frame(e), Err(HandshakeError::Frame(got))) => {
            prop_assert_eq!(got.to_string(), e);
            prop_assert!(replies.items.is_empty());
        }
        (Want::Closed, Err(HandshakeError::Closed)) | (Want::Timeout, Err(HandshakeError::Timeout(_))) => {
            prop_assert!(replies.items.is_empty());
        }
        (want, got) => prop_assert!(false, "wanted {want:?}, got {got:?}"),
    }
    Ok(())
}

#[test]
fn server_handshake_answers_every_first_frame_and_never_hangs() {
    let input = (
        peer_bytes(gen::hello()),
        any::<bool>(),
        gen::token(),
        select(vec![16usize, 64, 4096, DEFAULT_MAX_FRAME]),
    );
    check(
        "server_handshake_answers_every_first_frame_and_never_hangs",
        4096,
        input,
        |((first, tail, muts), close, token, max)| server_case(first, tail, muts, close, token, max),
    );
}

fn client_case(
    first: Option<HelloReply>,
    tail: Vec<u8>,
    muts: Vec<Mutation>,
    close: bool,
    role: PeerRole,
    token: Option<String>,
) -> Result<(), TestCaseError> {
    let max = 4096;
    let mut bytes = match &first {
        Some(r) => frame(r)?,
        None => Vec::new(),
    };
    bytes.extend(tail);
    let bytes = mutated(bytes, &muts);
    let answered = decode_stream::<HelloReply>(&bytes, &[], max)?;
    let want = match answered.items.first() {
        Some(HelloReply::Welcome { node }) => Want::Accept(*node),
        Some(HelloReply::Refused(r)) => Want::Refused(r.clone()),
        None => want_without_frame(&answered.end, close),
    };
    let (outcome, hello) = paused_runtime().block_on(async {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let connect = tokio::time::timeout(
            HANG,
            client_handshake::<_, CoordinatorMessage, WorkerMessage>(
                client,
                role.clone(),
                token.clone(),
                max,
            ),
        );
        let answer = async {
            let _ = server.write_all(&bytes).await;
            if close {
                let _ = server.shutdown().await;
            }
        };
        let (outcome, ()) = tokio::join!(connect, answer);
        let outcome = outcome.map(|r| r.map(|(_conn, node)| node));
        let mut hello = Vec::new();
        let _ = tokio::time::timeout(HANG, server.read_to_end(&mut hello)).await;
        (outcome, hello)
    });
    let outcome = outcome.map_err(|_| TestCaseError::fail("client_handshake hung"))?;
    // whatever the server said, the client said hello first, correctly
    let hellos = decode_stream::<Hello>(&hello, &[], max)?;
    prop_assert_eq!(hellos.items, vec![Hello { version: PROTOCOL_VERSION, role, token }]);
    match (want, outcome) {
        (Want::Accept(n), Ok(node)) => prop_assert_eq!(node, n),
        (Want::Refused(r), Err(HandshakeError::Refused(got))) => prop_assert_eq!(got, r),
        (Want::Frame(e), Err(HandshakeError::Frame(got))) => prop_assert_eq!(got.to_string(), e),
        (Want::Closed, Err(HandshakeError::Closed)) | (Want::Timeout, Err(HandshakeError::Timeout(_))) => {}
        (want, got) => prop_assert!(false, "wanted {want:?}, got {got:?}"),
    }
    Ok(())
}

#[test]
fn client_handshake_answers_every_reply_and_never_hangs() {
    let input = (peer_bytes(gen::hello_reply()), any::<bool>(), gen::peer_role(), gen::token());
    check(
        "client_handshake_answers_every_reply_and_never_hangs",
        4096,
        input,
        |((first, tail, muts), close, role, token)| client_case(first, tail, muts, close, role, token),
    );
}

#[test]
fn handshake_then_messages_round_trip_both_ways() {
    let input = (
        gen::token(),
        gen::token(),
        gen::peer_role(),
        vec(gen::worker_message(), 0..4),
        vec(gen::coordinator_message(), 0..4),
    );
    check(
        "handshake_then_messages_round_trip_both_ways",
        2048,
        input,
        |(client_token, server_token, role, up, down)| {
            let accept = match &server_token {
                Some(t) => client_token.as_ref() == Some(t),
                None => true,
            };
            let (client, server) = paused_runtime().block_on(async {
                let (c, s) = tokio::io::duplex(1 << 12);
                let client = async {
                    let (mut conn, node) = client_handshake::<_, CoordinatorMessage, WorkerMessage>(
                        c,
                        role.clone(),
                        client_token.clone(),
                        DEFAULT_MAX_FRAME,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    for m in &up {
                        conn.send(m.clone()).await.map_err(|e| e.to_string())?;
                    }
                    let mut got = Vec::new();
                    for _ in 0..down.len() {
                        match conn.next().await {
                            Some(Ok(m)) => got.push(m),
                            other => return Err(format!("client stream ended: {other:?}")),
                        }
                    }
                    Ok::<_, String>((node, got))
                };
                let server = async {
                    let (mut conn, hello) = server_handshake::<_, WorkerMessage, CoordinatorMessage>(
                        s,
                        NodeId(7),
                        server_token.clone().map(Tokens::one).as_ref(),
                        DEFAULT_MAX_FRAME,
                        |_, _| Ok(()),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    let mut got = Vec::new();
                    for _ in 0..up.len() {
                        match conn.next().await {
                            Some(Ok(m)) => got.push(m),
                            other => return Err(format!("server stream ended: {other:?}")),
                        }
                    }
                    for m in &down {
                        conn.send(m.clone()).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>((hello, got))
                };
                let both = tokio::time::timeout(HANG, async { tokio::join!(client, server) }).await;
                both.unwrap_or_else(|_| (Err("hung".into()), Err("hung".into())))
            });
            if accept {
                let (node, got_down) = client.map_err(TestCaseError::fail)?;
                let (hello, got_up) = server.map_err(TestCaseError::fail)?;
                prop_assert_eq!(node, NodeId(7));
                prop_assert_eq!(hello, Hello { version: PROTOCOL_VERSION, role, token: client_token });
                prop_assert_eq!(got_up, up);
                prop_assert_eq!(got_down, down);
            } else {
                let c = client.err().unwrap_or_default();
                let s = server.err().unwrap_or_default();
                prop_assert!(c.contains("refused by the server: missing or wrong token"), "client: {c}");
                prop_assert!(s.contains("refused the client: missing or wrong token"), "server: {s}");
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Wire messages
// ---------------------------------------------------------------------------

#[test]
fn wire_messages_round_trip() {
    let input = (
        gen::worker_message(),
        gen::coordinator_message(),
        gen::peer_message(),
        gen::hello(),
        gen::hello_reply(),
    );
    check("wire_messages_round_trip", 1024, input, |(w, c, p, h, r)| {
        round_trips(&w)?;
        round_trips(&c)?;
        round_trips(&p)?;
        round_trips(&h)?;
        round_trips(&r)?;
        Ok(())
    });
}

/// A value of any message type, to damage.
#[derive(Debug, Clone)]
enum AnyMessage {
    Worker(WorkerMessage),
    Coordinator(CoordinatorMessage),
    Peer(PeerMessage),
    Hello(Hello),
    Reply(HelloReply),
}

fn decodes_cleanly<T>(body: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    if let Ok(value) = rmp_serde::from_slice::<T>(body) {
        round_trips(&value)?;
    }
    Ok(())
}

#[test]
fn wire_decoders_survive_arbitrary_and_damaged_bodies() {
    let message = prop_oneof![
        gen::worker_message().prop_map(AnyMessage::Worker),
        gen::coordinator_message().prop_map(AnyMessage::Coordinator),
        gen::peer_message().prop_map(AnyMessage::Peer),
        gen::hello().prop_map(AnyMessage::Hello),
        gen::hello_reply().prop_map(AnyMessage::Reply),
    ];
    let body = prop_oneof![
        1 => vec(any::<u8>(), 0..128).prop_map(|b| (None, b)),
        3 => message.prop_map(|m| (Some(m), Vec::new())),
    ];
    let input = (body, vec(mutation(MSGPACK_EDGES), 1..4));
    check("wire_decoders_survive_arbitrary_and_damaged_bodies", 9216, input, |((msg, raw), muts)| {
        let encoded = match &msg {
            None => Ok(raw),
            Some(AnyMessage::Worker(m)) => rmp_serde::to_vec_named(m),
            Some(AnyMessage::Coordinator(m)) => rmp_serde::to_vec_named(m),
            Some(AnyMessage::Peer(m)) => rmp_serde::to_vec_named(m),
            Some(AnyMessage::Hello(m)) => rmp_serde::to_vec_named(m),
            Some(AnyMessage::Reply(m)) => rmp_serde::to_vec_named(m),
        }
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let body = mutated(encoded, &muts);
        decodes_cleanly::<WorkerMessage>(&body)?;
        decodes_cleanly::<CoordinatorMessage>(&body)?;
        decodes_cleanly::<PeerMessage>(&body)?;
        decodes_cleanly::<Hello>(&body)?;
        decodes_cleanly::<HelloReply>(&body)?;
        Ok(())
    });
}

/// MessagePack of a map with `fields` (already encoded key/value pairs).
fn msgpack_map(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0x80 | fields.len() as u8];
    for (key, value) in fields {
        out.push(0xa0 | key.len() as u8);
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value);
    }
    out
}

#[test]
fn wire_deeply_nested_bodies_do_not_exhaust_a_server_threads_stack() {
    // an unknown field is skipped by recursing into it: a body of nested
    // arrays must be refused or skipped within the stack a tokio worker
    // thread has (2 MiB), not crash the process
    let worker = std::thread::Builder::new().stack_size(2 << 20);
    let handle = worker
        .spawn(|| {
            for depth in
                [100usize, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1023, 1024, 1025, 10_000, 1 << 20]
            {
                eprintln!("DEPTH {depth}");
                let mut nested = vec![0x91; depth];
                nested.push(0xc0);
                let hello = msgpack_map(&[
                    ("version", vec![PROTOCOL_VERSION]),
                    ("role", b"\xa6Worker".to_vec()),
                    ("token", vec![0xc0]),
                    ("x", nested.clone()),
                ]);
                let heartbeat = msgpack_map(&[(
                    "Heartbeat",
                    msgpack_map(&[
                        ("generation", vec![1]),
                        ("step", vec![1]),
                        ("status", b"\xa7Running".to_vec()),
                        ("x", nested),
                    ]),
                )]);
                for body in [hello, heartbeat] {
                    let mut bytes = ((body.len() + 1) as u32).to_be_bytes().to_vec();
                    bytes.push(PROTOCOL_VERSION);
                    bytes.extend_from_slice(&body);
                    let mut buf = BytesMut::from(&bytes[..]);
                    let _ = FrameCodec::<Hello, ()>::new(DEFAULT_MAX_FRAME).decode(&mut buf);
                    let mut buf = BytesMut::from(&bytes[..]);
                    let _ = FrameCodec::<WorkerMessage, ()>::new(DEFAULT_MAX_FRAME).decode(&mut buf);
                }
            }
        })
        .expect("a thread");
    handle.join().expect("decoding nested bodies panicked");
}

// ---------------------------------------------------------------------------
// Job spec (SPEC §2)
// ---------------------------------------------------------------------------

/// The ranges SPEC §2 and the spec's refusal messages document, written out
/// independently of `JobSpec::validate`.
fn in_documented_ranges(s: &JobSpec) -> Result<(), String> {
    let name = s.name.as_str();
    let mut bad = Vec::new();
    if !(1..=63).contains(&name.len())
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bad.push("name");
    }
    if !(1..=65_536).contains(&s.world_size) {
        bad.push("world_size");
    }
    let c = &s.checkpoint;
    if c.every_steps.is_none() && c.every_seconds.is_none() {
        bad.push("checkpoint.every_steps or every_seconds");
    }
    if c.every_steps == Some(0) || c.every_seconds == Some(0) {
        bad.push("checkpoint.every_*");
    }
    if c.keep_last < 1 {
        bad.push("checkpoint.keep_last");
    }
    if !c.root.is_absolute() {
        bad.push("checkpoint.root");
    }
    if c.resume_from.as_ref().is_some_and(|p| !p.is_absolute()) {
        bad.push("checkpoint.resume_from");
    }
    if !(1..=86_400).contains(&c.timeout_seconds) {
        bad.push("checkpoint.timeout_seconds");
    }
    let f = &s.failure;
    if !(10..=600_000).contains(&f.heartbeat_interval_ms) {
        bad.push("failure.heartbeat_interval_ms");
    }
    if f.heartbeat_timeout_ms < f.heartbeat_interval_ms.saturating_mul(2)
        || f.heartbeat_timeout_ms > 3_600_000
    {
        bad.push("failure.heartbeat_timeout_ms");
    }
    if !(1..=604_800).contains(&f.hang_timeout_seconds) {
        bad.push("failure.hang_timeout_seconds");
    }
    if let Some(t) = &s.trainer {
        if t.total_steps < 1 {
            bad.push("trainer.total_steps");
        }
        if !(1..=1024).contains(&t.layers) {
            bad.push("trainer.layers");
        }
        let min = 144 * u64::from(t.layers.min(1024));
        if !(min..=1 << 40).contains(&t.params_per_rank_bytes) {
            bad.push("trainer.params_per_rank_bytes");
        }
        if t.step_time_ms > 60_000 {
            bad.push("trainer.step_time_ms");
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("accepted a spec out of range: {bad:?}"))
    }
}

/// Whatever `from_toml` accepted is in range and survives `to_toml`.
fn accepted_spec_holds(text: &str) -> Result<(), TestCaseError> {
    let Ok(spec) = JobSpec::from_toml(text) else { return Ok(()) };
    in_documented_ranges(&spec).map_err(TestCaseError::fail)?;
    let again = spec.to_toml();
    let back = JobSpec::from_toml(&again).map_err(|e| TestCaseError::fail(format!("{e}\n{again}")))?;
    prop_assert_eq!(back, spec);
    Ok(())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

const SPEC_KEYS: &[&str] = &[
    "name",
    "world_size",
    "every_steps",
    "every_seconds",
    "keep_last",
    "root",
    "timeout_seconds",
    "resume_from",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "max_restarts",
    "hang_timeout_seconds",
    "memory_headroom_bytes",
    "total_steps",
    "params_per_rank_bytes",
    "layers",
    "step_time_ms",
    "seed",
    "checkpoint",
    "failure",
    "trainer",
    "checkpoint.root",
    "trainer.layers",
];

fn toml_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        select(vec![
            "0",
            "1",
            "-1",
            "10",
            "500",
            "3000",
            "86400",
            "86401",
            "65536",
            "65537",
            "1099511627776",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "4294967295",
            "4294967296",
            "0x10",
            "0o7",
            "0b1",
            "+5",
            "1_000",
            "1.5",
            "1e3",
            "inf",
            "nan",
            "true",
            "false",
            "1979-05-27",
            "1979-05-27T07:32:00Z",
            "\"/data/checkpoints\"",
            "\"demo\"",
            "\"relative\"",
            "\"\"",
            "'/literal'",
            "\"\\u0000\"",
            "\"\\q\"",
            "\"\"\"/multi\nline\"\"\"",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        gen::text().prop_map(|s| toml_str(&s)),
        "(?s).{0,6}",
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            vec((select(SPEC_KEYS), inner), 0..3).prop_map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{{}}}", fields.join(", "))
            }),
        ]
    })
    .boxed()
}

fn toml_line() -> BoxedStrategy<String> {
    let key =
        prop_oneof![4 => select(SPEC_KEYS).prop_map(str::to_string), 1 => "[a-z_]{1,10}", 1 => "(?s).{0,6}"];
    prop_oneof![
        8 => (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        3 => select(vec!["[checkpoint]", "[failure]", "[trainer]", "[[checkpoint]]", "[trainer.x]", "[]", "[name]"])
            .prop_map(str::to_string),
        1 => "(?s).{0,24}",
        1 => Just(String::new()),
        1 => "#.{0,10}",
    ]
    .boxed()
}

#[test]
fn spec_parser_survives_toml_like_text() {
    check("spec_parser_survives_toml_like_text", 4096, vec(toml_line(), 0..24), |lines| {
        accepted_spec_holds(&lines.join("\n"))
    });
}

/// A spec document as lines per table, so one key can be broken at a time.
#[derive(Debug, Clone)]
struct Doc {
    top: Vec<(String, String)>,
    tables: Vec<(String, Vec<(String, String)>)>,
}

impl Doc {
    fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.top {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for (table, lines) in &self.tables {
            out.push_str(&format!("\n[{table}]\n"));
            for (k, v) in lines {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    fn lines_mut(&mut self, table: Option<&str>) -> &mut Vec<(String, String)> {
        match table {
            None => &mut self.top,
            Some(t) => {
                let at = match self.tables.iter().position(|(name, _)| name == t) {
                    Some(at) => at,
                    None => {
                        self.tables.push((t.to_string(), Vec::new()));
                        self.tables.len() - 1
                    }
                };
                &mut self.tables[at].1
            }
        }
    }

    /// Sets `table.key` (adding the table and the key where missing).
    fn set(&mut self, dotted: &str, value: String) {
        let (table, key) = split_key(dotted);
        let lines = self.lines_mut(table);
        match lines.iter_mut().find(|(k, _)| k == key) {
            Some(line) => line.1 = value,
            None => lines.push((key.to_string(), value)),
        }
    }

    fn remove(&mut self, dotted: &str) {
        let (table, key) = split_key(dotted);
        self.lines_mut(table).retain(|(k, _)| k != key);
    }

    fn get(&self, dotted: &str) -> Option<&str> {
        let (table, key) = split_key(dotted);
        let lines = match table {
            None => &self.top,
            Some(t) => &self.tables.iter().find(|(name, _)| name == t)?.1,
        };
        lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn split_key(dotted: &str) -> (Option<&str>, &str) {
    match dotted.split_once('.') {
        Some((t, k)) => (Some(t), k),
        None => (None, dotted),
    }
}

/// How an integer is written (TOML allows several spellings).
#[derive(Debug, Clone, Copy)]
enum IntStyle {
    Plain,
    Underscores,
    Hex,
}

fn int(n: u64, style: IntStyle) -> String {
    match style {
        IntStyle::Plain => n.to_string(),
        IntStyle::Hex => format!("0x{n:x}"),
        IntStyle::Underscores => {
            let digits = n.to_string();
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i).is_multiple_of(3) {
                    out.push('_');
                }
                out.push(c);
            }
            out
        }
    }
}

/// A valid spec and a document that states it, keys in any order, optional
/// keys sometimes left to their defaults.
fn valid_doc() -> BoxedStrategy<(JobSpec, Doc)> {
    const I64: u64 = i64::MAX as u64;
    let every = prop_oneof![
        (1..=I64).prop_map(|n| (Some(n), None)),
        (1..=I64).prop_map(|n| (None, Some(n))),
        (1..=I64, 1..=I64).prop_map(|(a, b)| (Some(a), Some(b))),
    ];
    let checkpoint =
        (every, option::of(1u32..), gen::text(), option::of(1u64..=86_400), option::of(gen::text()));
    let failure = (
        option::of(10u64..=600_000),
        option::of(any::<u64>()),
        option::of(any::<u32>()),
        option::of(1u64..=604_800),
        option::of(0..=I64),
    );
    let trainer = option::of((
        option::of(1..=I64),
        option::of(1u32..=1024),
        option::of(any::<u64>()),
        option::of(0u64..=60_000),
        option::of(0..=I64),
    ));
    let style = select(vec![IntStyle::Plain, IntStyle::Plain, IntStyle::Underscores, IntStyle::Hex]);
    (gen::job_name(), 1u32..=65_536, checkpoint, failure, trainer, style, vec(any::<Index>(), 0..8))
        .prop_map(|(name, world_size, c, f, t, style, shuffle)| {
            let ((every_steps, every_seconds), keep_last, root, timeout, resume_from) = c;
            let root = format!("/{root}");
            let resume_from = resume_from.map(|r| format!("/{r}"));
            let (interval, timeout_ms, max_restarts, hang, headroom) = f;
            let i = interval.unwrap_or(500);
            // a timeout in [2 × interval, 3600000]; the default 3000 only where it fits
            let timeout_ms = match timeout_ms {
                None if 2 * i <= 3000 => None,
                other => Some(2 * i + other.unwrap_or(0) % (3_600_000 - 2 * i + 1)),
            };
            let spec = JobSpec {
                name: name.clone(),
                world_size,
                checkpoint: CheckpointSpec {
                    every_steps,
                    every_seconds,
                    keep_last: keep_last.unwrap_or(3),
                    root: PathBuf::from(&root),
                    timeout_seconds: timeout.unwrap_or(120),
                    resume_from: resume_from.as_ref().map(PathBuf::from),
                    at_end: true,
                    memory_copies: 1,
                },
                failure: FailureSpec {
                    heartbeat_interval_ms: i,
                    heartbeat_timeout_ms: timeout_ms.unwrap_or(3000),
                    max_restarts: max_restarts.unwrap_or(10),
                    hang_timeout_seconds: hang.unwrap_or(300),
                    memory_headroom_bytes: headroom.unwrap_or(0),
                    spares: 0,
                },
                trainer: t.map(|(total, layers, params, step_time, seed)| {
                    let l = layers.unwrap_or(8);
                    let min = 144 * u64::from(l);
                    TrainerSpec {
                        total_steps: total.unwrap_or(2000),
                        params_per_rank_bytes: params.map_or(64 << 20, |p| min + p % ((1 << 40) - min + 1)),
                        layers: l,
                        step_time_ms: step_time.unwrap_or(5),
                        seed: seed.unwrap_or(42),
                    }
                }),
            };
            let n = |v: u64| int(v, style);
            let mut doc = Doc { top: Vec::new(), tables: Vec::new() };
            doc.set("name", toml_str(name.as_str()));
            doc.set("world_size", n(u64::from(world_size)));
            let mut ck: Vec<(&str, Option<String>)> = vec![
                ("every_steps", every_steps.map(n)),
                ("every_seconds", every_seconds.map(n)),
                ("keep_last", keep_last.map(|k| n(u64::from(k)))),
                ("root", Some(toml_str(&root))),
                ("timeout_seconds", timeout.map(n)),
                ("resume_from", resume_from.as_deref().map(toml_str)),
            ];
            let mut fl: Vec<(&str, Option<String>)> = vec![
                ("heartbeat_interval_ms", interval.map(n)),
                ("heartbeat_timeout_ms", timeout_ms.map(n)),
                ("max_restarts", max_restarts.map(|m| n(u64::from(m)))),
                ("hang_timeout_seconds", hang.map(n)),
                ("memory_headroom_bytes", headroom.map(n)),
            ];
            for (k, s) in shuffle.iter().enumerate() {
                let a = k % ck.len();
                let b = s.index(ck.len());
                ck.swap(a, b);
                let (a, b) = (k % fl.len(), s.index(fl.len()));
                fl.swap(a, b);
            }
            for (k, v) in ck {
                if let Some(v) = v {
                    doc.set(&format!("checkpoint.{k}"), v);
                }
            }
            if shuffle.len() % 2 == 1 || fl.iter().any(|(_, v)| v.is_some()) {
                doc.lines_mut(Some("failure"));
                for (k, v) in fl {
                    if let Some(v) = v {
                        doc.set(&format!("failure.{k}"), v);
                    }
                }
            }
            if let Some((total, layers, _, step_time, seed)) = t {
                let tr = spec.trainer.as_ref().expect("trainer present");
                doc.lines_mut(Some("trainer"));
                let keys: [(&str, Option<u64>); 5] = [
                    ("total_steps", total),
                    ("params_per_rank_bytes", t.and_then(|t| t.2).map(|_| tr.params_per_rank_bytes)),
                    ("layers", layers.map(u64::from)),
                    ("step_time_ms", step_time),
                    ("seed", seed),
                ];
                for (k, v) in keys {
                    if let Some(v) = v {
                        doc.set(&format!("trainer.{k}"), n(v));
                    }
                }
            }
            (spec, doc)
        })
        .boxed()
}

#[test]
fn spec_valid_documents_parse_to_what_they_say_and_round_trip() {
    check("spec_valid_documents_parse_to_what_they_say_and_round_trip", 2048, valid_doc(), |(spec, doc)| {
        let text = doc.render();
        let parsed = JobSpec::from_toml(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&parsed, &spec);
        in_documented_ranges(&parsed).map_err(TestCaseError::fail)?;
        accepted_spec_holds(&text)
    });
}

/// One way to break an otherwise valid spec, and what the refusal must name.
#[derive(Debug, Clone)]
enum Break {
    /// A value out of its documented range (key index, raw choice).
    Range(Index, u64),
    /// A key the schema does not know, in a table (index), named so.
    Unknown(Index, String),
    /// A required key (index) left out.
    Missing(Index),
    /// A value of the wrong type for a key (index).
    WrongType(Index, Index),
}

const RANGE_KEYS: &[&str] = &[
    "world_size",
    "checkpoint.every_steps",
    "checkpoint.every_seconds",
    "checkpoint.keep_last",
    "checkpoint.root",
    "checkpoint.resume_from",
    "checkpoint.timeout_seconds",
    "failure.heartbeat_interval_ms",
    "failure.heartbeat_timeout_ms",
    "failure.hang_timeout_seconds",
    "trainer.total_steps",
    "trainer.layers",
    "trainer.params_per_rank_bytes",
    "trainer.step_time_ms",
];

/// An out-of-range value for `key` given the rest of `doc` (`r` picks which).
fn out_of_range(key: &str, doc: &Doc, r: u64) -> String {
    const I64: u64 = i64::MAX as u64;
    let current = |k: &str, default: u64| {
        doc.get(k).map_or(default, |v| {
            let v = v.replace('_', "");
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(default),
                None => v.parse().unwrap_or(default),
            }
        })
    };
    let above = |lo: u64, hi: u64| (lo + r % (hi - lo + 1)).to_string();
    let low_or_high = |below: u64, lo: u64, hi: u64| {
        if r.is_multiple_of(2) && below > 0 {
            (r / 2 % below).to_string()
        } else {
            above(lo, hi)
        }
    };
    match key {
        "world_size" => low_or_high(1, 65_537, u64::from(u32::MAX)),
        "checkpoint.every_steps"
        | "checkpoint.every_seconds"
        | "checkpoint.keep_last"
        | "trainer.total_steps" => "0".into(),
        "checkpoint.root" | "checkpoint.resume_from" => {
            toml_str(["data/checkpoints", "", "./x", "~/c"][(r % 4) as usize])
        }
        "checkpoint.timeout_seconds" => low_or_high(1, 86_401, I64),
        "failure.heartbeat_interval_ms" => low_or_high(10, 600_001, I64),
        "failure.heartbeat_timeout_ms" => {
            let i = current("failure.heartbeat_interval_ms", 500);
            low_or_high(2 * i, 3_600_001, I64)
        }
        "failure.hang_timeout_seconds" => low_or_high(1, 604_801, I64),
        "trainer.layers" => low_or_high(1, 1025, u64::from(u32::MAX)),
        "trainer.params_per_rank_bytes" => {
            let layers = current("trainer.layers", 8);
            low_or_high(144 * layers, (1 << 40) + 1, I64)
        }
        "trainer.step_time_ms" => above(60_001, I64),
        other => unreachable!("no range for {other}"),
    }
}

#[test]
fn spec_one_broken_key_is_refused_and_named() {
    let brk = prop_oneof![
        4 => (any::<Index>(), any::<u64>()).prop_map(|(k, r)| Break::Range(k, r)),
        1 => (any::<Index>(), "[a-z_]{1,10}").prop_map(|(t, k)| Break::Unknown(t, k)),
        1 => any::<Index>().prop_map(Break::Missing),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(k, v)| Break::WrongType(k, v)),
    ];
    check("spec_one_broken_key_is_refused_and_named", 2048, (valid_doc(), brk), |((_, mut doc), brk)| {
        let want: String = match &brk {
            Break::Range(k, r) => {
                let key = RANGE_KEYS[k.index(RANGE_KEYS.len())];
                if key == "checkpoint.every_steps" || key == "checkpoint.every_seconds" {
                    // the other one alone would still be a valid schedule
                    doc.remove("checkpoint.every_steps");
                    doc.remove("checkpoint.every_seconds");
                }
                if key == "trainer.params_per_rank_bytes" {
                    // the value shown must be the one written
                    doc.remove("trainer.layers");
                }
                let value = out_of_range(key, &doc, *r);
                doc.set(key, value);
                format!("`{key}` = ")
            }
            Break::Unknown(t, key) => {
                let known = SPEC_KEYS.iter().any(|k| k == key) || key == "at_end";
                if known {
                    return Ok(());
                }
                let table = [None, Some("checkpoint"), Some("failure"), Some("trainer")][t.index(4)];
                let dotted = table.map_or(key.clone(), |t| format!("{t}.{key}"));
                doc.set(&dotted, "1".into());
                format!("unknown field `{key}`")
            }
            Break::Missing(k) => {
                let key = ["name", "world_size", "checkpoint.root", "checkpoint"][k.index(4)];
                if key == "checkpoint" {
                    doc.tables.retain(|(t, _)| t != "checkpoint");
                } else {
                    doc.remove(key);
                }
                format!("missing field `{}`", split_key(key).1)
            }
            Break::WrongType(k, v) => {
                let key = *select_key(k);
                let (_, leaf) = split_key(key);
                let strings = ["name", "root", "resume_from"];
                let value = if strings.contains(&leaf) {
                    ["5", "true", "[\"/a\"]", "{ a = 1 }"][v.index(4)]
                } else {
                    ["\"12\"", "true", "[1]", "1.5", "-1", "{ a = 1 }", "1979-05-27"][v.index(7)]
                };
                doc.set(key, value.into());
                leaf.to_string()
            }
        };
        let text = doc.render();
        match JobSpec::from_toml(&text) {
            Ok(spec) => prop_assert!(false, "accepted {brk:?}: {spec:?}\n{text}"),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.contains(&want), "refusal does not name {want:?}: {e}\n{text}");
            }
        }
        Ok(())
    });
}

fn select_key(k: &Index) -> &'static &'static str {
    const TYPED: &[&str] = &[
        "name",
        "world_size",
        "checkpoint.every_steps",
        "checkpoint.every_seconds",
        "checkpoint.keep_last",
        "checkpoint.root",
        "checkpoint.timeout_seconds",
        "checkpoint.resume_from",
        "failure.heartbeat_interval_ms",
        "failure.heartbeat_timeout_ms",
        "failure.max_restarts",
        "failure.hang_timeout_seconds",
        "failure.memory_headroom_bytes",
        "trainer.total_steps",
        "trainer.params_per_rank_bytes",
        "trainer.layers",
        "trainer.step_time_ms",
        "trainer.seed",
    ];
    &TYPED[k.index(TYPED.len())]
}

/// A line-level edit of a spec document.
#[derive(Debug, Clone)]
enum LineEdit {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    Replace(Index, String),
    Insert(Index, String),
}

#[test]
fn spec_damaged_documents_never_panic_and_never_slip_through() {
    let edit = prop_oneof![
        (any::<Index>()).prop_map(LineEdit::Delete),
        (any::<Index>()).prop_map(LineEdit::Duplicate),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| LineEdit::Swap(a, b)),
        (any::<Index>(), toml_line()).prop_map(|(a, l)| LineEdit::Replace(a, l)),
        (any::<Index>(), toml_line()).prop_map(|(a, l)| LineEdit::Insert(a, l)),
    ];
    let input = (valid_doc(), vec(edit, 0..4), vec(mutation(JSON_EDGES), 0..3));
    check(
        "spec_damaged_documents_never_panic_and_never_slip_through",
        2048,
        input,
        |((_, doc), edits, muts)| {
            let mut lines: Vec<String> = doc.render().lines().map(str::to_string).collect();
            for e in &edits {
                let n = lines.len();
                match e {
                    LineEdit::Delete(i) if n > 0 => {
                        lines.remove(i.index(n));
                    }
                    LineEdit::Duplicate(i) if n > 0 => {
                        let l = lines[i.index(n)].clone();
                        lines.insert(i.index(n), l);
                    }
                    LineEdit::Swap(a, b) if n > 0 => lines.swap(a.index(n), b.index(n)),
                    LineEdit::Replace(i, l) if n > 0 => lines[i.index(n)] = l.clone(),
                    LineEdit::Insert(i, l) => lines.insert(i.index(n + 1), l.clone()),
                    _ => {}
                }
            }
            let bytes = mutated(lines.join("\n").into_bytes(), &muts);
            accepted_spec_holds(&String::from_utf8_lossy(&bytes))
        },
    );
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

/// A fresh file name in `dir` for each case.
fn case_path(dir: &Path, name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!("{name}-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// What must hold of any header `read_header` accepts for a file of `len` bytes.
fn header_is_sound(h: &flotilla_shared::shard::ShardHeader, len: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(h.file_len, len);
    prop_assert!(h.header_len >= 8 && h.header_len as u64 <= len);
    let mut at = 0usize;
    for (spec, range) in &h.tensors {
        prop_assert_eq!(range.start, at, "tensors are not back to back");
        prop_assert_eq!(range.len(), spec.byte_len(), "{} has the wrong length", spec.name);
        at = range.end;
    }
    prop_assert_eq!((h.header_len + at) as u64, len);
    prop_assert!(JobName::new(h.meta.job.as_str()).is_ok());
    Ok(())
}

/// A file `read_header` accepts verifies against a manifest describing it
/// (the two readers agree), and its tensors are its bytes.
fn verifies_against_its_own_manifest(path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(h) = read_header(path, "fuzz") else { return Ok(()) };
    header_is_sound(&h, bytes.len() as u64)?;
    let data = &bytes[h.header_len..];
    let manifest = ShardManifest {
        rank: h.meta.rank,
        file: "x".into(),
        bytes: bytes.len() as u64,
        checksum: Checksum::of(bytes),
        tensors: h
            .tensors
            .iter()
            .map(|(v, r)| TensorRecord {
                name: v.name.clone(),
                dtype: v.dtype,
                shape: v.shape.clone(),
                bytes: r.len() as u64,
                checksum: Checksum::of(&data[r.clone()]),
            })
            .collect(),
    };
    let shard = Shard::read_verified(path, "fuzz", &manifest)
        .map_err(|e| TestCaseError::fail(format!("read_header accepts it, read_verified refuses: {e}")))?;
    for ((v, got), (want_v, r)) in shard.tensors().zip(&h.tensors) {
        prop_assert_eq!(v, want_v);
        prop_assert_eq!(got, &data[r.clone()]);
    }
    Ok(())
}

/// A tensor entry of a hand-made header.
#[derive(Debug, Clone)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    /// Explicit offsets; `None`: right after the previous tensor.
    offsets: Option<(u64, u64)>,
}

/// A hand-made safetensors file: header fields, length field, data.
#[derive(Debug, Clone)]
struct RawShard {
    meta: Option<Vec<(String, String)>>,
    tensors: Vec<RawTensor>,
    /// Added to the true header length in the length field (wrapping).
    len_delta: i64,
    pad: usize,
    /// `None`: as much data as the header says (when small), else this much.
    data_len: Option<usize>,
    seed: u64,
}

fn dtype_name() -> BoxedStrategy<String> {
    prop_oneof![
        20 => gen::dtype().prop_map(|d| serde_json::to_value(d).expect("dtype").as_str().expect("a name").to_string()),
        1 => select(vec!["F33", "f32", "", "__metadata__"]).prop_map(str::to_string),
    ]
    .boxed()
}

/// `__metadata__`, mostly valid (so that the readers get past it), each
/// field sometimes missing or wrong.
fn raw_meta() -> BoxedStrategy<Option<Vec<(String, String)>>> {
    let bad = select(vec!["-1", "", "x", "1.5", "18446744073709551616"]).prop_map(str::to_string);
    let num = prop_oneof![20 => gen::num().prop_map(|n| n.to_string()), 1 => bad.clone()].boxed();
    let rank = prop_oneof![
        20 => gen::num32().prop_map(|n| n.to_string()),
        1 => Just("4294967296".to_string()),
        1 => bad,
    ]
    .boxed();
    let field = |k: &'static str, v: BoxedStrategy<String>| {
        option::weighted(0.98, v).prop_map(move |v| v.map(|v| (k.to_string(), v)))
    };
    option::weighted(
        0.95,
        (
            field("format", Just("flotilla-shard/1".to_string()).boxed()),
            field("job", prop_oneof![20 => "[a-z0-9-]{1,8}", 1 => "(?s).{0,8}"].boxed()),
            field("checkpoint", num.clone()),
            field("rank", rank),
            field("step", num.clone()),
            field("generation", num),
            option::weighted(0.1, (gen::text(), gen::text())),
        )
            .prop_map(|(a, b, c, d, e, f, extra)| {
                [a, b, c, d, e, f, extra].into_iter().flatten().collect::<Vec<_>>()
            }),
    )
    .boxed()
}

fn raw_shard() -> BoxedStrategy<RawShard> {
    let small =
        (gen::text(), dtype_name(), vec(0u64..6, 0..4), option::weighted(0.03, (gen::num(), gen::num())))
            .prop_map(|(name, dtype, shape, offsets)| RawTensor { name, dtype, shape, offsets });
    let edge_dim = select(vec![0u64, 1, 3, 1 << 32, (1 << 61) - 1, 1 << 61, 1 << 62, u64::MAX]);
    let odd =
        (gen::text(), dtype_name(), vec(edge_dim, 0..3), option::weighted(0.2, (gen::num(), gen::num())))
            .prop_map(|(name, dtype, shape, offsets)| RawTensor { name, dtype, shape, offsets });
    // the largest tensors a one-byte dtype allows, back to back: the offsets
    // reach the top of the u64 range
    let huge = (0u64..16, select(vec!["U8", "I8", "BOOL"])).prop_map(|(k, dtype)| RawTensor {
        name: String::new(),
        dtype: dtype.to_string(),
        shape: vec![((1u64 << 61) - 1) - k],
        offsets: None,
    });
    let huge = vec(huge, 7..10).prop_map(|mut v| {
        for (i, t) in v.iter_mut().enumerate() {
            t.name = format!("huge-{i}");
        }
        v
    });
    let tensors = prop_oneof![
        4 => vec(small, 0..6),
        2 => vec(odd, 0..4),
        1 => huge,
    ];
    let len_delta = prop_oneof![12 => Just(0i64), 2 => -8i64..8, 1 => any::<i64>()];
    (raw_meta(), tensors, len_delta, 0usize..9, option::weighted(0.15, 0usize..300), any::<u64>())
        .prop_map(|(meta, tensors, len_delta, pad, data_len, seed)| RawShard {
            meta,
            tensors,
            len_delta,
            pad,
            data_len,
            seed,
        })
        .boxed()
}

fn dtype_bits(name: &str) -> u128 {
    serde_json::from_value::<Dtype>(serde_json::Value::String(name.into())).map_or(8, |d| d.bitsize() as u128)
}

fn render_shard(raw: &RawShard) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(meta) = &raw.meta {
        let m: serde_json::Map<_, _> =
            meta.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), m.into());
    }
    let mut at: u128 = 0;
    for t in &raw.tensors {
        let elements = t.shape.iter().fold(1u128, |a, &d| a.saturating_mul(u128::from(d)));
        let size = elements.saturating_mul(dtype_bits(&t.dtype)) / 8;
        let (start, end) = t.offsets.unwrap_or_else(|| {
            let end = at.saturating_add(size);
            (at.min(u64::MAX as u128) as u64, end.min(u64::MAX as u128) as u64)
        });
        at = u128::from(end);
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [start, end] }),
        );
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map");
    json.resize(json.len() + raw.pad, b' ');
    let len = (json.len() as u64).wrapping_add_signed(raw.len_delta);
    let data_len = raw.data_len.unwrap_or(if at <= 4096 { at as usize } else { 64 });
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend(filler(raw.seed, data_len));
    out
}

#[test]
fn shard_header_reader_survives_arbitrary_files() {
    let dir = tempdir();
    let input = prop_oneof![
        1 => vec(any::<u8>(), 0..96).prop_map(|b| (None, b, Vec::new())),
        8 => (raw_shard(), prop_oneof![2 => Just(Vec::new()), 1 => vec(mutation(JSON_EDGES), 1..3)]).prop_map(|(r, m)| (Some(r), Vec::new(), m)),
    ];
    check("shard_header_reader_survives_arbitrary_files", 8192, input, |(raw, bytes, muts)| {
        let bytes = match &raw {
            Some(raw) => mutated(render_shard(raw), &muts),
            None => bytes,
        };
        let path = case_path(dir.path(), "any.safetensors");
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let result = verifies_against_its_own_manifest(&path, &bytes);
        let _ = std::fs::remove_file(&path);
        result
    });
}

/// Variables and data of a shard a trainer could write.
#[derive(Debug, Clone)]
struct RealShard {
    meta: ShardMeta,
    vars: Vec<VariableSpec>,
    seed: u64,
}

/// Dtypes whose elements are whole bytes.
fn byte_dtype() -> BoxedStrategy<Dtype> {
    select(gen::DTYPES.iter().copied().filter(|d| d.bitsize() % 8 == 0).collect::<Vec<_>>()).boxed()
}

fn real_shard() -> BoxedStrategy<RealShard> {
    let meta =
        (gen::job_name(), gen::num(), gen::num32(), gen::num(), gen::num()).prop_map(|(job, c, r, s, g)| {
            ShardMeta {
                job,
                checkpoint: CheckpointId(c),
                rank: Rank(r),
                step: Step(s),
                generation: Generation(g),
            }
        });
    let var = ("(?s).{0,12}", byte_dtype(), vec(0usize..6, 0..3));
    (meta, vec(var, 0..5), any::<u64>())
        .prop_map(|(meta, vars, seed)| RealShard {
            meta,
            vars: vars
                .into_iter()
                .enumerate()
                // names unique, never `__metadata__`
                .map(|(i, (name, dtype, shape))| VariableSpec::new(format!("{i}/{name}"), dtype, shape))
                .collect(),
            seed,
        })
        .boxed()
}

/// Damage to a written shard file.
#[derive(Debug, Clone)]
enum FileDamage {
    None,
    /// One byte of tensor data flipped.
    FlipData(Index, u8),
    /// One byte of the header (length field included) flipped.
    FlipHeader(Index, u8),
    /// The file cut short.
    Truncate(Index),
    /// Bytes appended.
    Append(Vec<u8>),
    /// Any bytes overwritten.
    Overwrite(Vec<(Index, u8)>),
}

#[test]
fn shard_damage_is_always_detected_and_named() {
    let dir = tempdir();
    let damage = prop_oneof![
        1 => Just(FileDamage::None),
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| FileDamage::FlipData(i, m)),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| FileDamage::FlipHeader(i, m)),
        2 => any::<Index>().prop_map(FileDamage::Truncate),
        1 => vec(any::<u8>(), 1..16).prop_map(FileDamage::Append),
        2 => vec((any::<Index>(), any::<u8>()), 1..6).prop_map(FileDamage::Overwrite),
    ];
    check("shard_damage_is_always_detected_and_named", 1024, (real_shard(), damage), |(shard, damage)| {
        let len: usize = shard.vars.iter().map(VariableSpec::byte_len).sum();
        let data = filler(shard.seed, len);
        let path = case_path(dir.path(), "rank.safetensors");
        let manifest = write_shard(&path, &shard.meta, &shard.vars, &data)
            .map_err(|e| TestCaseError::fail(format!("a valid shard is refused: {e}")))?;
        let clean = std::fs::read(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let header = read_header(&path, "fuzz").map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&header.meta, &shard.meta);
        // file order: by offset, an empty variable before the one it shares
        // an offset with, empty ones at one offset by name
        let mut at = 0;
        let mut placed: Vec<(usize, usize, &VariableSpec)> = shard
            .vars
            .iter()
            .map(|v| {
                at += v.byte_len();
                (at - v.byte_len(), at, v)
            })
            .collect();
        placed.sort_by(|a, b| (a.0, a.1, &a.2.name).cmp(&(b.0, b.1, &b.2.name)));
        let in_file_order: Vec<VariableSpec> = placed.into_iter().map(|(_, _, v)| v.clone()).collect();
        prop_assert_eq!(header.variables(), in_file_order);
        let mut bytes = clean.clone();
        let data_at = header.header_len;
        // which error the damage must produce: None = accepted intact
        let want: Option<String> = match &damage {
            FileDamage::None => None,
            FileDamage::FlipData(i, mask) if bytes.len() > data_at => {
                let at = data_at + i.index(bytes.len() - data_at);
                bytes[at] ^= mask;
                let (v, _) = header
                    .tensors
                    .iter()
                    .find(|(_, r)| r.contains(&(at - data_at)))
                    .expect("every data byte belongs to a tensor");
                Some(format!("checksum mismatch in {}", v.name))
            }
            FileDamage::FlipData(..) => None,
            FileDamage::FlipHeader(i, mask) => {
                bytes[i.index(data_at)] ^= mask;
                Some(String::new())
            }
            FileDamage::Truncate(i) => {
                bytes.truncate(i.index(bytes.len()));
                Some(format!(
                    "truncated or overwritten: {} bytes on disk, {} expected",
                    bytes.len(),
                    clean.len()
                ))
            }
            FileDamage::Append(more) => {
                bytes.extend_from_slice(more);
                Some(format!(
                    "truncated or overwritten: {} bytes on disk, {} expected",
                    bytes.len(),
                    clean.len()
                ))
            }
            FileDamage::Overwrite(writes) => {
                for (i, b) in writes {
                    let at = i.index(bytes.len());
                    bytes[at] = *b;
                }
                (bytes != clean).then(String::new)
            }
        };
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let verified = Shard::read_verified(&path, "checkpoint 7 rank 2", &manifest);
        let header_again = read_header(&path, "checkpoint 7 rank 2");
        let _ = std::fs::remove_file(&path);
        match (want, verified) {
            (None, Ok(s)) => {
                let all: Vec<u8> = s.tensors().flat_map(|(_, d)| d.to_vec()).collect();
                prop_assert_eq!(all, data);
            }
            (None, Err(e)) => prop_assert!(false, "an intact shard is refused: {e}"),
            (Some(want), Ok(_)) => prop_assert!(false, "damage not detected (wanted {want:?})"),
            (Some(want), Err(e)) => {
                prop_assert!(e.is_corruption(), "damage not reported as corruption: {e}");
                let e = e.to_string();
                prop_assert!(e.starts_with("checkpoint 7 rank 2: "), "{e}");
                prop_assert!(e.contains(&want), "wanted {want:?}, got {e:?}");
            }
        }
        if matches!(damage, FileDamage::Truncate(_) | FileDamage::Append(_)) {
            match header_again {
                Err(e) => prop_assert!(matches!(e.kind, ShardErrorKind::Truncated { .. }), "{e}"),
                Ok(_) => prop_assert!(false, "read_header accepts a file of the wrong length"),
            }
        }
        Ok(())
    });
}

#[test]
fn shard_writer_refuses_what_it_cannot_write_and_never_panics() {
    let dir = tempdir();
    let name = prop_oneof![
        4 => "[a-z/_0-9]{1,8}",
        1 => Just("__metadata__".to_string()),
        1 => Just("dup".to_string()),
    ];
    let var = (name, gen::dtype(), vec(gen::dim(), 0..3));
    let input = (vec(var, 0..5), option::weighted(0.3, 0usize..64), any::<u64>());
    check("shard_writer_refuses_what_it_cannot_write_and_never_panics", 1024, input, |(vars, len, seed)| {
        let vars: Vec<VariableSpec> = vars.into_iter().map(|(n, d, s)| VariableSpec::new(n, d, s)).collect();
        // the bytes the variables need, where that is a sane number
        let need = vars.iter().try_fold(0u128, |acc, v| {
            let elements = v.shape.iter().try_fold(1u128, |a, &d| a.checked_mul(d as u128))?;
            acc.checked_add(elements.checked_mul(v.dtype.bitsize() as u128)? / 8)
        });
        let len = len.unwrap_or(match need {
            Some(n) if n <= 4096 => n as usize,
            _ => 16,
        });
        let data = filler(seed, len);
        let meta = ShardMeta {
            job: JobName::new("fuzz").expect("valid"),
            checkpoint: CheckpointId(1),
            rank: Rank(0),
            step: Step(1),
            generation: Generation(1),
        };
        let path = case_path(dir.path(), "w.safetensors");
        let written = write_shard(&path, &meta, &vars, &data);
        let result = match written {
            Ok(manifest) => match Shard::read_verified(&path, "w", &manifest) {
                Ok(shard) => {
                    let all: Vec<u8> = shard.tensors().flat_map(|(_, d)| d.to_vec()).collect();
                    prop_assert_eq!(all, data);
                    Ok(())
                }
                Err(e) => Err(TestCaseError::fail(format!("written, then refused: {e}"))),
            },
            Err(e) => {
                prop_assert!(!path.exists(), "a refused shard left a file: {e}");
                Ok(())
            }
        };
        let _ = std::fs::remove_file(&path);
        result
    });
}

// ---------------------------------------------------------------------------
// MANIFEST.json
// ---------------------------------------------------------------------------

fn manifest() -> BoxedStrategy<Manifest> {
    (
        gen::job_name(),
        gen::num(),
        gen::num(),
        gen::num(),
        gen::text(),
        gen::num(),
        vec(gen::shard_manifest(), 0..4),
    )
        .prop_map(|(job, id, step, generation, created, created_unix_ms, ranks)| Manifest {
            job,
            id: CheckpointId(id),
            step: Step(step),
            generation: Generation(generation),
            world_size: ranks.len() as u32,
            created,
            created_unix_ms,
            ranks: ranks
                .into_iter()
                .enumerate()
                .map(|(i, r)| ShardManifest { rank: Rank(i as u32), ..r })
                .collect(),
        })
        .boxed()
}

/// A structural edit of a JSON document.
#[derive(Debug, Clone)]
enum JsonEdit {
    /// Replace the value at a path by another.
    Replace(Vec<Index>, serde_json::Value),
    /// Remove the member or element at a path.
    Remove(Vec<Index>),
    /// Add a member to the object at a path.
    Add(Vec<Index>, String, serde_json::Value),
}

fn json_leaf() -> BoxedStrategy<serde_json::Value> {
    use serde_json::{json, Value};
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        gen::num().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        select(vec![-1.5f64, 0.5, 1e300]).prop_map(|f| json!(f)),
        gen::text().prop_map(Value::String),
        select(vec!["crc32c:00000000", "crc32c:+fffffff", "crc32c:xyz", "F32", "rank-00000.safetensors"])
            .prop_map(|s| Value::String(s.into())),
        Just(json!([])),
        Just(json!({})),
        Just(json!([[[[[[[[1]]]]]]]])),
    ]
    .boxed()
}

/// The parent container of the value a path leads to, and the key or index.
fn walk<'a>(v: &'a mut serde_json::Value, path: &[Index]) -> Option<(&'a mut serde_json::Value, usize)> {
    let (last, rest) = path.split_last()?;
    let mut at = v;
    for step in rest {
        let n = match &*at {
            serde_json::Value::Object(m) if !m.is_empty() => m.len(),
            serde_json::Value::Array(a) if !a.is_empty() => a.len(),
            _ => break,
        };
        let i = step.index(n);
        at = match at {
            serde_json::Value::Object(m) => m.values_mut().nth(i)?,
            serde_json::Value::Array(a) => &mut a[i],
            _ => unreachable!(),
        };
    }
    let n = match &*at {
        serde_json::Value::Object(m) => m.len(),
        serde_json::Value::Array(a) => a.len(),
        _ => 0,
    };
    (n > 0).then(|| {
        let i = last.index(n);
        (at, i)
    })
}

fn edit_json(v: &mut serde_json::Value, edit: &JsonEdit) {
    match edit {
        JsonEdit::Replace(path, new) => {
            if let Some((parent, i)) = walk(v, path) {
                match parent {
                    serde_json::Value::Object(m) => {
                        if let Some(slot) = m.values_mut().nth(i) {
                            *slot = new.clone();
                        }
                    }
                    serde_json::Value::Array(a) => a[i] = new.clone(),
                    _ => {}
                }
            }
        }
        JsonEdit::Remove(path) => {
            if let Some((parent, i)) = walk(v, path) {
                match parent {
                    serde_json::Value::Object(m) => {
                        if let Some(k) = m.keys().nth(i).cloned() {
                            m.remove(&k);
                        }
                    }
                    serde_json::Value::Array(a) => {
                        a.remove(i);
                    }
                    _ => {}
                }
            }
        }
        JsonEdit::Add(path, key, new) => {
            let target = match walk(v, path) {
                Some((serde_json::Value::Object(m), i)) => m.values_mut().nth(i),
                Some((serde_json::Value::Array(a), i)) => a.get_mut(i),
                _ => None,
            };
            if let Some(serde_json::Value::Object(m)) = target {
                m.insert(key.clone(), new.clone());
            } else if let serde_json::Value::Object(m) = v {
                m.insert(key.clone(), new.clone());
            }
        }
    }
}

fn json_edit() -> BoxedStrategy<JsonEdit> {
    let path = vec(any::<Index>(), 1..5);
    prop_oneof![
        3 => (path.clone(), json_leaf()).prop_map(|(p, v)| JsonEdit::Replace(p, v)),
        1 => path.clone().prop_map(JsonEdit::Remove),
        1 => (path, "[a-z_]{1,8}", json_leaf()).prop_map(|(p, k, v)| JsonEdit::Add(p, k, v)),
    ]
    .boxed()
}

/// What must hold of any manifest `Manifest::read` accepts.
fn accepted_manifest_holds(m: &Manifest) -> Result<(), TestCaseError> {
    prop_assert!(m.validate().is_ok());
    prop_assert_eq!(m.ranks.len(), m.world_size as usize);
    for (i, r) in m.ranks.iter().enumerate() {
        prop_assert_eq!(r.rank, Rank(i as u32));
    }
    let _ = m.bytes(); // what `flotilla inspect` prints
    let json = serde_json::to_vec_pretty(m).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: Manifest = serde_json::from_slice(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, m);
    Ok(())
}

#[test]
fn manifest_reader_survives_damaged_manifests() {
    let dir = tempdir();
    let input = (
        manifest(),
        vec(json_edit(), 0..4),
        vec(mutation(JSON_EDGES), 0..3),
        any::<bool>(),
        prop_oneof![4 => Just(None), 1 => vec(any::<u8>(), 0..64).prop_map(Some)],
    );
    check("manifest_reader_survives_damaged_manifests", 9216, input, |(m, edits, muts, pretty, raw)| {
        let mut value = serde_json::to_value(&m).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for e in &edits {
            edit_json(&mut value, e);
        }
        let text = if pretty { serde_json::to_vec_pretty(&value) } else { serde_json::to_vec(&value) }
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bytes = raw.unwrap_or_else(|| mutated(text, &muts));
        let ckpt = case_path(dir.path(), "ckpt");
        std::fs::create_dir(&ckpt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        std::fs::write(ckpt.join(MANIFEST_FILE), &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let read = Manifest::read(&ckpt);
        let _ = std::fs::remove_dir_all(&ckpt);
        match read {
            Ok(got) => {
                accepted_manifest_holds(&got)?;
                if edits.is_empty() && muts.is_empty() {
                    prop_assert_eq!(got, m);
                }
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.contains(MANIFEST_FILE) && e.contains("is invalid"), "{e}");
            }
        }
        Ok(())
    });
}

#[test]
fn manifest_written_is_read_back_identical() {
    let dir = tempdir();
    check("manifest_written_is_read_back_identical", 1024, manifest(), |m| {
        let ckpt = case_path(dir.path(), "ckpt");
        std::fs::create_dir(&ckpt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        m.write(&ckpt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = Manifest::read(&ckpt).map_err(|e| TestCaseError::fail(e.to_string()));
        let _ = std::fs::remove_dir_all(&ckpt);
        prop_assert_eq!(back?, m);
        Ok(())
    });
}
