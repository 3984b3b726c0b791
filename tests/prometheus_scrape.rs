//! A real Prometheus server (Debian's `prometheus`, which `scripts/test.sh`
//! installs) scrapes a local cluster of 3 coordinators and 2 workers; its
//! query API must return every series of SPEC §9 with sane values.

mod common;

use common::{wait_for, BIN};
use flotilla_coordinator::client::Client;
use flotilla_coordinator::testkit::local::{free_port, LocalCluster, LocalOptions, LocalWorkers};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a PromQL instant query; returns every sample's value.
async fn query(base: &str, promql: &str) -> Result<Vec<f64>, String> {
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    let result = v["data"]["result"].as_array().ok_or_else(|| format!("bad answer: {v}"))?;
    Ok(result.iter().filter_map(|r| r["value"][1].as_str().and_then(|x| x.parse().ok())).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_every_spec_series() {
    let prometheus = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "the prometheus server is not installed: `apt-get install prometheus` (scripts/test.sh does)",
        );
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "name = \"watched\"\nworld_size = 2\n[checkpoint]\nevery_steps = 50\nroot = \"{}\"\n\
         [trainer]\ntotal_steps = 1000000\nparams_per_rank_bytes = 262144\nlayers = 2\nstep_time_ms = 5\n",
        dir.path().join("ckpt").display()
    );
    let cluster = LocalCluster::start(Path::new(BIN), dir.path(), 3, LocalOptions::default()).unwrap();
    cluster.wait_for_leader(LONG).await.unwrap();
    let client = Client::new(cluster.endpoints().split(',').map(String::from).collect(), None);
    client.submit(&spec).await.unwrap();
    let mut workers = LocalWorkers::new(Path::new(BIN), dir.path(), cluster.api_endpoints(), "watched", 2);
    workers.spawn(0, &[]).unwrap();
    workers.spawn(1, &[]).unwrap();

    // `honor_labels`: the coordinators' series carry a `job` label (the
    // Flotilla job, SPEC §9) that must win over the scrape job's name
    tracing::info!("--- Prometheus scrapes every process each second");
    let coordinators: Vec<String> = cluster.nodes.iter().map(|n| format!("'{}'", n.http_addr)).collect();
    let worker_targets: Vec<String> = (0..2).map(|r| format!("'{}'", workers.http_addr(r))).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         \x20 - job_name: flotilla-coordinator\n    honor_labels: true\n    static_configs:\n      - targets: [{}]\n\
         \x20 - job_name: flotilla-worker\n    honor_labels: true\n    static_configs:\n      - targets: [{}]\n",
        coordinators.join(", "),
        worker_targets.join(", ")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port().unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = KillOnDrop(
        Command::new(prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");

    wait_for("all 5 targets up", LONG, || async {
        let up = query(&base, "sum(up)").await?;
        if up == [5.0] {
            Ok(())
        } else {
            Err(format!("sum(up) = {up:?}"))
        }
    })
    .await;
    wait_for("exactly one leader", LONG, || async {
        let leaders = query(&base, "sum(flotilla_raft_is_leader)").await?;
        if leaders == [1.0] {
            Ok(())
        } else {
            Err(format!("{leaders:?}"))
        }
    })
    .await;

    tracing::info!("--- a worker dies and comes back: restores and recovery are counted");
    workers.kill(1);
    workers.spawn(1, &[]).unwrap();

    let committed = wait_for("a committed checkpoint", LONG, || async {
        let v = query(&base, "max(flotilla_latest_committed_step{job=\"watched\"})").await?;
        match v.first() {
            Some(step) if *step > 0.0 => Ok(*step),
            _ => Err(format!("{v:?}")),
        }
    })
    .await;
    wait_for("the latest committed step to rise", LONG, || async {
        let v = query(&base, "max(flotilla_latest_committed_step{job=\"watched\"})").await?;
        if v.first().is_some_and(|s| *s > committed) {
            Ok(())
        } else {
            Err(format!("{v:?} after {committed}"))
        }
    })
    .await;

    tracing::info!("--- every SPEC §9 series is there");
    let series = [
        "flotilla_raft_term",
        "flotilla_raft_is_leader",
        "flotilla_raft_commit_index",
        "flotilla_job_generation{job=\"watched\"}",
        "flotilla_job_step{job=\"watched\"}",
        "flotilla_job_workers{job=\"watched\"}",
        "flotilla_latest_committed_step{job=\"watched\"}",
        "flotilla_checkpoints_total{job=\"watched\",outcome=\"committed\"}",
        "flotilla_checkpoint_duration_seconds_count{job=\"watched\"}",
        "flotilla_restores_total{job=\"watched\"}",
        "flotilla_recovery_duration_seconds_count{job=\"watched\"}",
        "flotilla_worker_step",
        "flotilla_snapshot_stall_seconds_count",
        "flotilla_shard_write_seconds_count",
        "flotilla_shard_bytes_written_total",
        "flotilla_restore_seconds_count",
        "flotilla_device_memory_free_bytes",
        "flotilla_device_memory_total_bytes",
        // step 9: every process, every worker series by job and rank, liveness per rank
        "flotilla_build_info{version!=\"\",commit!=\"\"}",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "flotilla_worker_step{job=\"watched\",rank=\"1\"}",
        "flotilla_worker_heartbeat_age_seconds{job=\"watched\",rank=\"0\"}",
    ];
    for s in series {
        wait_for(&format!("series {s}"), LONG, || async {
            let v = query(&base, s).await?;
            if v.is_empty() {
                Err("no samples".to_string())
            } else {
                Ok(())
            }
        })
        .await;
    }
    // values that must make sense
    assert_eq!(query(&base, "count(flotilla_raft_is_leader == 1)").await.unwrap(), [1.0]);
    // the restarted rank's series comes back with its next scrape (the
    // failed scrapes of the killed process marked it stale)
    wait_for("both ranks' steps above 0", LONG, || async {
        let v = query(&base, "count(flotilla_worker_step > 0)").await?;
        if v == [2.0] {
            Ok(())
        } else {
            Err(format!("{v:?}"))
        }
    })
    .await;
    let gen = query(&base, "max(flotilla_job_generation{job=\"watched\"})").await.unwrap();
    assert!(gen.first().is_some_and(|g| *g >= 2.0), "a restore must have moved the generation: {gen:?}");
    let restores = query(&base, "sum(flotilla_restores_total{job=\"watched\"})").await.unwrap();
    assert!(restores.first().is_some_and(|r| *r >= 1.0), "{restores:?}");
    let running = query(&base, "max(flotilla_job_state{job=\"watched\",state=\"running\"})").await.unwrap();
    assert_eq!(running, [1.0]);
    let free = query(&base, "min(flotilla_device_memory_free_bytes)").await.unwrap();
    assert!(free.first().is_some_and(|f| *f > 0.0), "{free:?}");
    // live ranks are heard from within a few heartbeats
    let age = query(&base, "max(flotilla_worker_heartbeat_age_seconds{job=\"watched\"})").await.unwrap();
    assert!(age.first().is_some_and(|a| *a < 5.0), "{age:?}");

    tracing::info!("--- every series the dashboard and the alert rules name is exported");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut named = std::collections::BTreeSet::new();
    for file in ["deploy/grafana/flotilla.json", "deploy/prometheus/rules.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        named.extend(metric_names(&text));
    }
    assert!(named.len() >= 15, "the dashboard and rules name {named:?}");
    for name in &named {
        let v = query(&base, &format!("count({{__name__=\"{name}\"}})")).await.unwrap();
        assert!(!v.is_empty(), "{name} is named by the dashboard or an alert rule but no process exports it");
    }

    tracing::info!("--- promtool accepts every endpoint's exposition");
    let targets = cluster
        .nodes
        .iter()
        .map(|n| n.http_addr.clone())
        .chain((0..2).map(|r| workers.http_addr(r).to_string()));
    for target in targets {
        let text = reqwest::get(format!("http://{target}/metrics")).await.unwrap().text().await.unwrap();
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool comes with the prometheus package (scripts/test.sh installs it)");
        use std::io::Write;
        promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {target}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The series names (`flotilla_*`, `process_*`) a PromQL-bearing file uses.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_')
            && (i == 0
                || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':'));
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..bytes.len())
            .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
            .unwrap_or(bytes.len());
        let word = &text[i..end];
        if word.starts_with("flotilla_") || word.starts_with("process_") {
            names.push(word.to_string());
        }
        i = end;
    }
    names
}
