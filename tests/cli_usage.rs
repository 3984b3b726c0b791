//! The command line's own checks, as a user meets them: the real binary,
//! bad values refused with exit code 2 and a message naming the right flag.

mod common;

use common::{flotilla, job_toml, text, BIN};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `flotilla worker ARGS` with a placeholder coordinator (never reached:
/// every case here is refused before the worker dials).
fn worker(job: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["worker", "--job", job])
        .args(extra)
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("FLOTILLA_RANK")
        .env_remove("FLOTILLA_COORDINATORS")
        .output()
        .unwrap()
}

#[test]
fn a_bad_rank_is_bad_usage() {
    let out = worker("demo", &["--coordinators", "127.0.0.1:1", "--rank", "abc"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'--rank <RANK>'") && stderr.contains("expected a rank"), "{stderr}");

    // a negative rank is our refusal, not clap's tip to pass it after `--`
    // (which would give it to the trainer command)
    let out = worker("demo", &["--coordinators", "127.0.0.1:1", "--rank", "-1"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a negative rank is never valid"), "{stderr}");
    assert!(!stderr.contains("'-- -1'"), "{stderr}");

    // what `auto` cannot resolve is bad usage too
    let out = Command::new(BIN)
        .args(["worker", "--job", "demo", "--coordinators", "127.0.0.1:1", "--rank", "auto"])
        .env("JOB_COMPLETION_INDEX", "x")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: --rank auto: JOB_COMPLETION_INDEX=\"x\""), "{stderr}");

    // and so is a job name out of its form
    let out = worker("Bad_Name", &["--coordinators", "127.0.0.1:1", "--rank", "0"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: --job: invalid job name"), "{stderr}");
}

#[test]
fn a_spare_with_a_rank_or_a_worker_with_neither_is_bad_usage() {
    let out = worker("demo", &["--coordinators", "127.0.0.1:1", "--spare", "--rank", "1"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'--spare' cannot be used with '--rank <RANK>'"), "{stderr}");
    let out = worker("demo", &["--coordinators", "127.0.0.1:1"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--rank <RANK>"), "{stderr}");
}

#[test]
fn a_demo_flag_out_of_its_range_is_bad_usage() {
    let out = flotilla(&["demo", "--steps", "1"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: --coordinators and --workers must be at least 1"), "{stderr}");
}

#[test]
fn a_url_for_coordinators_points_at_endpoints() {
    for cmd in [&["worker", "--job", "demo", "--rank", "0"][..], &["node"][..]] {
        let out = Command::new(BIN)
            .args(cmd)
            .args(["--coordinators", "127.0.0.1:7201,http://127.0.0.1:9201"])
            .env_remove("FLOTILLA_COORDINATORS")
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(stderr.contains("'http://127.0.0.1:9201'"), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("HOST:PORT of the coordinators' worker API (their --api-addr)")
                && stderr.contains("--endpoints"),
            "{cmd:?}: {stderr}"
        );
    }
}

#[test]
fn an_endpoint_without_a_scheme_is_taken_as_http() {
    // a port nothing listens on: the error names the URL it tried
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = flotilla(&["status", "--endpoints", &format!("127.0.0.1:{port}")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("relative URL"), "{stderr}");
    assert!(stderr.contains(&format!("http://127.0.0.1:{port}")), "{stderr}");
}

#[test]
fn help_points_at_the_docs_and_names_spec() {
    let out = flotilla(&["submit", "--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("docs/REFERENCE.md") && !stdout.contains("SPEC §"), "{stdout}");
    let out = flotilla(&["coordinator", "--help"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.contains("--spec <FILE>"), "{stdout}");
    // `--job` is the hidden former name
    assert!(!stdout.contains("--job <"), "{stdout}");
}

#[test]
fn a_spec_file_that_cannot_be_read_names_spec() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    for flag in ["--spec", "--job"] {
        let out = Command::new(BIN)
            .args(["coordinator", "--id", "1", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("d"))
            .arg(flag)
            .arg(&missing)
            .env_remove("FLOTILLA_JOB")
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.starts_with(&format!("error: cannot read --spec {}", missing.display())), "{stderr}");
    }
}

/// A child process killed when the test ends, passing or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_one_node_coordinator_submits_its_spec_and_answers_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("alpha.toml");
    std::fs::write(&spec, job_toml("alpha", 1, &dir.path().join("ckpt"))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let http = format!("127.0.0.1:{port}");
    let _coordinator = Killed(
        Command::new(BIN)
            .args(["coordinator", "--id", "1", "--http-addr", &http, "--data-dir"])
            .arg(dir.path().join("d"))
            .arg("--spec")
            .arg(&spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // HOST:PORT, no scheme: taken as http://HOST:PORT
        let out = flotilla(&["status", "--json", "--endpoints", &http]);
        let (stdout, stderr) = text(&out);
        let submitted = out.status.success()
            && serde_json::from_str::<serde_json::Value>(&stdout).is_ok_and(|v| {
                v["jobs"].as_array().is_some_and(|jobs| jobs.iter().any(|j| j["name"] == "alpha"))
            });
        if submitted {
            break;
        }
        assert!(!stderr.contains("relative URL"), "{stderr}");
        assert!(Instant::now() < deadline, "the job of --spec never showed: {stdout} {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cancel_and_delete_without_a_job_are_bad_usage() {
    for args in [&["cancel"][..], &["delete"], &["delete", "--remove-checkpoints"]] {
        let out = flotilla(&[args, &["--endpoints", "http://127.0.0.1:1"]].concat());
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--job <JOB>"), "{args:?}: {stderr}");
    }
    let out = flotilla(&["jobs", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
}
