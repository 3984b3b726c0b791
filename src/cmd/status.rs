//! `flotilla status`: the replicas, each job and every rank, and in
//! words why a rank is not training (`rank_reason`).

use super::{client, contact, count, table};
use crate::cli::StatusArgs;
use anyhow::{bail, Result};
use flotilla_coordinator::api::StepSource;
use flotilla_coordinator::client::Client;
use flotilla_coordinator::ledger::{BlockReason, JobState};
use flotilla_coordinator::supervise::RankState;
use flotilla_shared::ids::Rank;

pub(crate) async fn run_status(args: StatusArgs) -> Result<()> {
    let client = client(&args.client)?;
    if !args.watch {
        print!("{}", status_view(&client, &args).await?);
        return Ok(());
    }
    // on a terminal: the screen redrawn in place every second; a pipe gets
    // one view per second, one after the other
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let view = match status_view(&client, &args).await {
            Ok(v) => v,
            Err(e) => format!("error: {e:#}\n"),
        };
        let stamp =
            flotilla_shared::layout::Manifest::format_time(flotilla_shared::layout::Manifest::now_unix_ms());
        if tty {
            // home, clear to the end: no flicker, nothing left of a longer view
            print!("\x1b[H\x1b[2J{view}\nrefreshed {stamp}; Ctrl-C to stop\n");
        } else {
            println!("{view}--- {stamp}");
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// What `flotilla status` prints: the replicas, then each job with every
/// rank. An error when no replica leads (quorum lost or an election).
async fn status_view(client: &Client, args: &StatusArgs) -> Result<String> {
    use std::fmt::Write as _;
    let status = client.status(args.job.as_deref()).await?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&status)?));
    }
    let mut out = String::new();
    let Some(leader_id) = status.leader_id else {
        let (up, all) = client.voters_reachable(&status).await;
        let majority = all / 2 + 1;
        if up < majority {
            bail!(
                "no leader: quorum lost, {up} of {all} replicas answer and a leader needs {majority}; bring replicas back (flotilla replicas list shows the membership)"
            );
        }
        bail!("no leader yet: an election is in progress ({up} of {all} replicas answer); try again in a few seconds");
    };
    if status.role != flotilla_coordinator::raft::node::Role::Leader {
        writeln!(
            out,
            "node {} is a follower and cannot reach leader node {leader_id}: it knows the ledger but not the workers, so a job's step is its latest committed checkpoint's and ranks are not shown",
            status.node_id
        )?;
    }
    // the replicas, as the leader tracks them
    match client.replicas_of(&status).await {
        Ok(r) => {
            let rows = r
                .voters
                .iter()
                .map(|id| (id, "voter"))
                .chain(r.learners.iter().map(|id| (id, "learner")))
                .map(|(id, kind)| {
                    let p = r.progress.iter().find(|p| p.id == *id);
                    let role = if Some(*id) == r.leader_id { "leader".to_string() } else { kind.to_string() };
                    let (reachable, heard) = contact(p.and_then(|p| p.last_contact_ms));
                    vec![
                        id.to_string(),
                        role,
                        if reachable { "yes" } else { "NO" }.to_string(),
                        heard,
                        p.map_or("?".into(), |p| p.matched.to_string()),
                        p.map_or("?".into(), |p| r.commit_index.saturating_sub(p.matched).to_string()),
                        r.addresses.get(id).cloned().unwrap_or_default(),
                    ]
                })
                .collect();
            let url = status.leader_url.as_deref().map(|u| format!(" at {u}")).unwrap_or_default();
            writeln!(
                out,
                "coordinators: leader node {leader_id}{url}, term {}, commit index {}",
                status.term, r.commit_index
            )?;
            for line in table(
                &[
                    ("node", true),
                    ("role", false),
                    ("reachable", false),
                    ("last contact", true),
                    ("match index", true),
                    ("behind", true),
                    ("raft address", false),
                ],
                rows,
            )
            .lines()
            {
                writeln!(out, "  {line}")?;
            }
        }
        Err(e) => {
            writeln!(out, "coordinators: leader node {leader_id}; its replica list is unavailable: {e}")?
        }
    }
    if status.jobs.is_empty() {
        writeln!(out, "no jobs; submit one with flotilla submit JOB.toml")?;
    }
    for job in &status.jobs {
        let latest = job.latest_committed.map(|c| format!("checkpoint {} at step {}", c.id, c.step));
        writeln!(
            out,
            "job {}: {}, generation {}, step {}{}, {}, {}, latest committed: {}",
            job.name,
            job.state,
            job.generation,
            job.step,
            step_note(job),
            count(u64::from(job.world_size), "rank"),
            count(u64::from(job.restores), "restore"),
            latest.as_deref().unwrap_or("none")
        )?;
        if let Some(c) = job.restored_from {
            let source = c.source.map_or(String::new(), |s| format!(", from {s}"));
            writeln!(out, "  restored from checkpoint {} (step {}){source}", c.id, c.step)?;
        }
        if let Some(e) = &job.error {
            writeln!(out, "  error: {e}")?;
        }
        if let Some(d) = &job.final_digest {
            writeln!(out, "  final digest: {d}")?;
        }
        if job.state != JobState::Succeeded && status.role == flotilla_coordinator::raft::node::Role::Leader {
            let rows = (0..job.world_size)
                .map(|rank| {
                    let w = job.workers.iter().find(|w| w.rank.0 == rank);
                    let (state, step, age) = match w {
                        Some(w) => (
                            w.state,
                            w.step.to_string(),
                            w.heartbeat_age_ms.map_or("?".into(), |ms| format!("{:.1} s", ms as f64 / 1e3)),
                        ),
                        None => (RankState::Missing, "-".to_string(), "-".to_string()),
                    };
                    let worker = w.and_then(|w| w.worker).map_or("-".into(), |id| id.to_string());
                    let host = w.and_then(|w| w.host.clone()).unwrap_or_else(|| "-".into());
                    let why = rank_reason(state, job.blocked.as_ref(), rank);
                    vec![rank.to_string(), state.to_string(), step, age, worker, host, why]
                })
                .collect();
            let columns = [
                ("rank", true),
                ("state", false),
                ("step", true),
                ("heard", true),
                ("worker", true),
                ("host", false),
                ("why", false),
            ];
            for line in table(&columns, rows).lines() {
                writeln!(out, "  {line}")?;
            }
            match job.spares.as_slice() {
                [] if job.world_size > 0 => writeln!(out, "  spares: none")?,
                [] => {}
                spares => {
                    let list: Vec<String> = spares
                        .iter()
                        .map(|s| {
                            format!(
                                "worker {} on {} ({})",
                                s.worker,
                                s.host.as_deref().unwrap_or("?"),
                                s.state.as_str()
                            )
                        })
                        .collect();
                    writeln!(out, "  spares: {}", list.join(", "))?;
                }
            }
        }
        if !job.events.is_empty() {
            writeln!(out, "  recent events:")?;
            for e in job.events.iter().rev().take(8).rev() {
                writeln!(out, "    {}  {}", flotilla_shared::layout::Manifest::format_time(e.at_ms), e.text)?;
            }
        }
    }
    Ok(out)
}

/// Where the job's step comes from, when it is not the ranks' own (the
/// leader hearing every rank) nor the job's end: the ledger's head.
fn step_note(job: &flotilla_coordinator::api::JobStatus) -> String {
    match (job.step_source, job.latest_committed) {
        (StepSource::Ranks | StepSource::Finished, _) => String::new(),
        (StepSource::Checkpoint, Some(_)) => format!(" ({})", job.step_source.describe()),
        (StepSource::Checkpoint, None) => {
            " (where it starts: nothing committed yet; the ranks' own steps are not known here)".into()
        }
    }
}

/// Why a rank is not training, in words, from its state (and the job's
/// block, which names the refused rank; a block recorded by an older build
/// names none, and its words are in the job's error line).
fn rank_reason(state: RankState, blocked: Option<&BlockReason>, rank: u32) -> String {
    let blocked_on_me = blocked.and_then(|b| b.rank) == Some(Rank(rank));
    match state {
        // first: a blocked rank's heartbeats may still say it runs
        _ if blocked_on_me => "its restore was refused (see error)".into(),
        RankState::Running | RankState::Checkpointing | RankState::Finished => String::new(),
        RankState::Missing => "never heard from by this leader: is its worker running?".into(),
        RankState::Disconnected => {
            "its connection closed; the job restores without it after the grace".into()
        }
        RankState::Stale => "holds an older generation's state; being restored".into(),
        RankState::Restoring => "restoring".into(),
        RankState::Waiting => "restored; waiting for the others".into(),
        RankState::Failed => "its trainer failed; restarted on the next restore".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::rank_reason;
    use flotilla_coordinator::ledger::BlockReason;
    use flotilla_coordinator::supervise::RankState;
    use flotilla_shared::ids::Rank;
    use flotilla_shared::wire::RestoreFailureKind;

    fn block(rank: u32, kind: RestoreFailureKind, detail: &str) -> BlockReason {
        BlockReason { rank: Some(Rank(rank)), kind: Some(kind), detail: detail.into() }
    }

    #[test]
    fn a_blocked_rank_is_told_apart_by_every_refusal_that_names_it() {
        let refused = "its restore was refused (see error)";
        for (kind, error) in [
            (RestoreFailureKind::DeviceMemory, "rank 2 on host memory: restore needs 258.6 KiB, 1000 B free"),
            (
                RestoreFailureKind::ModelMismatch,
                "checkpoint 7 rank 2 does not match the model: missing model/w",
            ),
            (RestoreFailureKind::Unavailable, "checkpoint 7 rank 2: open ...: Permission denied"),
        ] {
            let error = &block(2, kind, error);
            assert_eq!(rank_reason(RankState::Restoring, Some(error), 2), refused, "{error}");
            // another rank of the same job is not the one blocked, nor is rank 12 rank 2
            assert_eq!(rank_reason(RankState::Restoring, Some(error), 1), "restoring", "{error}");
            let twelve = block(12, kind, &error.detail.replace("rank 2", "rank 12"));
            assert_eq!(rank_reason(RankState::Restoring, Some(&twelve), 2), "restoring");
        }
        // a blocked rank's heartbeats may still say it runs: the refusal wins
        let on_gpu = block(2, RestoreFailureKind::DeviceMemory, "rank 2 on GPU 0: x");
        assert_eq!(rank_reason(RankState::Running, Some(&on_gpu), 2), refused);
        assert_eq!(rank_reason(RankState::Running, Some(&on_gpu), 3), "");
        assert!(rank_reason(RankState::Missing, None, 0).contains("never heard from"));
        // a block an older build recorded names no rank: none is singled out
        let old = BlockReason { rank: None, kind: None, detail: "rank 2 on GPU 0: x".into() };
        assert_eq!(rank_reason(RankState::Restoring, Some(&old), 2), "restoring");
    }
}
