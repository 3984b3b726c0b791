//! Network partitions end to end: real `flotilla` processes, each in its own
//! Linux network namespace, cut off with iptables DROP rules. Needs root,
//! `ip netns` and iptables; without them each test prints `skipped: <why>`
//! and passes (`FLOTILLA_REQUIRE_NETNS=1` turns a skip into a failure, for CI
//! machines that must run it).
//!
//! ```text
//!                 switch namespace: bridge br0
//!     ┌───────┬───────┬───────┼───────┬───────┬───────┐
//!    c1      c2      c3      w0      w1      w2     the test (root namespace)
//!   .11     .12     .13     .20     .21     .22     .254        10.A.B.0/24
//! ```
//! One namespace per coordinator replica and per worker, each with a veth to
//! the bridge; the test process reads every `/v1/status` over its own veth.
//! A partition is an iptables ruleset inside one namespace that drops every
//! packet in and out except loopback and the test's address: the others'
//! TCP connections to the isolated process hang (no reset, no FIN), the hard
//! case, while the test can still watch the isolated process.
//!
//! The tests assert outcomes, never timings: an isolated leader stops
//! leading, the majority elects a leader of a higher term and the job goes on
//! under it, the isolated replica's log commits nothing meanwhile, healing
//! brings it back as a follower that catches up, the job ends `succeeded`
//! with the digest of a failure-free run, and every committed checkpoint on
//! disk is of one generation (directives of two leaders acted upon would
//! break one of these).

mod common;

use common::BIN;
use flotilla_coordinator::api::ClusterStatus;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::raft::node::Role;
use flotilla_shared::ids::NodeId;
use flotilla_shared::layout::{JobDir, Manifest};
use flotilla_shared::shard::read_header;
use flotilla_shared::spec::JobSpec;
use flotilla_worker::trainer::reference_digest;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The longest election timeout of the coordinators' default `NodeConfig`
/// (12 ticks of 50 ms, randomized up to twice that).
const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(1200);
/// How long an isolated leader may take to notice it lost its quorum: many
/// election timeouts, because these machines are shared and noisy.
const STEP_DOWN_DEADLINE: Duration = Duration::from_millis(1200 * 20);
/// A phase's deadline.
const PHASE: Duration = Duration::from_secs(45);
/// `1` turns a skip into a failure.
const REQUIRE_ENV: &str = "FLOTILLA_REQUIRE_NETNS";
/// `1` keeps the logs, data and checkpoints of a passing run too (a failing
/// run always keeps them).
const KEEP_ENV: &str = "FLOTILLA_TEST_KEEP";
/// The job's name.
const JOB: &str = "part";

/// One scenario at a time: each runs 6 processes on what may be 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! phase {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        tracing::info!("--- {line}");
        eprintln!("--- {line}");
    }};
}

/// Polls `$probe` (an expression yielding `Result<T, String>`, re-evaluated
/// each turn) until it is `Ok`; fails at once when a process exited that
/// should not have, and after `$timeout` with the last observation and a
/// picture of the whole cluster.
macro_rules! wait_until {
    ($s:expr, $what:expr, $timeout:expr, $probe:expr) => {{
        let timeout: Duration = $timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = $s.check_processes() {
                panic!("while waiting for {}: {e}\n{}", $what, $s.diagnose().await);
            }
            let r = $probe;
            match r {
                Ok(v) => break v,
                Err(last) if Instant::now() > deadline => {
                    panic!(
                        "timed out after {timeout:?} waiting for {}; last: {last}\n{}",
                        $what,
                        $s.diagnose().await
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }};
}

// ---------------------------------------------------------------------------
// commands

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{cmd} {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Runs `args` inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Feeds `rules` to `iptables-restore` inside `ns` (atomic: all or nothing).
fn iptables_restore(ns: &str, rules: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore in {ns}: {e}"))?;
    child.stdin.take().expect("piped").write_all(rules.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("iptables-restore in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Whether a TCP connection from inside `ns` to `addr` (`ip:port`) opens
/// within 2 s.
fn tcp_reachable(ns: &str, addr: &str) -> bool {
    let (host, port) = addr.rsplit_once(':').expect("ip:port");
    in_ns(ns, &["timeout", "2", "bash", "-c", "exec 3<>/dev/tcp/$0/$1", host, port]).is_ok()
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Why these tests cannot run here, if they cannot.
fn preflight() -> Result<(), String> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => return Err(format!("not root (uid {uid}); network namespaces and iptables need root")),
        None => return Err("cannot read the uid from /proc/self/status (not Linux?)".into()),
    }
    ip(&["netns", "list"]).map_err(|e| format!("`ip netns` is unavailable (install iproute2): {e}"))?;
    run("iptables-restore", &["--version"])
        .map_err(|e| format!("iptables is unavailable (scripts/test.sh installs it): {e}"))?;
    run("bash", &["--version"]).map_err(|e| format!("bash is unavailable: {e}"))?;
    Ok(())
}

/// Prints `skipped: <why>`, or fails where `FLOTILLA_REQUIRE_NETNS=1`.
fn skip(why: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but the partition test cannot run here: {why}");
    }
    eprintln!("skipped: {why}");
}

// ---------------------------------------------------------------------------
// the network

/// A host on the test network: its namespace and address.
#[derive(Debug, Clone)]
struct Host {
    ns: String,
    addr: String,
}

/// A bridge in its own namespace, one namespace per host, and a veth for the
/// test process. Dropping it deletes every namespace it made (the veths go
/// with them), also when a test panics.
struct Net {
    tag: String,
    prefix: String,
    switch: String,
    namespaces: Vec<String>,
}

impl Net {
    /// A fresh network; `variant` tells apart the tests of one run. Names
    /// and the subnet derive from the pid, so parallel runs do not collide.
    fn new(variant: u32) -> Result<Self, String> {
        let pid = std::process::id();
        let tag = format!("fp{}{variant}", pid % 100_000);
        let in_use = format!("{}{}", ip(&["-4", "-o", "addr", "show"])?, ip(&["-4", "route", "show"])?);
        let mut n = pid.wrapping_mul(4).wrapping_add(variant);
        let prefix = loop {
            let p = format!("10.{}.{}", 100 + (n >> 8) % 150, n % 256);
            if !in_use.contains(&format!("{p}.")) {
                break p;
            }
            n = n.wrapping_add(4);
        };
        let mut net = Self { switch: format!("flotilla-{tag}-sw"), tag, prefix, namespaces: Vec::new() };
        let sw = net.switch.clone();
        net.add_ns(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        // the test's own port on the bridge
        let (root_if, port) = (format!("{}r", net.tag), format!("{}rb", net.tag));
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", &port, "netns", &sw])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", net.test_addr()), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        Ok(net)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        // a leftover of a killed run that had this pid
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The test process's address.
    fn test_addr(&self) -> String {
        format!("{}.254", self.prefix)
    }

    /// A namespace `name` on the bridge with address `.host`.
    fn add_host(&mut self, name: &str, host: u8) -> Result<Host, String> {
        let ns = format!("flotilla-{}-{name}", self.tag);
        self.add_ns(&ns)?;
        let (inner, outer) = (format!("{}{name}", self.tag), format!("{}{name}b", self.tag));
        ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns", &self.switch])?;
        ip(&["link", "set", &inner, "netns", &ns])?;
        ip(&["-n", &self.switch, "link", "set", &outer, "master", "br0", "up"])?;
        let addr = format!("{}.{host}", self.prefix);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &inner])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        Ok(Host { ns, addr })
    }

    /// Cuts `host` off from everyone but itself and the test process.
    fn isolate(&self, host: &Host) -> Result<(), String> {
        let test = self.test_addr();
        iptables_restore(
            &host.ns,
            &format!(
                "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                 -A INPUT -i lo -j ACCEPT\n-A OUTPUT -o lo -j ACCEPT\n\
                 -A INPUT -s {test}/32 -j ACCEPT\n-A OUTPUT -d {test}/32 -j ACCEPT\n\
                 -A INPUT -j DROP\n-A OUTPUT -j DROP\nCOMMIT\n"
            ),
        )
    }

    /// Packets dropped so far by `isolate`'s rules, in and out.
    fn dropped(&self, host: &Host) -> Result<(u64, u64), String> {
        let count = |chain: &str| -> Result<u64, String> {
            let listing = in_ns(&host.ns, &["iptables", "-L", chain, "-v", "-n", "-x"])?;
            Ok(listing
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.get(2) == Some(&"DROP")).then(|| f[0].parse::<u64>().unwrap_or(0))
                })
                .sum())
        };
        Ok((count("INPUT")?, count("OUTPUT")?))
    }

    /// Removes `isolate`'s rules.
    fn heal(&self, host: &Host) -> Result<(), String> {
        iptables_restore(
            &host.ns,
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // hosts first, the switch (with the test's veth peer) last
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// processes

/// A `flotilla` process inside a namespace.
struct Proc {
    name: String,
    log: PathBuf,
    child: Option<Child>,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, ns: &str, args: &[String], log: PathBuf) -> Self {
        let file = File::options().create(true).append(true).open(&log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, _) in std::env::vars() {
            if k.starts_with("FLOTILLA_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name} in {ns}: {e}"));
        Self { name: name.to_string(), log, child: Some(child), exited: None }
    }

    /// Its exit status once it exited (reaped here).
    fn poll(&mut self) -> Option<ExitStatus> {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                self.exited = Some(status);
                self.child = None;
            }
        }
        self.exited
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `n` lines of its log.
    fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| format!("    {}", l.chars().take(400).collect::<String>()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Coord {
    id: u64,
    host: Host,
    proc: Proc,
}

impl Coord {
    fn raft_addr(&self) -> String {
        format!("{}:7000", self.host.addr)
    }
    fn api_addr(&self) -> String {
        format!("{}:7100", self.host.addr)
    }
    fn http_addr(&self) -> String {
        format!("{}:9200", self.host.addr)
    }
    fn url(&self) -> String {
        format!("http://{}", self.http_addr())
    }
}

struct Worker {
    rank: u32,
    host: Host,
    proc: Option<Proc>,
}

impl Worker {
    fn http_addr(&self) -> String {
        format!("{}:9300", self.host.addr)
    }
}

// ---------------------------------------------------------------------------
// the scenario

/// 3 coordinators and `world` workers, each in its own namespace.
struct Scenario {
    coords: Vec<Coord>,
    workers: Vec<Worker>,
    http: reqwest::Client,
    spec: JobSpec,
    text: String,
    /// Set once the job may end: workers exiting 0 is then expected.
    ending: bool,
    dir: Option<tempfile::TempDir>,
    /// Declared last: dropped after every process is gone.
    net: Net,
}

impl Scenario {
    /// The network and the coordinators, or why the test must skip.
    fn start(variant: u32, world: u32, steps: u64, every: u64) -> Result<Self, String> {
        preflight()?;
        let mut net = Net::new(variant).map_err(|e| format!("cannot build the test network: {e}"))?;
        let mut hosts = Vec::new();
        for i in 1..=3u8 {
            hosts.push(
                net.add_host(&format!("c{i}"), 10 + i)
                    .map_err(|e| format!("cannot build a namespace: {e}"))?,
            );
        }
        let mut whosts = Vec::new();
        for r in 0..world {
            whosts.push(
                net.add_host(&format!("w{r}"), 20 + r as u8)
                    .map_err(|e| format!("cannot build a namespace: {e}"))?,
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "name = \"{JOB}\"\nworld_size = {world}\n\n[checkpoint]\nevery_steps = {every}\nkeep_last = 3\nroot = \"{}\"\n\n\
             [trainer]\ntotal_steps = {steps}\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 7\n",
            dir.path().join("ckpt").display()
        );
        let spec = JobSpec::from_toml(&text).expect("a valid spec");
        let peers =
            (1..=3).map(|i| format!("{i}={}.{}:7000", net.prefix, 10 + i)).collect::<Vec<_>>().join(",");
        let coords = hosts
            .into_iter()
            .zip(1u64..)
            .map(|(host, id)| {
                let (http, api) = (format!("{}:9200", host.addr), format!("{}:7100", host.addr));
                let data = dir.path().join(format!("c{id}"));
                let args: Vec<String> = vec![
                    "coordinator".into(),
                    "--id".into(),
                    id.to_string(),
                    "--peers".into(),
                    peers.clone(),
                    "--http-addr".into(),
                    http,
                    "--api-addr".into(),
                    api,
                    "--data-dir".into(),
                    data.display().to_string(),
                    // private network namespaces, no one else on them
                    "--insecure".into(),
                ];
                let proc =
                    Proc::spawn(&format!("c{id}"), &host.ns, &args, dir.path().join(format!("c{id}.log")));
                Coord { id, host, proc }
            })
            .collect();
        let workers = whosts
            .into_iter()
            .enumerate()
            .map(|(r, host)| Worker { rank: r as u32, host, proc: None })
            .collect();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("http client");
        Ok(Self { coords, workers, http, spec, text, ending: false, dir: Some(dir), net })
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the scenario's directory").path()
    }

    fn spawn_workers(&mut self) {
        let coordinators = self.coords.iter().map(Coord::api_addr).collect::<Vec<_>>().join(",");
        let dir = self.dir().to_path_buf();
        for w in &mut self.workers {
            let args: Vec<String> = vec![
                "worker".into(),
                "--coordinators".into(),
                coordinators.clone(),
                "--job".into(),
                JOB.into(),
                "--rank".into(),
                w.rank.to_string(),
                "--http-addr".into(),
                w.http_addr(),
            ];
            let name = format!("worker {}", w.rank);
            w.proc = Some(Proc::spawn(&name, &w.host.ns, &args, dir.join(format!("w{}.log", w.rank))));
        }
    }

    /// A client of the coordinators `among` (indexes into `coords`).
    fn client(&self, among: &[usize]) -> Client {
        Client::new(among.iter().map(|&i| self.coords[i].url()).collect(), None)
    }

    /// Replica `i`'s own status (not redirected to the leader).
    async fn status(&self, i: usize) -> Result<ClusterStatus, String> {
        // every job: the only one, once submitted
        let url = format!("{}/v1/status", self.coords[i].url());
        let resp = self.http.get(&url).send().await.map_err(|e| format!("c{}: {e}", i + 1))?;
        if !resp.status().is_success() {
            return Err(format!("c{}: {} {}", i + 1, resp.status(), resp.text().await.unwrap_or_default()));
        }
        resp.json().await.map_err(|e| format!("c{}: invalid status: {e}", i + 1))
    }

    /// Rank `r`'s worker status.
    async fn worker_status(&self, r: usize) -> Result<serde_json::Value, String> {
        let url = format!("http://{}/v1/status", self.workers[r].http_addr());
        let resp = self.http.get(&url).send().await.map_err(|e| format!("worker {r}: {e}"))?;
        resp.json().await.map_err(|e| format!("worker {r}: invalid status: {e}"))
    }

    /// The one leader that every replica of `among` names and that says
    /// it leads; its index.
    async fn agreed_leader(&self, among: &[usize]) -> Result<(usize, ClusterStatus), String> {
        let mut views = Vec::new();
        for &i in among {
            views.push(self.status(i).await?);
        }
        let leader = views[0].leader_id.ok_or_else(|| format!("c{} knows no leader", among[0] + 1))?;
        for v in &views {
            if v.leader_id != Some(leader) {
                return Err(format!(
                    "c{} names leader {:?}, c{} names {leader}",
                    v.node_id, v.leader_id, views[0].node_id
                ));
            }
        }
        let li = self.index(leader);
        let lv = views
            .into_iter()
            .find(|v| v.node_id == leader)
            .ok_or_else(|| format!("the leader c{leader} is outside {among:?}"))?;
        if lv.role != Role::Leader {
            return Err(format!("c{leader} is named leader but is {:?}", lv.role));
        }
        Ok((li, lv))
    }

    fn index(&self, id: NodeId) -> usize {
        self.coords.iter().position(|c| c.id == id.0).expect("a known replica")
    }

    /// Every worker registered with the coordinator whose api address is
    /// `attached_to` (or any but `not_to`), at `generation`.
    async fn workers_settled(
        &self,
        attached_to: Option<&str>,
        not_to: Option<&str>,
        generation: u64,
    ) -> Result<(), String> {
        for r in 0..self.workers.len() {
            let w = self.worker_status(r).await?;
            let at = w["coordinator"].as_str().unwrap_or("");
            let summary = format!(
                "worker {r}: registered {}, coordinator {at}, generation {}, step {}, state {}",
                w["registered"], w["generation"], w["step"], w["state"]
            );
            if w["registered"] != true
                || attached_to.is_some_and(|a| a != at)
                || not_to.is_some_and(|a| a == at)
                || w["generation"].as_u64() != Some(generation)
            {
                return Err(format!("{summary} (want generation {generation})"));
            }
        }
        Ok(())
    }

    /// Which coordinator (api address) each worker says it is registered
    /// with, and at which generation and step.
    async fn attachments(&self) -> String {
        let mut out = Vec::new();
        for r in 0..self.workers.len() {
            out.push(match self.worker_status(r).await {
                Ok(w) => format!(
                    "rank {r} -> {} (gen {}, step {})",
                    w["coordinator"].as_str().unwrap_or("none"),
                    w["generation"],
                    w["step"]
                ),
                Err(e) => e,
            });
        }
        out.join(", ")
    }

    /// Fails when a coordinator exited, or a worker exited while the job
    /// had not ended (or with a failure at any time).
    fn check_processes(&mut self) -> Result<(), String> {
        for c in &mut self.coords {
            if let Some(status) = c.proc.poll() {
                return Err(format!("coordinator c{} exited ({status}):\n{}", c.id, c.proc.tail(20)));
            }
        }
        for w in &mut self.workers {
            if let Some(p) = &mut w.proc {
                if let Some(status) = p.poll() {
                    if !status.success() || !self.ending {
                        return Err(format!(
                            "worker {} exited ({status}) before the job ended:\n{}",
                            w.rank,
                            p.tail(20)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every replica's and worker's view and the tail of each log.
    async fn diagnose(&self) -> String {
        let mut out = String::from("cluster at the failure:\n");
        for (i, c) in self.coords.iter().enumerate() {
            match self.status(i).await {
                Ok(s) => {
                    out += &format!(
                        "  c{} {}: role {:?} term {} leader {:?} commit {}",
                        c.id, c.host.addr, s.role, s.term, s.leader_id, s.commit_index
                    );
                    if let Some(j) = s.jobs.first() {
                        out += &format!(
                            "; job {} gen {} step {} restores {} latest {:?} error {:?} workers {:?}",
                            j.state,
                            j.generation,
                            j.step,
                            j.restores,
                            j.latest_committed.map(|c| (c.id.0, c.step.0)),
                            j.error,
                            j.workers.iter().map(|w| (w.rank.0, w.state, w.step.0)).collect::<Vec<_>>()
                        );
                    }
                    out += "\n";
                }
                Err(e) => out += &format!("  c{} {}: no status: {e}\n", c.id, c.host.addr),
            }
        }
        for r in 0..self.workers.len() {
            match self.worker_status(r).await {
                Ok(w) => out += &format!("  worker {r}: {w}\n"),
                Err(e) => out += &format!("  worker {r}: no status: {e}\n"),
            }
        }
        let procs =
            self.coords.iter().map(|c| &c.proc).chain(self.workers.iter().filter_map(|w| w.proc.as_ref()));
        for p in procs {
            out += &format!("  last lines of {} ({}):\n{}\n", p.name, p.log.display(), p.tail(8));
        }
        out
    }

    /// The failure-free run's digest.
    fn reference(&self) -> String {
        reference_digest(self.spec.trainer.as_ref().expect("a trainer"), self.spec.world_size)
    }

    /// Every committed checkpoint on disk has one shard per rank, all of the
    /// checkpoint's own generation and step, every checksum right; returns
    /// how many.
    fn check_committed_checkpoints(&self) -> usize {
        let job_dir = JobDir::new(&self.dir().join("ckpt"), &self.spec.name);
        let mut n = 0;
        for (id, dir) in job_dir.list_checkpoint_dirs().expect("list checkpoints") {
            let Ok(manifest) = Manifest::read(&dir) else { continue };
            n += 1;
            assert_eq!(manifest.ranks.len() as u32, self.spec.world_size, "checkpoint {id}");
            for shard in &manifest.ranks {
                let header = read_header(&dir.join(&shard.file), "test").expect("shard header");
                assert_eq!(
                    (header.meta.generation, header.meta.step),
                    (manifest.generation, manifest.step),
                    "checkpoint {id} rank {}: a shard of another generation or step",
                    shard.rank
                );
            }
            let out = Command::new(BIN).args(["inspect", "--verify", dir.to_str().expect("utf-8")]).output();
            let out = out.expect("run flotilla inspect");
            assert!(out.status.success(), "checkpoint {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        n
    }

    /// Waits for the job to succeed under the majority `among`, checks the
    /// digest against the failure-free run, the checkpoints on disk, and
    /// that every worker exits 0.
    async fn finish(&mut self, among: &[usize]) {
        phase!("the job ends succeeded with the failure-free digest");
        self.ending = true;
        let client = self.client(among);
        let done = wait_until!(
            self,
            "the job to succeed",
            Duration::from_secs(90),
            async {
                let job = client
                    .status(Some(JOB))
                    .await
                    .map_err(|e| e.to_string())?
                    .jobs
                    .into_iter()
                    .next()
                    .ok_or("no job")?;
                if job.state == "succeeded" {
                    Ok(job)
                } else {
                    Err(format!(
                        "state {} gen {} step {} restores {}",
                        job.state, job.generation, job.step, job.restores
                    ))
                }
            }
            .await
        );
        assert_eq!(
            done.final_digest.as_deref(),
            Some(self.reference().as_str()),
            "the final digest differs from the failure-free run's: directives of two leaders were acted upon, or a restore lost state"
        );
        let n = self.check_committed_checkpoints();
        assert!(n >= 1, "no committed checkpoint left on disk");
        eprintln!(
            "    digest matches; {n} committed checkpoints on disk, each of one generation, checksums right"
        );
        wait_until!(self, "every worker to exit 0 after the job ended", PHASE, {
            let mut running = Vec::new();
            for w in &mut self.workers {
                if w.proc.as_mut().is_some_and(|p| p.poll().is_none()) {
                    running.push(w.rank);
                }
            }
            if running.is_empty() {
                Ok(())
            } else {
                Err(format!("ranks {running:?} still running"))
            }
        });
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(p) = &mut w.proc {
                p.kill();
            }
        }
        for c in &mut self.coords {
            c.proc.kill();
        }
        if std::thread::panicking() || std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("logs, data and checkpoints kept in {}", dir.keep().display());
            }
        }
    }
}

/// Starts the scenario, or says why it is skipped.
fn start_or_skip(variant: u32, world: u32, steps: u64, every: u64) -> Option<Scenario> {
    match Scenario::start(variant, world, steps, every) {
        Ok(s) => Some(s),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// Waits for a leader of all three replicas, submits the job, starts the
/// workers, and waits until the job runs with a committed checkpoint and
/// every worker is registered with that leader; returns the leader's index
/// and status.
async fn run_job_under_a_leader(s: &mut Scenario) -> (usize, ClusterStatus) {
    phase!(
        "3 coordinators and {} workers, each in its own namespace on {}.0/24",
        s.workers.len(),
        s.net.prefix
    );
    wait_until!(s, "a leader all three replicas agree on", PHASE, s.agreed_leader(&[0, 1, 2]).await);
    s.client(&[0, 1, 2]).submit(&s.text).await.expect("submit the job");
    s.spawn_workers();
    wait_until!(
        s,
        "the job to run with a committed checkpoint, every worker registered with the leader",
        PHASE,
        async {
            let (li, lv) = s.agreed_leader(&[0, 1, 2]).await?;
            let job = lv.jobs.first().ok_or("no job")?;
            if job.state != "running" || job.latest_committed.is_none() {
                return Err(format!(
                    "job {} gen {} step {} latest {:?}",
                    job.state, job.generation, job.step, job.latest_committed
                ));
            }
            s.workers_settled(Some(&s.coords[li].api_addr()), None, job.generation.0).await?;
            Ok((li, lv))
        }
        .await
    )
}

// ---------------------------------------------------------------------------
// the tests

#[tokio::test(flavor = "multi_thread")]
async fn isolated_leader_steps_down_the_majority_goes_on_and_healing_converges() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(mut s) = start_or_skip(1, 3, 3000, 100) else { return };
    let (li, before) = run_job_under_a_leader(&mut s).await;
    let majority: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let old = s.coords[li].id;
    let job0 = before.jobs[0].clone();
    let committed0 = job0.latest_committed.expect("a committed checkpoint");

    phase!(
        "isolate the leader c{old} (term {}, commit {}; job step {}, latest committed {})",
        before.term,
        before.commit_index,
        job0.step,
        committed0.id
    );
    s.net.isolate(&s.coords[li].host).expect("isolate the leader");
    let isolated_at = Instant::now();
    // the partition landed on the live leader: right after, it still holds
    // the term it led in (pre-vote keeps an isolated replica's term)
    let after = s.status(li).await.expect("the test still reaches the isolated replica");
    assert_eq!(
        after.term, before.term,
        "c{old} changed term while being isolated; it was not the live leader"
    );
    phase!("the isolated c{old} stops leading (election timeout up to {ELECTION_TIMEOUT_MAX:?})");
    let stepped = wait_until!(
        s,
        format!("c{old} to step down"),
        STEP_DOWN_DEADLINE,
        async {
            let st = s.status(li).await?;
            if st.role != Role::Leader {
                Ok(st)
            } else {
                Err(format!("c{old} still says leader in term {}", st.term))
            }
        }
        .await
    );
    eprintln!("    c{old} is {:?} ({:?} after the partition)", stepped.role, isolated_at.elapsed());

    phase!("the majority elects a new leader of a higher term");
    let (ni, nv) = wait_until!(
        s,
        "a new leader among the majority",
        PHASE,
        async {
            let (ni, nv) = s.agreed_leader(&majority).await?;
            if nv.term > before.term {
                Ok((ni, nv))
            } else {
                Err(format!("c{} leads in term {}, not above {}", nv.node_id, nv.term, before.term))
            }
        }
        .await
    );
    eprintln!(
        "    c{} leads in term {} ({:?} after the partition)",
        s.coords[ni].id,
        nv.term,
        isolated_at.elapsed()
    );

    // the partition is real: cut off both ways, while the others still talk
    let (iso, peer, other) = (&s.coords[li], &s.coords[majority[0]], &s.coords[majority[1]]);
    assert!(!tcp_reachable(&iso.host.ns, &peer.raft_addr()), "c{old} still reaches c{}", peer.id);
    assert!(!tcp_reachable(&peer.host.ns, &iso.http_addr()), "c{} still reaches c{old}", peer.id);
    assert!(!tcp_reachable(&s.workers[0].host.ns, &iso.api_addr()), "worker 0 still reaches c{old}");
    assert!(
        tcp_reachable(&peer.host.ns, &other.raft_addr()),
        "the majority c{} c{} cannot talk",
        peer.id,
        other.id
    );

    phase!("training goes on under the majority: progress and a checkpoint committed after the partition");
    let moved_on = wait_until!(s, "a checkpoint committed by the majority, every worker attached to it", PHASE, async {
        let (ni, nv) = s.agreed_leader(&majority).await?;
        let job = nv.jobs.first().ok_or("no job")?.clone();
        let latest = job.latest_committed.ok_or("no committed checkpoint")?;
        if job.state != "running" || latest.id <= committed0.id || job.step.0 < job0.step.0 + 100 {
            return Err(format!(
                "job {} gen {} step {} restores {} latest {:?} (at the partition: step {}, latest {}); workers attached to: {}",
                job.state,
                job.generation,
                job.step,
                job.restores,
                latest,
                job0.step,
                committed0.id,
                s.attachments().await
            ));
        }
        s.workers_settled(None, Some(&s.coords[li].api_addr()), job.generation.0).await?;
        Ok((ni, nv))
    }
    .await);
    let job1 = &moved_on.1.jobs[0];
    eprintln!(
        "    job at step {} generation {} ({} restores), checkpoint {} at step {} committed",
        job1.step,
        job1.generation,
        job1.restores,
        job1.latest_committed.unwrap().id,
        job1.latest_committed.unwrap().step
    );

    phase!("meanwhile the isolated c{old} committed nothing and never led again");
    let iso_now = s.status(li).await.expect("the isolated replica's status");
    assert_ne!(iso_now.role, Role::Leader, "c{old} leads again while isolated");
    assert_eq!(iso_now.commit_index, stepped.commit_index, "c{old} committed entries while isolated");
    let (dropped_in, dropped_out) = s.net.dropped(&s.coords[li].host).expect("read the drop counters");
    assert!(dropped_in > 0, "no packet to c{old} was dropped: the partition did not hit");
    eprintln!(
        "    c{old}: {:?}, commit {}; dropped {dropped_in} packets in, {dropped_out} out",
        iso_now.role, iso_now.commit_index
    );

    phase!("heal: c{old} rejoins as a follower and catches up");
    let leader_commit = s.status(moved_on.0).await.expect("the leader's status").commit_index;
    s.net.heal(&s.coords[li].host).expect("heal");
    wait_until!(
        s,
        format!("c{old} to follow and catch up"),
        PHASE,
        async {
            let (ni, nv) = s.agreed_leader(&[0, 1, 2]).await?;
            let st = s.status(li).await?;
            if ni != li && st.role == Role::Follower && st.term == nv.term && st.commit_index >= leader_commit
            {
                Ok(())
            } else {
                Err(format!(
                "c{old}: {:?} term {} commit {} (leader c{} term {} commit {}; at the heal {leader_commit})",
                st.role,
                st.term,
                st.commit_index,
                nv.node_id,
                nv.term,
                nv.commit_index
            ))
            }
        }
        .await
    );
    s.finish(&[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_worker_is_restored_around_and_rejoins_after_healing() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(mut s) = start_or_skip(2, 3, 2000, 100) else { return };
    let (li, before) = run_job_under_a_leader(&mut s).await;
    let job0 = before.jobs[0].clone();
    let victim = s.workers.len() - 1;

    phase!("isolate worker {victim} (job generation {}, step {})", job0.generation, job0.step);
    s.net.isolate(&s.workers[victim].host).expect("isolate the worker");
    assert!(
        !tcp_reachable(&s.workers[victim].host.ns, &s.coords[li].api_addr()),
        "worker {victim} still reaches the leader"
    );

    phase!("the coordinators declare it failed and restore the job in a new generation");
    let restored = wait_until!(
        s,
        "a whole-job restore",
        PHASE,
        async {
            let job = s.client(&[0, 1, 2]).status(Some(JOB)).await.map_err(|e| e.to_string())?.jobs.remove(0);
            if job.generation > job0.generation && job.restores > job0.restores {
                Ok(job)
            } else {
                Err(format!(
                    "job {} gen {} restores {} step {}",
                    job.state, job.generation, job.restores, job.step
                ))
            }
        }
        .await
    );
    eprintln!(
        "    job {} in generation {} ({} restores)",
        restored.state, restored.generation, restored.restores
    );
    // the isolated worker did not exit (check_processes ran all along) and
    // never took part in the new generation
    let w = s.worker_status(victim).await.expect("the isolated worker's status");
    assert_ne!(
        w["generation"].as_u64(),
        Some(restored.generation.0),
        "the isolated worker joined a generation it cannot have been told of"
    );
    let (dropped_in, dropped_out) = s.net.dropped(&s.workers[victim].host).expect("read the drop counters");
    assert!(
        dropped_in + dropped_out > 0,
        "no packet of worker {victim} was dropped: the partition did not hit"
    );
    eprintln!(
        "    worker {victim}: generation {} step {}; dropped {dropped_in} packets in, {dropped_out} out",
        w["generation"], w["step"]
    );

    phase!("heal: worker {victim} rejoins and the job runs again, every rank in one generation");
    s.net.heal(&s.workers[victim].host).expect("heal");
    wait_until!(
        s,
        "every worker to run in the job's current generation",
        PHASE,
        async {
            let job = s.client(&[0, 1, 2]).status(Some(JOB)).await.map_err(|e| e.to_string())?.jobs.remove(0);
            if job.state != "running" && job.state != "succeeded" {
                return Err(format!("job {} gen {} step {}", job.state, job.generation, job.step));
            }
            if job.state == "running" {
                s.workers_settled(None, None, job.generation.0).await?;
            }
            Ok(())
        }
        .await
    );
    s.finish(&[0, 1, 2]).await;
}
