//! The crate's one `Result`, over one error that any of its seams' errors
//! converts into. Each function still returns its own seam's type (a
//! `SpecError` names a key, a `ShardError` a tensor); this is for callers
//! that handle them together.

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job spec.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// A shard file.
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    /// The checkpoint layout on storage.
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    /// A MANIFEST.json that contradicts itself.
    #[error(transparent)]
    Manifest(#[from] crate::layout::ManifestMismatch),
    /// `flotilla inspect`.
    #[error(transparent)]
    Inspect(#[from] crate::inspect::InspectError),
    /// Framing.
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
    /// A handshake.
    #[error(transparent)]
    Handshake(#[from] crate::frame::HandshakeError),
    /// A worker session.
    #[error(transparent)]
    Session(#[from] crate::frame::SessionError),
    /// TLS set-up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The crate's `Result`; `E` defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
