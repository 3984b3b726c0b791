//! The Flotilla coordinator: the replicated job ledger ([`state`]).

pub mod state;
