//! Identifiers: random ids for files, batches and HTTP exchanges, stable ids for batch
//! request lines.

use rand::distr::Alphanumeric;
use rand::Rng;

fn random_suffix(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

/// A new file id, `file-` followed by 24 random alphanumerics.
pub fn file_id() -> String {
    format!("file-{}", random_suffix(24))
}

/// A new batch id, `batch_` followed by 24 random alphanumerics.
pub fn batch_id() -> String {
    format!("batch_{}", random_suffix(24))
}

/// A new Message Batch id (Anthropic's API), `msgbatch_` followed by 24 random alphanumerics.
pub fn message_batch_id() -> String {
    format!("msgbatch_{}", random_suffix(24))
}

/// A new id of an HTTP exchange (`x-request-id`, when the client sent none), `req_` followed
/// by 24 random alphanumerics.
pub fn http_request_id() -> String {
    format!("req_{}", random_suffix(24))
}

/// The id of a batch's output or error file: derived from the batch id so that a
/// finalization interrupted by a crash writes the same file again, never a second one.
pub fn batch_output_file_id(batch_id: &str, kind: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{batch_id}/{kind}").as_bytes());
    format!("file-{h:032x}")
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
}
