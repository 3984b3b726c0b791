//! Fault injection at the storage seam: an fsync (write) error never
//! acknowledges a write. Run with `--features failpoints`.
#![cfg(feature = "failpoints")]

use flotilla_coordinator::ledger::Command;
use flotilla_coordinator::metrics::Metrics;
use flotilla_coordinator::raft::node::{self, NodeConfig, ProposeError, Role, Transport};
use flotilla_shared::ids::NodeId;
use flotilla_shared::spec::JobSpec;
use std::sync::Arc;
use std::time::Duration;

struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, _msgs: Vec<raft::eraftpb::Message>) {}
}

fn submit(name: &str) -> Command {
    let spec = JobSpec::from_toml(&format!(
        "name = \"{name}\"\nworld_size = 1\n[checkpoint]\nevery_steps = 5\nroot = \"/ckpt\"\n"
    ))
    .unwrap();
    Command::SubmitJob { spec, now_ms: 1, origin: None }
}

async fn start(
    dir: &std::path::Path,
) -> (node::NodeHandle, tokio::task::JoinHandle<Result<(), node::NodeError>>) {
    let cfg = NodeConfig::new(NodeId(1), vec![NodeId(1)], dir.to_path_buf());
    let (_peer_tx, peer_rx) = tokio::sync::mpsc::channel(16);
    let (handle, task) = node::start(cfg, Arc::new(NoPeers), peer_rx, Metrics::new()).unwrap();
    let mut status = handle.watch_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.role == Role::Leader && s.applied_index == s.commit_index),
    )
    .await
    .expect("a one-node cluster elects itself and replays its log")
    .unwrap();
    (handle, task)
}

#[tokio::test]
async fn a_failed_log_write_never_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    {
        tracing::info!("--- a healthy write is acknowledged");
        let (handle, task) = start(dir.path()).await;
        handle.propose(submit("kept")).await.unwrap().unwrap();

        tracing::info!("--- the log store fails: the proposal is not acknowledged, the node stops");
        fail::cfg("log_store::write::err", "return").unwrap();
        let result = handle.propose(submit("lost")).await;
        assert!(matches!(result, Err(ProposeError::Stopped(_))), "{result:?}");
        let ended = task.await.unwrap();
        assert!(ended.unwrap_err().to_string().contains("injected failure at log_store::write::err"));
        assert!(handle.read_state(|s| !s.jobs.keys().any(|j| j.as_str() == "lost")));
        fail::remove("log_store::write::err");
    }

    tracing::info!("--- after a restart the acknowledged write is there and the failed one is not");
    let (handle, _task) = start(dir.path()).await;
    let jobs: Vec<String> = handle.read_state(|s| s.jobs.keys().map(|j| j.to_string()).collect());
    assert_eq!(jobs, vec!["kept".to_string()]);
}
