//! Device memory: how much the device a rank restores onto has free.
//!
//! - NVML (`nvml-wrapper`, loaded at run time, so the binary runs where
//!   `libnvidia-ml.so.1` is absent) for the GPU chosen by `--gpu`;
//! - without NVML, the host's available memory (`/proc/meminfo`), with a
//!   warning in the log and in status (`--require-gpu` refuses instead);
//! - `FLOTILLA_DEVICE_FREE_BYTES=N` replaces the free figure by N (tests,
//!   drills), logged and shown in status, never silent.

use serde::Serialize;

/// Name of the override variable.
pub const FREE_BYTES_OVERRIDE: &str = "FLOTILLA_DEVICE_FREE_BYTES";

/// Where a reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// NVML, from the driver.
    Nvml,
    /// The host's available memory (no NVML here).
    Host,
}

/// One reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reading {
    /// The device as people name it: `GPU 0 (NVIDIA H100 80GB HBM3)` or `host memory`.
    pub device: String,
    /// Device label for metrics (`gpu0`, `host`).
    pub label: String,
    /// Total bytes.
    pub total: u64,
    /// Free bytes (the override's value when one is in force).
    pub free: u64,
    /// Where the figures came from.
    pub source: Source,
    /// The override in force, if any.
    pub free_override: Option<u64>,
}

/// Why device memory could not be read, or the reader could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// NVML is loaded but cannot open the GPU `--gpu` names.
    #[error("NVML cannot open GPU {selector}: {source}; check --gpu (an index or a UUID)")]
    OpenGpu {
        /// The `--gpu` value.
        selector: String,
        /// NVML's answer.
        source: nvml_wrapper::error::NvmlError,
    },
    /// NVML opened the GPU but cannot read its memory.
    #[error("NVML memory_info on GPU {selector}: {source}")]
    MemoryInfo {
        /// The `--gpu` value.
        selector: String,
        /// NVML's answer.
        source: nvml_wrapper::error::NvmlError,
    },
    /// `--require-gpu` with no NVML on this host.
    #[error("--require-gpu: NVML is not available ({0}); install the NVIDIA driver or drop --require-gpu")]
    NoNvml(nvml_wrapper::error::NvmlError),
    /// The host's memory figures cannot be read.
    #[error("cannot read /proc/meminfo: {0}")]
    Meminfo(std::io::Error),
    /// `/proc/meminfo` lacks a figure.
    #[error("no {0} in /proc/meminfo")]
    MeminfoField(&'static str),
    /// `FLOTILLA_DEVICE_FREE_BYTES` is not a number.
    #[error("{FREE_BYTES_OVERRIDE}={0:?} is not a number of bytes")]
    BadOverride(String),
}

/// A device whose memory can be read.
pub trait DeviceMemory: Send + Sync {
    /// Reads total and free memory now.
    fn read(&self) -> crate::Result<Reading, DeviceError>;
}

struct Nvml {
    nvml: nvml_wrapper::Nvml,
    selector: String,
}

impl Nvml {
    fn device(&self) -> crate::Result<nvml_wrapper::Device<'_>, DeviceError> {
        match self.selector.parse::<u32>() {
            Ok(i) => self.nvml.device_by_index(i),
            Err(_) => self.nvml.device_by_uuid(self.selector.as_str()),
        }
        .map_err(|source| DeviceError::OpenGpu { selector: self.selector.clone(), source })
    }
}

impl DeviceMemory for Nvml {
    fn read(&self) -> crate::Result<Reading, DeviceError> {
        let dev = self.device()?;
        let mem = dev
            .memory_info()
            .map_err(|source| DeviceError::MemoryInfo { selector: self.selector.clone(), source })?;
        let name = dev.name().unwrap_or_else(|_| "unknown".into());
        Ok(Reading {
            device: format!("GPU {} ({name})", self.selector),
            label: format!("gpu{}", self.selector),
            total: mem.total,
            free: mem.free,
            source: Source::Nvml,
            free_override: None,
        })
    }
}

/// The host's available memory (`MemAvailable` in `/proc/meminfo`): the
/// device without NVML, and where the built-in trainer's and the snapshot
/// buffer's memory always comes from.
pub struct Host;

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

impl DeviceMemory for Host {
    fn read(&self) -> crate::Result<Reading, DeviceError> {
        let text = std::fs::read_to_string("/proc/meminfo").map_err(DeviceError::Meminfo)?;
        let total = meminfo_kib(&text, "MemTotal:").ok_or(DeviceError::MeminfoField("MemTotal"))? * 1024;
        let free =
            meminfo_kib(&text, "MemAvailable:").ok_or(DeviceError::MeminfoField("MemAvailable"))? * 1024;
        Ok(Reading {
            device: "host memory".into(),
            label: "host".into(),
            total,
            free,
            source: Source::Host,
            free_override: None,
        })
    }
}

struct Override {
    inner: Box<dyn DeviceMemory>,
    free: u64,
}

impl DeviceMemory for Override {
    fn read(&self) -> crate::Result<Reading, DeviceError> {
        let mut r = self.inner.read()?;
        r.free = self.free;
        r.free_override = Some(self.free);
        Ok(r)
    }
}

/// Opens the device memory source for `gpu` (index or UUID; default 0).
/// `override_free` is the value of `FLOTILLA_DEVICE_FREE_BYTES`, if set.
pub fn open(
    gpu: Option<&str>,
    require_gpu: bool,
    override_free: Option<&str>,
) -> crate::Result<Box<dyn DeviceMemory>, DeviceError> {
    let selector = gpu.unwrap_or("0").to_string();
    let base: Box<dyn DeviceMemory> = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => {
            let dev = Nvml { nvml, selector };
            let reading = dev.read()?;
            tracing::info!(
                "device memory from NVML: {}, {} of {} bytes free",
                reading.device,
                reading.free,
                reading.total
            );
            Box::new(dev)
        }
        Err(e) if require_gpu => return Err(DeviceError::NoNvml(e)),
        Err(e) => {
            tracing::warn!(
                "NVML is not available ({e}); restores check the host's available memory instead of a GPU's"
            );
            Box::new(Host)
        }
    };
    match override_free {
        None => Ok(base),
        Some(text) => {
            let free: u64 = text.trim().parse().map_err(|_| DeviceError::BadOverride(text.to_string()))?;
            tracing::warn!("{FREE_BYTES_OVERRIDE}={free} is in force: restores see {free} bytes free");
            Ok(Box::new(Override { inner: base, free }))
        }
    }
}

/// Formats bytes in the largest binary unit that keeps one digit before
/// the point (B, KiB, MiB, GiB, TiB), one decimal, as messages show them:
/// `16.0 MiB`, `1000 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_reads_and_override_replaces_free() {
        let host = Host.read().unwrap();
        assert!(host.total > 0 && host.free <= host.total);
        let o = Override { inner: Box::new(Host), free: 1234 };
        let r = o.read().unwrap();
        assert_eq!((r.free, r.free_override, r.total), (1234, Some(1234), host.total));
    }

    #[test]
    fn override_must_be_a_number() {
        let err = open(None, false, Some("lots")).err().unwrap().to_string();
        assert!(err.contains("FLOTILLA_DEVICE_FREE_BYTES"), "{err}");
    }

    #[test]
    fn nvml_when_present_else_host_with_require_gpu_refusing() {
        // Runs for real either way: on a machine with the NVIDIA driver the
        // NVML path reads the GPU; elsewhere the fallback and refusal are checked.
        match nvml_wrapper::Nvml::init() {
            Ok(_) => {
                let dev = open(Some("0"), true, None).unwrap();
                let r = dev.read().unwrap();
                assert_eq!(r.source, Source::Nvml);
                assert!(r.total > 0 && r.free <= r.total, "{r:?}");
            }
            Err(_) => {
                eprintln!("NVML not present: checked the host fallback and --require-gpu instead (no GPU test here)");
                let err = open(None, true, None).err().unwrap().to_string();
                assert!(err.contains("--require-gpu"), "{err}");
                assert_eq!(open(None, false, None).unwrap().read().unwrap().source, Source::Host);
            }
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(16_777_216 + 8_192), "16.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(13_314_398_618), "12.4 GiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }
}
