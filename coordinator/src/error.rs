//! The crate's one `Result`, over one error that any of its seams' errors
//! converts into. Each function still returns its own seam's type (a
//! `FlagError` names a flag, a `ProposeError` says why a proposal went
//! nowhere); this is for callers that handle them together.

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A replica stopped.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    /// A flag's value cannot work.
    #[error(transparent)]
    Flag(#[from] crate::serve::FlagError),
    /// A data dir's identity.
    #[error(transparent)]
    Identity(#[from] crate::raft::identity::IdentityError),
    /// The Raft node.
    #[error(transparent)]
    Node(#[from] crate::raft::node::NodeError),
    /// A proposal.
    #[error(transparent)]
    Propose(#[from] crate::raft::node::ProposeError),
    /// The durable log.
    #[error(transparent)]
    Store(#[from] crate::raft::storage::StoreError),
    /// A peer.
    #[error(transparent)]
    Peer(#[from] crate::raft::transport::PeerError),
    /// A `resume_from` checkpoint.
    #[error(transparent)]
    Origin(#[from] crate::serve::origin::OriginError),
    /// The CLI's client.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// The client's CA file.
    #[error(transparent)]
    Ca(#[from] crate::client::CaError),
}

/// The crate's `Result`; `E` defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
