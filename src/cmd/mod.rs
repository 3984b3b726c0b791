//! The commands' bodies, one module per group, and the helpers they
//! share: tokens, clients, the hostname, signals, tables.

pub(crate) mod admin;
pub(crate) mod bench;
pub(crate) mod inspect;
pub(crate) mod jobs;
pub(crate) mod serve;
pub(crate) mod status;

use crate::cli::{BenchCommand, Cli, ClientArgs, Command};
use crate::{bench_exec, demo};
use anyhow::{bail, Context, Result};
use flotilla_coordinator::client::Client;
use flotilla_shared::frame::Tokens;
use std::path::PathBuf;

/// Bad usage found after parsing (a flag's value out of its range or form):
/// exit code 2, as clap gives every usage error it finds itself.
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

impl From<flotilla_coordinator::serve::FlagError> for Usage {
    fn from(e: flotilla_coordinator::serve::FlagError) -> Self {
        Self(e.message)
    }
}

/// A command whose output goes to a terminal or a pipe and nowhere else
/// (`inspect DIR | head`): it ends quietly when the reader goes away, as
/// `cat` does, instead of panicking on the failed write. Servers keep
/// SIGPIPE ignored (a dead peer is an error to handle, never a signal).
#[allow(unsafe_code)]
fn end_quietly_on_closed_pipe() {
    // SAFETY: restoring the default disposition of SIGPIPE, before any
    // thread is started, touches no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs the command the command line names.
pub(crate) fn run(cli: Cli) -> Result<()> {
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Checkpoints(_)
            | Command::Inspect(_)
            | Command::Submit(_)
            | Command::Checkpoint(_)
            | Command::Restore(_)
            | Command::Replicas(_)
            | Command::Jobs(_)
            | Command::Cancel(_)
            | Command::Delete(_)
    ) {
        end_quietly_on_closed_pipe();
    }
    match cli.command {
        Command::Coordinator(args) => serve::run_coordinator(args),
        Command::Worker(args) => serve::run_worker(args),
        Command::Node(args) => serve::run_node(args),
        Command::Demo(args) => {
            let matched = multi_thread()?.block_on(demo::run(args))?;
            if !matched {
                bail!("the final digest differs from the failure-free reference");
            }
            Ok(())
        }
        Command::Submit(args) => block_on(admin::run_submit(args)),
        Command::Status(args) => block_on(status::run_status(args)),
        Command::Jobs(args) => block_on(jobs::run_jobs(args)),
        Command::Cancel(args) => block_on(jobs::run_cancel(args)),
        Command::Delete(args) => block_on(jobs::run_delete(args)),
        Command::Checkpoint(args) => block_on(admin::run_checkpoint(args)),
        Command::Checkpoints(args) => block_on(admin::run_checkpoints(args)),
        Command::Restore(args) => block_on(admin::run_restore(args)),
        Command::Inspect(args) => inspect::run_inspect(args),
        Command::Certs(args) => admin::run_certs(args),
        Command::Replicas(cmd) => block_on(admin::run_replicas(cmd)),
        Command::Bench(BenchCommand::Snapshot(args)) => bench::run_bench_snapshot(args),
        Command::Bench(BenchCommand::Copy(args)) => bench::run_bench_copy(args),
        Command::Bench(BenchCommand::Raft(args)) => block_on(bench::run_bench_raft(args)),
        Command::Bench(BenchCommand::Exec(args)) => multi_thread()?.block_on(bench_exec::run(args)),
        Command::Bench(BenchCommand::SimWorkers(args)) => bench::run_sim_workers(args),
        Command::Bench(BenchCommand::Coordinator(args)) => {
            multi_thread()?.block_on(bench::run_bench_coordinator(args))
        }
    }
}

fn multi_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `1 rank`, `4 ranks`: a count with its noun.
pub(crate) fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

pub(crate) fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// The token a client or worker presents: the first of its file.
pub(crate) fn read_token(path: Option<&PathBuf>) -> Result<Option<String>> {
    Ok(read_secret("--token-file", path)?.map(|t| t.present().to_string()))
}

/// A token file: one token per line (several while rotating; the first is
/// presented, any is accepted).
pub(crate) fn read_secret(flag: &str, path: Option<&PathBuf>) -> Result<Option<Tokens>> {
    path.map(|p| {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {flag} {}", p.display()))?;
        Tokens::parse(&text)
            .with_context(|| format!("{flag} {} holds no token; put the token in it", p.display()))
    })
    .transpose()
}

pub(crate) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A token cancelled on the first SIGINT or SIGTERM (call inside the runtime).
pub(crate) fn cancel_on_signal() -> Result<tokio_util::sync::CancellationToken> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    Ok(shutdown)
}

/// The client of the client commands. An endpoint given as HOST:PORT is
/// taken as `http://HOST:PORT` (`https://` with --tls-ca), as a browser
/// would, instead of refused as a URL without a scheme.
pub(crate) fn client(args: &ClientArgs) -> Result<Client> {
    let scheme = if args.tls_ca.is_some() { "https" } else { "http" };
    let endpoints = args.endpoints.iter().map(|e| with_scheme(e, scheme)).collect();
    let client = Client::new(endpoints, read_token(args.token_file.as_ref())?);
    match &args.tls_ca {
        Some(ca) => client.with_ca(ca).map_err(anyhow::Error::msg),
        None => Ok(client),
    }
}

/// `endpoint` as a URL: as given when it names a scheme, else `scheme://endpoint`.
fn with_scheme(endpoint: &str, scheme: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{scheme}://{endpoint}")
    }
}

/// Rows under a header, each column as wide as its widest cell, numbers
/// (`true`) right-aligned, text left-aligned; trailing blanks trimmed.
pub(crate) fn table(columns: &[(&str, bool)], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns.iter().zip(&widths))
            .map(|(cell, ((_, right), w))| if *right { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The longest silence after which a replica still counts as reachable: a
/// live replica answers the leader's heartbeats (every 200 ms) many times
/// within it. `status` and `replicas list` both judge by it; raft-rs's own
/// `recent_active` is no such judgement, since the leader clears it on
/// every quorum check and a healthy follower reads inactive until its next
/// answer.
pub(crate) const REACHABLE_WITHIN_MS: u64 = 2_000;

/// Whether the leader heard from a replica within [`REACHABLE_WITHIN_MS`],
/// and when it last did, in words.
pub(crate) fn contact(last_contact_ms: Option<u64>) -> (bool, String) {
    (
        last_contact_ms.is_some_and(|ms| ms <= REACHABLE_WITHIN_MS),
        last_contact_ms.map_or("never".into(), |ms| format!("{:.1} s ago", ms as f64 / 1e3)),
    )
}
