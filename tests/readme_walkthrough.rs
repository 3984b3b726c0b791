//! The README's hand-run walk-through ("A cluster on one machine, by hand")
//! and the examples' instructions, checked as a new user meets them: one
//! binary variable, every client command given every coordinator (so it
//! survives the leader's kill), a job long enough to type the kill steps,
//! and the same ports everywhere. Its job spec is parsed by the real parser.

use flotilla_shared::spec::JobSpec;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const CLIENT_COMMANDS: [&str; 6] = ["submit", "status", "checkpoint", "checkpoints", "restore", "replicas"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The `sh` blocks of `text` between the heading `from` and the next `## `.
fn sh_blocks(text: &str, from: &str) -> Vec<String> {
    let at = text.find(from).unwrap_or_else(|| panic!("no section {from:?}"));
    let section = &text[at + from.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split("```sh\n")
        .skip(1)
        .map(|b| b[..b.find("```").expect("a closed block")].to_string())
        .collect()
}

/// The commands of shell text: continuation lines joined, comments dropped.
fn commands(block: &str) -> Vec<String> {
    let joined = block.replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The value `NAME=...` is given in the blocks (exactly once).
fn variable(blocks: &[String], name: &str) -> String {
    let prefix = format!("{name}=");
    let defs: Vec<String> = blocks
        .iter()
        .flat_map(|b| commands(b))
        .filter(|c| c.starts_with(&prefix))
        .map(|c| c[prefix.len()..].split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(defs.len(), 1, "{name} defined once: {defs:?}");
    defs[0].clone()
}

/// Every `127.0.0.1:PORT` in `text`.
fn ports(text: &str) -> BTreeSet<u16> {
    text.match_indices("127.0.0.1:")
        .filter_map(|(at, m)| {
            let rest = &text[at + m.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// A `$B SUBCOMMAND` invocation's subcommand (the token after `$B`).
fn subcommand(cmd: &str) -> Option<&str> {
    let at = cmd.find("$B ")?;
    cmd[at + 3..].split_whitespace().next()
}

#[test]
fn the_readme_walk_through_can_be_followed_by_hand() {
    let readme = read("README.md");
    let blocks = sh_blocks(&readme, "## A cluster on one machine, by hand");
    assert!(blocks.len() >= 2, "a start and the failures: {blocks:?}");
    let all: Vec<String> = blocks.iter().flat_map(|b| commands(b)).collect();

    // one binary variable, and no command past it that names the binary otherwise
    let b = variable(&blocks, "B");
    assert!(b.ends_with("target/release/flotilla"), "{b}");
    for c in &all {
        let words: Vec<&str> = c.split_whitespace().collect();
        assert!(
            !words.iter().any(|w| *w == "flotilla" || w.contains("target/") && !c.starts_with("B=")),
            "a command that does not use $B: {c}"
        );
    }

    // the coordinators' addresses: HTTP, worker API, Raft
    let e = variable(&blocks, "E");
    let a = variable(&blocks, "A");
    let p = variable(&blocks, "P");
    assert_eq!(e.split(',').count(), 3, "all three coordinators: {e}");
    assert_eq!(a.split(',').count(), 3, "all three coordinators: {a}");
    let started = all.iter().find(|c| subcommand(c) == Some("coordinator")).expect("a coordinator command");
    // the coordinator command's ports (suffixed by the replica id) are those listed
    for (flag, list) in [("--http-addr", &e), ("--api-addr", &a)] {
        let given = started.split(flag).nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
        let stem = given.trim_end_matches("$1").trim_end_matches("$i");
        for id in 1..=3 {
            assert!(list.contains(&format!("{stem}{id}")), "{flag} {given}, replica {id}, not in {list}");
        }
    }
    assert!(started.contains("--peers $P") && p.split(',').count() == 3, "{started} / {p}");

    // every client command lists every coordinator: it survives the leader's kill
    let clients: Vec<&String> =
        all.iter().filter(|c| subcommand(c).is_some_and(|s| CLIENT_COMMANDS.contains(&s))).collect();
    assert!(clients.len() >= 6, "{clients:?}");
    for c in &clients {
        assert!(c.contains("--endpoints $E"), "a client command without every coordinator: {c}");
    }
    for c in all.iter().filter(|c| subcommand(c) == Some("worker")) {
        assert!(c.contains("--coordinators $A"), "{c}");
    }
    // the steps a user types are all there: a worker and the leader killed, status after
    let text = blocks.join("\n");
    for step in ["kill -9 ${W[", "kill -9 ${C[", "start_worker 1", "start_coordinator $L", "replicas list"] {
        assert!(text.contains(step), "missing {step:?}");
    }

    // the job runs for minutes, not seconds: time to type the kill steps
    let spec = text.split("<<'TOML'\n").nth(1).and_then(|t| t.split("\nTOML").next()).expect("a job spec");
    let spec = JobSpec::from_toml(spec).unwrap();
    let trainer = spec.trainer.expect("the built-in trainer");
    let seconds = trainer.total_steps * trainer.step_time_ms / 1000;
    assert!(seconds >= 180, "the job trains for {seconds} s only");
    assert!(spec.checkpoint.every_steps.is_some_and(|n| n * trainer.step_time_ms / 1000 <= 30));
}

#[test]
fn the_examples_use_the_main_readmes_coordinators() {
    let readme = read("README.md");
    let blocks = sh_blocks(&readme, "## A cluster on one machine, by hand");
    let coordinators = ports(&blocks.join("\n"));
    let mut pages = vec![PathBuf::from("examples/README.md")];
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let page = entry.unwrap().path().join("README.md");
        if page.exists() {
            pages.push(page.strip_prefix(repo()).unwrap().to_path_buf());
        }
    }
    assert!(pages.len() >= 4, "{pages:?}");
    for page in &pages {
        let text = read(page.to_str().unwrap());
        let mut cmds = Vec::new();
        for block in text.split("```sh\n").skip(1) {
            cmds.extend(commands(&block[..block.find("```").unwrap()]));
        }
        for c in &cmds {
            let words: Vec<&str> = c.split_whitespace().collect();
            assert!(!words.contains(&"flotilla"), "{}: use $B as the main README does: {c}", page.display());
            if subcommand(c).is_some_and(|s| CLIENT_COMMANDS.contains(&s)) {
                assert!(c.contains("--endpoints $E"), "{}: {c}", page.display());
            }
            if subcommand(c) == Some("worker") {
                assert!(c.contains("--coordinators $A"), "{}: {c}", page.display());
            }
            // a coordinator's address written out is one of the main README's
            for port in ports(c) {
                let worker_http = c.contains(&format!("--http-addr 127.0.0.1:{port}"));
                assert!(
                    worker_http || coordinators.contains(&port),
                    "{}: port {port} is none of the main README's coordinators {coordinators:?}: {c}",
                    page.display()
                );
            }
        }
        assert!(!cmds.is_empty() || page == Path::new("examples/README.md"), "{}", page.display());
    }
}
