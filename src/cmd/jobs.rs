//! The job list and the end of a job's life: `jobs`, `cancel` and `delete`.

use super::{client, table};
use crate::cli::{DeleteArgs, JobArgs, JobsArgs};
use anyhow::Result;
use flotilla_coordinator::api::JobStatus;
use flotilla_shared::layout::Manifest;

/// `flotilla jobs`: one line per job in the ledger.
pub(crate) async fn run_jobs(args: JobsArgs) -> Result<()> {
    let status = client(&args.client)?.status(None).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status.jobs)?);
        return Ok(());
    }
    print!("{}", jobs_table(&status.jobs));
    Ok(())
}

/// The table `flotilla jobs` prints.
fn jobs_table(jobs: &[JobStatus]) -> String {
    if jobs.is_empty() {
        return "no jobs; submit one with flotilla submit\n".into();
    }
    let rows = jobs
        .iter()
        .map(|j| {
            vec![
                j.name.to_string(),
                j.state.to_string(),
                j.generation.to_string(),
                j.world_size.to_string(),
                j.latest_committed.as_ref().map_or("-".into(), |c| format!("{}@{}", c.id, c.step)),
                // 0: a replica of a build that did not say
                match j.submitted_ms {
                    0 => "-".into(),
                    ms => Manifest::format_time(ms),
                },
            ]
        })
        .collect();
    table(
        &[
            ("job", false),
            ("state", false),
            ("generation", true),
            ("world", true),
            ("latest", false),
            ("submitted", false),
        ],
        rows,
    )
}

/// `flotilla cancel`: the job becomes `cancelled`; its workers stop.
pub(crate) async fn run_cancel(args: JobArgs) -> Result<()> {
    let v = client(&args.client)?.cancel(&args.job).await?;
    let aborted: Vec<String> =
        v["aborted"].as_array().map(|ids| ids.iter().map(|id| id.to_string()).collect()).unwrap_or_default();
    let pending = match aborted.as_slice() {
        [] => String::new(),
        [id] => format!("; pending checkpoint {id} aborted"),
        ids => format!("; pending checkpoints {} aborted", ids.join(", ")),
    };
    println!(
        "job {} cancelled{pending}; its workers are told to stop. Its committed checkpoints stay; \
         flotilla delete --job {} removes it from the ledger",
        args.job, args.job
    );
    Ok(())
}

/// `flotilla delete`: removes an ended job from the ledger (and, when
/// asked, its checkpoint directory).
pub(crate) async fn run_delete(args: DeleteArgs) -> Result<()> {
    let v = client(&args.client)?.delete_job(&args.job, args.remove_checkpoints).await?;
    let dir = v["dir"].as_str().unwrap_or("its directory").to_string();
    let files = match (args.remove_checkpoints, v["removed"].as_bool()) {
        (false, _) => format!(
            "its checkpoint files stay in {dir} (a new job can start from them with [checkpoint] resume_from)"
        ),
        (true, Some(true)) => format!("{dir} removed"),
        (true, _) => format!("{dir} is not removed yet: the leader removes it shortly"),
    };
    println!("job {} deleted; {files}. The name can be submitted again", args.job);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_table_has_a_line_per_job() {
        let jobs: Vec<JobStatus> = serde_json::from_value(serde_json::json!([
            {"name": "a", "state": "running", "generation": 2, "world_size": 4, "step": 0,
             "restores": 1, "latest_committed": {"id": 3, "step": 150}, "checkpoints": [],
             "workers": [], "final_digest": null, "error": null, "submitted_ms": 1_700_000_000_000u64},
            {"name": "b", "state": "cancelled", "generation": 1, "world_size": 1, "step": 0,
             "restores": 0, "latest_committed": null, "checkpoints": [], "workers": [],
             "final_digest": null, "error": null},
        ]))
        .unwrap();
        let shown = jobs_table(&jobs);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        let a: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&a[..5], ["a", "running", "2", "4", "3@150"], "{shown}");
        assert_eq!(a[5], Manifest::format_time(1_700_000_000_000), "{shown}");
        let b: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(b, ["b", "cancelled", "1", "1", "-", "-"], "{shown}");
        assert!(jobs_table(&[]).starts_with("no jobs"));
    }
}
