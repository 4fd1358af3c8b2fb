//! [`Error`]: what a store call can fail with, whatever the database.
//!
//! The variants classify (what a caller does about it); the driver's own error stays attached
//! as the [`std::error::Error::source`], so a log line shows the whole chain while the API
//! and the engine decide on the variant alone. A `Display` never repeats its source.

/// The cause an error carries: the driver's error (`sqlx::Error`, a migration error) or a
/// message of the store's own (an unreadable row).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend-neutral store error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    /// The call conflicts with what is stored (a file still read by a running batch); the
    /// message is meant for the client.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached or refused for now: trying again later may succeed.
    #[error("store unavailable")]
    Unavailable(#[source] Cause),
    /// The store cannot write because its disk is full; reads still work.
    #[error("store is out of space")]
    Full(#[source] Cause),
    /// Anything else: a driver error that is neither of the above, an unreadable row, a
    /// schema this build cannot run on (see [`super::schema`]).
    #[error("store error")]
    Other(#[source] Cause),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again later may succeed (the store is down or full), as opposed to a
    /// problem with the data itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Full(_))
    }

    /// A stored row or value that cannot be what the store wrote.
    pub(crate) fn corrupt(what: impl Into<String>) -> Error {
        Error::Other(what.into().into())
    }
}
