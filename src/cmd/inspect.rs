//! `flotilla inspect`: a checkpoint on storage, offline: its ranks and
//! variables as text or JSON, and with --verify every checksum.

use super::{count, table};
use crate::cli::InspectArgs;
use anyhow::{bail, Result};
use flotilla_shared::inspect::{inspect, InspectError};
use flotilla_shared::layout::JobDir;
use std::path::Path;

/// The jobs whose checkpoint roots are the subdirectories of `dir`, when
/// `dir` is the checkpoint root above them (`[checkpoint] root`) rather
/// than one job's: it holds no LATEST and no ckpt-* directory itself.
fn jobs_under(dir: &Path) -> Vec<String> {
    let own = JobDir::at(dir);
    if own.latest_path().exists() || own.list_checkpoint_dirs().map_or(true, |d| !d.is_empty()) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut jobs: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter(|e| {
            let job = JobDir::at(e.path());
            job.latest_path().exists() || job.list_checkpoint_dirs().is_ok_and(|d| !d.is_empty())
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    jobs.sort();
    jobs
}

pub(crate) fn run_inspect(args: InspectArgs) -> Result<()> {
    let found = match inspect(&args.path) {
        Ok(found) => found,
        Err(e @ InspectError::NotACheckpoint(_)) if args.path.is_dir() => {
            let jobs = jobs_under(&args.path);
            let Some(first) = jobs.first() else { return Err(e.into()) };
            bail!(
                "{} is a checkpoint root above the jobs' own, holding {} ({}); pass <root>/<job>, e.g. flotilla inspect {}",
                args.path.display(),
                count(jobs.len() as u64, "job"),
                jobs.join(", "),
                args.path.join(first).display()
            );
        }
        Err(e) => return Err(e.into()),
    };
    // verified first: a failed check is an error, with nothing printed before it
    let verified = if args.verify { Some(found.verify()?) } else { None };
    if args.json {
        let shards: Vec<serde_json::Value> = found
            .shards
            .iter()
            .map(|(file, header)| {
                let entry =
                    found.manifest.as_ref().and_then(|m| m.ranks.iter().find(|r| file.ends_with(&r.file)));
                serde_json::json!({
                    "rank": header.meta.rank,
                    "file": file,
                    "step": header.meta.step,
                    "generation": header.meta.generation,
                    "bytes": header.file_len,
                    "checksum": entry.map(|e| e.checksum.to_string()),
                    "variables": header.tensors.iter().map(|(v, r)| serde_json::json!({
                        "name": v.name, "dtype": v.dtype.to_string(), "shape": v.shape, "bytes": r.len(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "dir": found.dir,
            "committed": found.manifest.is_some(),
            "manifest": found.manifest,
            "shards": shards,
            "verified_variables": verified,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match &found.manifest {
        Some(m) => println!(
            "checkpoint {} of job {}: step {}, generation {}, {}, {} bytes, committed {}",
            m.id,
            m.job,
            m.step,
            m.generation,
            count(u64::from(m.world_size), "rank"),
            m.bytes(),
            m.created
        ),
        None => println!(
            "{}: NOT COMMITTED (no MANIFEST.json): a partial or aborted checkpoint, never restored from",
            found.dir.display()
        ),
    }
    if let Some(n) = verified {
        // the verdict alone: the variables were listed by a plain inspect
        println!(
            "verified: {}, {}, every checksum matches",
            count(found.shards.len() as u64, "shard"),
            count(n as u64, "variable")
        );
        return Ok(());
    }
    for (file, header) in &found.shards {
        let entry = found.manifest.as_ref().and_then(|m| m.ranks.iter().find(|r| file.ends_with(&r.file)));
        println!(
            "rank {} {} step {} generation {} {} bytes{}",
            header.meta.rank,
            file.display(),
            header.meta.step,
            header.meta.generation,
            header.file_len,
            entry.map(|e| format!(" {}", e.checksum)).unwrap_or_default()
        );
        let rows = header
            .tensors
            .iter()
            .map(|(var, range)| {
                vec![
                    var.name.clone(),
                    var.dtype.to_string(),
                    format!("{:?}", var.shape),
                    range.len().to_string(),
                ]
            })
            .collect();
        let variables =
            table(&[("variable", false), ("dtype", false), ("shape", false), ("bytes", true)], rows);
        for line in variables.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}
