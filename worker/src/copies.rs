//! The memory tier's copies (SPEC §11): other ranks' shards of the latest
//! committed checkpoint held in this worker's memory, so that a spare or a
//! restarted worker restores a lost rank without reading storage.
//!
//! ```text
//! rank r (after the commit)                 peer p (a worker's --http-addr)
//!   CopyShard{C, to} from the leader
//!   writer thread: header + data ── PUT /v1/copies/C/r ──► admit (room, free memory)
//!                                                          verify against the checksum
//!                 ◄── 200 held / 507 refused: why ──────── keep (drop older checkpoints)
//!   CopiesMade{C, [p]} ─► leader ─► Restore{from: C, peers: [p]} to whoever takes r
//! restorer: GET /v1/copies/C/r ─► verify as a file (the ledger's checksum) ─► load
//! ```
//! A copy is verified when it arrives (against the sender's checksum) and
//! again by the restorer (against the ledger's): a copy never changes what is
//! loaded, only where it is read. The worker-to-worker traffic is plain HTTP
//! on the workers' `--http-addr`; TLS with the worker credential is not
//! built yet.

use crate::metrics::WorkerMetrics;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use flotilla_shared::checksum::Checksum;
use flotilla_shared::ids::{CheckpointId, Rank};
use flotilla_shared::shard::{Shard, ShardDigest};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The header carrying the whole-file checksum of a copy sent.
pub const CHECKSUM_HEADER: &str = "x-flotilla-checksum";

/// Host memory a copy must leave free beyond itself.
pub const FREE_MARGIN_BYTES: u64 = 256 << 20;

/// One shard image held for another rank.
struct Copy {
    checkpoint: CheckpointId,
    rank: Rank,
    image: Arc<Vec<u8>>,
}

/// The copies this worker holds: at most `capacity` (`[checkpoint]
/// memory_copies` of its job, 0 until it knows the job).
#[derive(Default)]
pub struct CopyStore {
    inner: Mutex<(usize, Vec<Copy>)>,
    /// The last copy refused, here or by a peer, and why (for status).
    refused: Mutex<Option<String>>,
}

/// What the worker's `/v1/status` says of its memory copies.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyStatus {
    /// `[(checkpoint, rank)]` of the copies held for other ranks.
    pub held: Vec<(CheckpointId, Rank)>,
    /// Their bytes.
    pub bytes: u64,
    /// The last copy refused (by this worker, or by a peer this worker
    /// sent to), and why.
    pub last_refused: Option<String>,
}

impl CopyStore {
    /// Notes a refused copy and why, for status.
    pub fn note_refused(&self, why: String) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// For the worker's status.
    pub fn status(&self) -> CopyStatus {
        let g = self.lock();
        CopyStatus {
            held: g.1.iter().map(|c| (c.checkpoint, c.rank)).collect(),
            bytes: g.1.iter().map(|c| c.image.len() as u64).sum(),
            last_refused: self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Sets how many copies it may hold (`[checkpoint] memory_copies`).
    pub fn set_capacity(&self, n: u32) {
        self.lock().0 = n as usize;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Vec<Copy>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a copy of `bytes` bytes of `rank`'s shard of `checkpoint`
    /// may come in, with `free` bytes of host memory available; copies of
    /// older checkpoints are dropped first (they are no longer the latest
    /// committed), as is the one it replaces. Gives the memory of a dropped
    /// copy to receive into (touched already, and no new memory is needed
    /// when it is large enough), else an empty buffer. The error is why
    /// not, for the sender's log.
    pub fn admit(
        &self,
        checkpoint: CheckpointId,
        rank: Rank,
        bytes: u64,
        free: u64,
    ) -> Result<Vec<u8>, String> {
        let mut g = self.lock();
        let (capacity, copies) = &mut *g;
        if *capacity == 0 {
            return Err("this worker holds no memory copies (memory_copies = 0, or it has no job yet)".into());
        }
        let stale =
            |c: &mut Copy| c.checkpoint < checkpoint || (c.checkpoint == checkpoint && c.rank == rank);
        let dropped: Vec<Copy> = copies.extract_if(.., stale).collect();
        if copies.len() >= *capacity {
            return Err(format!("this worker already holds memory_copies = {capacity} copies"));
        }
        // a copy being served right now keeps its memory until it is sent
        let recycled = dropped
            .into_iter()
            .filter_map(|c| Arc::try_unwrap(c.image).ok())
            .max_by_key(Vec::capacity)
            .unwrap_or_default();
        if recycled.capacity() as u64 >= bytes {
            return Ok(recycled);
        }
        if bytes.saturating_add(FREE_MARGIN_BYTES) > free {
            return Err(format!(
                "a copy of {} would exceed free host memory: {} available, {} kept free",
                human(bytes),
                human(free),
                human(FREE_MARGIN_BYTES)
            ));
        }
        Ok(recycled)
    }

    /// Keeps `image` as `rank`'s shard of `checkpoint` (admitted before).
    pub fn insert(&self, checkpoint: CheckpointId, rank: Rank, image: Vec<u8>) -> Result<u64, String> {
        let mut g = self.lock();
        let (capacity, copies) = &mut *g;
        copies.retain(|c| c.checkpoint >= checkpoint && !(c.checkpoint == checkpoint && c.rank == rank));
        if copies.len() >= *capacity {
            return Err(format!("this worker already holds memory_copies = {capacity} copies"));
        }
        copies.push(Copy { checkpoint, rank, image: Arc::new(image) });
        Ok(copies.iter().map(|c| c.image.len() as u64).sum())
    }

    /// `rank`'s shard of `checkpoint`, if held.
    pub fn get(&self, checkpoint: CheckpointId, rank: Rank) -> Option<Arc<Vec<u8>>> {
        self.lock().1.iter().find(|c| c.checkpoint == checkpoint && c.rank == rank).map(|c| c.image.clone())
    }
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The available host memory, as `/proc/meminfo` says.
fn host_free() -> u64 {
    use crate::device::DeviceMemory;
    crate::device::Host.read().map_or(0, |r| r.free)
}

/// What the copy routes need.
#[derive(Clone)]
pub struct CopyState {
    /// The copies held.
    pub store: Arc<CopyStore>,
    /// `flotilla_memory_copy_bytes`.
    pub metrics: WorkerMetrics,
}

/// `PUT /v1/copies/{checkpoint}/{rank}`: a peer's copy of its shard, with
/// its whole-file checksum in [`CHECKSUM_HEADER`]. 200 when held; 507 with
/// the reason when there is no room or memory; 422 when it fails its
/// checksum; 400 for a bad request.
pub async fn put_copy(
    State(s): State<CopyState>,
    Path((checkpoint, rank)): Path<(u64, u32)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let (checkpoint, rank) = (CheckpointId(checkpoint), Rank(rank));
    let checksum = headers.get(CHECKSUM_HEADER).and_then(|v| v.to_str().ok()).map(str::parse::<Checksum>);
    let Some(Ok(checksum)) = checksum else {
        let why = format!("a copy needs its whole-file checksum in {CHECKSUM_HEADER} (crc32c:xxxxxxxx)");
        return (StatusCode::BAD_REQUEST, why).into_response();
    };
    let length = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let Some(bytes) = length else {
        return (StatusCode::LENGTH_REQUIRED, "a copy needs its content-length").into_response();
    };
    // the room and the memory are checked before a byte is read
    let mut image = match s.store.admit(checkpoint, rank, bytes, host_free()) {
        Ok(buf) => buf,
        Err(why) => {
            tracing::info!(%checkpoint, %rank, "memory copy refused: {why}");
            s.store.note_refused(format!("refused a copy of checkpoint {checkpoint} rank {rank}: {why}"));
            return (StatusCode::INSUFFICIENT_STORAGE, why).into_response();
        }
    };
    image.clear();
    image.reserve(usize::try_from(bytes).unwrap_or(usize::MAX));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the copy: {e}")).into_response(),
        };
        if image.len() as u64 + chunk.len() as u64 > bytes {
            let why = format!("the copy is longer than its content-length, {bytes}");
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
        image.extend_from_slice(&chunk);
    }
    if image.len() as u64 != bytes {
        let why = format!("the copy has {} bytes, its content-length said {bytes}", image.len());
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    let store = s.store.clone();
    let verified = tokio::task::spawn_blocking(move || {
        let digest = ShardDigest { rank, file: String::new(), bytes, checksum };
        let label = format!("copy of checkpoint {checkpoint} rank {rank}");
        match Shard::verify_image(image, &label, &digest) {
            Ok(shard) => store
                .insert(checkpoint, rank, shard.into_buffer())
                .map_err(|e| (StatusCode::INSUFFICIENT_STORAGE, e)),
            Err(refused) => Err((StatusCode::UNPROCESSABLE_ENTITY, refused.error.to_string())),
        }
    })
    .await;
    match verified {
        Ok(Ok(held)) => {
            s.metrics.memory_copy_bytes.set(i64::try_from(held).unwrap_or(i64::MAX));
            tracing::info!(%checkpoint, %rank, "holding a memory copy of {}", human(bytes));
            (StatusCode::OK, "held\n").into_response()
        }
        Ok(Err((code, why))) => {
            tracing::warn!(%checkpoint, %rank, "memory copy refused: {why}");
            s.store.note_refused(format!("refused a copy of checkpoint {checkpoint} rank {rank}: {why}"));
            (code, why).into_response()
        }
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("verifying the copy failed: {e}")).into_response()
        }
    }
}

/// `GET /v1/copies/{checkpoint}/{rank}`: the copy held, or 404.
pub async fn get_copy(State(s): State<CopyState>, Path((checkpoint, rank)): Path<(u64, u32)>) -> Response {
    match s.store.get(CheckpointId(checkpoint), Rank(rank)) {
        Some(image) => Bytes::from_owner(Image(image)).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no copy of checkpoint {checkpoint} rank {rank} here\n"))
            .into_response(),
    }
}

/// A body that stops with an error once `cancelled()`.
struct Cancellable<'a, R> {
    inner: R,
    cancelled: &'a dyn Fn() -> bool,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.cancelled)() {
            return Err(std::io::Error::other("given up: a restore needs the snapshot buffer"));
        }
        self.inner.read(buf)
    }
}

struct Image(Arc<Vec<u8>>);

impl AsRef<[u8]> for Image {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// An HTTP client whose every socket write gives up after 1 s and every
/// read after `read`: a peer that stops reading (a stopped or hung process)
/// must not hold this rank's snapshot buffer, nor a restore, for long.
fn agent(read: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(1))
        .timeout_write(Duration::from_secs(1))
        .timeout_read(read)
        .build()
}

/// Sends `rank`'s shard (its `header`, then its `data`) of `checkpoint`
/// to the peer at `addr` (`host:port`), giving up as soon as `cancelled()`
/// says so (asked before each read of the body); the error is the peer's
/// reason.
pub fn send(
    addr: &str,
    checkpoint: CheckpointId,
    rank: Rank,
    header: &[u8],
    data: &[u8],
    checksum: Checksum,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), String> {
    let url = format!("http://{addr}/v1/copies/{}/{}", checkpoint.0, rank.0);
    let len = header.len() + data.len();
    let body = Cancellable { inner: header.chain(data), cancelled };
    // the peer verifies the copy before it answers: a few seconds at most
    match agent(Duration::from_secs(5))
        .put(&url)
        .set(CHECKSUM_HEADER, &checksum.to_string())
        .set("content-length", &len.to_string())
        .send(body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            Err(format!("{addr} answered {code}: {}", r.into_string().unwrap_or_default().trim()))
        }
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

/// Fetches `rank`'s shard of `checkpoint` of `bytes` bytes from the peer at
/// `addr` into `buf` (its capacity reused); the caller verifies it.
pub fn fetch(
    addr: &str,
    checkpoint: CheckpointId,
    rank: Rank,
    bytes: u64,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let url = format!("http://{addr}/v1/copies/{}/{}", checkpoint.0, rank.0);
    let r = match agent(Duration::from_secs(2)).get(&url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(format!("{addr} answered {code}: {}", r.into_string().unwrap_or_default().trim()))
        }
        Err(e) => return Err(format!("{addr}: {e}")),
    };
    buf.clear();
    r.into_reader().take(bytes + 1).read_to_end(buf).map_err(|e| format!("{addr}: reading the copy: {e}"))?;
    if buf.len() as u64 != bytes {
        return Err(format!("{addr} sent {} bytes, the shard has {bytes}", buf.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_copy_needs_room_and_free_memory_and_older_checkpoints_make_way() {
        let store = CopyStore::default();
        let (c1, c2) = (CheckpointId(1), CheckpointId(2));
        let e = store.admit(c1, Rank(0), 10, GIB).unwrap_err();
        assert!(e.contains("memory_copies = 0"), "{e}");
        store.set_capacity(1);
        store.admit(c1, Rank(0), 10, GIB).unwrap();
        assert_eq!(store.insert(c1, Rank(0), vec![7; 10]).unwrap(), 10);
        // full: another rank's copy of the same checkpoint is refused, naming the bound
        let e = store.admit(c1, Rank(1), 10, GIB).unwrap_err();
        assert!(e.contains("already holds memory_copies = 1"), "{e}");
        // the same copy again replaces it, receiving into the old one's memory
        let recycled = store.admit(c1, Rank(0), 10, GIB).unwrap();
        assert!(recycled.capacity() >= 10, "the dropped copy's memory is reused");
        store.insert(c1, Rank(0), recycled).unwrap();
        // memory that is reused needs no free memory
        assert!(store.admit(c2, Rank(0), 10, 0).is_ok(), "a recycled buffer needs nothing free");
        // a copy that would leave less than the margin free is refused, with figures
        let e = store.admit(c2, Rank(1), GIB, GIB).unwrap_err();
        assert!(e.contains("would exceed free host memory") && e.contains("1024.0 MiB available"), "{e}");
        // a newer checkpoint's copy drops the older one first
        store.admit(c2, Rank(1), 10, GIB).unwrap();
        assert!(store.get(c1, Rank(0)).is_none(), "a copy of an older checkpoint is dropped");
        store.insert(c2, Rank(1), vec![8; 10]).unwrap();
        assert_eq!(store.get(c2, Rank(1)).as_deref(), Some(&vec![8; 10]));
    }
}

/// `flotilla bench copy`: a restore's fetch of a memory copy from a peer
/// (the worker's real routes, on loopback) against a plain TCP copy of the
/// same bytes on loopback, interleaved; and the verification the restorer
/// adds. Medians of `runs` after one warm-up run of each.
pub mod bench {
    use super::*;
    use flotilla_shared::ids::{Generation, JobName, Step};
    use flotilla_shared::shard::Dtype;
    use flotilla_shared::shard::{write_shard, ShardMeta, VariableSpec};
    use serde::Serialize;
    use std::io::Write;
    use std::time::Instant;

    /// What one run measured, in seconds.
    #[derive(Debug, Clone, Copy, Serialize)]
    pub struct CopyRun {
        /// `GET` of the copy from the peer into a reused buffer.
        pub peer_s: f64,
        /// The same bytes over a plain loopback TCP connection.
        pub tcp_s: f64,
        /// Verifying the fetched image (every checksum, in parallel).
        pub verify_s: f64,
    }

    /// The report.
    #[derive(Debug, Clone, Serialize)]
    pub struct CopyBenchReport {
        /// Bytes of the shard image.
        pub bytes: u64,
        /// Each recorded run.
        pub runs: Vec<CopyRun>,
    }

    impl CopyBenchReport {
        fn median(&self, f: impl Fn(&CopyRun) -> f64) -> f64 {
            let mut v: Vec<f64> = self.runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        }
        /// Median fetch seconds from the peer.
        pub fn peer_s(&self) -> f64 {
            self.median(|r| r.peer_s)
        }
        /// Median plain TCP seconds.
        pub fn tcp_s(&self) -> f64 {
            self.median(|r| r.tcp_s)
        }
        /// Median verification seconds.
        pub fn verify_s(&self) -> f64 {
            self.median(|r| r.verify_s)
        }
        /// Median of the per-run ratios of the peer's throughput to TCP's.
        pub fn ratio(&self) -> f64 {
            self.median(|r| r.tcp_s / r.peer_s.max(1e-9))
        }
    }

    /// Runs it with a shard of about `bytes` written in `dir` (removed after).
    pub fn run(bytes: u64, runs: usize, dir: &std::path::Path) -> Result<CopyBenchReport, String> {
        // a real shard: one tensor of pseudo-random f32s (nothing compresses)
        let n = (bytes / 4).max(1) as usize;
        let vars = vec![VariableSpec::new("model/w", Dtype::F32, vec![n])];
        let mut data = vec![0u8; n * 4];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("copy-bench.safetensors");
        let meta = ShardMeta {
            job: JobName::new("bench").expect("valid"),
            checkpoint: CheckpointId(1),
            rank: Rank(0),
            step: Step(0),
            generation: Generation(1),
        };
        let manifest = write_shard(&path, &meta, &vars, &data).map_err(|e| e.to_string())?;
        drop(data);
        let image = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        let digest = manifest.digest();
        let len = image.len();
        // the peer: the worker's copy routes, holding the image
        let store = Arc::new(CopyStore::default());
        store.set_capacity(1);
        let image = Arc::new(image);
        store.insert(CheckpointId(1), Rank(0), image.to_vec())?;
        let peer = serve(store)?;
        // the baseline: a loopback listener that writes the same bytes
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let tcp_addr = tcp.local_addr().map_err(|e| e.to_string())?;
        let bytes_for_tcp = image.clone();
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.write_all(&bytes_for_tcp);
            }
        });
        drop(image);
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let mut out = Vec::new();
        for i in 0..=runs {
            let at = Instant::now();
            fetch(&peer, CheckpointId(1), Rank(0), len as u64, &mut buf)?;
            let peer_s = at.elapsed().as_secs_f64();
            let at = Instant::now();
            let mut conn = std::net::TcpStream::connect(tcp_addr).map_err(|e| e.to_string())?;
            buf.resize(len, 0);
            conn.read_exact(&mut buf).map_err(|e| format!("plain TCP: {e}"))?;
            let tcp_s = at.elapsed().as_secs_f64();
            let at = Instant::now();
            let shard = Shard::verify_image(std::mem::take(&mut buf), "bench", &digest)
                .map_err(|r| r.error.to_string())?;
            let verify_s = at.elapsed().as_secs_f64();
            buf = shard.into_buffer();
            if i > 0 {
                out.push(CopyRun { peer_s, tcp_s, verify_s });
            }
        }
        Ok(CopyBenchReport { bytes: len as u64, runs: out })
    }

    /// Serves `store` on a loopback port from a thread of its own (the
    /// worker's copy routes); its `host:port`.
    pub fn serve(store: Arc<CopyStore>) -> Result<String, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
            else {
                return;
            };
            rt.block_on(async move {
                let state = CopyState { store, metrics: WorkerMetrics::new() };
                let router = axum::Router::new()
                    .route("/v1/copies/{checkpoint}/{rank}", axum::routing::get(get_copy).put(put_copy))
                    .with_state(state);
                if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                    let _ = axum::serve(listener, router).await;
                }
            });
        });
        Ok(addr)
    }
}
