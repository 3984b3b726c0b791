//! Online membership changes with real processes: a 3-replica cluster grows
//! to 5 (each new replica joins as a learner, catches up, is promoted), then
//! loses two of its original replicas at once and keeps going on the other
//! three, then shrinks back to 3 — all while a job trains and checkpoints.
//! Nothing committed is lost and the job ends with the failure-free digest.

mod common;

use common::{flotilla, text, wait_for, BIN};
use flotilla_coordinator::api::JobStatus;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::testkit::local::{LocalCluster, LocalOptions, LocalWorkers};
use flotilla_shared::ids::NodeId;
use flotilla_shared::spec::JobSpec;
use flotilla_worker::trainer::reference_digest;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

fn replicas(cluster: &LocalCluster, args: &[&str]) -> String {
    let endpoints = cluster.endpoints();
    let mut argv = vec!["replicas"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--endpoints", &endpoints]);
    let out = flotilla(&argv);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "flotilla {argv:?}: {stderr}");
    stdout
}

async fn job(client: &Client) -> Result<JobStatus, String> {
    let s = client.status(Some("grow")).await.map_err(|e| e.to_string())?;
    s.jobs.into_iter().next().ok_or_else(|| "no job".to_string())
}

/// The latest committed step never goes back, and the job keeps committing.
async fn committed_past(client: &Client, floor: u64) -> u64 {
    wait_for(&format!("a checkpoint committed past step {floor}"), LONG, || async {
        let j = job(client).await?;
        match j.latest_committed {
            Some(c) if c.step.0 > floor => Ok(c.step.0),
            other => Err(format!("latest {other:?} state {}", j.state)),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn grow_to_five_lose_two_and_shrink_back_while_a_job_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let text_spec = format!(
        "name = \"grow\"\nworld_size = 2\n\n[checkpoint]\nevery_steps = 50\nkeep_last = 3\nroot = \"{}\"\n\n\
         [trainer]\ntotal_steps = 6000\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\nseed = 9\n",
        dir.path().join("ckpt").display()
    );
    let spec = JobSpec::from_toml(&text_spec).unwrap();
    let mut cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
    cluster.wait_for_leader(LONG).await.unwrap();
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    client.submit(&text_spec).await.unwrap();
    let mut workers = LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "grow", 2);
    for rank in 0..2 {
        workers.spawn(rank, &[]).unwrap();
    }
    let mut floor = committed_past(&client, 0).await;

    tracing::info!("--- grow 3 → 5: each new replica starts empty, joins as a learner, is promoted");
    for expected in [NodeId(4), NodeId(5)] {
        let id = cluster.add_node().unwrap();
        assert_eq!(id, expected);
        let addr = cluster.nodes[id.0 as usize - 1].raft_addr.clone();
        let out = replicas(&cluster, &["add", "--id", &id.0.to_string(), "--raft-addr", &addr]);
        assert!(out.contains(&format!("replica {id} is a voter")), "{out}");
        floor = committed_past(&client, floor).await;
    }
    let list = replicas(&cluster, &["list"]);
    println!("{list}");
    let view = client.replicas().await.unwrap();
    assert_eq!(view.voters, (1..=5).map(NodeId).collect::<Vec<_>>(), "{list}");
    // --json is the same membership, machine-readable
    let json: flotilla_coordinator::api::ReplicasView =
        serde_json::from_str(&replicas(&cluster, &["list", "--json"])).unwrap();
    assert_eq!(json.voters, view.voters);
    // the table: one row per member under a header whose columns line up with it
    let header = list.lines().next().unwrap_or_default();
    let at = header.find("raft address").unwrap();
    for id in 1..=5u64 {
        let row = list.lines().find(|l| l.trim_start().starts_with(&format!("{id} "))).unwrap_or_default();
        let addr = &cluster.nodes[id as usize - 1].raft_addr;
        assert_eq!(row.find(addr.as_str()), Some(at), "{list}");
    }
    assert!(view.learners.is_empty(), "{list}");
    // every replica holds the ledger, the new ones included
    for id in [NodeId(4), NodeId(5)] {
        wait_for(&format!("node {id} to hold the job"), LONG, || async {
            let s = cluster.status(id).await.ok_or("no answer")?;
            if s.jobs.iter().any(|j| j.name.as_str() == "grow") && !s.joining {
                Ok(())
            } else {
                Err(format!("joining {} jobs {}", s.joining, s.jobs.len()))
            }
        })
        .await;
    }

    tracing::info!("--- two of the original replicas die at once: 3 of 5 keep a quorum");
    let leader = cluster.wait_for_leader(LONG).await.unwrap();
    let victims: Vec<NodeId> =
        [NodeId(1), NodeId(2), NodeId(3)].into_iter().filter(|&n| n != leader).collect();
    cluster.kill(victims[0]);
    cluster.kill(leader);
    floor = committed_past(&client, floor).await;
    cluster.spawn(victims[0]).unwrap();
    cluster.spawn(leader).unwrap();

    tracing::info!("--- shrink back to 3: remove the two added replicas, stop them");
    for id in [NodeId(5), NodeId(4)] {
        let out = replicas(&cluster, &["remove", "--id", &id.0.to_string()]);
        assert!(out.contains("removed"), "{out}");
        cluster.kill(id);
        floor = committed_past(&client, floor).await;
    }
    let view = client.replicas().await.unwrap();
    assert_eq!(view.voters, (1..=3).map(NodeId).collect::<Vec<_>>());

    tracing::info!("--- the job ends with the failure-free digest");
    let done = wait_for("the job to succeed", Duration::from_secs(300), || async {
        let j = job(&client).await?;
        if j.state == "succeeded" {
            Ok(j)
        } else {
            Err(format!("state {} step {}", j.state, j.step))
        }
    })
    .await;
    assert!(done.latest_committed.is_some_and(|c| c.step.0 >= floor), "{done:?}");
    let reference = reference_digest(spec.trainer.as_ref().unwrap(), 2);
    assert_eq!(done.final_digest.as_deref(), Some(reference.as_str()));
}
