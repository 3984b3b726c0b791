//! The job spec (SPEC §2): TOML in, a validated [`JobSpec`] out.
//!
//! Unknown keys, missing required keys and out-of-range values are refused
//! with an error that names the key, so an operator can fix the file at once.

use crate::ids::JobName;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Bytes of f32 state the built-in trainer keeps per unit of `hidden²` in one
/// layer: attention (4·d²) and MLP (8·d²) weights, each with Adam `m` and `v`
/// slots, 4 bytes per element. See `flotilla_worker::trainer`.
pub const TRAINER_BYTES_PER_LAYER_UNIT: u64 = 12 * 3 * 4;

/// A job as submitted: the unit the coordinator schedules and checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name, `[a-z0-9-]{1,63}`.
    pub name: JobName,
    /// Number of ranks (workers) in the job.
    pub world_size: u32,
    /// When and where checkpoints are taken.
    pub checkpoint: CheckpointSpec,
    /// How failures are detected and how often the job may restart.
    #[serde(default)]
    pub failure: FailureSpec,
    /// The built-in trainer's shape; absent for jobs run only with `--exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<TrainerSpec>,
}

/// `[checkpoint]`: the periodic consistent checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Take a checkpoint every this many steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_steps: Option<u64>,
    /// Take a checkpoint every this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_seconds: Option<u64>,
    /// Committed checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Shared storage every rank and coordinator can reach.
    pub root: PathBuf,
    /// A checkpoint not committed by then is aborted.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Start from the latest committed checkpoint of another job (its
    /// checkpoint directory, `<root>/<job>`), checked against the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<PathBuf>,
    /// A final checkpoint when every rank reaches `trainer.total_steps`,
    /// committed before the job succeeds (the built-in trainer's jobs).
    #[serde(default = "default_at_end")]
    pub at_end: bool,
    /// Copies of each rank's shard of the latest committed checkpoint held
    /// in other workers' memory (0: none), for a restore without storage.
    #[serde(default = "default_memory_copies")]
    pub memory_copies: u32,
}

/// `[failure]`: failure detection and restart budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureSpec {
    /// How often a worker reports.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long has failed.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Failure-caused restores allowed within any hour; one more fails the
    /// job. Operator restores, retries of a blocked restore and fallbacks
    /// past a corrupt checkpoint do not count.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// A running rank whose step does not advance this long has failed
    /// ("hang"): liveness is progress, not heartbeats alone.
    #[serde(default = "default_hang_timeout_seconds")]
    pub hang_timeout_seconds: u64,
    /// Extra free device memory a restore demands beyond the shard's bytes.
    #[serde(default)]
    pub memory_headroom_bytes: u64,
    /// Spare workers (`flotilla worker --spare`) the job is meant to have
    /// ready: `flotilla_job_spares_wanted`, and the FlotillaJobSpareMissing
    /// alert when fewer are ready. It starts none (the platform does).
    #[serde(default)]
    pub spares: u32,
}

impl Default for FailureSpec {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            max_restarts: default_max_restarts(),
            hang_timeout_seconds: default_hang_timeout_seconds(),
            memory_headroom_bytes: 0,
            spares: 0,
        }
    }
}

/// `[trainer]`: the built-in deterministic trainer (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerSpec {
    /// The job succeeds when every rank reaches this step.
    #[serde(default = "default_total_steps")]
    pub total_steps: u64,
    /// Bytes of f32 variables (weights and optimizer slots) per rank.
    #[serde(default = "default_params_per_rank_bytes")]
    pub params_per_rank_bytes: u64,
    /// Number of layers the variables are spread over.
    #[serde(default = "default_layers")]
    pub layers: u32,
    /// Simulated compute per step, on top of the real update.
    #[serde(default = "default_step_time_ms")]
    pub step_time_ms: u64,
    /// Seed of the deterministic initialisation and updates.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            total_steps: default_total_steps(),
            params_per_rank_bytes: default_params_per_rank_bytes(),
            layers: default_layers(),
            step_time_ms: default_step_time_ms(),
            seed: default_seed(),
        }
    }
}

fn default_keep_last() -> u32 {
    3
}
fn default_memory_copies() -> u32 {
    1
}
fn default_timeout_seconds() -> u64 {
    120
}
fn default_heartbeat_interval_ms() -> u64 {
    500
}
fn default_heartbeat_timeout_ms() -> u64 {
    3000
}
fn default_max_restarts() -> u32 {
    10
}
fn default_hang_timeout_seconds() -> u64 {
    300
}
fn default_total_steps() -> u64 {
    2000
}
fn default_params_per_rank_bytes() -> u64 {
    64 << 20
}
fn default_at_end() -> bool {
    true
}
fn default_layers() -> u32 {
    8
}
fn default_step_time_ms() -> u64 {
    5
}
fn default_seed() -> u64 {
    42
}

/// A refused job spec. The message names the key and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The TOML did not parse or did not match the schema (unknown key,
    /// missing key, wrong type); the parser's message names the key and line.
    #[error("job spec: {0}")]
    Parse(String),
    /// A value that is not a number outside a range, but of the wrong form
    /// (a relative path).
    #[error("job spec: `{key}` = {value} {expected}")]
    Refused {
        /// Dotted key, e.g. `checkpoint.root`.
        key: &'static str,
        /// The refused value, as written.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// A value outside its allowed range.
    #[error("job spec: `{key}` = {value} is out of range: {expected}")]
    OutOfRange {
        /// Dotted key, e.g. `checkpoint.keep_last`.
        key: &'static str,
        /// The refused value, as written.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// A required key (or one of a set) is missing.
    #[error("job spec: `{key}` is required: {hint}")]
    Missing {
        /// Dotted key.
        key: &'static str,
        /// How to fix it.
        hint: &'static str,
    },
}

fn check(
    ok: bool,
    key: &'static str,
    value: impl std::fmt::Display,
    expected: impl Into<String>,
) -> Result<(), SpecError> {
    if ok {
        Ok(())
    } else {
        Err(SpecError::OutOfRange { key, value: value.to_string(), expected: expected.into() })
    }
}

fn absolute(path: &std::path::Path, key: &'static str, why: &str) -> Result<(), SpecError> {
    if path.is_absolute() {
        return Ok(());
    }
    Err(SpecError::Refused {
        key,
        value: format!("{path:?}"),
        expected: format!("is relative: it must be an absolute path {why}"),
    })
}

/// A TOML or schema error on one line: where (line and dotted key), and
/// what was expected in words rather than Rust type names.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .trim_end()
        .replace("expected u32", "expected a whole number from 0 to 4294967295")
        .replace("expected u64", "expected a whole number from 0 to 18446744073709551615")
        .replace("expected usize", "expected a whole number from 0 to 18446744073709551615")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace('\n', " ");
    let Some(span) = e.span() else { return message };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    // the table the line is in: the last `[header]` above it
    let table = before
        .lines()
        .rev()
        .skip(1)
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('[')) {
        Some(key) => {
            let key = table.map_or_else(|| key.to_string(), |t| format!("{t}.{key}"));
            format!("line {line_no}, `{key}`: {message}")
        }
        None => format!("line {line_no}: {message}"),
    }
}

impl JobSpec {
    /// Largest job the coordinator accepts.
    pub const MAX_WORLD_SIZE: u32 = 65_536;

    /// Parses and validates a spec from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| SpecError::Parse(one_line(text, &e)))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Renders the spec back to TOML (e.g. for `flotilla demo` to submit).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serializes to TOML")
    }

    /// Checks every range rule; the first violation is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        check(
            (1..=Self::MAX_WORLD_SIZE).contains(&self.world_size),
            "world_size",
            self.world_size,
            format!("must be between 1 and {}", Self::MAX_WORLD_SIZE),
        )?;

        let c = &self.checkpoint;
        if c.every_steps.is_none() && c.every_seconds.is_none() {
            return Err(SpecError::Missing {
                key: "checkpoint.every_steps",
                hint: "set checkpoint.every_steps and/or checkpoint.every_seconds",
            });
        }
        if let Some(n) = c.every_steps {
            check(n >= 1, "checkpoint.every_steps", n, "must be at least 1")?;
        }
        if let Some(n) = c.every_seconds {
            check(n >= 1, "checkpoint.every_seconds", n, "must be at least 1")?;
        }
        check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be at least 1")?;
        check(c.memory_copies <= 8, "checkpoint.memory_copies", c.memory_copies, "must be between 0 and 8")?;
        absolute(&c.root, "checkpoint.root", "(every rank and coordinator resolves it alike)")?;
        if let Some(from) = &c.resume_from {
            absolute(from, "checkpoint.resume_from", "to another job's checkpoint directory (<root>/<job>)")?;
        }
        check(
            (1..=86_400).contains(&c.timeout_seconds),
            "checkpoint.timeout_seconds",
            c.timeout_seconds,
            "must be between 1 and 86400",
        )?;

        let f = &self.failure;
        check(
            (10..=600_000).contains(&f.heartbeat_interval_ms),
            "failure.heartbeat_interval_ms",
            f.heartbeat_interval_ms,
            "must be between 10 and 600000",
        )?;
        check(
            f.heartbeat_timeout_ms >= 2 * f.heartbeat_interval_ms && f.heartbeat_timeout_ms <= 3_600_000,
            "failure.heartbeat_timeout_ms",
            f.heartbeat_timeout_ms,
            format!(
                "must be at least twice failure.heartbeat_interval_ms ({}) and at most 3600000",
                f.heartbeat_interval_ms
            ),
        )?;

        check(
            (1..=604_800).contains(&f.hang_timeout_seconds),
            "failure.hang_timeout_seconds",
            f.hang_timeout_seconds,
            "must be between 1 and 604800 (a week)",
        )?;

        if let Some(t) = &self.trainer {
            check(t.total_steps >= 1, "trainer.total_steps", t.total_steps, "must be at least 1")?;
            check((1..=1024).contains(&t.layers), "trainer.layers", t.layers, "must be between 1 and 1024")?;
            let min = TRAINER_BYTES_PER_LAYER_UNIT * u64::from(t.layers);
            check(
                (min..=1 << 40).contains(&t.params_per_rank_bytes),
                "trainer.params_per_rank_bytes",
                t.params_per_rank_bytes,
                format!(
                    "must be between {min} ({TRAINER_BYTES_PER_LAYER_UNIT} × trainer.layers) and 1099511627776"
                ),
            )?;
            check(t.step_time_ms <= 60_000, "trainer.step_time_ms", t.step_time_ms, "must be at most 60000")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "demo"
world_size = 4

[checkpoint]
every_steps = 100
keep_last = 3
root = "/data/checkpoints"
timeout_seconds = 120

[failure]
heartbeat_interval_ms = 500
heartbeat_timeout_ms = 3000
max_restarts = 10
hang_timeout_seconds = 300
memory_headroom_bytes = 0

[trainer]
total_steps = 2000
params_per_rank_bytes = 67108864
layers = 8
step_time_ms = 5
seed = 42
"#;

    fn refused(text: &str) -> String {
        JobSpec::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn spec_example_parses_and_round_trips() {
        let spec = JobSpec::from_toml(FULL).unwrap();
        assert_eq!(spec.name.as_str(), "demo");
        assert_eq!(spec.world_size, 4);
        assert_eq!(spec.checkpoint.every_steps, Some(100));
        assert_eq!(spec.trainer.as_ref().unwrap().params_per_rank_bytes, 64 << 20);
        assert_eq!(JobSpec::from_toml(&spec.to_toml()).unwrap(), spec);
    }

    #[test]
    fn defaults_fill_optional_keys() {
        let spec = JobSpec::from_toml(
            "name = \"a\"\nworld_size = 1\n[checkpoint]\nevery_seconds = 60\nroot = \"/c\"\n",
        )
        .unwrap();
        assert_eq!(spec.checkpoint.keep_last, 3);
        assert!(spec.checkpoint.at_end, "a final checkpoint unless asked not to");
        assert_eq!(spec.failure, FailureSpec::default());
        assert_eq!(spec.trainer, None);
        let off = FULL.replace("timeout_seconds = 120", "timeout_seconds = 120\nat_end = false");
        assert!(!JobSpec::from_toml(&off).unwrap().checkpoint.at_end);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = refused(&FULL.replace("keep_last = 3", "keep_lst = 3"));
        assert!(e.contains("unknown field `keep_lst`"), "{e}");
        let e = refused(&format!("colour = \"red\"\n{FULL}"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = refused(&FULL.replace("[trainer]", "[trainer]\nlr = 0.1"));
        assert!(e.contains("unknown field `lr`"), "{e}");
    }

    #[test]
    fn missing_keys_are_named() {
        let e = refused(&FULL.replace("world_size = 4", ""));
        assert!(e.contains("missing field `world_size`"), "{e}");
        let e = refused(&FULL.replace("root = \"/data/checkpoints\"", ""));
        assert!(e.contains("missing field `root`"), "{e}");
        let e = refused(&FULL.replace("every_steps = 100", ""));
        assert!(e.contains("`checkpoint.every_steps` is required"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let cases = [
            ("world_size = 4", "world_size = 0", "`world_size` = 0"),
            ("keep_last = 3", "keep_last = 0", "`checkpoint.keep_last` = 0"),
            ("keep_last = 3", "keep_last = 3\nmemory_copies = 9", "`checkpoint.memory_copies` = 9"),
            ("every_steps = 100", "every_steps = 0", "`checkpoint.every_steps` = 0"),
            ("timeout_seconds = 120", "timeout_seconds = 0", "`checkpoint.timeout_seconds` = 0"),
            (
                "heartbeat_interval_ms = 500",
                "heartbeat_interval_ms = 1",
                "`failure.heartbeat_interval_ms` = 1",
            ),
            (
                "heartbeat_timeout_ms = 3000",
                "heartbeat_timeout_ms = 600",
                "`failure.heartbeat_timeout_ms` = 600",
            ),
            ("hang_timeout_seconds = 300", "hang_timeout_seconds = 0", "`failure.hang_timeout_seconds` = 0"),
            ("total_steps = 2000", "total_steps = 0", "`trainer.total_steps` = 0"),
            ("layers = 8", "layers = 0", "`trainer.layers` = 0"),
            (
                "params_per_rank_bytes = 67108864",
                "params_per_rank_bytes = 100",
                "`trainer.params_per_rank_bytes` = 100",
            ),
            ("step_time_ms = 5", "step_time_ms = 100000", "`trainer.step_time_ms` = 100000"),
        ];
        for (from, to, want) in cases {
            let e = refused(&FULL.replace(from, to));
            assert!(e.contains(want) && e.contains("out of range"), "{to}: {e}");
        }
    }

    #[test]
    fn wrong_types_and_bad_names_are_refused() {
        let e = refused(&FULL.replace("world_size = 4", "world_size = \"four\""));
        assert_eq!(
            e,
            "job spec: line 3, `world_size`: invalid type: string \"four\", expected a whole number from 0 to 4294967295"
        );
        let e = refused(&FULL.replace("world_size = 4", "world_size = -1"));
        assert!(
            e.starts_with(
                "job spec: line 3, `world_size`: invalid value: integer `-1`, expected a whole number"
            ),
            "{e}"
        );
        // a key in a table is named with its table
        let e = refused(&FULL.replace("keep_last = 3", "keep_last = \"x\""));
        assert!(e.contains("`checkpoint.keep_last`: invalid type"), "{e}");
        assert!(!e.contains('\n') && !e.contains(" u64") && !e.contains(" u32"), "{e}");
        let e = refused(&FULL.replace("\"demo\"", "\"Demo_1\""));
        assert!(e.contains("invalid job name"), "{e}");
        let e = refused("name = ");
        assert!(e.starts_with("job spec: line 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // a relative root is not "out of range"
        let e = refused(&FULL.replace("root = \"/data/checkpoints\"", "root = \"rel/ckpt\""));
        assert_eq!(
            e,
            "job spec: `checkpoint.root` = \"rel/ckpt\" is relative: it must be an absolute path (every rank and coordinator resolves it alike)"
        );
    }
}
