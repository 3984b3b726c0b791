//! The worker's Prometheus metrics (SPEC §9).

use crate::device::Reading;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every worker metric, registered in [`WorkerMetrics::registry`].
#[derive(Clone)]
pub struct WorkerMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Steps completed.
    pub step: IntGauge,
    /// Training stall per snapshot.
    pub stall: Histogram,
    /// Background shard write (checksums, write, fsync, rename).
    pub shard_write: Histogram,
    /// Bytes of shards written.
    pub bytes_written: IntCounter,
    /// Restore (validate, memory check, read + verify, load).
    pub restore: Histogram,
    /// Each phase of a restore (`phase`: prechecks, read_verify, load).
    pub restore_phase: HistogramVec,
    /// Device memory the last restore's precheck asked for (the shard's
    /// bytes plus `failure.memory_headroom_bytes`); compare with
    /// `flotilla_device_memory_free_bytes` when a rank is blocked.
    pub restore_need_bytes: IntGauge,
    /// Bytes of other ranks' shards this worker holds in memory (copies).
    pub memory_copy_bytes: IntGauge,
    /// Sending one copy of this rank's shard to a peer.
    pub memory_copy_seconds: Histogram,
    device_free: IntGaugeVec,
    device_total: IntGaugeVec,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// Every metric, unlabelled (tests).
    pub fn new() -> Self {
        Self::with_registry(Registry::new())
    }

    /// Every metric of `rank` of `job`: each series carries `job` and
    /// `rank` labels, so that series from many workers stay apart in one
    /// Prometheus (scrape with `honor_labels: true`, as the coordinators).
    pub fn for_rank(job: &str, rank: u32) -> Self {
        let labels = std::collections::HashMap::from([
            ("job".to_string(), job.to_string()),
            ("rank".to_string(), rank.to_string()),
        ]);
        Self::with_registry(Registry::new_custom(None, Some(labels)).expect("valid labels"))
    }

    /// Every metric of a worker of `job`: `rank`'s, or a spare's (`rank`
    /// label `spare`; a spare that takes a rank keeps its series' labels,
    /// and its status says the rank).
    pub fn for_worker(job: &str, rank: Option<flotilla_shared::ids::Rank>) -> Self {
        match rank {
            Some(rank) => Self::for_rank(job, rank.0),
            None => {
                let labels = std::collections::HashMap::from([
                    ("job".to_string(), job.to_string()),
                    ("rank".to_string(), "spare".to_string()),
                ]);
                Self::with_registry(Registry::new_custom(None, Some(labels)).expect("valid labels"))
            }
        }
    }

    fn with_registry(registry: Registry) -> Self {
        flotilla_shared::register_process_metrics(&registry);
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let durations =
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        let step =
            IntGauge::new("flotilla_worker_step", "Training steps completed by this rank.").expect("valid");
        registry.register(Box::new(step.clone())).expect("registered once");
        let stall = hist(
            "flotilla_snapshot_stall_seconds",
            "Training stall per checkpoint (copy of the variables into the host buffer).",
            durations.clone(),
        );
        let shard_write = hist(
            "flotilla_shard_write_seconds",
            "Background shard write: checksums, write, fsync, rename, directory fsync.",
            durations.clone(),
        );
        let restore = hist(
            "flotilla_restore_seconds",
            "Restore of this rank: validate, device memory check, read and verify, load.",
            durations.clone(),
        );
        let restore_phase = HistogramVec::new(
            HistogramOpts::new(
                "flotilla_restore_phase_seconds",
                "A restore's phases: prechecks (model, device memory), read_verify (read and every checksum, in parallel), load.",
            )
            .buckets(durations),
            &["phase"],
        )
        .expect("valid metric");
        registry.register(Box::new(restore_phase.clone())).expect("registered once");
        let bytes_written =
            IntCounter::new("flotilla_shard_bytes_written_total", "Bytes of shards written durably.")
                .expect("valid");
        registry.register(Box::new(bytes_written.clone())).expect("registered once");
        let device_free = IntGaugeVec::new(
            Opts::new(
                "flotilla_device_memory_free_bytes",
                "Free memory of the device restores check (last reading).",
            ),
            &["device"],
        )
        .expect("valid");
        registry.register(Box::new(device_free.clone())).expect("registered once");
        let device_total = IntGaugeVec::new(
            Opts::new("flotilla_device_memory_total_bytes", "Total memory of the device restores check."),
            &["device"],
        )
        .expect("valid");
        registry.register(Box::new(device_total.clone())).expect("registered once");
        let restore_need_bytes = IntGauge::new(
            "flotilla_restore_need_bytes",
            "Device memory the last restore's precheck needed: the shard's bytes plus failure.memory_headroom_bytes.",
        )
        .expect("valid");
        registry.register(Box::new(restore_need_bytes.clone())).expect("registered once");
        let memory_copy_bytes = IntGauge::new(
            "flotilla_memory_copy_bytes",
            "Bytes of other ranks' shards (memory copies of the latest committed checkpoint) held in this worker's memory.",
        )
        .expect("valid");
        registry.register(Box::new(memory_copy_bytes.clone())).expect("registered once");
        let memory_copy_seconds = hist(
            "flotilla_memory_copy_seconds",
            "Sending one memory copy of this rank's shard to a peer worker (accepted or refused).",
            vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        );
        Self {
            memory_copy_bytes,
            memory_copy_seconds,
            registry,
            step,
            stall,
            shard_write,
            bytes_written,
            restore,
            restore_phase,
            restore_need_bytes,
            device_free,
            device_total,
        }
    }

    /// Records a device memory reading.
    pub fn observe_device(&self, r: &Reading) {
        self.device_free.with_label_values(&[&r.label]).set(r.free as i64);
        self.device_total.with_label_values(&[&r.label]).set(r.total as i64);
    }

    /// The last free-memory reading of device `label`, if one was taken.
    pub fn device_free(&self, label: &str) -> Option<u64> {
        let g = self.device_free.get_metric_with_label_values(&[label]).ok()?;
        u64::try_from(g.get()).ok()
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
