//! The wire messages between the worker and its trainer process
//! (docs/TRAINER_PROTOCOL.md): length-prefixed MessagePack frames, one
//! request, one reply; and the checks of what the process declares.

use crate::error::{DeclError, ProtocolError};
use flotilla_shared::shard::{Dtype, VariableSpec};
use flotilla_shared::wire::RestoreFailureKind;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{Read, Write};

/// Version of the trainer protocol (the `hello` request carries it).
pub const TRAINER_PROTOCOL_VERSION: u32 = 1;
/// Largest request frame.
pub(super) const MAX_FRAME: usize = 16 << 20;
/// Largest tensor a trainer may declare.
const MAX_TENSOR_BYTES: usize = 1 << 40;

/// One request from the trainer (docs/TRAINER_PROTOCOL.md).
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Request {
    Hello { version: u32 },
    Restore { like: Option<Vec<TensorDecl>> },
    Step { step: u64 },
    SaveBegin { tensors: Vec<TensorDecl> },
    SaveDone { stall_seconds: f64 },
    Finish { digest: Option<String> },
}

/// `[name, dtype, shape]`.
pub(super) type TensorDecl = (String, String, Vec<usize>);

#[derive(Serialize)]
pub(super) struct Okay {
    pub ok: bool,
}

#[derive(Serialize)]
pub(super) struct Refusal<'a> {
    pub ok: bool,
    pub kind: &'a str,
    pub error: String,
}

#[derive(Serialize)]
pub(super) struct HelloReply {
    pub ok: bool,
    pub job: String,
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    pub start_step: u64,
    pub restoring: bool,
    /// What `flotilla.init()` puts in `os.environ` (a spare's process was
    /// started before it had them).
    pub local_rank: u32,
    pub master_addr: String,
    pub master_port: String,
}

#[derive(Serialize, Clone)]
pub(super) struct RestoredState {
    pub path: String,
    pub size: u64,
    pub step: u64,
    /// `[name, dtype, shape, offset, length]`.
    pub tensors: Vec<(String, String, Vec<usize>, u64, u64)>,
}

#[derive(Serialize)]
pub(super) struct RestoreReply {
    pub ok: bool,
    pub state: Option<RestoredState>,
}

#[derive(Serialize)]
pub(super) struct StepReply {
    pub ok: bool,
    pub checkpoint: bool,
}

#[derive(Serialize)]
pub(super) struct SaveBeginReply {
    pub ok: bool,
    pub path: String,
    pub size: u64,
    pub offsets: Vec<u64>,
}

/// Reads request frames until the stream ends, a frame is too large, or
/// `deliver` says stop.
pub(super) fn read_requests(
    mut stream: impl Read,
    mut deliver: impl FnMut(crate::Result<Request, ProtocolError>) -> bool,
) {
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            deliver(Err(ProtocolError::FrameTooLarge { len: n, max: MAX_FRAME }));
            return;
        }
        let mut body = vec![0u8; n];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        if !deliver(rmp_serde::from_slice::<Request>(&body).map_err(ProtocolError::from)) {
            return;
        }
    }
}

/// Writes one reply frame.
pub(super) fn write_reply<T: Serialize>(conn: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = rmp_serde::to_vec_named(msg).expect("replies serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    conn.write_all(&frame)
}

/// Parses `[name, dtype, shape]` declarations: known dtypes, unique
/// non-empty names.
pub(super) fn parse_decls(decls: &[TensorDecl]) -> crate::Result<Vec<VariableSpec>, DeclError> {
    let mut seen = HashSet::new();
    let mut vars = Vec::with_capacity(decls.len());
    for (name, dtype, shape) in decls {
        if name.is_empty() {
            return Err(DeclError::EmptyName);
        }
        if !seen.insert(name.as_str()) {
            return Err(DeclError::NamedTwice(name.clone()));
        }
        let dtype = parse_dtype(dtype)
            .ok_or_else(|| DeclError::Dtype { name: name.clone(), dtype: dtype.clone() })?;
        let var = VariableSpec::new(name.clone(), dtype, shape.clone());
        if var.checked_byte_len().is_none_or(|b| b > MAX_TENSOR_BYTES) {
            return Err(DeclError::TooLarge { name: name.clone(), shape: shape.clone() });
        }
        vars.push(var);
    }
    Ok(vars)
}

/// The shard's layout of the declared variables: the widest element type
/// first (otherwise in declared order), so that every tensor starts at a
/// multiple of its element size, in the buffer and in the file (whose data
/// starts 8-aligned): restored arrays are naturally aligned. Returns the
/// variables in file order and each declared variable's offset.
pub(super) fn shard_layout(vars: &[VariableSpec]) -> (Vec<VariableSpec>, Vec<u64>) {
    let mut order: Vec<usize> = (0..vars.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(vars[i].dtype.bitsize()));
    let mut offsets = vec![0u64; vars.len()];
    let mut at = 0u64;
    for &i in &order {
        offsets[i] = at;
        at += vars[i].byte_len() as u64;
    }
    (order.into_iter().map(|i| vars[i].clone()).collect(), offsets)
}

fn parse_dtype(s: &str) -> Option<Dtype> {
    Some(match s {
        "BOOL" => Dtype::BOOL,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        _ => return None,
    })
}

pub(super) fn refusal_kind(kind: RestoreFailureKind) -> &'static str {
    match kind {
        RestoreFailureKind::ModelMismatch => "model_mismatch",
        RestoreFailureKind::DeviceMemory => "device_memory",
        RestoreFailureKind::Corrupt => "corrupt",
        RestoreFailureKind::Unavailable => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, dtype: &str, shape: &[usize]) -> TensorDecl {
        (name.to_string(), dtype.to_string(), shape.to_vec())
    }

    #[test]
    fn the_layout_aligns_every_tensor_to_its_element_size() {
        let vars = parse_decls(&[
            decl("a", "F32", &[3]),
            decl("flag", "BOOL", &[]),
            decl("step", "I64", &[]),
            decl("h", "F16", &[5]),
            decl("w", "F64", &[2, 2]),
        ])
        .unwrap();
        let (order, offsets) = shard_layout(&vars);
        let names: Vec<&str> = order.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["step", "w", "a", "h", "flag"]);
        assert_eq!(offsets, [40, 62, 0, 52, 8]);
        for (v, o) in vars.iter().zip(&offsets) {
            assert_eq!(o % (v.dtype.bitsize() as u64 / 8), 0, "{} at {o}", v.name);
        }
    }

    #[test]
    fn declarations_are_checked() {
        let e = parse_decls(&[decl("a", "F32", &[1]), decl("a", "F32", &[1])]).unwrap_err().to_string();
        assert!(e.contains("named twice"), "{e}");
        let e = parse_decls(&[decl("a", "float32", &[1])]).unwrap_err().to_string();
        assert!(e.contains("\"float32\"") && e.contains("F32"), "{e}");
        assert!(parse_decls(&[decl("", "F32", &[1])]).is_err());
        let e = parse_decls(&[decl("huge", "F64", &[1 << 40, 1 << 40])]).unwrap_err().to_string();
        assert!(e.contains("tensor huge of shape"), "{e}");
    }
}
