//! Framing: every connection (worker ↔ coordinator, coordinator ↔ peer)
//! carries length-prefixed MessagePack frames.
//!
//! ```text
//! +----------------+---------+---------------------------+
//! | length: u32 BE | version | MessagePack body          |
//! |  (of the rest) |  u8     | (rmp-serde, named fields) |
//! +----------------+---------+---------------------------+
//! ```
//! The length is checked against the maximum before any buffer grows, so a
//! hostile length costs nothing, and a body's nesting is capped far below
//! what a thread's stack holds. Any decode error is returned to the caller,
//! which closes that one connection; nothing here panics on any input.
//!
//! The first frame each way is the handshake ([`Hello`] → [`HelloReply`]);
//! see [`client_handshake`] and [`server_handshake`]. Each side waits at
//! most [`HELLO_TIMEOUT`] for the other's, so a peer that accepts a
//! connection and then says nothing (stopped, partitioned) is given up on.

use crate::ids::NodeId;
use crate::wire::{ErrorCode, ErrorReply, Hello, HelloReply, PeerRole, PROTOCOL_VERSION};
use bytes::{Buf, BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use std::io;
use std::marker::PhantomData;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

/// Default largest frame: fits a Raft snapshot chunk or a batch of entries.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// How long a server waits for the peer's [`Hello`], and a client for the
/// [`HelloReply`].
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest handshake frame (`Hello`, `HelloReply`): nothing before
/// authentication may make a server buffer more than this.
pub const HELLO_MAX_FRAME: usize = 4096;
/// Deepest nesting of arrays and maps a frame body may have. Every message
/// nests fewer than ten levels; the decoder recurses once per level (into
/// unknown fields too), so a deep body is refused long before it could
/// exhaust a thread's stack (a debug build spends ~3.5 KiB per level; tokio
/// worker threads have 2 MiB).
pub const MAX_BODY_DEPTH: usize = 64;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// A frame announced more bytes than the limit; refused before reading it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A frame of another protocol version.
    #[error("frame has protocol version {got}, this build speaks {PROTOCOL_VERSION}; run the same flotilla version on both sides")]
    Version {
        /// The version byte received.
        got: u8,
    },
    /// A zero-length frame (not even a version byte).
    #[error("empty frame")]
    Empty,
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// Encoding a message failed (a bug: every message type serializes).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer answered in HTTP: the address is an HTTP port (a
    /// coordinator's `--http-addr`, used by `--endpoints`), not a worker API.
    #[error(
        "the peer answered in HTTP: this is an HTTP address (a coordinator's --http-addr, which --endpoints takes), \
         not a worker API address; give workers and node agents the coordinators' --api-addr in --coordinators"
    )]
    Http,
}

impl FrameError {
    /// Whether trying the same address again cannot help: it serves another
    /// protocol. (Another version can: a rolling upgrade ends.)
    pub fn is_wrong_peer(&self) -> bool {
        matches!(self, FrameError::Http)
    }
}

/// Codec of typed frames: decodes `In`, encodes `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    max: usize,
    /// The inner codec has consumed a frame's length and awaits its body.
    in_body: bool,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        let inner =
            LengthDelimitedCodec::builder().length_field_type::<u32>().max_frame_length(max).new_codec();
        Self { inner, max, in_body: false, _types: PhantomData }
    }

    /// The same framing state with other message types (after the handshake).
    pub fn retype<In2, Out2>(self) -> FrameCodec<In2, Out2> {
        FrameCodec { inner: self.inner, max: self.max, in_body: self.in_body, _types: PhantomData }
    }

    /// The same codec for other message types with another frame limit
    /// (the handshake reads at most [`HELLO_MAX_FRAME`]; the connection
    /// then takes its full limit).
    pub fn resize<In2, Out2>(mut self, max: usize) -> FrameCodec<In2, Out2> {
        self.inner.set_max_frame_length(max);
        FrameCodec { inner: self.inner, max, in_body: self.in_body, _types: PhantomData }
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        // Check the announced length ourselves first, for an error that says
        // how big the frame claimed to be; nothing has been allocated yet.
        let head_available = !self.in_body && src.len() >= 4;
        if head_available {
            let len = u64::from(u32::from_be_bytes([src[0], src[1], src[2], src[3]]));
            // an HTTP server answers our first frame with "HTTP/1.1 400 ...":
            // those four bytes read as a length are 1.2 GB
            if len > self.max as u64 && src[..4] == *b"HTTP" {
                return Err(FrameError::Http);
            }
            if len > self.max as u64 {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
        }
        let Some(mut frame) = self.inner.decode(src)? else {
            // the inner codec consumes the length as soon as it is there
            self.in_body |= head_available;
            return Ok(None);
        };
        self.in_body = false;
        if frame.is_empty() {
            return Err(FrameError::Empty);
        }
        let version = frame.get_u8();
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version { got: version });
        }
        let mut body = rmp_serde::Deserializer::from_read_ref(&frame[..]);
        body.set_max_depth(MAX_BODY_DEPTH);
        In::deserialize(&mut body).map(Some).map_err(|e| FrameError::Malformed(e.to_string()))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            // a length prefix already consumed is a frame begun, even with
            // none of its body here
            None if buf.is_empty() && !self.in_body => Ok(None),
            None => Err(FrameError::Truncated(buf.len() + if self.in_body { 4 } else { 0 })),
        }
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut body = BytesMut::new().writer();
        body.get_mut().put_u8(PROTOCOL_VERSION);
        rmp_serde::encode::write_named(&mut body, &item).map_err(|e| FrameError::Encode(e.to_string()))?;
        let body = body.into_inner().freeze();
        if body.len() > self.max {
            return Err(FrameError::TooLarge { len: body.len() as u64, max: self.max });
        }
        self.inner.encode(body, dst)?;
        Ok(())
    }
}

/// A framed connection decoding `In` and encoding `Out`.
pub type Connection<T, In, Out> = Framed<T, FrameCodec<In, Out>>;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Framing or I/O failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The other side refused us.
    #[error("refused by the server: {}", .0.message)]
    Refused(ErrorReply),
    /// We refused the other side (the reply was sent before closing).
    #[error("refused the client: {}", .0.message)]
    Rejected(ErrorReply),
    /// The peer closed before completing the handshake.
    #[error("connection closed during the handshake")]
    Closed,
    /// The peer sent no handshake frame in time.
    #[error("no handshake frame from the peer within {0:?}")]
    Timeout(Duration),
}

/// Client side: sends `Hello`, awaits `Welcome` (within [`HELLO_TIMEOUT`]),
/// returns the connection retyped for messages and the server's node id.
pub async fn client_handshake<T, In, Out>(
    io: T,
    role: PeerRole,
    token: Option<String>,
    max_frame: usize,
) -> Result<(Connection<T, In, Out>, NodeId), HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Framed::new(io, FrameCodec::<HelloReply, Hello>::new(max_frame.min(HELLO_MAX_FRAME)));
    conn.send(Hello { version: PROTOCOL_VERSION, role, token }).await?;
    // a server that accepted the connection may still never answer (stopped,
    // or partitioned away after the TCP handshake): the caller must get to
    // try another one
    let node = match tokio::time::timeout(HELLO_TIMEOUT, conn.next()).await {
        Err(_) => return Err(HandshakeError::Timeout(HELLO_TIMEOUT)),
        Ok(None) => return Err(HandshakeError::Closed),
        Ok(Some(reply)) => match reply? {
            HelloReply::Welcome { node } => node,
            HelloReply::Refused(reply) => return Err(HandshakeError::Refused(reply)),
        },
    };
    Ok((conn.map_codec(|c| c.resize(max_frame)), node))
}

/// Compares secrets in time independent of where they differ.
pub fn token_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tokens of one role: any of them is accepted, the first is the one
/// presented. Several only while a token is rotated (docs/SECURITY.md).
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens(Vec<String>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// One token.
    pub fn one(token: impl Into<String>) -> Self {
        Self(vec![token.into()])
    }

    /// A token file's contents: one token per line; blank lines and lines
    /// starting with `#` are skipped. `None` when it holds no token.
    pub fn parse(text: &str) -> Option<Self> {
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        (!tokens.is_empty()).then_some(Self(tokens))
    }

    /// The token this side presents: the first.
    pub fn present(&self) -> &str {
        &self.0[0]
    }

    /// Whether `got` is one of them (compared in constant time, every one
    /// compared).
    pub fn accepts(&self, got: &str) -> bool {
        self.0.iter().fold(false, |ok, want| ok | token_eq(want, got))
    }

    /// Whether the two share a token.
    pub fn overlaps(&self, other: &Tokens) -> bool {
        self.0.iter().any(|t| other.accepts(t))
    }
}

/// Server side: reads the client's `Hello` (within [`HELLO_TIMEOUT`]),
/// checks version and token (any of `tokens`; none configured: open), then
/// `admit` (which may refuse by role, or by what the connection `T` proved,
/// e.g. a TLS certificate), answers, and returns the connection retyped for
/// messages with the client's hello. A refusal is sent to the client before
/// the error is returned (the caller then drops the connection).
pub async fn server_handshake<T, In, Out>(
    io: T,
    node: NodeId,
    tokens: Option<&Tokens>,
    max_frame: usize,
    admit: impl FnOnce(&Hello, &T) -> Result<(), ErrorReply>,
) -> Result<(Connection<T, In, Out>, Hello), HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Framed::new(io, FrameCodec::<Hello, HelloReply>::new(max_frame.min(HELLO_MAX_FRAME)));
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, conn.next()).await {
        Err(_) => return Err(HandshakeError::Timeout(HELLO_TIMEOUT)),
        Ok(None) => return Err(HandshakeError::Closed),
        Ok(Some(hello)) => hello?,
    };
    let refusal = if hello.version != PROTOCOL_VERSION {
        Some(ErrorReply {
            code: ErrorCode::VersionMismatch,
            message: format!(
                "protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION}); run matching flotilla versions",
                hello.version
            ),
        })
    } else {
        match (tokens, hello.token.as_deref()) {
            (Some(want), Some(got)) if want.accepts(got) => admit(&hello, conn.get_ref()).err(),
            (Some(_), _) => Some(ErrorReply {
                code: ErrorCode::Unauthorized,
                message: "missing or wrong token; pass this role's token with --token-file".into(),
            }),
            (None, _) => admit(&hello, conn.get_ref()).err(),
        }
    };
    if let Some(reply) = refusal {
        // best effort: the peer may already be gone
        let _ = conn.send(HelloReply::Refused(reply.clone())).await;
        return Err(HandshakeError::Rejected(reply));
    }
    conn.send(HelloReply::Welcome { node }).await?;
    Ok((conn.map_codec(|c| c.resize(max_frame)), hello))
}

/// How long a worker connection may take to send its first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a worker session (one rank's connection, or a node's) ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Framing or I/O failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Nothing arrived after the handshake.
    #[error("no Register within {0:?}")]
    NoRegister(Duration),
    /// The worker closed before registering.
    #[error("closed before registering")]
    ClosedBeforeRegister,
    /// A registered session fell silent.
    #[error("silent for {0:?}; closed")]
    Idle(Duration),
    /// A registered node session fell silent.
    #[error("node session silent for {0:?}; closed")]
    NodeIdle(Duration),
    /// The worker broke the protocol (what it did).
    #[error("{0}")]
    Protocol(&'static str),
}

/// Accepts a worker's connection: the handshake (checking `tokens`), then
/// its first message (a registration), within [`FIRST_MESSAGE_TIMEOUT`].
/// The coordinator's worker API and the node agent both start this way.
pub async fn accept_worker<T>(
    io: T,
    node: NodeId,
    tokens: Option<&Tokens>,
) -> Result<
    (Connection<T, crate::wire::WorkerMessage, crate::wire::CoordinatorMessage>, crate::wire::WorkerMessage),
    SessionError,
>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut conn, _hello) = server_handshake(io, node, tokens, DEFAULT_MAX_FRAME, |_, _| Ok(())).await?;
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, conn.next())
        .await
        .map_err(|_| SessionError::NoRegister(FIRST_MESSAGE_TIMEOUT))?
        .ok_or(SessionError::ClosedBeforeRegister)??;
    Ok((conn, first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::wire::*;

    type Codec = FrameCodec<WorkerMessage, WorkerMessage>;

    fn heartbeat() -> WorkerMessage {
        WorkerMessage::Heartbeat {
            generation: Generation(2),
            step: Step(1234),
            status: WorkerStatus::Running,
        }
    }

    fn encoded(msg: WorkerMessage) -> BytesMut {
        let mut buf = BytesMut::new();
        Codec::new(DEFAULT_MAX_FRAME).encode(msg, &mut buf).unwrap();
        buf
    }

    #[test]
    fn an_http_answer_is_named_for_what_it_is_not_read_as_a_length() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"[..]);
        let err = Codec::new(DEFAULT_MAX_FRAME).decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::Http) && err.is_wrong_peer(), "{err}");
        let text = err.to_string();
        assert!(text.contains("--api-addr") && text.contains("--endpoints"), "{text}");
        // any other oversized length stays an oversized frame
        let mut big = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        assert!(matches!(Codec::new(DEFAULT_MAX_FRAME).decode(&mut big), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn a_token_file_holds_one_token_or_several_while_rotating() {
        assert_eq!(Tokens::parse(" \n# comment\n\n"), None);
        let one = Tokens::parse("secret\n").unwrap();
        assert_eq!((one.present(), one.accepts("secret"), one.accepts("secre")), ("secret", true, false));
        let two = Tokens::parse("# new first\nnew\n  old  \n").unwrap();
        assert_eq!(two.present(), "new");
        assert!(two.accepts("new") && two.accepts("old") && !two.accepts("other"));
        assert!(two.overlaps(&Tokens::one("old")) && !two.overlaps(&one));
        assert_eq!(format!("{two:?}"), "Tokens(2 redacted)");
    }

    #[test]
    fn round_trip_every_worker_message() {
        let manifest = crate::shard::ShardDigest {
            rank: Rank(1),
            file: "rank-00001.safetensors".into(),
            bytes: 10,
            checksum: crate::checksum::Checksum(3),
        };
        let msgs = vec![
            WorkerMessage::Register {
                job: JobName::new("demo").unwrap(),
                rank: Some(Rank(1)),
                incarnation: Incarnation(99),
                http_addr: Some("127.0.0.1:9300".into()),
                generation: None,
                step: Step(0),
                host: Some("node-1".into()),
            },
            WorkerMessage::Register {
                job: JobName::new("demo").unwrap(),
                rank: None,
                incarnation: Incarnation(100),
                http_addr: None,
                generation: None,
                step: Step(0),
                host: None,
            },
            heartbeat(),
            WorkerMessage::ShardSaved { generation: Generation(1), checkpoint: CheckpointId(7), manifest },
            WorkerMessage::RestoreFailed {
                generation: Generation(3),
                checkpoint: Some(CheckpointId(7)),
                kind: RestoreFailureKind::DeviceMemory,
                message: "rank 2 on GPU 0: restore needs 12.4 GiB, 3.1 GiB free".into(),
            },
            WorkerMessage::Finished { generation: Generation(3), step: Step(2000), digest: "ab".into() },
        ];
        let mut codec = Codec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        for m in &msgs {
            codec.encode(m.clone(), &mut buf).unwrap();
        }
        for m in msgs {
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(m));
        }
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = encoded(heartbeat());
        let mut codec = Codec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            buf.put_u8(*byte);
            let got = codec.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == full.len() - 1);
        }
    }

    #[test]
    fn truncated_stream_is_an_error_not_a_hang() {
        let full = encoded(heartbeat());
        let mut buf = BytesMut::from(&full[..full.len() - 2]);
        let err = Codec::new(DEFAULT_MAX_FRAME).decode_eof(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::Truncated(_)), "{err}");
        let mut empty = BytesMut::new();
        assert!(Codec::new(DEFAULT_MAX_FRAME).decode_eof(&mut empty).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_refused_before_allocating() {
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u32(u32::MAX);
        buf.put_u8(PROTOCOL_VERSION);
        let err = Codec::new(1024).decode(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "frame of 4294967295 bytes exceeds the limit of 1024 bytes");
        assert!(buf.capacity() < 1024, "buffer grew to {}", buf.capacity());
        // and the sender refuses to produce one
        let big = WorkerMessage::TrainerFailed { generation: Generation(1), reason: "x".repeat(2000) };
        let err = Codec::new(1024).encode(big, &mut BytesMut::new()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 1024, .. }), "{err}");
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0, 0, 0, 0], "empty frame"),
            (vec![0, 0, 0, 1, 9], "protocol version 9"),
            (vec![0, 0, 0, 4, PROTOCOL_VERSION, 0xc1, 0xff, 0x00], "malformed frame"),
            (vec![0, 0, 0, 1, PROTOCOL_VERSION], "malformed frame"),
            // a valid msgpack string that is not a message
            (vec![0, 0, 0, 3, PROTOCOL_VERSION, 0xa1, b'x'], "malformed frame"),
        ];
        for (bytes, want) in cases {
            let mut buf = BytesMut::from(&bytes[..]);
            let err = Codec::new(DEFAULT_MAX_FRAME).decode(&mut buf).unwrap_err();
            assert!(err.to_string().contains(want), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift, fixed seed: reproducible without a dependency
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            if bytes.len() >= 5 {
                let body = (bytes.len() - 4) as u32;
                bytes[0..4].copy_from_slice(&body.to_be_bytes());
                bytes[4] = PROTOCOL_VERSION;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Codec::new(DEFAULT_MAX_FRAME).decode_eof(&mut buf);
        }
    }

    #[tokio::test]
    async fn before_the_handshake_a_frame_is_at_most_a_few_kib_after_it_the_full_limit() {
        use tokio::io::AsyncWriteExt;
        // a client announcing a 1 MiB hello: refused before anything is buffered
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        let err = server_handshake::<_, WorkerMessage, CoordinatorMessage>(
            server,
            NodeId(1),
            None,
            DEFAULT_MAX_FRAME,
            |_, _| Ok(()),
        )
        .await
        .err()
        .unwrap();
        assert!(
            matches!(err, HandshakeError::Frame(FrameError::TooLarge { max: HELLO_MAX_FRAME, .. })),
            "{err:?}"
        );
        // once accepted, a frame far larger than a hello passes
        let (client, server) = tokio::io::duplex(1 << 20);
        let srv = tokio::spawn(async move {
            server_handshake::<_, WorkerMessage, CoordinatorMessage>(
                server,
                NodeId(1),
                None,
                DEFAULT_MAX_FRAME,
                |_, _| Ok(()),
            )
            .await
        });
        let (mut conn, _) = client_handshake::<_, CoordinatorMessage, WorkerMessage>(
            client,
            PeerRole::Worker,
            None,
            DEFAULT_MAX_FRAME,
        )
        .await
        .unwrap();
        let (mut sconn, _) = srv.await.unwrap().unwrap();
        let big = WorkerMessage::TrainerFailed { generation: Generation(1), reason: "x".repeat(100_000) };
        conn.send(big.clone()).await.unwrap();
        assert_eq!(sconn.next().await.unwrap().unwrap(), big);
    }

    #[tokio::test]
    async fn a_refusal_by_the_admission_check_reaches_the_client() {
        let (client, server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            let admit = |hello: &Hello, _: &tokio::io::DuplexStream| match hello.role {
                PeerRole::Worker => {
                    Err(ErrorReply { code: ErrorCode::Unauthorized, message: "no workers here".into() })
                }
                PeerRole::Coordinator { .. } => Ok(()),
            };
            server_handshake::<_, WorkerMessage, CoordinatorMessage>(server, NodeId(3), None, 4096, admit)
                .await
        });
        let err =
            client_handshake::<_, CoordinatorMessage, WorkerMessage>(client, PeerRole::Worker, None, 4096)
                .await
                .unwrap_err();
        assert!(matches!(&err, HandshakeError::Refused(r) if r.message == "no workers here"), "{err:?}");
        assert!(matches!(srv.await.unwrap(), Err(HandshakeError::Rejected(_))));
    }

    #[tokio::test]
    async fn handshake_accepts_right_token_and_refuses_wrong_one() {
        let (client, server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            server_handshake::<_, WorkerMessage, CoordinatorMessage>(
                server,
                NodeId(3),
                Some(&Tokens::one("s3cret")),
                4096,
                |_, _| Ok(()),
            )
            .await
        });
        let (mut conn, node) = client_handshake::<_, CoordinatorMessage, WorkerMessage>(
            client,
            PeerRole::Worker,
            Some("s3cret".into()),
            4096,
        )
        .await
        .unwrap();
        assert_eq!(node, NodeId(3));
        let (mut sconn, hello) = srv.await.unwrap().unwrap();
        assert_eq!(hello.role, PeerRole::Worker);
        conn.send(heartbeat()).await.unwrap();
        assert_eq!(sconn.next().await.unwrap().unwrap(), heartbeat());

        for token in [Some("wrong".to_string()), None] {
            let (client, server) = tokio::io::duplex(4096);
            let srv = tokio::spawn(async move {
                server_handshake::<_, WorkerMessage, CoordinatorMessage>(
                    server,
                    NodeId(3),
                    Some(&Tokens::one("s3cret")),
                    4096,
                    |_, _| Ok(()),
                )
                .await
            });
            let err = client_handshake::<_, CoordinatorMessage, WorkerMessage>(
                client,
                PeerRole::Worker,
                token,
                4096,
            )
            .await
            .unwrap_err();
            match err {
                HandshakeError::Refused(r) => {
                    assert_eq!(r.code, ErrorCode::Unauthorized);
                    assert!(r.message.contains("--token-file"));
                }
                other => panic!("unexpected {other}"),
            }
            assert!(matches!(srv.await.unwrap(), Err(HandshakeError::Rejected(_))));
        }
    }

    #[test]
    fn stream_closed_right_after_a_length_prefix_is_truncated_not_clean() {
        // regression (fuzz_decoders): the prefix is consumed at once, so the
        // buffer is empty at EOF although a frame was begun
        let full = encoded(heartbeat());
        let mut codec = Codec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::from(&full[..4]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "connection closed in the middle of a frame (4 bytes of it received)");
        let mut buf = BytesMut::from(&full[..6]);
        let err = Codec::new(DEFAULT_MAX_FRAME).decode_eof(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "connection closed in the middle of a frame (6 bytes of it received)");
    }

    /// A Hello with an unknown field `x` holding `depth` nested arrays.
    fn nested_hello(depth: usize) -> BytesMut {
        let mut body = vec![PROTOCOL_VERSION, 0x84, 0xa7];
        body.extend_from_slice(b"version");
        body.push(PROTOCOL_VERSION);
        body.push(0xa4);
        body.extend_from_slice(b"role");
        body.push(0xa6);
        body.extend_from_slice(b"Worker");
        body.push(0xa5);
        body.extend_from_slice(b"token");
        body.push(0xc0);
        body.extend_from_slice(&[0xa1, b'x']);
        body.extend(std::iter::repeat_n(0x91, depth));
        body.push(0xc0);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.extend_from_slice(&body);
        buf
    }

    #[test]
    fn deeply_nested_body_is_refused_before_the_stack_runs_out() {
        // regression (fuzz_decoders): skipping an unknown field recurses per
        // level; rmp-serde's own limit (1024) overflowed a 2 MiB stack in a
        // debug build at ~600 levels, aborting the whole process
        let decoded = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let shallow = FrameCodec::<Hello, ()>::new(DEFAULT_MAX_FRAME).decode(&mut nested_hello(40));
                let deep = FrameCodec::<Hello, ()>::new(DEFAULT_MAX_FRAME).decode(&mut nested_hello(100_000));
                (shallow.map_err(|e| e.to_string()), deep.map_err(|e| e.to_string()))
            })
            .unwrap()
            .join()
            .unwrap();
        let hello = decoded.0.unwrap().unwrap();
        assert_eq!(hello, Hello { version: PROTOCOL_VERSION, role: PeerRole::Worker, token: None });
        let err = decoded.1.unwrap_err();
        assert!(err.contains("malformed frame") && err.contains("depth limit exceeded"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn client_gives_up_on_a_server_that_never_answers() {
        // regression (fuzz_decoders): a server that accepts the connection and
        // stays silent (SIGSTOPped, partitioned after the TCP handshake) held
        // the client forever, so a worker never failed over
        let (client, _silent) = tokio::io::duplex(4096);
        let handshake =
            client_handshake::<_, CoordinatorMessage, WorkerMessage>(client, PeerRole::Worker, None, 4096);
        let err = tokio::time::timeout(HELLO_TIMEOUT * 10, handshake)
            .await
            .expect("the client waited past its own timeout")
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(t) if t == HELLO_TIMEOUT), "{err}");
        assert_eq!(err.to_string(), "no handshake frame from the peer within 5s");
    }

    #[tokio::test]
    async fn server_survives_garbage_hello() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let srv = tokio::spawn(async move {
            server_handshake::<_, WorkerMessage, CoordinatorMessage>(server, NodeId(1), None, 4096, |_, _| {
                Ok(())
            })
            .await
        });
        client.write_all(&[0, 0, 0, 3, PROTOCOL_VERSION, 0xde, 0xad]).await.unwrap();
        let err = srv.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("malformed frame"), "{err}");
    }
}
