//! One coordinator replica, assembled: Raft listener and peer transport,
//! the Raft node, the HTTP API ([`http`]), the worker API ([`worker_api`]),
//! self-announcement, and the optional job submitted at start-up
//! ([`origin`] reads the checkpoint its `resume_from` names).

pub mod http;
pub mod origin;
pub mod worker_api;

use crate::ledger::{Command, NodeInfo};
use crate::metrics::Metrics;
use crate::raft::identity;
use crate::raft::node::{self, NodeConfig, NodeHandle, ProposeError};
use crate::raft::transport::{self, PeerAuth, PeerTransport};
use crate::supervise::task;
use flotilla_shared::frame::Tokens;
use flotilla_shared::ids::NodeId;
use flotilla_shared::spec::JobSpec;
use flotilla_shared::tls::NodeTls;
use http::HttpState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything `flotilla coordinator` is told.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// The cluster (`--cluster-id`), recorded in the data dir and checked
    /// between peers.
    pub cluster_id: String,
    /// This replica.
    pub id: NodeId,
    /// Every voter's Raft address, itself included.
    pub peers: Vec<(NodeId, String)>,
    /// Where the HTTP API listens.
    pub http_addr: String,
    /// Where the worker API listens (none: this replica serves no workers).
    pub api_addr: Option<String>,
    /// The address workers use for this replica's worker API.
    pub advertise_api: Option<String>,
    /// The URL other replicas and clients use for this one's HTTP API.
    pub advertise_http: String,
    /// Raft log and snapshots.
    pub data_dir: PathBuf,
    /// Who may connect, by role.
    pub credentials: Credentials,
    /// `--tls-ca`, `--tls-cert`, `--tls-key`: mutual TLS between replicas,
    /// HTTPS, and TLS on the worker API.
    pub tls: Option<NodeTls>,
    /// Run without credentials on a non-loopback address (`--insecure`).
    pub insecure: bool,
    /// A job to submit once a leader exists (idempotent).
    pub job: Option<JobSpec>,
    /// Applied entries between snapshots.
    pub snapshot_threshold: u64,
}

/// The secrets each kind of client presents (SPEC §4, docs/SECURITY.md).
/// A role without one is open: only where every listener is on loopback,
/// or with `--insecure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Coordinator peers on the Raft port. Never given to workers.
    pub peer: Option<Tokens>,
    /// Workers on the worker API (they run user code: this one is the
    /// least trusted; the Raft port refuses it).
    pub worker: Option<Tokens>,
    /// Mutations on the HTTP API (submit, checkpoint, restore, replicas).
    pub admin: Option<Tokens>,
}

impl Credentials {
    /// One token for every role (`--token-file` alone).
    pub fn shared(token: Option<Tokens>) -> Self {
        Self { peer: token.clone(), worker: token.clone(), admin: token }
    }

    /// Refuses a worker token that is also the peer's or the admin's, unless
    /// one token is shared by every role (`--token-file` alone, the weaker
    /// set-up docs/SECURITY.md warns about): split roles must really split.
    pub fn check_distinct(&self) -> Result<(), FlagError> {
        let shared = self.peer == self.worker && self.worker == self.admin;
        let overlaps = |other: &Option<Tokens>| match (&self.worker, other) {
            (Some(w), Some(o)) => w.overlaps(o),
            _ => false,
        };
        if !shared && (overlaps(&self.peer) || overlaps(&self.admin)) {
            return Err(FlagError::new("--worker-token-file", "the worker token is also the peer or admin token: workers run user code and must not hold either; give --worker-token-file its own token"));
        }
        Ok(())
    }
}

/// Refuses to serve without credentials on an address others can reach.
/// Each listener reachable from another host needs its role's credential:
/// the HTTP API the admin token (TLS alone lets anyone in who reaches it),
/// the worker API the worker token, the Raft port the peer token or mutual
/// TLS.
pub fn check_exposure(opts: &CoordinatorOptions) -> Result<(), FlagError> {
    if opts.insecure {
        return Ok(());
    }
    let c = &opts.credentials;
    let mut listeners = vec![(
        "--http-addr",
        opts.http_addr.clone(),
        c.admin.is_some(),
        "anyone could submit, checkpoint or restore jobs; pass --admin-token-file (or --token-file)",
    )];
    if let Some(api) = &opts.api_addr {
        listeners.push((
            "--api-addr",
            api.clone(),
            c.worker.is_some(),
            "anyone could register as a worker; pass --worker-token-file (or --token-file)",
        ));
    }
    if opts.peers.len() > 1 {
        for (_, raft) in opts.peers.iter().filter(|(id, _)| *id == opts.id) {
            listeners.push((
                "--peers",
                raft.clone(),
                c.peer.is_some() || opts.tls.is_some(),
                "anyone could join the cluster and rewrite the ledger; pass --tls-ca/--tls-cert/--tls-key or --peer-token-file (or --token-file)",
            ));
        }
    }
    for (flag, addr, guarded, why) in listeners {
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(['[', ']']);
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback && !guarded {
            return Err(FlagError::new(flag, format!(
                "{flag} {addr} is reachable from other hosts without a credential for it: {why}, or --insecure to run open anyway"
            )));
        }
    }
    Ok(())
}

/// Why the replica stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag is inconsistent.
    #[error("{0}")]
    Config(String),
    /// A flag's value cannot work.
    #[error(transparent)]
    Flag(#[from] FlagError),
    /// The data dir's identity refuses this replica.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {error}{}", bind_hint(.error))]
    Bind {
        /// The address.
        addr: String,
        /// The OS error (not a `source`: the message already says it).
        error: std::io::Error,
    },
    /// The Raft node failed (e.g. the disk).
    #[error(transparent)]
    Node(#[from] node::NodeError),
}

/// A flag whose value cannot work: names the flag and the way out (the CLI
/// exits 2 for it, as for any bad usage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FlagError {
    /// The flag.
    pub flag: &'static str,
    /// For people: the value, what is wrong, what to pass instead.
    pub message: String,
}

impl FlagError {
    fn new(flag: &'static str, message: impl Into<String>) -> Self {
        Self { flag, message: message.into() }
    }
}

/// What to try after a failed bind.
fn bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => "; another process uses it: stop it, or choose another port",
        std::io::ErrorKind::AddrNotAvailable => "; no interface of this host has that address",
        std::io::ErrorKind::PermissionDenied => "; ports below 1024 need privileges: choose a higher one",
        _ => "",
    }
}

/// Holds `<data-dir>/LOCK` for as long as the replica runs: a second
/// coordinator on the same data dir is refused at start, naming the dir,
/// before it can touch the Raft log.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, ServeError> {
    let path = dir.join("LOCK");
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| {
            ServeError::Config(format!(
                "cannot open {}: {e}; --data-dir must be writable by the user running the coordinator",
                path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServeError::Config(format!(
            "--data-dir {} is in use by another coordinator (it holds {}); stop that one, or give this one its own --data-dir",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(ServeError::Config(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

/// Runs the replica until `shutdown` is cancelled or the node fails.
pub async fn run(opts: CoordinatorOptions, shutdown: CancellationToken) -> Result<(), ServeError> {
    identity::check_cluster_id(&opts.cluster_id)?;
    check_exposure(&opts)?;
    opts.credentials.check_distinct()?;
    let raft_addr =
        opts.peers.iter().find(|(id, _)| *id == opts.id).map(|(_, a)| a.clone()).ok_or_else(|| {
            ServeError::Config(format!(
                "--peers has no entry for --id {}; add {}=HOST:PORT",
                opts.id, opts.id
            ))
        })?;
    // the data dir first: a second coordinator on it is refused before it
    // binds anything
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        ServeError::Config(format!("cannot create --data-dir {}: {e}", opts.data_dir.display()))
    })?;
    let _lock = lock_data_dir(&opts.data_dir)?;
    let bind = |addr: String| async move {
        TcpListener::bind(&addr).await.map_err(|error| ServeError::Bind { addr, error })
    };
    let http_listener = bind(opts.http_addr.clone()).await?;
    let api_listener = match &opts.api_addr {
        Some(addr) => Some(bind(addr.clone()).await?),
        None => {
            tracing::warn!(
                "no --api-addr: this replica serves no worker API, so no worker can register with it (while it leads, no job can run); give --api-addr HOST:PORT"
            );
            None
        }
    };
    let raft_listener = if opts.peers.len() > 1 { Some(bind(raft_addr.clone()).await?) } else { None };

    let metrics = Metrics::new();
    let (peer_tx, peer_rx) = tokio::sync::mpsc::channel(8192);
    let peer_auth = PeerAuth {
        cluster: opts.cluster_id.clone(),
        token: opts.credentials.peer.clone(),
        tls: opts.tls.clone(),
    };
    let transport = Arc::new(PeerTransport::start(
        opts.id,
        opts.peers.clone(),
        peer_auth.clone(),
        peer_tx.clone(),
        shutdown.clone(),
    ));
    // answered to probes: whether this replica holds a Raft log
    let has_log = Arc::new(AtomicBool::new(identity::has_log(&opts.data_dir)));
    if let Some(listener) = raft_listener {
        let serve = transport::serve(
            listener,
            opts.id,
            peer_auth.clone(),
            peer_tx,
            has_log.clone(),
            shutdown.clone(),
        );
        tokio::spawn(serve);
    }
    let Some(joining) = membership(&opts, &peer_auth, &shutdown).await? else { return Ok(()) };
    let mut cfg =
        NodeConfig::new(opts.id, opts.peers.iter().map(|(id, _)| *id).collect(), opts.data_dir.clone());
    cfg.snapshot_threshold = opts.snapshot_threshold.max(1);
    cfg.joining = joining;
    let (handle, mut node_task) = node::start(cfg, transport, peer_rx, metrics.clone())?;
    tracing::info!(node = opts.id.0, raft = %raft_addr, http = %opts.http_addr, "coordinator replica started");
    tokio::spawn(track_log(
        handle.clone(),
        opts.cluster_id.clone(),
        opts.id,
        opts.data_dir.clone(),
        has_log,
        joining,
        shutdown.clone(),
    ));

    let (supervisor, workers_view, supervisor_tx) =
        task::start_supervisor(handle.clone(), metrics.clone(), shutdown.clone());
    if let Some(listener) = api_listener {
        tokio::spawn(worker_api::serve(
            listener,
            handle.clone(),
            opts.credentials.worker.clone(),
            opts.tls.clone(),
            supervisor_tx,
            metrics.worker_sessions.clone(),
            shutdown.clone(),
        ));
    }
    let http_state = HttpState {
        node: handle.clone(),
        token: opts.credentials.admin.clone(),
        metrics,
        supervisor,
        workers: workers_view,
        peers: opts.peers.clone(),
    };
    let http_task = tokio::spawn(http::serve(http_listener, http_state, opts.tls.clone(), shutdown.clone()));
    let info = NodeInfo {
        http_url: opts.advertise_http.clone(),
        api_addr: opts.advertise_api.clone().or_else(|| opts.api_addr.clone()),
    };
    tokio::spawn(announce(handle.clone(), opts.id, info, shutdown.clone()));
    if let Some(spec) = opts.job.clone() {
        tokio::spawn(submit_at_start(handle.clone(), spec, shutdown.clone()));
    }

    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = &mut node_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServeError::Node(e)),
            Err(e) => Err(ServeError::Config(format!("raft task panicked: {e}"))),
        },
    };
    shutdown.cancel();
    let _ = http_task.await;
    result
}

/// Whether this replica starts joining (see `identity`): from its data
/// dir's identity, or for an empty data dir, from its peers' answers.
/// `None` when shut down while still asking.
async fn membership(
    opts: &CoordinatorOptions,
    auth: &PeerAuth,
    shutdown: &CancellationToken,
) -> Result<Option<bool>, ServeError> {
    let dir = &opts.data_dir;
    let recorded =
        |joining| identity::Identity { cluster: opts.cluster_id.clone(), node_id: opts.id, joining };
    if let Some(found) = identity::read(dir)? {
        identity::check(dir, &found, &opts.cluster_id, opts.id)?;
        if found.cluster.is_empty() {
            // written before cluster ids were recorded: adopt this one
            identity::write(dir, &recorded(found.joining))?;
        }
        return Ok(Some(found.joining));
    }
    let joining = if identity::has_log(dir) || opts.peers.len() <= 1 {
        false
    } else {
        let peers: Vec<&(NodeId, String)> = opts.peers.iter().filter(|(id, _)| *id != opts.id).collect();
        let mut answers = vec![None; peers.len()];
        let mut asked = 0u32;
        loop {
            for (slot, (id, addr)) in answers.iter_mut().zip(&peers) {
                if slot.is_none() {
                    match transport::probe(opts.id, *id, addr, auth).await {
                        Ok(has_log) => *slot = Some(has_log),
                        Err(e) => tracing::debug!(peer = id.0, %addr, "probe: {e}"),
                    }
                }
            }
            if let Some(start) = identity::decide(opts.peers.len(), &answers) {
                tracing::info!(node = opts.id.0, "empty data dir: {start:?} (peers' logs: {answers:?})");
                break start == identity::Start::Join;
            }
            asked += 1;
            if asked == 1 || asked.is_multiple_of(50) {
                tracing::warn!(
                    node = opts.id.0,
                    "empty data dir: waiting for a peer with a log, or a majority of empty replicas, before taking part (answers so far: {answers:?})"
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    };
    identity::write(dir, &recorded(joining))?;
    Ok(Some(joining))
}

/// Keeps the probe answer and the data dir's identity in step with the
/// node: it holds a log once it has entries or a snapshot; a joining
/// replica that caught up is recorded as a member (before that, a restart
/// keeps it joining, which is always safe).
async fn track_log(
    handle: NodeHandle,
    cluster: String,
    id: NodeId,
    dir: PathBuf,
    has_log: Arc<AtomicBool>,
    mut joining: bool,
    shutdown: CancellationToken,
) {
    let mut status = handle.watch_status();
    loop {
        let s = status.borrow_and_update().clone();
        has_log.store(s.last_index > 0 || s.snapshot_index > 0, Ordering::SeqCst);
        if joining && !s.joining {
            let member = identity::Identity { cluster: cluster.clone(), node_id: id, joining: false };
            match identity::write(&dir, &member) {
                Ok(()) => joining = false,
                Err(e) => tracing::error!("{e}; this replica will start joining again after a restart"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}

/// Retries `cmd` through elections until it is applied (or refused) or
/// `shutdown`; for the replica's own bookkeeping proposals.
async fn propose_until_applied(handle: &NodeHandle, cmd: Command, what: &str, shutdown: &CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        match handle.propose(cmd.clone()).await {
            Ok(Ok(_)) => return,
            Ok(Err(refusal)) => {
                tracing::error!("{what} refused: {refusal}");
                return;
            }
            Err(ProposeError::Stopped(_)) => return,
            Err(e) => tracing::debug!("{what}: {e}; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn announce(handle: NodeHandle, id: NodeId, info: NodeInfo, shutdown: CancellationToken) {
    let mut status = handle.watch_status();
    // keep the announcement true across restarts and address changes
    loop {
        let current = handle.read_state(|s| s.nodes.get(&id).cloned());
        if current.as_ref() != Some(&info) && handle.status().leader_id.is_some() {
            propose_until_applied(
                &handle,
                Command::Announce { node: id, info: info.clone() },
                "announcing this replica",
                &shutdown,
            )
            .await;
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}

async fn submit_at_start(handle: NodeHandle, spec: JobSpec, shutdown: CancellationToken) {
    let mut status = handle.watch_status();
    while handle.status().leader_id.is_none() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
    let name = spec.name.clone();
    let now_ms = flotilla_shared::layout::Manifest::now_unix_ms();
    let origin = match origin::read_origin(&spec) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("cannot submit job {name} (--job): {e}");
            return;
        }
    };
    propose_until_applied(
        &handle,
        Command::SubmitJob { spec, now_ms, origin },
        &format!("submitting job {name} (--job)"),
        &shutdown,
    )
    .await;
}

/// Parses `--peers`: `1=host:port,2=host:port,...` (empty: no peers).
pub fn parse_peers(text: &str) -> Result<Vec<(NodeId, String)>, FlagError> {
    let bad = |message: String| FlagError::new("--peers", message);
    let mut peers = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            bad(format!("--peers entry {part:?} is not ID=HOST:PORT (e.g. 1=10.0.0.1:7101)"))
        })?;
        let id: u64 =
            id.trim().parse().ok().filter(|n| (1..1 << 16).contains(n)).ok_or_else(|| {
                bad(format!("--peers entry {part:?}: the id must be a number from 1 to 65535"))
            })?;
        if !addr.contains(':') {
            return Err(bad(format!("--peers entry {part:?}: the address needs a port (HOST:PORT)")));
        }
        if peers.iter().any(|(p, _)| *p == NodeId(id)) {
            return Err(bad(format!("--peers lists id {id} twice")));
        }
        peers.push((NodeId(id), addr.trim().to_string()));
    }
    Ok(peers)
}

/// Resolves `--id`: a number, or `auto` for a StatefulSet pod, whose
/// hostname ends in `-<ordinal>`: the id is ordinal + 1.
pub fn resolve_id(flag: &str, hostname: &str) -> Result<NodeId, FlagError> {
    let bad = |message: String| FlagError::new("--id", message);
    if flag != "auto" {
        return flag
            .parse()
            .ok()
            .filter(|n| (1..1 << 16).contains(n))
            .map(NodeId)
            .ok_or_else(|| bad(format!("--id {flag:?} must be a number from 1 to 65535, or auto")));
    }
    hostname
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .map(|ordinal| NodeId(ordinal + 1))
        .ok_or_else(|| {
            bad(format!("--id auto needs a StatefulSet hostname ending in -<ordinal> (e.g. flotilla-coordinator-0), got {hostname:?}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(
        http: &str,
        api: Option<&str>,
        credentials: Credentials,
        insecure: bool,
    ) -> CoordinatorOptions {
        CoordinatorOptions {
            cluster_id: "flotilla".into(),
            id: NodeId(1),
            peers: vec![(NodeId(1), "127.0.0.1:7101".into()), (NodeId(2), "10.0.0.2:7101".into())],
            http_addr: http.into(),
            api_addr: api.map(String::from),
            advertise_api: None,
            advertise_http: format!("http://{http}"),
            data_dir: "/nonexistent".into(),
            credentials,
            tls: None,
            insecure,
            job: None,
            snapshot_threshold: 10,
        }
    }

    #[test]
    fn open_listeners_beyond_loopback_need_credentials_or_insecure() {
        let none = Credentials::default();
        check_exposure(&options("127.0.0.1:9201", Some("[::1]:7201"), none.clone(), false)).unwrap();
        check_exposure(&options("localhost:9201", None, none.clone(), false)).unwrap();
        let e = check_exposure(&options("127.0.0.1:9201", Some("0.0.0.0:7201"), none.clone(), false))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--api-addr 0.0.0.0:7201 is reachable from other hosts"), "{e}");
        check_exposure(&options("0.0.0.0:9201", None, none.clone(), true)).unwrap();
        check_exposure(&options("0.0.0.0:9201", None, Credentials::shared(Some(Tokens::one("t"))), false))
            .unwrap();
        // each listener needs its own role's credential
        let only = |peer: bool, worker: bool, admin: bool| Credentials {
            peer: peer.then(|| Tokens::one("p")),
            worker: worker.then(|| Tokens::one("w")),
            admin: admin.then(|| Tokens::one("a")),
        };
        let e = check_exposure(&options("0.0.0.0:9201", None, only(true, true, false), false))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--http-addr 0.0.0.0:9201") && e.contains("--admin-token-file"), "{e}");
        let e =
            check_exposure(&options("127.0.0.1:9201", Some("0.0.0.0:7201"), only(true, false, true), false))
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("--api-addr 0.0.0.0:7201") && e.contains("--worker-token-file"), "{e}");
        check_exposure(&options("0.0.0.0:9201", Some("0.0.0.0:7201"), only(false, true, true), false))
            .unwrap();
        let mut exposed_raft = options("127.0.0.1:9201", None, only(false, true, true), false);
        exposed_raft.peers[0].1 = "10.0.0.1:7101".into();
        let e = check_exposure(&exposed_raft).unwrap_err().to_string();
        assert!(e.starts_with("--peers 10.0.0.1:7101") && e.contains("--tls-ca"), "{e}");
        exposed_raft.credentials.peer = Some(Tokens::one("p"));
        check_exposure(&exposed_raft).unwrap();
    }

    #[test]
    fn a_worker_token_never_doubles_as_another_roles() {
        Credentials::shared(Some(Tokens::one("t"))).check_distinct().unwrap();
        let split = |p: &str, w: &str, a: &str| Credentials {
            peer: Tokens::parse(p),
            worker: Tokens::parse(w),
            admin: Tokens::parse(a),
        };
        split("p", "w", "a").check_distinct().unwrap();
        split("p", "w", "p").check_distinct().unwrap();
        assert!(split("p", "p", "a").check_distinct().unwrap_err().to_string().contains("worker token"));
        assert!(split("p", "a", "a").check_distinct().is_err());
        // during a rotation a file holds two tokens: no worker token may be any other role's
        split("p1\np2", "w1\nw2", "a").check_distinct().unwrap();
        assert!(split("p1\nw2", "w1\nw2", "a").check_distinct().is_err());
    }

    #[test]
    fn peers() {
        assert_eq!(
            parse_peers("1=127.0.0.1:7101, 2=h:7102").unwrap(),
            vec![(NodeId(1), "127.0.0.1:7101".to_string()), (NodeId(2), "h:7102".to_string())]
        );
        assert!(parse_peers("").unwrap().is_empty());
        assert!(parse_peers("127.0.0.1:7101").unwrap_err().to_string().contains("ID=HOST:PORT"));
        assert!(parse_peers("0=h:1").unwrap_err().to_string().contains("from 1 to 65535"));
        assert!(parse_peers("1=h").unwrap_err().to_string().contains("needs a port"));
        assert!(parse_peers("1=h:1,1=g:2").unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn ids() {
        assert_eq!(resolve_id("3", "x").unwrap(), NodeId(3));
        assert_eq!(resolve_id("auto", "flotilla-coordinator-0").unwrap(), NodeId(1));
        assert_eq!(resolve_id("auto", "flotilla-coordinator-2").unwrap(), NodeId(3));
        assert!(resolve_id("auto", "laptop").unwrap_err().to_string().contains("StatefulSet"));
        assert!(resolve_id("0", "x").is_err());
        assert!(resolve_id("one", "x").is_err());
    }
}
