//! The long-running commands: `coordinator` (a replica), `worker` (one
//! rank's agent) and `node` (a host's node agent).

use super::{cancel_on_signal, hostname, read_secret, read_token, Usage};
use crate::cli::{CoordinatorArgs, NodeArgs, WorkerArgs};
use anyhow::{Context, Result};
use flotilla_coordinator::serve;
use flotilla_shared::ids::{JobName, Rank};
use flotilla_shared::spec::JobSpec;
use flotilla_worker::agent::{self, WorkerOptions};

pub(crate) fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let id = serve::resolve_id(&args.id, &hostname()).map_err(Usage::from)?;
    let mut peers = serve::parse_peers(&args.peers).map_err(Usage::from)?;
    if peers.is_empty() {
        // a one-node cluster: its Raft address is never dialled
        peers.push((id, "127.0.0.1:0".to_string()));
    }
    let job = args
        .spec
        .as_ref()
        .map(|p| -> Result<JobSpec> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("cannot read --spec {}", p.display()))?;
            JobSpec::from_toml(&text).with_context(|| format!("--spec {}", p.display()))
        })
        .transpose()?;
    let tls = match (&args.tls_dir, &args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(dir), ..) => Some(flotilla_shared::tls::NodeTls::load(
            id,
            &dir.join("ca.pem"),
            &dir.join(format!("node-{id}.pem")),
            &dir.join(format!("node-{id}.key")),
        )?),
        (None, Some(ca), Some(cert), Some(key)) => {
            Some(flotilla_shared::tls::NodeTls::load(id, ca, cert, key)?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let opts = serve::CoordinatorOptions {
        cluster_id: args.cluster_id,
        id,
        peers,
        advertise_http: args
            .advertise_http
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", args.http_addr)),
        tls,
        http_addr: args.http_addr,
        api_addr: args.api_addr,
        advertise_api: args.advertise_api,
        data_dir: args.data_dir,
        credentials: {
            let shared = serve::Credentials::shared(read_secret("--token-file", args.token_file.as_ref())?);
            serve::Credentials {
                peer: read_secret("--peer-token-file", args.peer_token_file.as_ref())?.or(shared.peer),
                worker: read_secret("--worker-token-file", args.worker_token_file.as_ref())?
                    .or(shared.worker),
                admin: read_secret("--admin-token-file", args.admin_token_file.as_ref())?.or(shared.admin),
            }
        },
        insecure: args.insecure,
        job,
        snapshot_threshold: args.snapshot_threshold,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("can install a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            on_signal.cancel();
        });
        serve::run(opts, shutdown).await.map_err(anyhow::Error::from)
    })
}

/// `--rank` (already a number or `auto`, as clap checked it); what `auto`
/// cannot resolve is bad usage, as `coordinator --id auto`'s is.
fn resolve_rank(flag: &str) -> Result<Rank, Usage> {
    if flag != "auto" {
        return flag
            .parse()
            .map(Rank)
            .map_err(|_| Usage(format!("--rank {flag:?} must be a number from 0 to {}, or auto", u32::MAX)));
    }
    if let Ok(index) = std::env::var("JOB_COMPLETION_INDEX") {
        return index
            .parse()
            .map(Rank)
            .map_err(|_| Usage(format!("--rank auto: JOB_COMPLETION_INDEX={index:?} is not a number")));
    }
    let host = hostname();
    host.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).map(Rank).ok_or_else(|| {
        Usage(format!(
            "--rank auto needs JOB_COMPLETION_INDEX (Indexed Job) or a hostname ending in -<ordinal>, got {host:?}"
        ))
    })
}

pub(crate) fn run_worker(args: WorkerArgs) -> Result<()> {
    // the trainer's device: --gpu, else the first of CUDA_VISIBLE_DEVICES
    // (which the trainer inherits then)
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let device = args.gpu.clone().or_else(|| {
        visible.as_deref().and_then(|v| v.split(',').next()).filter(|d| !d.is_empty()).map(str::to_string)
    });
    let exec = args.exec.then(|| flotilla_worker::exec::ExecOptions {
        argv: args.command.clone(),
        stop_grace: std::time::Duration::from_secs(args.stop_grace_seconds),
        master_addr: args.master_addr.clone(),
        local_rank: args.local_rank,
        local_world_size: args.local_world_size,
        gpu: args.gpu.clone(),
    });
    let opts = WorkerOptions {
        coordinators: args.coordinators,
        job: JobName::new(args.job.as_str()).map_err(|e| Usage(format!("--job: {e}")))?,
        // clap refuses --spare with --rank, and neither (exit 2)
        rank: args.rank.as_deref().map(resolve_rank).transpose()?,
        host: args.host.clone().unwrap_or_else(hostname),
        http_addr: args.http_addr,
        token: read_token(args.token_file.as_ref())?,
        tls: args
            .tls_ca
            .as_deref()
            .map(|ca| flotilla_shared::tls::ClientTls::load("--tls-ca", ca))
            .transpose()?,
        gpu: device,
        require_gpu: args.require_gpu,
        free_override: std::env::var(flotilla_worker::device::FREE_BYTES_OVERRIDE).ok(),
        exec,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // SIGINT or SIGTERM: stop the trainer, then exit
        let shutdown = cancel_on_signal()?;
        agent::run(opts, shutdown).await.map_err(anyhow::Error::from)
    })
}

pub(crate) fn run_node(args: NodeArgs) -> Result<()> {
    let opts = flotilla_worker::node::NodeOptions {
        coordinators: args.coordinators,
        tokens: read_secret("--token-file", args.token_file.as_ref())?,
        tls: args
            .tls_ca
            .as_deref()
            .map(|ca| flotilla_shared::tls::ClientTls::load("--tls-ca", ca))
            .transpose()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
        tracing::info!(listen = %args.listen, "node agent: this host's workers connect here");
        let shutdown = cancel_on_signal()?;
        flotilla_worker::node::run(listener, opts, shutdown).await.map_err(anyhow::Error::msg)
    })
}
