//! A shard written by Flotilla is read by the reference Python `safetensors`
//! library (a client no one here wrote): names, dtypes, shapes, metadata and
//! every byte of every tensor. `scripts/test.sh` installs it.

mod common;

use std::process::Command;

#[test]
fn python_safetensors_reads_a_flotilla_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = common::write_checkpoint(dir.path(), "interop", 3, 1, false);
    let (_, data) = common::trained(0, 30);
    let shard_path = dir.path().join("interop/ckpt-00000003/rank-00000.safetensors");

    let mut offset = 0;
    let tensors: Vec<_> = shards[0]
        .tensors
        .iter()
        .map(|t| {
            let entry = serde_json::json!({
                "name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape,
                "offset": offset, "bytes": t.bytes,
            });
            offset += t.bytes;
            entry
        })
        .collect();
    assert_eq!(offset as usize, data.len());
    // each tensor's checksum, as a JSON object in a metadata string
    let checksums: std::collections::BTreeMap<&str, String> =
        shards[0].tensors.iter().map(|t| (t.name.as_str(), t.checksum.to_string())).collect();
    let expected = serde_json::json!({
        "metadata": {"format": "flotilla-shard/1", "job": "interop", "checkpoint": "3",
                     "rank": "0", "step": "30", "generation": "1",
                     "checksums": serde_json::to_string(&checksums).unwrap()},
        "tensors": tensors,
    });
    let json_path = dir.path().join("expected.json");
    let bin_path = dir.path().join("expected.bin");
    std::fs::write(&json_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    std::fs::write(&bin_path, &data).unwrap();

    let python = std::env::var("FLOTILLA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/check_safetensors.py");
    let out = Command::new(&python)
        .args([script, shard_path.to_str().unwrap(), json_path.to_str().unwrap(), bin_path.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}; install Python 3 (scripts/test.sh does)"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "python safetensors could not read the shard (missing module? `pip install safetensors numpy`, \
         as scripts/test.sh does):\n{stdout}\n{stderr}"
    );
    assert!(stdout.starts_with("ok: 37 tensors"), "{stdout}");
}
