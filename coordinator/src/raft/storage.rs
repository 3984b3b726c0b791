//! The durable Raft log: raft-rs's [`Storage`] on TiKV's `raft-engine`.
//!
//! Everything Raft needs after a crash lives in one raft-engine group:
//! log entries, the hard state (term, vote, commit), the membership, and the
//! latest state-machine snapshot (metadata and data). Writes that Raft must
//! see durable before messages leave ([`LogStore::persist`]) go in a single
//! batch with `fdatasync`; an error there is returned, never swallowed, and
//! the node stops rather than acknowledge anything (see `node`).
//!
//! Invariant: the log starts right after the snapshot, i.e. when entries
//! exist, `first_index == snapshot.index + 1`; entries are only dropped
//! together with the snapshot that covers them.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command as EngineCommand, Config, Engine, LogBatch, MessageExt, ReadableSize};
use std::path::Path;

/// The one Raft group in the engine.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// Tells raft-engine how to index raft-rs entries.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// A failure of the log store. Fatal for the node: a replica that cannot
/// persist must not take part in consensus.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// raft-engine failed (I/O, corruption).
    #[error("raft log store: {}", describe(.0))]
    Engine(#[from] raft_engine::Error),
    /// The log could not be opened (or created) in `dir`.
    #[error("cannot open the raft log in {}: {}; check that --data-dir is a writable directory with free space", .dir.display(), describe(.source))]
    Open {
        /// The log's directory.
        dir: std::path::PathBuf,
        /// What raft-engine said.
        source: raft_engine::Error,
    },
    /// Injected by a failpoint (tests only).
    #[error("raft log store: injected failure at {0}")]
    Injected(&'static str),
}

/// raft-engine's error in words: an I/O error by its own message, not
/// Debug output, and without the `[source path:line]:` raft-engine puts
/// in front of some.
fn describe(e: &raft_engine::Error) -> String {
    let text = match e {
        raft_engine::Error::Io(io) => return io.to_string(),
        other => other.to_string(),
    };
    // the location is `[path/to/file.rs:LINE]: `, written by raft-engine's
    // error macro; anything else in brackets is part of the message
    let location = |inside: &str| {
        inside
            .rsplit_once(':')
            .is_some_and(|(file, line)| file.ends_with(".rs") && line.parse::<u32>().is_ok())
    };
    match (text.find('['), text.find("]: ")) {
        (Some(open), Some(close)) if open < close && location(&text[open + 1..close]) => {
            format!("{}{}", &text[..open], &text[close + 3..])
        }
        _ => text,
    }
}

/// The durable log of one replica.
pub struct LogStore {
    engine: Engine,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. A new log starts with `voters`
    /// as its membership; an existing one keeps what it recorded.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self, StoreError> {
        let cfg = Config {
            dir: dir.join("raft-engine").to_string_lossy().into_owned(),
            target_file_size: ReadableSize::mb(32),
            purge_threshold: ReadableSize::mb(256),
            ..Config::default()
        };
        let engine =
            Engine::open(cfg).map_err(|source| StoreError::Open { dir: dir.to_path_buf(), source })?;
        let hard_state = engine.get_message::<HardState>(GROUP, KEY_HARD_STATE)?.unwrap_or_default();
        let snapshot_meta = engine.get_message::<SnapshotMetadata>(GROUP, KEY_SNAPSHOT_META)?;
        let mut snapshot = Snapshot::default();
        if let Some(meta) = snapshot_meta {
            snapshot.set_metadata(meta);
            snapshot.data = engine.get(GROUP, KEY_SNAPSHOT_DATA).unwrap_or_default().into();
        }
        let mut store = match engine.get_message::<ConfState>(GROUP, KEY_CONF_STATE)? {
            Some(conf_state) => Self { engine, hard_state, conf_state, snapshot },
            None => {
                let conf_state = ConfState::from((voters.to_vec(), vec![]));
                let mut store = Self { engine, hard_state, conf_state: conf_state.clone(), snapshot };
                let mut batch = LogBatch::default();
                batch.put_message(GROUP, KEY_CONF_STATE.to_vec(), &conf_state)?;
                store.write(&mut batch)?;
                store
            }
        };
        store.snapshot.mut_metadata().set_conf_state(store.conf_state.clone());
        Ok(store)
    }

    fn write(&mut self, batch: &mut LogBatch) -> Result<(), StoreError> {
        fail::fail_point!("log_store::write::err", |_| Err(StoreError::Injected("log_store::write::err")));
        self.engine.write(batch, true)?;
        Ok(())
    }

    /// The hard state as last persisted.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The latest snapshot (index 0 when there is none).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Durably records, in one synced batch, a snapshot received from the
    /// leader (replacing the whole log), new entries and a new hard state.
    /// Raft may send the messages that depend on them only after this returns.
    pub fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        let mut next_hs = hard_state.cloned().unwrap_or_else(|| self.hard_state.clone());
        let mut next_snapshot = None;
        if let Some(snap) = snapshot.filter(|s| !s.is_empty()) {
            let meta = snap.get_metadata();
            // Clean wipes the group (entries and keys); everything is put back after it
            batch.add_command(GROUP, EngineCommand::Clean);
            batch.put_message(GROUP, KEY_SNAPSHOT_META.to_vec(), meta)?;
            batch.put(GROUP, KEY_SNAPSHOT_DATA.to_vec(), snap.data.to_vec())?;
            batch.put_message(GROUP, KEY_CONF_STATE.to_vec(), meta.get_conf_state())?;
            next_hs.term = next_hs.term.max(meta.term);
            next_hs.commit = next_hs.commit.max(meta.index);
            next_snapshot = Some(snap.clone());
        }
        if !entries.is_empty() {
            batch.add_entries::<EntryExt>(GROUP, entries)?;
        }
        if hard_state.is_some() || next_snapshot.is_some() {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &next_hs)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.write(&mut batch)?;
        self.hard_state = next_hs;
        if let Some(snap) = next_snapshot {
            self.conf_state = snap.get_metadata().get_conf_state().clone();
            self.snapshot = snap;
        }
        Ok(())
    }

    /// Durably records the membership after an applied change.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_CONF_STATE.to_vec(), &conf_state)?;
        self.write(&mut batch)?;
        self.snapshot.mut_metadata().set_conf_state(conf_state.clone());
        self.conf_state = conf_state;
        Ok(())
    }

    /// Records a newer commit index (from a LightReady).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.persist(None, &[], Some(&hs))
    }

    /// Records a state-machine snapshot at `index` (applied, so committed)
    /// and drops the log entries it covers.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), StoreError> {
        let term = raft::Storage::term(self, index).map_err(|e| {
            StoreError::Engine(raft_engine::Error::InvalidArgument(format!("no term for index {index}: {e}")))
        })?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(self.conf_state.clone());
        snap.data = data.into();
        let mut batch = LogBatch::default();
        batch.put_message(GROUP, KEY_SNAPSHOT_META.to_vec(), snap.get_metadata())?;
        batch.put(GROUP, KEY_SNAPSHOT_DATA.to_vec(), snap.data.to_vec())?;
        batch.add_command(GROUP, EngineCommand::Compact { index: index + 1 });
        self.write(&mut batch)?;
        self.snapshot = snap;
        // reclaim files whose entries are all compacted away
        self.engine.purge_expired_files()?;
        Ok(())
    }

    fn first(&self) -> u64 {
        self.engine.first_index(GROUP).unwrap_or(self.snapshot.get_metadata().index + 1)
    }

    fn last(&self) -> u64 {
        self.engine.last_index(GROUP).unwrap_or(self.snapshot.get_metadata().index)
    }
}

fn storage_err(e: raft_engine::Error) -> raft::Error {
    match e {
        raft_engine::Error::EntryCompacted => raft::Error::Store(StorageError::Compacted),
        raft_engine::Error::EntryNotFound => raft::Error::Store(StorageError::Unavailable),
        other => raft::Error::Store(StorageError::Other(Box::new(other))),
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low == high {
            return Ok(Vec::new());
        }
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().filter(|&m| m != raft::NO_LIMIT).map(|m| m as usize);
        let mut out = Vec::with_capacity((high - low) as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(GROUP, low, high, max_size, &mut out)
            .map_err(storage_err)?;
        if out.is_empty() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.engine.get_entry::<EntryExt>(GROUP, idx).map_err(storage_err)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        if meta.index == 0 || meta.index < request_index {
            // the node takes a fresh one at its next compaction check
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

/// Encodes a raft-rs message for the wire.
pub fn encode_message(msg: &raft::eraftpb::Message) -> Vec<u8> {
    msg.write_to_bytes().expect("a raft message always encodes")
}

/// Decodes a raft-rs message from the wire.
pub fn decode_message(bytes: &[u8]) -> Result<raft::eraftpb::Message, protobuf::ProtobufError> {
    raft::eraftpb::Message::parse_from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: format!("cmd-{index}").into_bytes().into(), ..Default::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..Default::default() }
    }

    #[test]
    fn an_unusable_data_dir_is_named_in_words() {
        let dir = tempfile::tempdir().unwrap();
        // a data dir under a regular file (ENOTDIR whoever runs the test, root included)
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let Err(e) = LogStore::open(&file.join("c1"), &[1]) else { panic!("opened a log under a file") };
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot open the raft log in {}: ", file.join("c1").display())),
            "{text}"
        );
        assert!(text.contains("--data-dir"), "{text}");
        assert!(!text.contains("Os {") && !text.contains(".rs:"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn a_new_store_has_the_initial_membership() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), &[1, 2, 3]).unwrap();
        let state = store.initial_state().unwrap();
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(state.hard_state, HardState::default());
        assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (1, 0));
        assert_eq!(store.term(0).unwrap(), 0);
    }

    #[test]
    fn everything_persisted_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), &[1, 2, 3]).unwrap();
            let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 2)).collect();
            store.persist(None, &entries, Some(&hs(2, 3, 0))).unwrap();
            store.set_commit(4).unwrap();
            // a conflicting suffix from a new leader replaces the tail
            store.persist(None, &[entry(4, 3)], Some(&hs(3, 1, 4))).unwrap();
        }
        let store = LogStore::open(dir.path(), &[9]).unwrap();
        let state = store.initial_state().unwrap();
        assert_eq!(state.hard_state, hs(3, 1, 4));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3], "membership comes from the log, not the flags");
        assert_eq!(store.last_index().unwrap(), 4);
        assert_eq!(store.term(4).unwrap(), 3);
        let got = store.entries(1, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(1, 2), (2, 2), (3, 2), (4, 3)]
        );
        assert_eq!(&got[0].data[..], b"cmd-1");
        // size limits still return at least one entry
        assert_eq!(store.entries(1, 5, 1, GetEntriesContext::empty(false)).unwrap().len(), 1);
    }

    #[test]
    fn compaction_keeps_a_snapshot_and_drops_covered_entries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), &[1]).unwrap();
            let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1)).collect();
            store.persist(None, &entries, Some(&hs(1, 1, 10))).unwrap();
            assert!(matches!(
                store.snapshot(0, 2),
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
            ));
            store.compact(7, b"state@7".to_vec()).unwrap();
        }
        let store = LogStore::open(dir.path(), &[1]).unwrap();
        assert_eq!(store.first_index().unwrap(), 8);
        assert_eq!(store.last_index().unwrap(), 10);
        assert_eq!(store.term(7).unwrap(), 1);
        assert!(matches!(store.term(6), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            store.entries(5, 9, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snap = store.snapshot(0, 2).unwrap();
        assert_eq!((snap.get_metadata().index, &snap.data[..]), (7, &b"state@7"[..]));
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1]);
    }

    #[test]
    fn a_received_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), &[1, 2, 3]).unwrap();
        store.persist(None, &[entry(1, 1), entry(2, 1)], Some(&hs(1, 2, 1))).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        snap.data = b"state@50".to_vec().into();
        store.persist(Some(&snap), &[], None).unwrap();
        drop(store);
        let mut store = LogStore::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (51, 50));
        assert_eq!(store.term(50).unwrap(), 4);
        assert_eq!(store.hard_state().commit, 50);
        assert_eq!(store.hard_state().term, 4);
        assert_eq!(&store.latest_snapshot().data[..], b"state@50");
        // the log continues right after it
        store.persist(None, &[entry(51, 4)], None).unwrap();
        assert_eq!(store.last_index().unwrap(), 51);
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let mut m = raft::eraftpb::Message { from: 1, to: 2, term: 7, ..Default::default() };
        m.set_entries(vec![entry(3, 7)].into());
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
        assert!(decode_message(&[0xff, 0xff, 0xff]).is_err());
    }
}
