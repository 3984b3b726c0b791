//! Shared memory between a worker and its `--exec` trainer: a file in
//! `/dev/shm` (tmpfs) that both map. The worker creates, sizes and touches
//! it; the trainer maps it by path (docs/TRAINER_PROTOCOL.md); the worker
//! removes the file when it drops it (the pages live on while the trainer
//! still maps them).

use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where shared-memory files go: `/dev/shm` where it exists, else the
/// temporary directory (still shared, but disk-backed).
pub fn shm_dir() -> PathBuf {
    let dev_shm = Path::new("/dev/shm");
    if dev_shm.is_dir() {
        dev_shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A unique name for a file of this process: `flotilla-<pid>-<n>-<what>`.
pub fn unique_name(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("flotilla-{}-{}-{what}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Removes the files in `dir` that [`unique_name`] gave processes no longer
/// alive: a worker killed with SIGKILL cannot remove its own, and each can
/// hold a whole shard of memory (tmpfs). Returns how many were removed. A
/// pid reused by a live process keeps its files (nothing is removed that
/// might be in use). Workers sharing one shm directory share a pid
/// namespace (one host, or one pod): a pid not alive here is dead.
pub fn sweep_dead(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("flotilla-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A shared-memory file mapped read-write, `len` bytes long.
#[derive(Debug)]
pub struct ShmFile {
    path: PathBuf,
    map: MmapMut,
    len: usize,
}

impl ShmFile {
    /// Creates `dir/name` of `len` bytes, maps it and touches every page, so
    /// neither side pays page faults later (a snapshot's copy is the stall).
    #[allow(unsafe_code)]
    pub fn create(dir: &Path, name: &str, len: usize) -> io::Result<Self> {
        let path = dir.join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let sized = file.set_len(len.max(1) as u64).and_then(|()| {
            // SAFETY: the file is ours, just created with a fresh name; the
            // trainer that maps it too only ever writes to it while the
            // worker does not read it (the protocol's save_begin/save_done)
            unsafe { MmapMut::map_mut(&file) }
        });
        let mut map = match sized {
            Ok(map) => map,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        for page in map.chunks_mut(4096) {
            page[0] = 0;
        }
        Ok(Self { path, map, len })
    }

    /// Its path (what the trainer maps).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for ShmFile {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl AsMut<[u8]> for ShmFile {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_mapping_sees_the_bytes_and_drop_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut shm = ShmFile::create(dir.path(), &unique_name("t"), 10_000).unwrap();
        shm.as_mut()[9_999] = 7;
        let other = std::fs::read(shm.path()).unwrap();
        assert_eq!((other.len(), other[9_999]), (10_000, 7));
        assert!(ShmFile::create(dir.path(), shm.path().file_name().unwrap().to_str().unwrap(), 1).is_err());
        let path = shm.path().to_path_buf();
        drop(shm);
        assert!(!path.exists());
        let empty = ShmFile::create(dir.path(), &unique_name("e"), 0).unwrap();
        assert!(empty.is_empty() && empty.as_ref().is_empty());
    }

    #[test]
    fn the_sweep_removes_only_files_of_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        // a process that has exited: its pid is free (until reused)
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = ShmFile::create(dir.path(), &unique_name("snapshot"), 16).unwrap();
        let leaked = dir.path().join(format!("flotilla-{dead}-3-snapshot"));
        std::fs::write(&leaked, b"x").unwrap();
        let other = dir.path().join("not-ours-1-2");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(sweep_dead(dir.path()), 1);
        assert!(!leaked.exists() && mine.path().exists() && other.exists());
    }
}
