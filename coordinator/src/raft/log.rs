//! raft-rs logs through `slog`; this forwards its records to `tracing`, so
//! one subscriber (and one `RUST_LOG`) covers everything.

use flotilla_shared::ids::NodeId;
use std::fmt::Write;

struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::debug!(target: "raft", "{msg}{}", kv.0)
            }
        }
        Ok(())
    }
}

/// A slog logger for raft-rs that writes through `tracing`.
pub fn slog_to_tracing(node: NodeId) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("node" => node.0))
}
