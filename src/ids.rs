//! Identifiers: the typed ids of batches and files ([`BatchId`], [`FileId`]) that the store
//! and the engine pass around, how new ones are made, and the derived ids of request lines,
//! output files and outbox events.
//!
//! An id is text on the wire and in the database: each newtype serializes, binds and decodes
//! as its string, so nothing stored or sent changes; a clone shares the text (the engine
//! hands a batch's id to each of its lines).
//! What the type adds is that a batch id cannot be passed where a file id is meant. An id
//! that arrives from a client is taken as it is: an id no row has is simply not found.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use rand::distr::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

/// Declares a string id: one shared allocation (a clone is a reference count), transparent
/// to serde and sqlx, read as a `&str` where one is wanted.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name("".into())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s.into())
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.into())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map($name::from)
            }
        }

        impl<DB: Database> Type<DB> for $name
        where
            String: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <String as Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <String as Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: Database> Encode<'q, DB> for $name
        where
            String: Encode<'q, DB>,
        {
            fn encode_by_ref(&self, buf: &mut <DB as Database>::ArgumentBuffer<'q>) -> Result<IsNull, BoxDynError> {
                self.0.to_string().encode(buf)
            }
        }

        impl<'r, DB: Database> Decode<'r, DB> for $name
        where
            String: Decode<'r, DB>,
        {
            fn decode(value: <DB as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                String::decode(value).map($name::from)
            }
        }
    };
}

string_id!(
    /// A batch's id: `batch_…` (OpenAI's API) or `msgbatch_…` (Anthropic's Message Batches).
    BatchId
);

string_id!(
    /// A file's id: `file-…`, random for an upload, derived for a batch's output and error files.
    FileId
);

fn random_suffix(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

/// A new file id, `file-` followed by 24 random alphanumerics.
pub fn file_id() -> FileId {
    FileId::from(format!("file-{}", random_suffix(24)))
}

/// A new batch id, `batch_` followed by 24 random alphanumerics.
pub fn batch_id() -> BatchId {
    BatchId::from(format!("batch_{}", random_suffix(24)))
}

/// A new Message Batch id (Anthropic's API), `msgbatch_` followed by 24 random alphanumerics.
pub fn message_batch_id() -> BatchId {
    BatchId::from(format!("msgbatch_{}", random_suffix(24)))
}

/// A new id of an HTTP exchange (`x-request-id`, when the client sent none), `req_` followed
/// by 24 random alphanumerics.
pub fn http_request_id() -> String {
    format!("req_{}", random_suffix(24))
}

/// The id of a batch's output or error file: derived from the batch id so that a
/// finalization interrupted by a crash writes the same file again, never a second one.
pub fn batch_output_file_id(batch_id: &str, kind: &str) -> FileId {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{batch_id}/{kind}").as_bytes());
    FileId::from(format!("file-{h:032x}"))
}

/// The stable id of one request line: the same for every attempt and every restart,
/// sent upstream as `x-request-id` so that an upstream able to deduplicate can.
pub fn request_id(batch_id: &str, line: u64) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{batch_id}#{line}").as_bytes());
    format!("batch_req_{h:032x}")
}

/// The public id of an outbox event (`evt_…`): stable for the event, so a webhook's
/// redeliveries carry the same `webhook-id`, and distinct across stores that reuse numbers.
pub fn event_id(batch_id: &str, event: i64) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{batch_id}@{event}").as_bytes());
    format!("evt_{h:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefixes_and_differ() {
        let (a, b) = (file_id(), file_id());
        assert!(a.starts_with("file-") && a.len() == 29);
        assert_ne!(a, b);
        assert!(batch_id().starts_with("batch_"));
    }

    #[test]
    fn request_ids_are_stable_per_line() {
        assert_eq!(request_id("batch_x", 3), request_id("batch_x", 3));
        assert_ne!(request_id("batch_x", 3), request_id("batch_x", 4));
        assert_ne!(request_id("batch_x", 3), request_id("batch_y", 3));
    }

    #[test]
    fn ids_are_their_text_on_the_wire() {
        let id = BatchId::from("batch_abc");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"batch_abc\"");
        assert_eq!(serde_json::from_str::<BatchId>("\"batch_abc\"").unwrap(), id);
        assert_eq!(id.to_string(), "batch_abc");
    }
}
