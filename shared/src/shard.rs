//! The shard format: one safetensors file per rank per checkpoint.
//!
//! ```text
//! [u64 LE n][n bytes JSON header, space-padded to 8][tensor data, packed in header order]
//!            {"__metadata__": {job, checkpoint, rank, step, generation, format,
//!                              checksums: "{\"model/layer_0/attn/wq\": \"crc32c:...\", ...}"},
//!             "model/layer_0/attn/wq": {"dtype":"F32","shape":[d,d],"data_offsets":[b,e]}, ...}
//! ```
//! The header is built and parsed by the `safetensors` crate's own
//! `Metadata`, so any safetensors reader accepts the file. Each tensor's
//! CRC-32C is computed as its data is written, in one pass, and recorded in
//! the header, written last (a checksum always prints the same length, so
//! its room is known first); the whole file's is combined from the header's
//! and the tensors'.
//! The writer returns both as a [`ShardManifest`] (MANIFEST.json's entry for
//! the rank). The worker reports, and the Raft ledger keeps, its
//! [`ShardDigest`]: the file, its size and its whole-file checksum, which
//! vouches for the header and the checksums in it, so a corrupted file still
//! cannot vouch for itself.

use crate::checksum::Checksum;
use crate::durable;
use crate::ids::{CheckpointId, Generation, JobName, Rank, Step};
use safetensors::tensor::{Metadata, TensorInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::Path;

pub use safetensors::Dtype;

/// The largest header we read (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Size of each `write(2)` of tensor data: big enough to stream, small enough
/// that the disk starts on one while the next is copied, and that a
/// cancelled write stops soon.
const WRITE_CHUNK: usize = 8 << 20;
/// What the io::Error that carries a cancellation out of
/// `durable::write_atomic` (which then removes the temporary file) holds:
/// recognised by its type, not by its words.
#[derive(Debug, thiserror::Error)]
#[error("flotilla: shard write cancelled")]
struct Cancelled;
/// Value of the `format` metadata key.
pub const FORMAT: &str = "flotilla-shard/1";
/// The metadata key that holds each tensor's checksum: a JSON object of
/// name to CRC-32C, as a string (safetensors metadata values are strings).
pub const CHECKSUMS_KEY: &str = "checksums";

/// A variable as a model declares it: scoped name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariableSpec {
    /// Scoped path, e.g. `model/layer_3/mlp/w_in`.
    pub name: String,
    /// Element type (safetensors' names: `F32`, `I64`, ...).
    pub dtype: Dtype,
    /// Dimensions; `[]` is a scalar.
    pub shape: Vec<usize>,
}

impl VariableSpec {
    /// A variable spec.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Self { name: name.into(), dtype, shape }
    }

    /// Number of elements (1 for a scalar); `usize::MAX` for a shape whose
    /// product does not fit (no real variable is that large).
    pub fn elements(&self) -> usize {
        self.checked_elements().unwrap_or(usize::MAX)
    }

    /// Bytes of data this variable occupies in a shard; `usize::MAX` where
    /// that does not fit (see [`VariableSpec::checked_byte_len`]).
    pub fn byte_len(&self) -> usize {
        self.checked_byte_len().unwrap_or(usize::MAX)
    }

    /// [`VariableSpec::byte_len`], or `None` when the shape declares more
    /// bytes than a `usize` counts: a declaration that cannot be real.
    pub fn checked_byte_len(&self) -> Option<usize> {
        Some(self.checked_elements()?.checked_mul(self.dtype.bitsize())? / 8)
    }

    fn checked_elements(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// The identity of a shard, stored in the header's `__metadata__`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Job the shard belongs to.
    pub job: JobName,
    /// Checkpoint it is part of.
    pub checkpoint: CheckpointId,
    /// Rank that wrote it.
    pub rank: Rank,
    /// Training step of the saved state.
    pub step: Step,
    /// Generation in which it was written.
    pub generation: Generation,
}

impl ShardMeta {
    fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("job".to_string(), self.job.to_string()),
            ("checkpoint".to_string(), self.checkpoint.to_string()),
            ("rank".to_string(), self.rank.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("generation".to_string(), self.generation.to_string()),
        ])
    }

    fn from_map(map: Option<&HashMap<String, String>>) -> Result<Self, String> {
        let map = map.ok_or("the header has no __metadata__")?;
        let get = |key: &str| map.get(key).ok_or_else(|| format!("__metadata__ has no `{key}`"));
        let num = |key: &str| -> Result<u64, String> {
            get(key)?.parse().map_err(|_| format!("__metadata__ `{key}` is not a number"))
        };
        Ok(Self {
            job: JobName::new(get("job")?.as_str()).map_err(|e| e.to_string())?,
            checkpoint: CheckpointId(num("checkpoint")?),
            rank: Rank(u32::try_from(num("rank")?).map_err(|_| "__metadata__ `rank` is too large")?),
            step: Step(num("step")?),
            generation: Generation(num("generation")?),
        })
    }
}

/// One variable of a written shard, with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Scoped name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Byte length of its data.
    pub bytes: u64,
    /// CRC-32C of its data.
    pub checksum: Checksum,
}

/// A rank's entry in MANIFEST.json: its shard's file, size, whole-file
/// checksum and every variable (SPEC §3). Made by the shard writer and
/// read back from a shard's header; it never crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// Rank that wrote the shard.
    pub rank: Rank,
    /// File name inside the checkpoint directory.
    pub file: String,
    /// Size of the whole file.
    pub bytes: u64,
    /// CRC-32C of the whole file.
    pub checksum: Checksum,
    /// Every variable, in file order.
    pub tensors: Vec<TensorRecord>,
}

impl ShardManifest {
    /// The variables of the shard (what a model must declare to load it).
    pub fn variables(&self) -> Vec<VariableSpec> {
        self.tensors.iter().map(|t| VariableSpec::new(t.name.clone(), t.dtype, t.shape.clone())).collect()
    }

    /// What a worker reports and the ledger keeps of this shard.
    pub fn digest(&self) -> ShardDigest {
        ShardDigest { rank: self.rank, file: self.file.clone(), bytes: self.bytes, checksum: self.checksum }
    }
}

/// What a rank reports once its shard is durable, and what the ledger keeps:
/// its file, size and whole-file checksum, without the per-variable list.
/// The whole-file checksum covers the header, which carries each tensor's
/// checksum, so a restore still names the tensor that differs; a
/// checkpoint's ledger entry stays a few dozen bytes per rank, however many
/// variables a model has.
///
/// Encoded as a [`ShardManifest`] with no variables, byte for byte what
/// builds before this type wrote and read (a rolling upgrade mixes both);
/// a list that arrives anyway is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ShardManifest", from = "ShardManifest")]
pub struct ShardDigest {
    /// Rank that wrote the shard.
    pub rank: Rank,
    /// File name inside the checkpoint directory.
    pub file: String,
    /// Size of the whole file.
    pub bytes: u64,
    /// CRC-32C of the whole file.
    pub checksum: Checksum,
}

impl From<ShardManifest> for ShardDigest {
    fn from(m: ShardManifest) -> Self {
        Self { rank: m.rank, file: m.file, bytes: m.bytes, checksum: m.checksum }
    }
}

impl From<ShardDigest> for ShardManifest {
    fn from(d: ShardDigest) -> Self {
        Self { rank: d.rank, file: d.file, bytes: d.bytes, checksum: d.checksum, tensors: Vec::new() }
    }
}

/// What a shard is verified against: a [`ShardDigest`] (the whole file's
/// checksum) or a [`ShardManifest`] (every variable's too).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    bytes: u64,
    checksum: Checksum,
    records: &'a [TensorRecord],
}

impl<'a> From<&'a ShardDigest> for Expected<'a> {
    fn from(d: &'a ShardDigest) -> Self {
        Self { bytes: d.bytes, checksum: d.checksum, records: &[] }
    }
}

impl<'a> From<&'a ShardManifest> for Expected<'a> {
    fn from(m: &'a ShardManifest) -> Self {
        Self { bytes: m.bytes, checksum: m.checksum, records: &m.tensors }
    }
}

/// Every way a shard's variables differ from what a model expects, so one
/// error lists all of them (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelMismatch {
    /// Variables the model expects and the shard lacks.
    pub missing: Vec<String>,
    /// Variables in the shard the model does not have.
    pub unexpected: Vec<String>,
    /// `(name, shard's dtype, model's dtype)`.
    pub dtype: Vec<(String, Dtype, Dtype)>,
    /// `(name, shard's shape, model's shape)`.
    pub shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl ModelMismatch {
    /// Compares a shard's variables with a model's. `Ok` when they match
    /// exactly (order does not matter).
    pub fn check(shard: &[VariableSpec], model: &[VariableSpec]) -> Result<(), ModelMismatch> {
        let in_shard: HashMap<&str, &VariableSpec> = shard.iter().map(|v| (v.name.as_str(), v)).collect();
        let in_model: HashSet<&str> = model.iter().map(|v| v.name.as_str()).collect();
        let mut m = ModelMismatch::default();
        for want in model {
            match in_shard.get(want.name.as_str()) {
                None => m.missing.push(want.name.clone()),
                Some(have) => {
                    if have.dtype != want.dtype {
                        m.dtype.push((want.name.clone(), have.dtype, want.dtype));
                    }
                    if have.shape != want.shape {
                        m.shape.push((want.name.clone(), have.shape.clone(), want.shape.clone()));
                    }
                }
            }
        }
        m.unexpected =
            shard.iter().filter(|v| !in_model.contains(v.name.as_str())).map(|v| v.name.clone()).collect();
        if m == ModelMismatch::default() {
            Ok(())
        } else {
            Err(m)
        }
    }
}

impl fmt::Display for ModelMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected {}", self.unexpected.join(", ")));
        }
        for (name, have, want) in &self.dtype {
            parts.push(format!("{name} has dtype {have}, model expects {want}"));
        }
        for (name, have, want) in &self.shape {
            parts.push(format!("{name} has shape {have:?}, model expects {want:?}"));
        }
        f.write_str(&parts.join("; "))
    }
}

/// What went wrong with a shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardErrorKind {
    /// The file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`read`, `write`, ...).
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Malformed(String),
    /// The file is shorter (or longer) than its header or manifest says.
    #[error("shard is truncated or overwritten: {len} bytes on disk, {expected} expected")]
    Truncated {
        /// Size found.
        len: u64,
        /// Size the header or manifest promises.
        expected: u64,
    },
    /// A tensor's data does not match its recorded checksum.
    #[error("checksum mismatch in {0}")]
    ChecksumMismatch(String),
    /// Every tensor matches but the whole file does not: the header changed.
    #[error("checksum mismatch in the header (the whole-file checksum differs while every tensor matches)")]
    HeaderChecksumMismatch,
    /// The header and the manifest describe different variables or identity.
    #[error("header disagrees with the manifest: {0}")]
    ManifestDisagrees(String),
    /// The shard's variables differ from the model's.
    #[error("{0}")]
    ModelMismatch(ModelMismatch),
    /// The caller's data does not fit the declared variables (writer side).
    #[error("invalid shard contents: {0}")]
    Invalid(String),
    /// The writer was told to give up (a restore needs its buffer); the
    /// temporary file is gone and nothing was renamed into place.
    #[error("write given up: a restore needs the buffer")]
    Cancelled,
}

/// A shard error with the shard it concerns (`checkpoint 7 rank 2`, or a path).
#[derive(Debug)]
pub struct ShardError {
    /// Which shard.
    pub shard: String,
    /// What went wrong.
    pub kind: ShardErrorKind,
}

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ShardErrorKind::ModelMismatch(m) => {
                write!(f, "{} does not match the model: {m}", self.shard)
            }
            kind => write!(f, "{}: {kind}", self.shard),
        }
    }
}

impl std::error::Error for ShardError {}

impl ShardError {
    fn new(shard: &str, kind: ShardErrorKind) -> Self {
        Self { shard: shard.to_string(), kind }
    }

    /// True when the stored bytes are damaged (so the checkpoint must be
    /// marked corrupt and the job falls back to an earlier one), as opposed
    /// to an I/O failure or a model that does not fit.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self.kind,
            ShardErrorKind::Malformed(_)
                | ShardErrorKind::Truncated { .. }
                | ShardErrorKind::ChecksumMismatch(_)
                | ShardErrorKind::HeaderChecksumMismatch
                | ShardErrorKind::ManifestDisagrees(_)
        )
    }
}

fn io_err<'a>(shard: &str, op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShardError + 'a {
    let shard = shard.to_string();
    move |source| ShardError {
        shard,
        kind: ShardErrorKind::Io { op, path: path.display().to_string(), source },
    }
}

/// Builds the `[u64 n][header]` prefix for `vars` laid out back to back.
/// The header bytes [`write_shard`] writes for `meta`, `vars` and the
/// `records` it returned: with the data after them, the file's image.
pub fn header_bytes(
    meta: &ShardMeta,
    vars: &[VariableSpec],
    records: &[TensorRecord],
) -> Result<Vec<u8>, String> {
    encode_header(meta, vars, records)
}

fn encode_header(
    meta: &ShardMeta,
    vars: &[VariableSpec],
    records: &[TensorRecord],
) -> Result<Vec<u8>, String> {
    let mut seen = HashSet::new();
    let mut offset = 0usize;
    let mut tensors = Vec::with_capacity(vars.len());
    for v in vars {
        if !seen.insert(v.name.as_str()) {
            return Err(format!("variable {} is declared twice", v.name));
        }
        if v.name == "__metadata__" {
            return Err("a variable cannot be named __metadata__".into());
        }
        let end = offset + v.byte_len();
        tensors.push((
            v.name.clone(),
            TensorInfo { dtype: v.dtype, shape: v.shape.clone(), data_offsets: (offset, end) },
        ));
        offset = end;
    }
    let mut map = meta.to_map();
    let checksums: BTreeMap<&str, String> =
        records.iter().map(|r| (r.name.as_str(), r.checksum.to_string())).collect();
    map.insert(CHECKSUMS_KEY.to_string(), serde_json::to_string(&checksums).map_err(|e| e.to_string())?);
    let metadata = Metadata::new(Some(map), tensors).map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    // pad so tensor data starts 8-byte aligned, as the reference writer does
    let padded = (8 + json.len()).next_multiple_of(8) - 8;
    json.resize(padded, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Writes a shard durably at `path` (temp → write → fsync → rename → fsync
/// dir). `data` holds the variables' bytes back to back, in `vars` order.
/// Returns the manifest with per-tensor and whole-file checksums (the
/// per-tensor ones are in the header too).
pub fn write_shard(
    path: &Path,
    meta: &ShardMeta,
    vars: &[VariableSpec],
    data: &[u8],
) -> Result<ShardManifest, ShardError> {
    write_shard_unless(path, meta, vars, data, &|| false)
}

/// [`write_shard`], giving up with [`ShardErrorKind::Cancelled`] as soon as
/// `cancelled()` says so: it is asked before each chunk and before the fsync,
/// so a restore waits for at most one chunk of a write it has made useless.
pub fn write_shard_unless(
    path: &Path,
    meta: &ShardMeta,
    vars: &[VariableSpec],
    data: &[u8],
    cancelled: &dyn Fn() -> bool,
) -> Result<ShardManifest, ShardError> {
    write_shard_keeping_header(path, meta, vars, data, cancelled).map(|(manifest, _)| manifest)
}

/// [`write_shard_unless`], also giving back the header bytes it wrote: with
/// the data after them, they are the file's image (a shard kept in memory;
/// a header is not re-encoded, its metadata's order is not fixed).
pub fn write_shard_keeping_header(
    path: &Path,
    meta: &ShardMeta,
    vars: &[VariableSpec],
    data: &[u8],
    cancelled: &dyn Fn() -> bool,
) -> Result<(ShardManifest, Vec<u8>), ShardError> {
    let label = format!("checkpoint {} rank {}", meta.checkpoint, meta.rank);
    let mut expected = 0usize;
    for v in vars {
        // checked: the shapes come from a trainer, and a sum that wrapped
        // could match the data while a single variable overruns it
        let Some(total) = v.checked_byte_len().and_then(|len| expected.checked_add(len)) else {
            return Err(ShardError::new(
                &label,
                ShardErrorKind::Invalid(format!(
                    "variable {} of shape {:?} and dtype {} declares more bytes than can exist",
                    v.name, v.shape, v.dtype
                )),
            ));
        };
        expected = total;
    }
    if expected != data.len() {
        return Err(ShardError::new(
            &label,
            ShardErrorKind::Invalid(format!(
                "the variables need {expected} bytes of data, {} were given",
                data.len()
            )),
        ));
    }
    let record = |v: &VariableSpec, checksum| TensorRecord {
        name: v.name.clone(),
        dtype: v.dtype,
        shape: v.shape.clone(),
        bytes: v.byte_len() as u64,
        checksum,
    };
    // The header carries every tensor's checksum, known only once the data
    // is written; a checksum always prints the same length, so a header
    // with placeholders is exactly as long as the real one.
    let placeholders: Vec<TensorRecord> = vars.iter().map(|v| record(v, Checksum::default())).collect();
    let header_len = encode_header(meta, vars, &placeholders)
        .map_err(|e| ShardError::new(&label, ShardErrorKind::Invalid(e)))?
        .len();

    let (records, header) = durable::write_atomic(path, |file| {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        // the data first, after the header's room, each chunk checksummed
        // as it is written (one pass); then the header at the start
        file.seek(SeekFrom::Start(header_len as u64))?;
        let mut offset = header_len as u64;
        let mut records = Vec::with_capacity(vars.len());
        let mut rest = data;
        for v in vars {
            let (tensor, tail) = rest.split_at(v.byte_len());
            rest = tail;
            let mut crc = Checksum::default();
            for chunk in tensor.chunks(WRITE_CHUNK) {
                if cancelled() {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, Cancelled));
                }
                crc = crc.append(chunk);
                file.write_all(chunk)?;
                // let the disk start on this chunk while we copy the next
                durable::start_writeback(file, offset, chunk.len() as u64);
                offset += chunk.len() as u64;
            }
            records.push(record(v, crc));
        }
        let header = encode_header(meta, vars, &records).map_err(io::Error::other)?;
        if header.len() != header_len {
            return Err(io::Error::other(format!(
                "the header is {} bytes, {header_len} were reserved for it",
                header.len()
            )));
        }
        file.write_all_at(&header, 0)?;
        if cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, Cancelled));
        }
        Ok((records, header))
    })
    .map_err(|e| {
        if e.get_ref().is_some_and(|inner| inner.is::<Cancelled>()) {
            ShardError::new(&label, ShardErrorKind::Cancelled)
        } else {
            io_err(&label, "write", path)(e)
        }
    })?;
    let file_checksum =
        records.iter().fold(Checksum::of(&header), |whole, r| whole.combine(r.checksum, r.bytes as usize));

    let manifest = ShardManifest {
        rank: meta.rank,
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        bytes: (header.len() + data.len()) as u64,
        checksum: file_checksum,
        tensors: records,
    };
    Ok((manifest, header))
}

/// A parsed shard header: identity, variables and where their data lies.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// Identity from `__metadata__`.
    pub meta: ShardMeta,
    /// Variables in file order (empty ones before the non-empty one at the
    /// same offset, by name among themselves), with their byte range
    /// relative to the data start.
    pub tensors: Vec<(VariableSpec, Range<usize>)>,
    /// Bytes before the data: the 8-byte length plus the JSON header.
    pub header_len: usize,
    /// Total file size the header implies.
    pub file_len: u64,
    /// Each tensor's CRC-32C as the writer recorded it (shards written
    /// before the header carried them have none). Vouched for by the whole
    /// file's checksum in the ledger, never by the file alone.
    pub checksums: Option<HashMap<String, Checksum>>,
}

impl ShardHeader {
    /// The variables, in file order.
    pub fn variables(&self) -> Vec<VariableSpec> {
        self.tensors.iter().map(|(v, _)| v.clone()).collect()
    }

    /// Every variable with the checksum the header records for it, in file
    /// order (MANIFEST.json's per-variable list); `None` when the header
    /// lacks one. Trust them only once the whole file's checksum matched.
    pub fn records(&self) -> Option<Vec<TensorRecord>> {
        let checksums = self.checksums.as_ref()?;
        self.tensors
            .iter()
            .map(|(v, r)| {
                Some(TensorRecord {
                    name: v.name.clone(),
                    dtype: v.dtype,
                    shape: v.shape.clone(),
                    bytes: r.len() as u64,
                    checksum: *checksums.get(&v.name)?,
                })
            })
            .collect()
    }

    /// Decodes the header bytes of a shard file `file_len` bytes long (a
    /// shard held in memory: its header is kept beside its data).
    pub fn decode(header: &[u8], file_len: u64, label: &str) -> Result<Self, ShardError> {
        Self::parse(header, file_len).map_err(|kind| ShardError::new(label, kind))
    }

    /// Parses a header from the file's first bytes (`prefix` must hold at
    /// least the 8-byte length and the JSON), given the file's actual size.
    fn parse(prefix: &[u8], actual_len: u64) -> Result<Self, ShardErrorKind> {
        let malformed = |m: String| ShardErrorKind::Malformed(m);
        let n = u64::from_le_bytes(
            prefix
                .get(..8)
                .ok_or(ShardErrorKind::Truncated { len: actual_len, expected: 8 })?
                .try_into()
                .expect("8 bytes"),
        );
        if n > MAX_HEADER_BYTES {
            return Err(malformed(format!("header length {n} exceeds {MAX_HEADER_BYTES}")));
        }
        let header_len = 8 + n as usize;
        let json = prefix
            .get(8..header_len)
            .ok_or(ShardErrorKind::Truncated { len: actual_len, expected: header_len as u64 })?;
        let metadata: Metadata =
            serde_json::from_slice(json).map_err(|e| malformed(format!("header: {e}")))?;
        // offsets near the top of the range are valid safetensors, yet no file
        // holds them (checked: a wrapped sum would read as merely truncated)
        let file_len = header_len.checked_add(metadata.data_len()).ok_or_else(|| {
            malformed(format!("header declares {} bytes of tensor data", metadata.data_len()))
        })? as u64;
        if file_len != actual_len {
            return Err(ShardErrorKind::Truncated { len: actual_len, expected: file_len });
        }
        let meta = ShardMeta::from_map(metadata.metadata().as_ref()).map_err(malformed)?;
        let checksums = match metadata.metadata().as_ref().and_then(|m| m.get(CHECKSUMS_KEY)) {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                malformed(format!("__metadata__ `{CHECKSUMS_KEY}` is not a map of checksums: {e}"))
            })?),
            None => None,
        };
        let mut tensors: Vec<_> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                (
                    VariableSpec::new(name, info.dtype, info.shape.clone()),
                    info.data_offsets.0..info.data_offsets.1,
                )
            })
            .collect();
        // file order; an empty tensor sits at the offset of the next one, and
        // several empty ones at one offset go by name, so that the order does
        // not depend on the header's hash map
        tensors.sort_by(|(a, ra), (b, rb)| (ra.start, ra.end, &a.name).cmp(&(rb.start, rb.end, &b.name)));
        Ok(Self { meta, tensors, header_len, file_len, checksums })
    }
}

/// Reads only the header of the shard at `path` (no tensor data), checking
/// that the file is as long as the header says. `label` names the shard in
/// errors (e.g. `checkpoint 7 rank 2`).
pub fn read_header(path: &Path, label: &str) -> Result<ShardHeader, ShardError> {
    let mut file = File::open(path).map_err(io_err(label, "open", path))?;
    let actual = file.metadata().map_err(io_err(label, "stat", path))?.len();
    let mut len = [0u8; 8];
    let mut prefix = Vec::new();
    if actual >= 8 {
        file.read_exact(&mut len).map_err(io_err(label, "read", path))?;
        prefix.extend_from_slice(&len);
        let n = u64::from_le_bytes(len).min(MAX_HEADER_BYTES + 1).min(actual - 8);
        prefix.resize(8 + n as usize, 0);
        file.read_exact(&mut prefix[8..]).map_err(io_err(label, "read", path))?;
    }
    ShardHeader::parse(&prefix, actual).map_err(|kind| ShardError::new(label, kind))
}

/// A shard image [`Shard::verify_image`] refused: why, and its buffer back.
#[derive(Debug)]
pub struct RefusedImage {
    /// What does not match.
    pub error: ShardError,
    /// The image's buffer, for reuse.
    pub image: Vec<u8>,
}

/// A whole shard in memory, checksums verified.
#[derive(Debug)]
pub struct Shard {
    /// The parsed header.
    pub header: ShardHeader,
    bytes: Vec<u8>,
}

impl Shard {
    /// Reads the shard at `path` and verifies it against `manifest`: size,
    /// variables, every tensor's checksum (a mismatch names the tensor) and
    /// the whole-file checksum.
    pub fn read_verified<'a>(
        path: &Path,
        label: &str,
        manifest: impl Into<Expected<'a>>,
    ) -> Result<Self, ShardError> {
        Self::read_verified_into(path, label, manifest, Vec::new())
    }

    /// [`Shard::read_verified`] into a caller's buffer, whose capacity is
    /// reused: a worker reads into memory it already touched (its snapshot
    /// buffer) instead of faulting in a fresh allocation the size of the
    /// shard. [`Shard::into_buffer`] gives the buffer back.
    pub fn read_verified_into<'a>(
        path: &Path,
        label: &str,
        manifest: impl Into<Expected<'a>>,
        mut buf: Vec<u8>,
    ) -> Result<Self, ShardError> {
        let manifest = manifest.into();
        let file = File::open(path).map_err(io_err(label, "open", path))?;
        let len = file.metadata().map_err(io_err(label, "stat", path))?.len();
        if len != manifest.bytes {
            let kind = ShardErrorKind::Truncated { len, expected: manifest.bytes };
            return Err(ShardError::new(label, kind));
        }
        // the buffer's bytes are overwritten: only a shorter one grows (a
        // snapshot buffer is usually the shard's size already)
        buf.resize(len as usize, 0);
        let header = read_and_verify(&file, &mut buf, manifest, label, path)?;
        Ok(Self { header, bytes: buf })
    }

    /// Verifies `image`, a whole shard file held in memory (a rank's own
    /// copy, or one a peer sent), against `manifest` exactly as
    /// [`Shard::read_verified`] verifies a file, in place. A shard that
    /// fails gives its buffer back with the error.
    pub fn verify_image<'a>(
        image: Vec<u8>,
        label: &str,
        manifest: impl Into<Expected<'a>>,
    ) -> Result<Self, Box<RefusedImage>> {
        let manifest = manifest.into();
        let mut image = image;
        if image.len() as u64 != manifest.bytes {
            let kind = ShardErrorKind::Truncated { len: image.len() as u64, expected: manifest.bytes };
            return Err(Box::new(RefusedImage { error: ShardError::new(label, kind), image }));
        }
        match verify_in(None, &mut image, manifest, label, Path::new("memory")) {
            Ok(header) => Ok(Self { header, bytes: image }),
            Err(error) => Err(Box::new(RefusedImage { error, image })),
        }
    }

    /// The buffer holding the file, for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }

    /// [`Shard::read_verified`] into the first `manifest.bytes` of `dst`
    /// (memory another process maps: an `--exec` trainer's restore
    /// segment); returns the header, which locates each variable's data.
    pub fn read_verified_to<'a>(
        path: &Path,
        label: &str,
        manifest: impl Into<Expected<'a>>,
        dst: &mut [u8],
    ) -> Result<ShardHeader, ShardError> {
        let manifest = manifest.into();
        let file = File::open(path).map_err(io_err(label, "open", path))?;
        let len = file.metadata().map_err(io_err(label, "stat", path))?.len();
        if len != manifest.bytes || dst.len() < len as usize {
            let kind = ShardErrorKind::Truncated { len, expected: manifest.bytes };
            return Err(ShardError::new(label, kind));
        }
        read_and_verify(&file, &mut dst[..len as usize], manifest, label, path)
    }
}

/// Checksummed pieces of a file: (offset, length, CRC-32C), in file order.
type Pieces = Vec<(usize, usize, Checksum)>;

/// Reads the shard `file` into `dst` (exactly its size) and verifies it
/// against `manifest`, in parallel: the data is cut into one part per core,
/// each read (`pread`) and checksummed by its own thread, the pieces'
/// checksums then combined per tensor and for the whole file. On a warm
/// page cache both the copy out of the cache and the CRC scale with the
/// cores; the result is exactly the sequential check's.
fn read_and_verify(
    file: &File,
    dst: &mut [u8],
    manifest: Expected<'_>,
    label: &str,
    path: &Path,
) -> Result<ShardHeader, ShardError> {
    verify_in(Some(file), dst, manifest, label, path)
}

/// [`read_and_verify`] with `file` to read `dst` from, or, without one,
/// the shard's bytes already in `dst` (an image held in memory), verified
/// in place in the same parallel parts.
fn verify_in(
    file: Option<&File>,
    dst: &mut [u8],
    manifest: Expected<'_>,
    label: &str,
    path: &Path,
) -> Result<ShardHeader, ShardError> {
    use std::os::unix::fs::FileExt;
    let read = |e: io::Error| io_err(label, "read", path)(e);
    let read_at = |buf: &mut [u8], at: usize| file.map_or(Ok(()), |f| f.read_exact_at(buf, at as u64));
    let len = dst.len() as u64;
    let fail = |kind| ShardError::new(label, kind);
    // the header first: its 8-byte length, then the JSON
    let head = dst.len().min(8);
    read_at(&mut dst[..head], 0).map_err(read)?;
    let n = dst.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let header_len = n.map_or(8, |n| 8usize.saturating_add(n.min(MAX_HEADER_BYTES) as usize)).min(dst.len());
    read_at(&mut dst[head..header_len], head).map_err(read)?;
    let header = ShardHeader::parse(&dst[..header_len], len).map_err(fail)?;
    let header_crc = Checksum::of(&dst[..header.header_len]);

    // each part: its file range, read and checksummed piece by piece, a
    // piece ending at every tensor boundary inside it
    let data_start = header.header_len;
    let ranges: Vec<Range<usize>> =
        header.tensors.iter().map(|(_, r)| data_start + r.start..data_start + r.end).collect();
    let (cuts, bounds) = parts_of(data_start..dst.len(), &ranges);
    let results: Vec<io::Result<Pieces>> = std::thread::scope(|scope| {
        let mut rest = &mut dst[data_start..];
        let mut handles = Vec::new();
        for w in cuts.windows(2) {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(w[1] - w[0]);
            rest = tail;
            let (start, bounds) = (w[0], &bounds);
            handles.push(scope.spawn(move || {
                read_at(part, start)?;
                Ok(pieces_of(part, start, bounds))
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("a reading thread panicked"))))
            .collect()
    });
    let mut pieces = Vec::new();
    for r in results {
        pieces.extend(r.map_err(read)?);
    }
    let crc_of = |r: Range<usize>| combine_pieces(&pieces, data_start + r.start..data_start + r.end);
    check_manifest(header, manifest, header_crc, crc_of).map_err(fail)
}

/// Cuts `span` into one part per core (at most 8; one for less than
/// 4 MiB): the part boundaries, and every boundary a piece must end at
/// (those and each range's ends).
fn parts_of(span: Range<usize>, ranges: &[Range<usize>]) -> (Vec<usize>, Vec<usize>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let parts = if span.len() < 4 << 20 { 1 } else { cores };
    let cuts: Vec<usize> = (0..=parts).map(|i| span.start + span.len() * i / parts).collect();
    let mut bounds: Vec<usize> =
        ranges.iter().flat_map(|r| [r.start, r.end]).chain(cuts.iter().copied()).collect();
    bounds.sort_unstable();
    bounds.dedup();
    (cuts, bounds)
}

/// The checksummed pieces of `part`, which starts at offset `start`: one
/// piece ending at each of `bounds` inside it, and one at its end.
fn pieces_of(part: &[u8], start: usize, bounds: &[usize]) -> Pieces {
    let mut pieces = Vec::new();
    let inner = bounds.iter().copied().filter(|b| *b > start && *b < start + part.len());
    let mut from = start;
    for to in inner.chain(std::iter::once(start + part.len())) {
        if to > from {
            pieces.push((from, to - from, Checksum::of(&part[from - start..to - start])));
        }
        from = to;
    }
    pieces
}

/// The checksum of `range`, combined from the pieces (in order) within it.
fn combine_pieces(pieces: &Pieces, range: Range<usize>) -> Checksum {
    pieces
        .iter()
        .filter(|(s, l, _)| *s >= range.start && s + l <= range.end)
        .fold(Checksum::of(&[]), |acc, (_, l, c)| acc.combine(*c, *l))
}

/// The checks of a shard against its manifest, given the header's checksum
/// and each tensor's (`crc_of` a data range). Against per-tensor records:
/// the same variables, dtypes and shapes, every tensor's checksum (a
/// mismatch names it) and the whole file's, combined in file order. Against
/// the ledger's digest (no records): the whole file's, and on a mismatch the
/// tensor that differs from the checksum its header recorded.
fn check_manifest(
    header: ShardHeader,
    manifest: Expected<'_>,
    header_crc: Checksum,
    crc_of: impl Fn(Range<usize>) -> Checksum,
) -> Result<ShardHeader, ShardErrorKind> {
    if manifest.records.is_empty() {
        // what the ledger keeps: the whole file's checksum, which vouches
        // for the header and so for the checksums it carries
        let whole =
            header.tensors.iter().fold(header_crc, |acc, (_, r)| acc.combine(crc_of(r.clone()), r.len()));
        if whole == manifest.checksum {
            return Ok(header);
        }
        // name what differs: a tensor whose data no longer matches the
        // checksum recorded at write time, else the header itself
        let recorded = |name: &str| header.checksums.as_ref().and_then(|c| c.get(name)).copied();
        let bad =
            header.tensors.iter().find(|(v, r)| recorded(&v.name).is_some_and(|c| c != crc_of(r.clone())));
        return Err(match bad {
            Some((v, _)) => ShardErrorKind::ChecksumMismatch(v.name.clone()),
            None => ShardErrorKind::HeaderChecksumMismatch,
        });
    }
    let by_name: HashMap<&str, &(VariableSpec, Range<usize>)> =
        header.tensors.iter().map(|t| (t.0.name.as_str(), t)).collect();
    if header.tensors.len() != manifest.records.len() {
        return Err(ShardErrorKind::ManifestDisagrees(format!(
            "the header has {} variables, the manifest {}",
            header.tensors.len(),
            manifest.records.len()
        )));
    }
    let mut whole = header_crc;
    // walk in file order so the whole-file checksum can be combined
    let mut records: Vec<&TensorRecord> = manifest.records.iter().collect();
    records.sort_by_key(|r| by_name.get(r.name.as_str()).map(|t| t.1.start));
    for record in records {
        let Some((spec, range)) = by_name.get(record.name.as_str()) else {
            return Err(ShardErrorKind::ManifestDisagrees(format!("{} is not in the header", record.name)));
        };
        if spec.dtype != record.dtype || spec.shape != record.shape {
            return Err(ShardErrorKind::ManifestDisagrees(format!(
                "{} is {} {:?} in the header, {} {:?} in the manifest",
                record.name, spec.dtype, spec.shape, record.dtype, record.shape
            )));
        }
        let crc = crc_of(range.clone());
        if crc != record.checksum {
            return Err(ShardErrorKind::ChecksumMismatch(record.name.clone()));
        }
        whole = whole.combine(crc, range.len());
    }
    if whole != manifest.checksum {
        return Err(ShardErrorKind::HeaderChecksumMismatch);
    }
    Ok(header)
}

impl Shard {
    /// The data of variable `name`, if the shard has it.
    pub fn tensor(&self, name: &str) -> Option<&[u8]> {
        self.header
            .tensors
            .iter()
            .find(|(v, _)| v.name == name)
            .map(|(_, r)| &self.bytes[self.header.header_len + r.start..self.header.header_len + r.end])
    }

    /// All variables with their data, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&VariableSpec, &[u8])> {
        let data = &self.bytes[self.header.header_len..];
        self.header.tensors.iter().map(move |(v, r)| (v, &data[r.clone()]))
    }

    /// Size of the file.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the shard is empty (never true for a valid shard: it has a header).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ShardMeta {
        ShardMeta {
            job: JobName::new("demo").unwrap(),
            checkpoint: CheckpointId(7),
            rank: Rank(2),
            step: Step(700),
            generation: Generation(1),
        }
    }

    fn sample() -> (Vec<VariableSpec>, Vec<u8>) {
        let vars = vec![
            VariableSpec::new("optimizer/step", Dtype::I64, vec![]),
            VariableSpec::new("model/layer_0/attn/wq", Dtype::F32, vec![4, 8]),
            VariableSpec::new("model/layer_0/mlp/w_in", Dtype::F32, vec![8, 3]),
        ];
        let mut data = 700i64.to_le_bytes().to_vec();
        data.extend((0..(32 + 24)).flat_map(|i| (i as f32 * 0.5).to_le_bytes()));
        (vars, data)
    }

    fn written() -> (tempfile::TempDir, std::path::PathBuf, ShardManifest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank-00002.safetensors");
        let (vars, data) = sample();
        let manifest = write_shard(&path, &meta(), &vars, &data).unwrap();
        (dir, path, manifest, data)
    }

    #[test]
    fn round_trip() {
        let (_dir, path, manifest, data) = written();
        assert_eq!(manifest.file, "rank-00002.safetensors");
        assert_eq!(manifest.bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(manifest.checksum, Checksum::of(&std::fs::read(&path).unwrap()));
        assert_eq!(manifest.tensors[1].checksum, Checksum::of(&data[8..8 + 128]));

        let header = read_header(&path, "t").unwrap();
        assert_eq!(header.meta, meta());
        assert_eq!(header.variables(), sample().0);
        assert_eq!(header.header_len % 8, 0);

        let shard = Shard::read_verified(&path, "t", &manifest).unwrap();
        assert_eq!(shard.tensor("optimizer/step").unwrap(), 700i64.to_le_bytes());
        assert_eq!(shard.tensor("model/layer_0/mlp/w_in").unwrap(), &data[8 + 128..]);
        let all: Vec<u8> = shard.tensors().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(all, data);
    }

    #[test]
    fn a_cancelled_write_leaves_no_file_and_a_later_one_lands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rank-00002.safetensors");
        // three chunks of data: give up after the first one is written
        let vars = vec![VariableSpec::new("w", Dtype::U8, vec![3 * WRITE_CHUNK])];
        let data = vec![7u8; 3 * WRITE_CHUNK];
        let asked = std::cell::Cell::new(0);
        let after_one = || {
            asked.set(asked.get() + 1);
            asked.get() > 1
        };
        let err = write_shard_unless(&path, &meta(), &vars, &data, &after_one).unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::Cancelled), "{err}");
        assert_eq!(asked.get(), 2, "asked before each chunk until told to stop");
        assert_eq!(err.to_string(), "checkpoint 7 rank 2: write given up: a restore needs the buffer");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "no shard and no temporary file: {left:?}");
        // asked once more before the fsync: a write told to stop at the very end stops too
        let at_end = std::cell::Cell::new(0);
        let last = || {
            at_end.set(at_end.get() + 1);
            at_end.get() > 3
        };
        assert!(write_shard_unless(&path, &meta(), &vars, &data, &last).is_err());
        assert!(!path.exists());
        let manifest = write_shard_unless(&path, &meta(), &vars, &data, &|| false).unwrap();
        Shard::read_verified(&path, "t", &manifest).unwrap();
    }

    #[test]
    fn safetensors_crate_reads_it() {
        let (_dir, path, _, data) = written();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("model/layer_0/attn/wq").unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), &[4, 8]);
        assert_eq!(t.data(), &data[8..8 + 128]);
    }

    #[test]
    fn flipped_data_byte_is_named() {
        let (_dir, path, manifest, _) = written();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 5; // inside model/layer_0/mlp/w_in
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "checkpoint 7 rank 2", &manifest).unwrap_err();
        assert_eq!(err.to_string(), "checkpoint 7 rank 2: checksum mismatch in model/layer_0/mlp/w_in");
        assert!(err.is_corruption());
    }

    #[test]
    fn the_ledgers_digest_verifies_a_shard_and_names_the_tensor_that_differs() {
        let (_dir, path, manifest, _) = written();
        let digest = manifest.digest();
        // encoded as a manifest without variables (what older builds read and
        // wrote); a list that arrives anyway is dropped
        let bare = ShardManifest { tensors: Vec::new(), ..manifest.clone() };
        assert_eq!(rmp_serde::to_vec_named(&digest).unwrap(), rmp_serde::to_vec_named(&bare).unwrap());
        let full = rmp_serde::to_vec_named(&manifest).unwrap();
        assert_eq!(rmp_serde::from_slice::<ShardDigest>(&full).unwrap(), digest);
        // the header carries what the ledger no longer does
        assert_eq!(read_header(&path, "t").unwrap().records().unwrap(), manifest.tensors);
        let shard = Shard::read_verified(&path, "t", &digest).unwrap();
        assert_eq!(shard.tensor("optimizer/step").unwrap(), 700i64.to_le_bytes());

        let clean = std::fs::read(&path).unwrap();
        let mut bytes = clean.clone();
        let last = bytes.len() - 5; // inside model/layer_0/mlp/w_in
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "checkpoint 7 rank 2", &digest).unwrap_err();
        assert_eq!(err.to_string(), "checkpoint 7 rank 2: checksum mismatch in model/layer_0/mlp/w_in");

        // a changed header cannot vouch for itself: step 700 -> 701
        let mut bytes = clean.clone();
        let at = bytes.windows(5).position(|w| w == b"\"700\"").unwrap() + 3;
        bytes[at] = b'1';
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "c", &digest).unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::HeaderChecksumMismatch), "{err}");

        // nor can a header whose recorded checksum was changed to match
        // changed data: the whole file's checksum is the ledger's
        let mut bytes = clean;
        let data_at = bytes.len() - 5;
        bytes[data_at] ^= 0x01;
        let header = read_header(&path, "t").unwrap();
        let w_in = &header.tensors.iter().find(|(v, _)| v.name == "model/layer_0/mlp/w_in").unwrap().1;
        let data = &bytes[header.header_len + w_in.start..header.header_len + w_in.end];
        let old = manifest
            .tensors
            .iter()
            .find(|t| t.name == "model/layer_0/mlp/w_in")
            .unwrap()
            .checksum
            .to_string();
        let new = Checksum::of(data).to_string();
        let at = bytes.windows(old.len()).position(|w| w == old.as_bytes()).unwrap();
        bytes[at..at + new.len()].copy_from_slice(new.as_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "c", &digest).unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::HeaderChecksumMismatch), "{err}");
    }

    #[test]
    fn flipped_header_byte_is_detected() {
        let (_dir, path, manifest, _) = written();
        let mut bytes = std::fs::read(&path).unwrap();
        // turn a padding space or a metadata digit into something else while
        // keeping valid JSON: change "700" (step) into "701"
        let at = bytes.windows(5).position(|w| w == b"\"700\"").unwrap() + 3;
        bytes[at] = b'1';
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "c", &manifest).unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::HeaderChecksumMismatch), "{err}");
        // and a header broken beyond JSON
        bytes[9] = b'#';
        std::fs::write(&path, &bytes).unwrap();
        let err = Shard::read_verified(&path, "c", &manifest).unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::Malformed(_)), "{err}");
        assert!(err.is_corruption());
    }

    #[test]
    fn truncated_shard_is_refused() {
        let (_dir, path, manifest, _) = written();
        let full = std::fs::read(&path).unwrap();
        for cut in [full.len() - 1, full.len() / 2, 20, 3, 0] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let err = Shard::read_verified(&path, "checkpoint 7 rank 2", &manifest).unwrap_err();
            assert!(
                err.to_string().contains(&format!(
                    "truncated or overwritten: {cut} bytes on disk, {} expected",
                    full.len()
                )),
                "{err}"
            );
            let err = read_header(&path, "checkpoint 7 rank 2").unwrap_err();
            assert!(matches!(err.kind, ShardErrorKind::Truncated { .. }), "{cut}: {err}");
        }
    }

    #[test]
    fn writer_refuses_wrong_data_length_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (mut vars, data) = sample();
        let err = write_shard(&path, &meta(), &vars, &data[1..]).unwrap_err();
        assert!(err.to_string().contains("need 232 bytes of data, 231 were given"), "{err}");
        vars[2].name = vars[1].name.clone();
        vars[2].shape = vec![4, 8];
        vars.push(VariableSpec::new("x", Dtype::F32, vec![0]));
        let err = write_shard(&path, &meta(), &vars, &[0; 8 + 256]).unwrap_err();
        assert!(err.to_string().contains("declared twice"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn writer_refuses_shapes_no_memory_holds() {
        // regression (fuzz_decoders): the byte count overflowed (a panic in a
        // debug build); wrapped, a sum could match the data while one
        // variable overran it
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let too_big = [
            vec![VariableSpec::new("a", Dtype::BOOL, vec![1 << 61, 4])],
            vec![
                VariableSpec::new("a", Dtype::U8, vec![usize::MAX / 2 + 1]),
                VariableSpec::new("b", Dtype::U8, vec![usize::MAX / 2 + 1]),
            ],
        ];
        for vars in too_big {
            let err = write_shard(&path, &meta(), &vars, &[]).unwrap_err();
            assert!(err.to_string().contains("declares more bytes than can exist"), "{err}");
            assert!(!path.exists());
        }
        let v = VariableSpec::new("a", Dtype::F64, vec![1 << 40, 1 << 40]);
        assert_eq!((v.elements(), v.byte_len(), v.checked_byte_len()), (usize::MAX, usize::MAX, None));
    }

    #[test]
    fn header_whose_data_cannot_fit_a_file_is_malformed() {
        // regression (fuzz_decoders): eight U8 tensors of 2^61 - 1 bytes are
        // valid safetensors offsets (up to 2^64 - 8), and adding the header's
        // length overflowed
        let size: u64 = (1 << 61) - 1;
        let header: serde_json::Map<String, serde_json::Value> = (0..8u64)
            .map(|i| {
                let info = serde_json::json!({"dtype": "U8", "shape": [size], "data_offsets": [i * size, (i + 1) * size]});
                (format!("t{i}"), info)
            })
            .collect();
        let json = serde_json::to_vec(&header).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let err = read_header(&path, "c").unwrap_err();
        assert!(matches!(err.kind, ShardErrorKind::Malformed(_)), "{err}");
        assert!(err.to_string().contains("18446744073709551608 bytes of tensor data"), "{err}");
        assert!(err.is_corruption());
    }

    #[test]
    fn empty_variables_keep_their_place_in_file_order() {
        // regression (fuzz_decoders): an empty tensor shares its offset with
        // the next one, and their order came from a hash map's
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        let vars = vec![
            VariableSpec::new("a", Dtype::U8, vec![]),
            VariableSpec::new("z", Dtype::F32, vec![0]),
            VariableSpec::new("b", Dtype::U64, vec![3]),
            VariableSpec::new("y", Dtype::I8, vec![2, 0]),
        ];
        write_shard(&path, &meta(), &vars, &[7; 25]).unwrap();
        for _ in 0..16 {
            assert_eq!(read_header(&path, "e").unwrap().variables(), vars);
        }
    }

    #[test]
    fn model_mismatch_lists_every_difference() {
        let shard = vec![
            VariableSpec::new("model/layer_0/attn/wq", Dtype::F32, vec![512, 512]),
            VariableSpec::new("model/layer_9/x", Dtype::F32, vec![1]),
            VariableSpec::new("optimizer/step", Dtype::I32, vec![]),
        ];
        let model = vec![
            VariableSpec::new("model/layer_0/attn/wq", Dtype::F32, vec![512, 1024]),
            VariableSpec::new("model/layer_3/mlp/w_in", Dtype::F32, vec![4]),
            VariableSpec::new("optimizer/step", Dtype::I64, vec![]),
        ];
        let m = ModelMismatch::check(&shard, &model).unwrap_err();
        assert_eq!(
            m.to_string(),
            "missing model/layer_3/mlp/w_in; unexpected model/layer_9/x; \
             optimizer/step has dtype I32, model expects I64; \
             model/layer_0/attn/wq has shape [512, 512], model expects [512, 1024]"
        );
        let err = ShardError::new("checkpoint 7 rank 2", ShardErrorKind::ModelMismatch(m));
        assert!(err.to_string().starts_with("checkpoint 7 rank 2 does not match the model: missing"));
        assert!(!err.is_corruption());
        assert_eq!(ModelMismatch::check(&model, &model), Ok(()));
    }
}
