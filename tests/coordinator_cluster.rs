//! The coordinator cluster end to end: real `flotilla coordinator`
//! processes on loopback, real Raft over TCP, real fsync, real SIGKILL.

mod common;

use common::{flotilla, job_toml, text, wait_for, BIN};
use flotilla_coordinator::client::Client;
use flotilla_coordinator::local::{LocalCluster, LocalOptions};
use flotilla_coordinator::node::Role;
use flotilla_shared::frame::{client_handshake, HandshakeError, DEFAULT_MAX_FRAME};
use flotilla_shared::ids::NodeId;
use flotilla_shared::wire::{CoordinatorMessage, PeerRole, WorkerMessage};
use std::path::Path;
use std::time::Duration;

const ELECTION: Duration = Duration::from_secs(30);

fn write_job(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, job_toml(name, 4, &dir.join("ckpt"))).unwrap();
    path
}

/// Waits until replica `id` is running and has applied every job in `jobs`.
async fn wait_for_jobs(
    cluster: &LocalCluster,
    id: NodeId,
    jobs: &[&str],
) -> flotilla_coordinator::api::ClusterStatus {
    wait_for(&format!("node {id} to show jobs {jobs:?}"), ELECTION, || async {
        let s = cluster.status(id).await.ok_or("no answer")?;
        let names: Vec<&str> = s.jobs.iter().map(|j| j.name.as_str()).collect();
        if jobs.iter().all(|j| names.contains(j)) {
            Ok(s)
        } else {
            Err(format!("has {names:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_election_replication_failover_and_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    tracing::info!("--- three replicas elect one leader");
    let mut cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
    let leader = cluster.wait_for_leader(ELECTION).await.unwrap();
    let follower = cluster.nodes.iter().map(|n| n.id).find(|&id| id != leader).unwrap();

    tracing::info!("--- a job submitted through a follower is visible on every replica");
    let job = write_job(dir.path(), "alpha");
    let out = flotilla(&["submit", job.to_str().unwrap(), "--endpoints", &cluster.url(follower)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "submitted job alpha");
    for node in [NodeId(1), NodeId(2), NodeId(3)] {
        let s = wait_for_jobs(&cluster, node, &["alpha"]).await;
        let alpha = &s.jobs[0];
        assert_eq!((alpha.state.as_str(), alpha.generation.0, alpha.world_size), ("waiting", 1, 4));
    }
    let out = flotilla(&["submit", job.to_str().unwrap(), "--endpoints", &cluster.endpoints()]);
    assert!(text(&out).0.contains("already submitted"), "{:?}", text(&out));

    tracing::info!("--- SIGKILL the leader: a new leader, the ledger intact");
    let old_term = cluster.status(leader).await.unwrap().term;
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(ELECTION).await.unwrap();
    assert_ne!(new_leader, leader);
    let s = wait_for_jobs(&cluster, new_leader, &["alpha"]).await;
    assert!(s.term > old_term, "term {} after {}", s.term, old_term);
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    let reply =
        client.submit(&std::fs::read_to_string(write_job(dir.path(), "beta")).unwrap()).await.unwrap();
    assert!(reply.created);

    tracing::info!("--- the killed replica restarts on its data dir and rejoins as a follower");
    cluster.spawn(leader).unwrap();
    let s =
        wait_for(&format!("node {leader} to follow node {new_leader} with both jobs"), ELECTION, || async {
            let s = cluster.status(leader).await.ok_or("no answer")?;
            let ok = s.role == Role::Follower && s.leader_id == Some(new_leader) && s.jobs.len() == 2;
            if ok {
                Ok(s)
            } else {
                Err(format!("{:?} leader {:?} jobs {}", s.role, s.leader_id, s.jobs.len()))
            }
        })
        .await;
    let leader_status = cluster.status(new_leader).await.unwrap();
    assert_eq!(s.jobs, leader_status.jobs);

    tracing::info!("--- status from the CLI names the leader and the jobs");
    let out = flotilla(&["status", "--endpoints", &cluster.url(leader)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&format!("leader node {new_leader}")), "{stdout}");
    assert!(stdout.contains("job alpha: waiting, generation 1"), "{stdout}");
    let out = flotilla(&["status", "--json", "--job", "beta", "--endpoints", &cluster.endpoints()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(v["jobs"][0]["name"], "beta");
    assert_eq!(v["role"], "leader");
}

#[tokio::test(flavor = "multi_thread")]
async fn wiped_replica_catches_up_through_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LocalOptions { snapshot_threshold: Some(4), ..LocalOptions::default() };
    let mut cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, opts).unwrap();
    let leader = cluster.wait_for_leader(ELECTION).await.unwrap();
    let follower = cluster.nodes.iter().map(|n| n.id).find(|&id| id != leader).unwrap();

    tracing::info!("--- enough entries that the log is compacted past its start");
    let client = Client::new(vec![cluster.url(leader)], None);
    let names: Vec<String> = (0..12).map(|i| format!("job-{i}")).collect();
    for name in &names {
        client.submit(&job_toml(name, 2, &dir.path().join("ckpt"))).await.unwrap();
    }
    let s = cluster.status(leader).await.unwrap();
    assert!(s.snapshot_index > 1, "leader did not compact: snapshot index {}", s.snapshot_index);

    tracing::info!("--- a follower loses its data dir and rejoins empty");
    cluster.kill(follower);
    cluster.wipe(follower).unwrap();
    cluster.spawn(follower).unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let s = wait_for_jobs(&cluster, follower, &refs).await;
    assert!(s.snapshot_index > 0, "caught up without a snapshot?");
    let metrics =
        reqwest::get(format!("{}/metrics", cluster.url(follower))).await.unwrap().text().await.unwrap();
    let installed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_raft_snapshots_applied_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(installed >= 1, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_cluster_works() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 1, LocalOptions::default()).unwrap();
    assert_eq!(cluster.wait_for_leader(ELECTION).await.unwrap(), NodeId(1));
    let job = write_job(dir.path(), "solo");
    let out = flotilla(&["submit", job.to_str().unwrap(), "--endpoints", &cluster.url(NodeId(1))]);
    assert!(out.status.success(), "{:?}", text(&out));
    let s = wait_for_jobs(&cluster, NodeId(1), &["solo"]).await;
    assert_eq!(s.role, Role::Leader);
    let metrics =
        reqwest::get(format!("{}/metrics", cluster.url(NodeId(1)))).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("flotilla_raft_is_leader 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("flotilla_raft_term ") && !l.ends_with(" 0")), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_bad_specs_and_garbage_are_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let opts = LocalOptions { token_file: Some(token_file.clone()), ..LocalOptions::default() };
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, opts).unwrap();
    // peers authenticate with the token, or no leader could be elected
    let leader = cluster.wait_for_leader(ELECTION).await.unwrap();
    let url = cluster.url(leader);
    let http = reqwest::Client::new();
    let spec = job_toml("secure", 2, &dir.path().join("ckpt"));

    tracing::info!("--- mutations need the token");
    let resp = http.post(format!("{url}/v1/jobs")).body(spec.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.text().await.unwrap().contains("--token-file"));
    let job = write_job(dir.path(), "secure");
    let out = flotilla(&["submit", job.to_str().unwrap(), "--endpoints", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.starts_with("error: missing or wrong token"), "{:?}", text(&out));

    tracing::info!("--- an invalid spec is a 400 naming the key");
    let resp = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth("s3cret")
        .body(spec.replace("world_size = 2", "world_size = 0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("`world_size` = 0 is out of range"));
    let resp = http.get(format!("{url}/v1/status?job=nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);

    tracing::info!("--- garbage and a wrong token on the Raft port close that connection only");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let raft_addr = cluster.nodes[0].raft_addr.clone();
    let mut garbage = tokio::net::TcpStream::connect(&raft_addr).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut sink)).await.unwrap();
    let stream = tokio::net::TcpStream::connect(&raft_addr).await.unwrap();
    let refused = flotilla_shared::frame::client_handshake::<
        _,
        flotilla_shared::wire::PeerMessage,
        flotilla_shared::wire::PeerMessage,
    >(
        stream,
        flotilla_shared::wire::PeerRole::Coordinator { node: NodeId(9) },
        Some("wrong".into()),
        1 << 20,
    )
    .await;
    assert!(matches!(refused, Err(flotilla_shared::frame::HandshakeError::Refused(_))));

    tracing::info!("--- and the cluster still serves, with the token");
    let out = flotilla(&[
        "submit",
        job.to_str().unwrap(),
        "--endpoints",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(cluster.wait_for_leader(ELECTION).await.unwrap(), leader);
}

/// The scenario of a replica whose disk is replaced: entry E is committed
/// on {A, B} while C is down; B loses its data dir; A dies; B comes back
/// empty with its usual command line (A being down already, it cannot have
/// caught up from A: the worst case), and C comes back without E. B must
/// not help C become a leader without E: either no leader until A returns,
/// or E survives.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_restarted_empty_never_helps_elect_a_leader_without_a_committed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
    let first = cluster.wait_for_leader(ELECTION).await.unwrap();
    // C: a follower, so that A and B keep a quorum without it
    let c = cluster.nodes.iter().map(|n| n.id).find(|&id| id != first).unwrap();
    tracing::info!("--- C (node {c}) is SIGKILLed; entry E (job 'precious') is committed on A and B");
    cluster.kill(c);
    let a = cluster.wait_for_leader(ELECTION).await.unwrap();
    let b = cluster.nodes.iter().map(|n| n.id).find(|&id| id != a && id != c).unwrap();
    let client = Client::new(vec![cluster.url(a)], None);
    client.submit(&job_toml("precious", 2, &dir.path().join("ckpt"))).await.unwrap();
    wait_for_jobs(&cluster, b, &["precious"]).await;

    tracing::info!("--- B (node {b}) loses its data dir; A (node {a}) dies; B restarts with its usual command line; C restarts on its data dir, without E");
    cluster.kill(b);
    cluster.wipe(b).unwrap();
    cluster.kill(a);
    cluster.spawn(b).unwrap();
    cluster.spawn(c).unwrap();
    let joined = wait_for("B to start as a joining replica", ELECTION, || async {
        let s = cluster.status(b).await.ok_or("no answer")?;
        if s.joining {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    assert!(joined.jobs.is_empty(), "B is empty: {:?}", joined.jobs);

    wait_for("C to answer", ELECTION, || async { cluster.status(c).await.ok_or("no answer".to_string()) })
        .await;
    // many election timeouts (0.6-1.2 s each): no leader may serve a ledger without E
    let window = std::time::Instant::now();
    let mut observed = 0;
    while window.elapsed() < Duration::from_secs(8) {
        for id in [b, c] {
            if let Some(s) = cluster.status(id).await {
                observed += 1;
                if s.role == Role::Leader {
                    let names: Vec<&str> = s.jobs.iter().map(|j| j.name.as_str()).collect();
                    assert!(
                        names.contains(&"precious"),
                        "node {id} leads term {} without E: {names:?}",
                        s.term
                    );
                }
                assert!(id != b || s.joining, "B stopped joining without a leader to catch up from");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(observed > 40, "B and C answered only {observed} times");

    tracing::info!("--- A returns: a leader with E; B catches up and votes again");
    cluster.spawn(a).unwrap();
    cluster.wait_for_leader(ELECTION).await.unwrap();
    for id in [a, b, c] {
        wait_for_jobs(&cluster, id, &["precious"]).await;
    }
    wait_for("B to finish joining", ELECTION, || async {
        let s = cluster.status(b).await.ok_or("no answer")?;
        if s.joining {
            Err("still joining".to_string())
        } else {
            Ok(())
        }
    })
    .await;
    let identity =
        std::fs::read_to_string(cluster.nodes[b.0 as usize - 1].data_dir.join("IDENTITY.json")).unwrap();
    assert!(identity.contains("\"joining\": false"), "{identity}");
}

#[test]
fn a_data_dir_of_another_replica_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c1");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("IDENTITY.json"), r#"{"node_id": 1, "joining": false}"#).unwrap();
    let port = |_| flotilla_coordinator::local::free_port().unwrap().to_string();
    let (http, raft) = (port(0), port(1));
    let out = flotilla(&[
        "coordinator",
        "--id",
        "2",
        "--peers",
        &format!("2=127.0.0.1:{raft}"),
        "--http-addr",
        &format!("127.0.0.1:{http}"),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("belongs to coordinator --id 1, not --id 2"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_has_its_own_credential_and_a_worker_cannot_join_the_raft_port() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path.display().to_string()
    };
    let (peer, worker, admin) =
        (file("peer", "p33r-secret"), file("worker", "w0rker-secret"), file("admin", "adm1n-secret"));
    let args = ["--peer-token-file", &peer, "--worker-token-file", &worker, "--admin-token-file", &admin];
    let opts = LocalOptions { args: args.iter().map(|a| a.to_string()).collect(), ..LocalOptions::default() };
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, opts).unwrap();
    // the peers authenticate with the peer token, or no leader could be elected
    let leader = cluster.wait_for_leader(ELECTION).await.unwrap();

    tracing::info!("--- the worker token opens the worker API and nothing else");
    let api = cluster.nodes[0].api_addr.clone();
    let raft = cluster.nodes[0].raft_addr.clone();
    let hello = |addr: String, role: PeerRole, token: &str| {
        let token = Some(token.to_string());
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            client_handshake::<_, CoordinatorMessage, WorkerMessage>(stream, role, token, DEFAULT_MAX_FRAME)
                .await
                .map(|_| ())
        }
    };
    hello(api.clone(), PeerRole::Worker, "w0rker-secret")
        .await
        .expect("the worker API takes the worker token");
    for (token, what) in [("w0rker-secret", "the worker token"), ("adm1n-secret", "the admin token")] {
        let refused = hello(raft.clone(), PeerRole::Coordinator { node: NodeId(9) }, token).await;
        assert!(matches!(refused, Err(HandshakeError::Refused(_))), "the Raft port took {what}: {refused:?}");
    }
    let refused = hello(api, PeerRole::Worker, "p33r-secret").await;
    assert!(matches!(refused, Err(HandshakeError::Refused(_))), "{refused:?}");

    tracing::info!("--- mutations need the admin token");
    let job = write_job(dir.path(), "roles");
    let url = cluster.url(leader);
    for (token_file, ok) in [(&worker, false), (&peer, false), (&admin, true)] {
        let out =
            flotilla(&["submit", job.to_str().unwrap(), "--endpoints", &url, "--token-file", token_file]);
        assert_eq!(out.status.success(), ok, "{token_file}: {:?}", text(&out));
    }
}

#[test]
fn a_coordinator_reachable_from_other_hosts_needs_credentials_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let port = flotilla_coordinator::local::free_port().unwrap();
    let http = format!("0.0.0.0:{port}");
    let data = dir.path().join("c1");
    let out =
        flotilla(&["coordinator", "--id", "1", "--http-addr", &http, "--data-dir", data.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no credentials are configured") && stderr.contains("--insecure"), "{stderr}");
    assert!(!data.exists(), "refused before touching the data dir");
}
