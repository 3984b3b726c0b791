//! A coordinator cluster of real `flotilla coordinator` processes on
//! loopback, for end-to-end tests, `flotilla bench` and `flotilla demo`.
//! Processes are killed (SIGKILL) when the cluster is dropped.

use super::HarnessError;
use crate::api::ClusterStatus;
use crate::raft::node::Role;
use flotilla_shared::ids::NodeId;
use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One replica of a [`LocalCluster`].
pub struct LocalNode {
    /// Its id.
    pub id: NodeId,
    /// Raft address.
    pub raft_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Worker API address.
    pub api_addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Its `--peers`.
    pub peers: String,
    /// Whether it serves HTTPS (the cluster runs with `--tls-*`).
    pub https: bool,
    child: Option<Child>,
}

impl LocalNode {
    /// `http://<http_addr>`, or `https://` under TLS.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.http_addr)
    }

    /// Whether its process is running (as far as this harness knows).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Extra flags for every replica.
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    /// `--snapshot-threshold`.
    pub snapshot_threshold: Option<u64>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--job`.
    pub job: Option<PathBuf>,
    /// `RUST_LOG` for the replicas.
    pub log_filter: Option<String>,
    /// More flags for every replica.
    pub args: Vec<String>,
    /// Run with TLS: certificates for every replica (naming 127.0.0.1)
    /// are made in this directory as `flotilla certs` would, and each
    /// replica gets `--tls-ca`, `--tls-cert` and `--tls-key`.
    pub tls_dir: Option<PathBuf>,
}

/// A local cluster of coordinator processes.
pub struct LocalCluster {
    bin: PathBuf,
    /// The replicas, by id - 1.
    pub nodes: Vec<LocalNode>,
    dir: PathBuf,
    opts: LocalOptions,
}

/// A free loopback port (bound, then released; the caller binds it soon).
/// Never the same port twice in one process: the kernel may hand a port
/// just released to the next bind, and tests start clusters in parallel,
/// so two replicas (of one cluster or two) could otherwise be given one port.
pub fn free_port() -> io::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return Ok(port);
        }
    }
}

impl LocalCluster {
    /// Starts `n` replicas of `bin` under `dir`.
    pub fn start(bin: &Path, dir: &Path, n: usize, opts: LocalOptions) -> io::Result<Self> {
        let mut cluster =
            Self { bin: bin.to_path_buf(), nodes: Vec::with_capacity(n), dir: dir.to_path_buf(), opts };
        for _ in 0..n {
            cluster.nodes.push(cluster.new_node()?);
        }
        let peers = cluster.peers();
        for node in &mut cluster.nodes {
            node.peers = peers.clone();
        }
        for i in 1..=n {
            cluster.spawn(NodeId(i as u64))?;
        }
        Ok(cluster)
    }

    fn new_node(&self) -> io::Result<LocalNode> {
        let i = self.nodes.len() + 1;
        if let Some(dir) = &self.opts.tls_dir {
            if !dir.join(format!("node-{i}.pem")).exists() {
                flotilla_shared::tls::generate(dir, &[NodeId(i as u64)], &["127.0.0.1".into()])
                    .map_err(io::Error::other)?;
            }
        }
        Ok(LocalNode {
            id: NodeId(i as u64),
            raft_addr: format!("127.0.0.1:{}", free_port()?),
            http_addr: format!("127.0.0.1:{}", free_port()?),
            api_addr: format!("127.0.0.1:{}", free_port()?),
            data_dir: self.dir.join(format!("c{i}")),
            log: self.dir.join(format!("c{i}.log")),
            peers: String::new(),
            https: self.opts.tls_dir.is_some(),
            child: None,
        })
    }

    /// Every replica's `ID=RAFT_ADDR`, comma-separated.
    fn peers(&self) -> String {
        self.nodes.iter().map(|n| format!("{}={}", n.id, n.raft_addr)).collect::<Vec<_>>().join(",")
    }

    /// Starts one more replica on an empty data dir, its `--peers` naming
    /// every replica so far and itself (the others keep theirs: it becomes
    /// a member through `flotilla replicas add`). Returns its id.
    pub fn add_node(&mut self) -> io::Result<NodeId> {
        let node = self.new_node()?;
        let id = node.id;
        self.nodes.push(node);
        let peers = self.peers();
        self.node_mut(id).peers = peers;
        self.spawn(id)?;
        Ok(id)
    }

    fn node(&self, id: NodeId) -> &LocalNode {
        &self.nodes[id.0 as usize - 1]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut LocalNode {
        &mut self.nodes[id.0 as usize - 1]
    }

    /// Starts (or restarts) replica `id` on its data directory.
    pub fn spawn(&mut self, id: NodeId) -> io::Result<()> {
        let node = self.node(id);
        let log = File::options().create(true).append(true).open(&node.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("coordinator")
            .args(["--id", &id.to_string(), "--peers", &node.peers])
            .args(["--http-addr", &node.http_addr, "--api-addr", &node.api_addr])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .env("RUST_LOG", self.opts.log_filter.as_deref().unwrap_or("info"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = self.opts.snapshot_threshold {
            cmd.args(["--snapshot-threshold", &t.to_string()]);
        }
        if let Some(f) = &self.opts.token_file {
            cmd.arg("--token-file").arg(f);
        }
        if let Some(dir) = &self.opts.tls_dir {
            cmd.arg("--tls-ca").arg(dir.join("ca.pem"));
            cmd.arg("--tls-cert").arg(dir.join(format!("node-{id}.pem")));
            cmd.arg("--tls-key").arg(dir.join(format!("node-{id}.key")));
        }
        cmd.args(&self.opts.args);
        if let Some(f) = &self.opts.job {
            cmd.arg("--spec").arg(f);
        }
        let child = cmd.spawn()?;
        self.node_mut(id).child = Some(child);
        Ok(())
    }

    /// SIGKILLs replica `id` and reaps it.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replicas whose process exited by itself, with their exit status
    /// (reaps them; a later [`LocalCluster::spawn`] starts them again).
    pub fn exited(&mut self) -> Vec<(NodeId, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push((node.id, status));
                    node.child = None;
                }
            }
        }
        out
    }

    /// Deletes replica `id`'s data directory (it must be stopped).
    pub fn wipe(&mut self, id: NodeId) -> io::Result<()> {
        assert!(!self.node(id).is_running(), "wipe a stopped replica only");
        match fs::remove_dir_all(&self.node(id).data_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every replica's URL, comma-separated (for `--endpoints`).
    pub fn endpoints(&self) -> String {
        self.nodes.iter().map(LocalNode::url).collect::<Vec<_>>().join(",")
    }

    /// Every replica's worker API address, comma-separated (for `--coordinators`).
    pub fn api_endpoints(&self) -> String {
        self.nodes.iter().map(|n| n.api_addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// The URL of replica `id`.
    pub fn url(&self, id: NodeId) -> String {
        self.node(id).url()
    }

    /// The status of replica `id`, if it answers.
    pub async fn status(&self, id: NodeId) -> Option<ClusterStatus> {
        let ca = self.opts.tls_dir.as_ref().map(|d| d.join("ca.pem"));
        let resp = crate::client::http_client(ca.as_deref())
            .ok()?
            .get(format!("{}/v1/status", self.url(id)))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// Waits until every running replica agrees on one leader that has
    /// announced itself; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let mut leaders = Vec::new();
            let mut agreed = true;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                match self.status(node.id).await {
                    Some(s) => {
                        if s.role == Role::Leader {
                            leaders.push(s.node_id);
                        }
                        agreed &= s.leader_id.is_some() && s.leader_url.is_some();
                        last = format!("node {}: role {:?}, leader {:?}", s.node_id, s.role, s.leader_id);
                    }
                    None => {
                        agreed = false;
                        last = format!("node {} does not answer", node.id);
                    }
                }
            }
            if agreed && leaders.len() == 1 {
                let leader = leaders[0];
                let mut all_follow = true;
                for node in self.nodes.iter().filter(|n| n.is_running()) {
                    all_follow &= self.status(node.id).await.is_some_and(|s| s.leader_id == Some(leader));
                }
                if all_follow {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no agreed leader within {timeout:?}; last: {last}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to process `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) -> io::Result<()> {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{signal} {pid} failed")))
    }
}

/// The workers of one job, as real `flotilla worker` processes: slot `r`
/// below the world size runs `--rank r`; slots above it are spares
/// ([`LocalWorkers::spawn_spare`]).
pub struct LocalWorkers {
    bin: PathBuf,
    dir: PathBuf,
    coordinators: String,
    job: String,
    children: Vec<Option<Child>>,
    http_addrs: Vec<String>,
    log_filter: String,
    exec: Vec<String>,
}

impl LocalWorkers {
    /// Workers for `job` with `world_size` ranks (none started yet).
    pub fn new(bin: &Path, dir: &Path, coordinators: String, job: &str, world_size: u32) -> Self {
        let http_addrs = (0..world_size).map(|_| format!("127.0.0.1:{}", free_port().unwrap_or(0))).collect();
        Self {
            http_addrs,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            coordinators,
            job: job.to_string(),
            children: (0..world_size).map(|_| None).collect(),
            log_filter: "info".into(),
            exec: Vec::new(),
        }
    }

    /// Runs `argv` as each rank's trainer (`--exec -- argv...`).
    pub fn exec(mut self, argv: &[&str]) -> Self {
        self.exec = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    /// `RUST_LOG` for the workers.
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = filter.to_string();
        self
    }

    /// The log file of `rank`.
    pub fn log(&self, rank: u32) -> PathBuf {
        self.dir.join(format!("worker-{rank}.log"))
    }

    /// Starts (or restarts) `rank` with extra environment variables.
    pub fn spawn(&mut self, rank: u32, env: &[(&str, &str)]) -> io::Result<()> {
        self.start(rank, &["--rank", &rank.to_string()], env)
    }

    /// Starts a spare (`--spare`) in a new slot; returns the slot (kill it,
    /// ask its pid or HTTP address by it). Its log is `worker-<slot>.log`.
    pub fn spawn_spare(&mut self, env: &[(&str, &str)]) -> io::Result<u32> {
        let slot = self.children.len() as u32;
        self.children.push(None);
        self.http_addrs.push(format!("127.0.0.1:{}", free_port()?));
        self.respawn_spare(slot, env)?;
        Ok(slot)
    }

    /// Starts a spare again in `slot`, one [`LocalWorkers::spawn_spare`] made.
    pub fn respawn_spare(&mut self, slot: u32, env: &[(&str, &str)]) -> io::Result<()> {
        self.start(slot, &["--spare", "--host", &format!("spare-host-{slot}")], env)
    }

    fn start(&mut self, slot: u32, seat: &[&str], env: &[(&str, &str)]) -> io::Result<()> {
        let rank = slot;
        let log = File::options().create(true).append(true).open(self.log(rank))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("worker")
            .args(["--coordinators", &self.coordinators, "--job", &self.job])
            .args(seat)
            .args(["--http-addr", &self.http_addrs[rank as usize]])
            .env("RUST_LOG", &self.log_filter)
            .env_remove(crate::testkit::local::FREE_BYTES_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if !self.exec.is_empty() {
            // a trainer stopped by a restore gets a short grace in tests
            cmd.args(["--stop-grace-seconds", "2", "--exec", "--"]).args(&self.exec);
        }
        self.children[rank as usize] = Some(cmd.spawn()?);
        Ok(())
    }

    /// The HTTP address (status, metrics) of `rank`.
    pub fn http_addr(&self, rank: u32) -> &str {
        &self.http_addrs[rank as usize]
    }

    /// SIGKILLs `rank` and reaps it.
    pub fn kill(&mut self, rank: u32) {
        if let Some(mut child) = self.children[rank as usize].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id of `rank`, while running.
    pub fn pid(&self, rank: u32) -> Option<u32> {
        self.children[rank as usize].as_ref().map(Child::id)
    }

    /// Exit statuses of the workers that exited (reaps them).
    pub fn exited(&mut self) -> Vec<(u32, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (rank, slot) in self.children.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push((rank as u32, status));
                    *slot = None;
                }
            }
        }
        out
    }
}

/// The device-memory override variable (kept out of workers unless asked).
pub const FREE_BYTES_ENV: &str = "FLOTILLA_DEVICE_FREE_BYTES";

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
