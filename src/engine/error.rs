//! [`Error`]: what can go wrong in a batch step, and what the engine does about it.
//!
//! - [`Error::Unavailable`]: the store or blob store is down or out of space. Nothing is
//!   wrong with the batch; the step waits with back-off for as long as it takes.
//! - [`Error::Retry`]: something unexpected. The step is tried again with back-off a few
//!   times, then treated as permanent, so no loop retries forever.
//! - [`Error::Permanent`]: this batch cannot go on (its input vanished, its stored state is
//!   unreadable). The batch is failed with the message; every other batch goes on.
//!
//! Engine errors never reach HTTP: they become `batch.errors`.

use crate::{blob, store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Retry(String),
    #[error("{code}: {message}")]
    Permanent { code: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        Error::Permanent { code, message: message.into() }
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: &str) -> Self {
        match self {
            Error::Unavailable(m) => Error::Unavailable(format!("{what}: {m}")),
            Error::Retry(m) => Error::Retry(format!("{what}: {m}")),
            Error::Permanent { code, message } => Error::Permanent { code, message: format!("{what}: {message}") },
        }
    }
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Unavailable(_) | store::Error::Full(_) => Error::Unavailable(e.to_string()),
            store::Error::NotFound => Error::permanent("state_missing", "a record the batch needs no longer exists"),
            store::Error::Conflict(_) | store::Error::Other(_) => Error::Retry(e.to_string()),
        }
    }
}

impl From<blob::Error> for Error {
    fn from(e: blob::Error) -> Self {
        match e {
            blob::Error::NotFound(_) => Error::permanent("input_unavailable", "the input file's bytes are missing from the blob store"),
            blob::Error::Unavailable(_) | blob::Error::Full(_) => Error::Unavailable(e.to_string()),
            blob::Error::Other(_) => Error::Retry(e.to_string()),
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
