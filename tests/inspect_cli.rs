//! `flotilla inspect` and `flotilla bench snapshot` as a user runs them: the
//! real binary on real files.

mod common;

use common::{flotilla, text, write_checkpoint};

#[test]
fn inspect_lists_the_latest_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), "demo", 1, 2, true);
    write_checkpoint(dir.path(), "demo", 2, 2, true);
    let job = dir.path().join("demo");

    let out = flotilla(&["inspect", job.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("checkpoint 2 of job demo: step 20, generation 1, 2 ranks"), "{stdout}");
    assert!(stdout.contains("rank 0 ") && stdout.contains("rank 1 "), "{stdout}");
    assert!(stdout.contains("model/layer_1/mlp/w_out"), "{stdout}");
    assert!(stdout.contains("optimizer/step"), "{stdout}");
    assert!(!stdout.contains("verified"), "{stdout}");

    // the variables under each rank form a table whose columns line up
    let rank0: Vec<&str> =
        stdout.lines().skip_while(|l| !l.starts_with("rank 0 ")).skip(1).take(38).collect();
    assert!(rank0[0].starts_with("  variable") && rank0[0].contains("dtype"), "{stdout}");
    let dtype_at = rank0[0].find("dtype").unwrap();
    assert!(
        rank0[1..].iter().all(|l| &l[dtype_at..dtype_at + 3] == "F32" || &l[dtype_at..dtype_at + 3] == "I64"),
        "{stdout}"
    );

    let out = flotilla(&["inspect", "--verify", job.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // the header line and the verdict, not every variable again
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("verified: 2 shards, 74 variables, every checksum matches"), "{stdout}");

    let out = flotilla(&["inspect", "--json", "--verify", job.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["committed"], true);
    assert_eq!(v["manifest"]["id"], 2);
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    assert_eq!(v["shards"][1]["rank"], 1);
    assert_eq!(v["shards"][0]["variables"].as_array().unwrap().len(), 37);
    assert_eq!(v["verified_variables"], 74);
}

#[test]
fn a_reader_that_goes_away_ends_inspect_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    // 40 ranks of 37 variables: more output than a pipe holds, so the
    // writes after the reader left really fail
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), "wide", 1, 40, true);
    let mut child = Command::new(common::BIN)
        .args(["inspect", dir.path().join("wide").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap(); // `| head -1`
    let out = child.wait_with_output().unwrap();
    assert!(first.starts_with("checkpoint 1 of job wide"), "{first}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "nothing to say when the reader leaves: {stderr}");
    assert_eq!(out.status.signal(), Some(SIGPIPE), "ends as `cat` does: {:?}", out.status);
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;

#[test]
fn verify_names_the_corrupt_tensor_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let shards = write_checkpoint(dir.path(), "demo", 4, 2, true);
    let ckpt = dir.path().join("demo/ckpt-00000004");
    let shard = ckpt.join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&shard, &bytes).unwrap();
    let last_tensor = &shards[1].tensors.last().unwrap().name;

    // listing still works (headers are intact); verification does not
    assert!(flotilla(&["inspect", ckpt.to_str().unwrap()]).status.success());
    let out = flotilla(&["inspect", "--verify", ckpt.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.trim(), format!("error: checkpoint 4 rank 1: checksum mismatch in {last_tensor}"));

    // a truncated shard is refused already when listing
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = flotilla(&["inspect", ckpt.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("checkpoint 4 rank 1: shard is truncated or overwritten"), "{stderr}");
}

#[test]
fn uncommitted_checkpoint_is_flagged_and_cannot_be_verified() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), "demo", 9, 1, false);
    let ckpt = dir.path().join("demo/ckpt-00000009");
    let out = flotilla(&["inspect", ckpt.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("NOT COMMITTED (no MANIFEST.json)"), "{stdout}");

    let out = flotilla(&["inspect", "--verify", ckpt.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("was never committed"), "{stderr}");

    // the job root has no LATEST: say so and point at a checkpoint
    let out = flotilla(&["inspect", dir.path().join("demo").to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("has no LATEST") && stderr.contains("ckpt-00000009"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let out = flotilla(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    let out = flotilla(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    // a flag's value that only our own checks refuse is bad usage too
    let out = flotilla(&["bench", "snapshot", "--bytes", "10"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.starts_with("error: --bytes 10 is too small to measure"), "{:?}", text(&out));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let args = ["coordinator", "--id", "1", "--peers", "garbage", "--http-addr", "127.0.0.1:0", "--data-dir"];
    let out = flotilla(&[&args[..], &[data.to_str().unwrap()]].concat());
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.starts_with("error: --peers"), "{:?}", text(&out));
}

#[test]
fn bench_snapshot_json_has_the_spec_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla(&[
        "bench",
        "snapshot",
        "--bytes",
        "2097152",
        "--runs",
        "1",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in ["stall_seconds", "write_mb_per_s", "read_verify_mb_per_s", "baseline_write_mb_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {stdout}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bench_coordinator_json_has_the_spec_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = flotilla(&[
        "bench",
        "coordinator",
        "--workers",
        "4",
        "--rounds",
        "3",
        "--failures",
        "1",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in ["round_p50_ms", "round_p99_ms", "detect_to_restore_ms"] {
        assert!(v[key].as_f64().is_some_and(|x| x >= 0.0), "{key} in {stdout}");
    }
    assert_eq!(v["rounds"], 3, "{stdout}");
    // the reconnect grace alone is 500 ms
    assert!(v["detect_to_restore_ms"].as_f64().unwrap() >= 500.0, "{stdout}");
}

#[test]
fn a_checkpoint_root_above_the_jobs_names_them() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), "alpha", 1, 1, true);
    write_checkpoint(dir.path(), "beta", 2, 1, false);
    std::fs::create_dir(dir.path().join("not-a-job")).unwrap();
    let out = flotilla(&["inspect", dir.path().to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is a checkpoint root") && stderr.contains("2 jobs (alpha, beta)"), "{stderr}");
    assert!(stderr.contains(&format!("flotilla inspect {}", dir.path().join("alpha").display())), "{stderr}");
    assert!(!stderr.contains("never committed"), "{stderr}");

    // an empty directory is no root of jobs: the message as before
    let empty = tempfile::tempdir().unwrap();
    let out = flotilla(&["inspect", empty.path().to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("has no LATEST"), "{stderr}");
}
