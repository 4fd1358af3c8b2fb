//! [`Error`]: what can go wrong in a batch step, and what the engine does about it.
//!
//! - [`Error::Unavailable`]: the database or the object store is down or out of space
//!   ([`Error::outage`] tells which). Nothing is wrong with the batch; the step waits with
//!   back-off for as long as it takes.
//! - [`Error::Retry`]: something unexpected. The step is tried again with back-off a few
//!   times, then treated as permanent, so no loop retries forever.
//! - [`Error::Permanent`]: this batch cannot go on (its input vanished, its stored state is
//!   unreadable). The batch is failed with the message; every other batch goes on.
//!
//! Engine errors never reach HTTP: they become `batch.errors`.

use crate::{blob, store};

/// The error behind an engine error, kept whole: the store's, the blob store's, a panic's
/// message, each wrapped in what the engine was doing ([`Error::context`]).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Unavailable(Cause),
    #[error(transparent)]
    Retry(Cause),
    #[error("{code}: {message}")]
    Permanent { code: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the engine was doing when `source` stopped it.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
struct Doing {
    what: String,
    #[source]
    source: Cause,
}

impl Error {
    /// What an `Unavailable` error says is out, by the error its chain holds: "the object
    /// store" (a blob store error) or "the database" (a store error); "the store" otherwise.
    pub fn outage(&self) -> &'static str {
        let Error::Unavailable(cause) = self else { return "the store" };
        let mut at: Option<&(dyn std::error::Error + 'static)> = Some(cause.as_ref());
        while let Some(e) = at {
            if e.is::<blob::Error>() {
                return "the object store";
            }
            if e.is::<store::Error>() {
                return "the database";
            }
            at = e.source();
        }
        "the store"
    }

    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Error::Permanent { code, message: message.into() }
    }

    /// Says what was being done: a permanent error's message is prefixed with it, the other
    /// errors are wrapped in it (their cause stays their source).
    pub fn context(self, what: &str) -> Self {
        let doing = |source| Box::new(Doing { what: what.to_string(), source });
        match self {
            Error::Unavailable(e) => Error::Unavailable(doing(e)),
            Error::Retry(e) => Error::Retry(doing(e)),
            Error::Permanent { code, message } => Error::Permanent { code, message: format!("{what}: {message}") },
        }
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound => Error::permanent("state_missing", "a record the batch needs no longer exists"),
            _ if e.is_transient() => Error::Unavailable(Box::new(e)),
            _ => Error::Retry(Box::new(e)),
        }
    }
}

impl From<blob::Error> for Error {
    fn from(e: blob::Error) -> Self {
        match e {
            blob::Error::NotFound(_) => Error::permanent("input_unavailable", "the input file's bytes are missing from the blob store"),
            blob::Error::Unavailable(_) | blob::Error::Full(_) => Error::Unavailable(Box::new(e)),
            blob::Error::Other(_) => Error::Retry(Box::new(e)),
        }
    }
}

/// Adds `.ctx("doing what")` to results whose error converts into [`Error`].
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }
}
