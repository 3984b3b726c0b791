//! The admin commands, which change the cluster or its jobs: `submit`,
//! `checkpoint`, `checkpoints`, `restore`, `replicas` and `certs`.

use super::{client, contact, table, Usage};
use crate::cli::{CertsArgs, CheckpointsArgs, JobArgs, ReplicasCommand, RestoreArgs, SubmitArgs};
use anyhow::{bail, Context, Result};
use flotilla_coordinator::api::{JobStatus, ReplicasView};
use flotilla_coordinator::ledger::{CheckpointState, JobEventKind, JobState};
use flotilla_shared::spec::JobSpec;

pub(crate) async fn run_submit(args: SubmitArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("cannot read {}", args.spec.display()))?;
    // refuse a bad spec here, with the file's name, before the network
    JobSpec::from_toml(&text).with_context(|| args.spec.display().to_string())?;
    let reply = client(&args.client)?.submit(&text).await?;
    if reply.created {
        println!("submitted job {}", reply.job);
    } else {
        println!("job {} was already submitted with this spec; nothing changed", reply.job);
    }
    Ok(())
}

/// `flotilla checkpoint`: asks for a checkpoint and, while the leader
/// waits for every shard, shows where the ranks are.
pub(crate) async fn run_checkpoint(args: JobArgs) -> Result<()> {
    let client = client(&args.client)?;
    let ask = client.checkpoint(&args.job);
    tokio::pin!(ask);
    let mut shown = String::new();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.tick().await;
    let v = loop {
        tokio::select! {
            v = &mut ask => break v?,
            _ = every.tick() => {
                let Ok(status) = client.status(Some(&args.job)).await else { continue };
                let Some(job) = status.jobs.first() else { continue };
                let Some(p) = job.checkpoints.iter().find(|c| c.state == CheckpointState::Pending) else { continue };
                let steps: Vec<u64> = job.workers.iter().map(|w| w.step.0).collect();
                let line = format!(
                    "checkpoint {} pending at step {}: ranks at steps {}..{}",
                    p.id,
                    p.step,
                    steps.iter().min().unwrap_or(&0),
                    steps.iter().max().unwrap_or(&0)
                );
                if line != shown {
                    eprintln!("{line}");
                    shown = line;
                }
            }
        }
    };
    // the leader answers once MANIFEST.json and LATEST are on disk; an
    // older leader does not say, and a slow disk may not have them yet
    let disk = match v["manifest_written"].as_bool() {
        Some(false) => "; its MANIFEST.json and LATEST are not on disk yet: the leader writes them shortly",
        _ => "",
    };
    println!("checkpoint {} committed at step {}{disk}", v["id"], v["step"]);
    Ok(())
}

pub(crate) async fn run_checkpoints(args: CheckpointsArgs) -> Result<()> {
    let client = client(&args.client)?;
    if let (true, Some(id)) = (args.verify, args.id) {
        let v = client.verify(&args.job, id).await?;
        let state = v["state"].as_str().unwrap_or("committed");
        let what = if state == "abandoned" {
            "it is abandoned: an operator's restore went back before it (flotilla restore --checkpoint can still choose it)"
        } else {
            "it is committed again"
        };
        // the leader answers once MANIFEST.json is back; an older leader
        // does not say, and a slow disk may not have it yet
        let manifest = match v["manifest_written"].as_bool() {
            Some(true) => "; its MANIFEST.json is written back",
            Some(false) => "; its MANIFEST.json is not back on disk yet: the leader writes it shortly (flotilla inspect needs it)",
            None => "",
        };
        println!("checkpoint {id} of job {} verified: every checksum matches; {what}{manifest}", args.job);
        return Ok(());
    }
    let status = client.status(Some(&args.job)).await?;
    let mut job = status.jobs.into_iter().next().context("no such job")?;
    if let Some(id) = args.id {
        job.checkpoints.retain(|c| c.id.0 == id);
        if job.checkpoints.is_empty() {
            bail!(
                "job {} has no checkpoint {id}; flotilla checkpoints --job {} lists them",
                args.job,
                args.job
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job.checkpoints)?);
        return Ok(());
    }
    if job.checkpoints.is_empty() {
        println!("no checkpoints yet");
        return Ok(());
    }
    let rows = job
        .checkpoints
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.step.to_string(),
                c.generation.to_string(),
                c.state.to_string(),
                c.bytes.to_string(),
                flotilla_shared::layout::Manifest::format_time(c.begun_ms),
                c.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                ("id", true),
                ("step", true),
                ("generation", true),
                ("state", false),
                ("bytes", true),
                ("begun", false),
                ("reason", false)
            ],
            rows
        )
    );
    Ok(())
}

/// `flotilla restore`: an operator's whole-job restore. It waits until every
/// rank trains again and says the generation and checkpoint that actually
/// took: a checkpoint found condemned on the way makes the job fall back to
/// an older one in a later generation, and that is what is reported.
pub(crate) async fn run_restore(args: RestoreArgs) -> Result<()> {
    let client = client(&args.client)?;
    let v = client.restore(&args.job, args.checkpoint).await?;
    let asked = v["generation"].as_u64().unwrap_or_default();
    let from = v["checkpoint"].as_u64().map_or("its start".to_string(), |c| format!("checkpoint {c}"));
    if args.no_wait {
        println!("job {} is restoring into generation {asked} from {from}", args.job);
        return Ok(());
    }
    eprintln!(
        "job {} is restoring into generation {asked} from {from}; waiting for every rank to train again",
        args.job
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout_seconds);
    loop {
        // an election on the way is no failure: ask again
        let job = client.status(Some(&args.job)).await.ok().and_then(|s| s.jobs.into_iter().next());
        if let Some(job) = job.filter(|j| j.generation.0 >= asked) {
            match job.state {
                JobState::Running if job.running_since_ms.is_some() => {
                    println!("{}", restore_outcome(&job, asked, &from));
                    return Ok(());
                }
                JobState::Succeeded => {
                    println!("{}", restore_outcome(&job, asked, &from));
                    return Ok(());
                }
                JobState::Blocked | JobState::Failed | JobState::Cancelled => bail!(
                    "job {} is {} after the restore into generation {asked} (now generation {}): {}; flotilla status --job {} says more",
                    args.job,
                    job.state,
                    job.generation,
                    job.error.as_deref().unwrap_or("no reason recorded"),
                    args.job
                ),
                _ => {}
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the restore of job {} into generation {asked} was accepted, but its ranks are not all training after {} s; flotilla status --job {} shows where each rank is (and --no-wait returns at once)",
                args.job,
                args.timeout_seconds,
                args.job
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// What a restore came to: the generation training now and the checkpoint
/// it started from, and, when that is not the generation asked for, what
/// happened in between (a checkpoint condemned, a fallback, a failure).
fn restore_outcome(job: &JobStatus, asked: u64, asked_from: &str) -> String {
    let from = job
        .restored_from
        .map_or("its start".to_string(), |c| format!("checkpoint {} (step {})", c.id, c.step));
    let how = if job.state == JobState::Succeeded { "succeeded" } else { "is training" };
    if job.generation.0 == asked {
        return format!("job {} restored: generation {asked} {how} from {from}", job.name);
    }
    // the events after the restore asked for: why it did not take
    let asked_at = job.events.iter().position(
        |e| matches!(e.kind, Some(JobEventKind::Restore { generation, .. }) if generation.0 == asked),
    );
    let since: Vec<&str> = match asked_at {
        Some(at) => job.events[at + 1..].iter().map(|e| e.text.as_str()).collect(),
        None => Vec::new(),
    };
    format!(
        "job {} restored: generation {} {how} from {from}, not generation {asked} from {asked_from}{}",
        job.name,
        job.generation,
        if since.is_empty() { String::new() } else { format!(": {}", since.join("; ")) }
    )
}

pub(crate) async fn run_replicas(cmd: ReplicasCommand) -> Result<()> {
    match cmd {
        ReplicasCommand::List(args) => {
            let v = client(&args.client)?.replicas().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            print!("{}", replicas_table(&v));
            if v.progress.is_empty() {
                println!(
                    "(progress is known to the leader only; node {} answered as {:?})",
                    v.node_id, v.role
                );
            } else {
                println!("commit index {}", v.commit_index);
            }
        }
        ReplicasCommand::Add(args) => {
            let c = client(&args.client)?;
            let known = c.replicas().await?;
            if !known.learners.iter().chain(&known.voters).any(|id| id.0 == args.id) {
                c.add_replica(args.id, &args.raft_addr).await?;
                println!("replica {} added as a learner; waiting for it to catch up", args.id);
            }
            if args.learner {
                return Ok(());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout_seconds);
            loop {
                let v = c.replicas().await?;
                if v.voters.iter().any(|id| id.0 == args.id) {
                    println!("replica {} is a voter", args.id);
                    return Ok(());
                }
                let matched = v.progress.iter().find(|p| p.id.0 == args.id).map_or(0, |p| p.matched);
                if !v.progress.is_empty() && matched >= v.commit_index {
                    c.promote_replica(args.id).await?;
                    continue;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "replica {} has replicated up to index {matched} of {} after {} s; check that it runs (flotilla coordinator --id {}) and that every replica reaches {}; run this command again to keep waiting",
                        args.id, v.commit_index, args.timeout_seconds, args.id, args.raft_addr
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        ReplicasCommand::Remove(args) => {
            client(&args.client)?.remove_replica(args.id).await?;
            println!("replica {} removed; stop its process now", args.id);
        }
    }
    Ok(())
}

/// `replicas list`'s table: each member, and on the leader how far it has
/// replicated and whether it answers (judged as `status` judges it, by
/// when the leader last heard from it).
fn replicas_table(v: &ReplicasView) -> String {
    let members = v.voters.iter().map(|id| (id, "voter")).chain(v.learners.iter().map(|id| (id, "learner")));
    let rows = members
        .map(|(id, role)| {
            let role = if Some(*id) == v.leader_id { "leader" } else { role };
            let p = v.progress.iter().find(|p| p.id == *id);
            let (reachable, heard) = contact(p.and_then(|p| p.last_contact_ms));
            let state = p.map_or(String::new(), |p| {
                format!("{}{}", p.state.to_lowercase(), if reachable { "" } else { ", unreachable" })
            });
            vec![
                id.0.to_string(),
                role.to_string(),
                v.addresses.get(id).cloned().unwrap_or_else(|| "?".into()),
                p.map_or("-".to_string(), |p| p.matched.to_string()),
                if p.is_some() { heard } else { "-".into() },
                state,
            ]
        })
        .collect();
    let columns = [
        ("id", true),
        ("role", false),
        ("raft address", false),
        ("matched", true),
        ("last contact", true),
        ("state", false),
    ];
    table(&columns, rows)
}

pub(crate) fn run_certs(args: CertsArgs) -> Result<()> {
    let nodes: Vec<flotilla_shared::ids::NodeId> =
        args.nodes.iter().map(|&n| flotilla_shared::ids::NodeId(n)).collect();
    if let Some(bad) = args.nodes.iter().find(|&&n| n == 0 || n > 65535) {
        return Err(Usage(format!("--node {bad}: replica ids are 1..65535")).into());
    }
    let made = flotilla_shared::tls::generate(&args.dir, &nodes, &args.hosts)?;
    if made.new_ca {
        println!("made the cluster CA in {} (ca.pem; keep ca.key offline)", args.dir.display());
    } else {
        println!("signed with the existing CA in {}", args.dir.display());
    }
    for f in &made.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{replicas_table, restore_outcome};
    use flotilla_coordinator::api::{JobStatus, ReplicasView};
    use flotilla_coordinator::ledger::JobEventKind;
    use flotilla_coordinator::raft::replica::{PeerProgress, Role};
    use flotilla_shared::ids::NodeId;

    fn peer(id: u64, recent_active: bool, last_contact_ms: Option<u64>) -> PeerProgress {
        PeerProgress {
            id: NodeId(id),
            matched: 40,
            state: "Replicate".into(),
            recent_active,
            last_contact_ms,
        }
    }

    #[test]
    fn a_follower_heard_from_just_now_is_reachable_whatever_the_quorum_check_flag_says() {
        let view = ReplicasView {
            node_id: NodeId(1),
            role: Role::Leader,
            leader_id: Some(NodeId(1)),
            commit_index: 40,
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            learners: vec![],
            // node 2 answered 100 ms ago, but the leader's quorum check has
            // just cleared raft-rs's `recent_active` (it does so every
            // election timeout); node 3 has been silent for 5 s
            progress: vec![peer(1, true, Some(0)), peer(2, false, Some(100)), peer(3, true, Some(5_000))],
            addresses: (1..=3).map(|i| (NodeId(i), format!("127.0.0.1:710{i}"))).collect(),
        };
        let shown = replicas_table(&view);
        let row = |id: &str| shown.lines().find(|l| l.split_whitespace().next() == Some(id)).unwrap();
        assert!(!row("2").contains("unreachable"), "{shown}");
        assert!(row("2").contains("0.1 s ago"), "{shown}");
        assert!(row("3").contains("unreachable") && row("3").contains("5.0 s ago"), "{shown}");
        assert!(!row("1").contains("unreachable"), "{shown}");
    }

    /// A job status as the API sends it: generation, restored from, events.
    fn job(generation: u64, from: (u64, u64), events: &[(Option<JobEventKind>, &str)]) -> JobStatus {
        let events: Vec<_> = events
            .iter()
            .map(|(kind, text)| serde_json::json!({"at_ms": 1, "text": text, "kind": kind}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "name": "e2e", "state": "running", "generation": generation, "world_size": 2, "step": 0,
            "restores": 1, "latest_committed": null, "restored_from": {"id": from.0, "step": from.1},
            "checkpoints": [], "workers": [], "events": events, "final_digest": null, "error": null,
        }))
        .unwrap()
    }

    #[test]
    fn a_restore_that_fell_back_says_the_generation_that_happened() {
        use flotilla_coordinator::ledger::RestoreReason;
        use flotilla_shared::ids::{CheckpointId, Generation, Step};
        let restore = |g: u64, from: u64, reason| JobEventKind::Restore {
            generation: Generation(g),
            from: Some(CheckpointId(from)),
            step: Step(from * 50),
            reason,
            detail: None,
            takeovers: Vec::new(),
        };
        // asked for generation 4 from checkpoint 6; it took
        let took = job(4, (6, 300), &[(Some(restore(4, 6, RestoreReason::Operator)), "restore into 4")]);
        assert_eq!(
            restore_outcome(&took, 4, "checkpoint 6"),
            "job e2e restored: generation 4 is training from checkpoint 6 (step 300)"
        );
        // checkpoint 6 was condemned on the way: generation 5 from checkpoint 5 is what happened
        let fell_back = job(
            5,
            (5, 250),
            &[
                (Some(restore(4, 6, RestoreReason::Operator)), "restore into 4"),
                (
                    Some(JobEventKind::Condemned { checkpoint: CheckpointId(6), reason: "x".into() }),
                    "checkpoint 6 condemned: rank 0: checksum mismatch",
                ),
                (
                    Some(restore(5, 5, RestoreReason::CorruptCheckpoint)),
                    "restore into generation 5 from checkpoint 5",
                ),
            ],
        );
        assert_eq!(
            restore_outcome(&fell_back, 4, "checkpoint 6"),
            "job e2e restored: generation 5 is training from checkpoint 5 (step 250), not generation 4 from \
             checkpoint 6: checkpoint 6 condemned: rank 0: checksum mismatch; restore into generation 5 from checkpoint 5"
        );
    }
}
