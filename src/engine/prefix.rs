//! Prefix keys: which lines of a batch begin with the same tokens on the server.
//!
//! A server with a prefix cache (vLLM, SGLang) computes a prompt's leading tokens once and
//! reuses them while they stay cached; what it caches is the prompt as its chat template
//! renders it — tools, then the system prompt, then each message in order. A line's
//! [`PrefixKey`] follows that order without knowing the template: it hashes the model, then
//! the request's leading part as a stream of *pieces* (each message's role, name, content and
//! tool calls, in the order the server renders them, every piece as its JSON text), cut into
//! fixed-size chunks of [`CHUNK`] bytes, each chunk's hash chained to the one before. Two lines
//! share the first `n` words of their keys exactly when they share the model and the first
//! `n - 1` chunks of that stream (but for a 32-bit collision, which only costs a little
//! order), so sorting lines by key puts lines that share a prefix next to each other, those
//! sharing the longest prefixes closest: a depth-first walk of the prefix tree.
//!
//! What is read, per endpoint (the body's own key order does not matter; JSON text of each
//! value is hashed as written, so one file's lines written by one program compare well):
//! - `/v1/chat/completions`: `tools`, then `messages`;
//! - `/v1/responses`: `instructions`, `tools`, then `input`;
//! - `/v1/messages` (Anthropic): `tools`, `system`, then `messages`;
//! - `/v1/completions`: `prompt`; `/v1/embeddings`: `input`;
//! - anything else: the model alone.
//!
//! Only the first [`MAX_CHUNKS`] chunks (16 KiB, about 4,000 tokens) count: lines that share
//! more than that are grouped together and keep their file order among themselves. That
//! bounds a key to 260 bytes, which the validator's external sort writes once per line.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Bytes of the rendered stream per chunk: about 64 tokens, 4 blocks of vLLM's 16.
pub const CHUNK: usize = 256;
/// Chunks hashed at most: 16 KiB of the leading part.
pub const MAX_CHUNKS: usize = 64;

/// Whether a server's prefix cache serves requests to `path` (`/v1/...`): not embeddings nor
/// moderations, whose requests are computed whole and share no decoding.
pub fn cacheable(path: &str) -> bool {
    matches!(path.strip_prefix("/v1").unwrap_or(path), "/chat/completions" | "/completions" | "/responses" | "/messages")
}

/// A line's prefix key: the model's hash, then one word per chunk of its leading part.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixKey(Vec<u32>);

impl PrefixKey {
    /// The key of a line whose prefix does not count: its model alone.
    pub fn model_only(model: &str) -> PrefixKey {
        Chain::new(model).finish()
    }

    /// The words: the model's hash first.
    pub fn words(&self) -> &[u32] {
        &self.0
    }

    /// The key as bytes that sort as the key does (big-endian words).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    /// Whole chunks this key shares with `other` (0 when the models differ).
    pub fn shared_chunks(&self, other: &PrefixKey) -> usize {
        self.0.iter().zip(&other.0).take_while(|(a, b)| a == b).count().saturating_sub(1)
    }
}

/// The key of a request `body` for `model` sent to `path` (`/v1/...`). A body that is not a
/// JSON object keys on the model alone.
pub fn prefix_key(path: &str, model: &str, body: &[u8]) -> PrefixKey {
    let mut chain = Chain::new(model);
    if let Ok(lead) = serde_json::from_slice::<Leading<'_>>(body) {
        for piece in lead.pieces(path) {
            if !chain.feed(piece.get().as_bytes()) {
                break;
            }
        }
    }
    chain.finish()
}

/// The parts of a request body that make up its leading tokens.
#[derive(Deserialize)]
struct Leading<'a> {
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
}

/// One message, in the order a chat template renders its parts.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_call_id: Option<&'a RawValue>,
}

impl<'a> Message<'a> {
    fn pieces(&self) -> impl Iterator<Item = &'a RawValue> {
        [self.role, self.name, self.tool_call_id, self.content, self.tool_calls].into_iter().flatten()
    }
}

impl<'a> Leading<'a> {
    /// The pieces of the leading part, in the server's order, for `path`.
    fn pieces(&self, path: &str) -> Vec<&'a RawValue> {
        let messages = || self.messages.iter().flatten().flat_map(Message::pieces);
        let head: Vec<Option<&'a RawValue>> = match path.strip_prefix("/v1").unwrap_or(path) {
            "/chat/completions" => vec![self.tools],
            "/responses" => vec![self.instructions, self.tools, self.input],
            "/messages" => vec![self.tools, self.system],
            "/completions" => vec![self.prompt],
            "/embeddings" => vec![self.input],
            _ => return Vec::new(),
        };
        let chat = matches!(path.strip_prefix("/v1").unwrap_or(path), "/chat/completions" | "/messages");
        head.into_iter().flatten().chain(messages().filter(move |_| chat)).collect()
    }
}

/// Chains chunk hashes over a stream of pieces.
struct Chain {
    words: Vec<u32>,
    hash: u64,
    buf: Vec<u8>,
}

/// Between pieces, so that `["ab", "c"]` and `["a", "bc"]` differ.
const SEPARATOR: u8 = 0x1e;

impl Chain {
    fn new(model: &str) -> Chain {
        let hash = xxhash_rust::xxh3::xxh3_64(model.as_bytes());
        Chain { words: vec![(hash >> 32) as u32], hash, buf: Vec::with_capacity(CHUNK) }
    }

    /// Adds one piece; `false` once [`MAX_CHUNKS`] chunks are hashed.
    fn feed(&mut self, piece: &[u8]) -> bool {
        let mut rest = piece;
        while !rest.is_empty() {
            let take = (CHUNK - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == CHUNK && !self.seal() {
                return false;
            }
        }
        self.buf.push(SEPARATOR);
        self.buf.len() < CHUNK || self.seal()
    }

    /// Hashes the full buffer as the next chunk; `false` at the limit.
    fn seal(&mut self) -> bool {
        self.hash = xxhash_rust::xxh3::xxh3_64_with_seed(&self.buf, self.hash);
        self.words.push((self.hash >> 32) as u32);
        self.buf.clear();
        self.words.len() <= MAX_CHUNKS
    }

    /// The key, the last partial chunk included.
    fn finish(mut self) -> PrefixKey {
        if !self.buf.is_empty() && self.words.len() <= MAX_CHUNKS {
            self.seal();
        }
        PrefixKey(self.words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHAT: &str = "/v1/chat/completions";

    fn chat(system: &str, question: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})).unwrap()
    }

    fn key(body: &[u8]) -> PrefixKey {
        prefix_key(CHAT, "m", body)
    }

    #[test]
    fn lines_sharing_a_long_system_prompt_share_the_chunks_it_fills() {
        let doc = "the same long document ".repeat(100); // 2,300 bytes: 8 whole chunks and a bit
        let (a, b) = (key(&chat(&doc, "first question")), key(&chat(&doc, "second question")));
        assert_ne!(a, b);
        let shared = a.shared_chunks(&b);
        assert!((8..=9).contains(&shared), "the role and the document fill 8 or 9 chunks: {shared}");
        let other = key(&chat(&"another document ".repeat(130), "first question"));
        assert_eq!(a.shared_chunks(&other), 0);
        assert_eq!(a.words()[0], other.words()[0], "same model");
    }

    #[test]
    fn sorting_by_key_groups_lines_by_their_longest_shared_prefix() {
        let docs: Vec<String> = (0..3).map(|d| format!("document {d} ").repeat(60)).collect();
        // Lines: doc d, then a sub-topic t (a second shared message), then a question.
        let mut lines: Vec<(PrefixKey, (usize, usize))> = vec![];
        for q in 0..4 {
            for (d, doc) in docs.iter().enumerate() {
                for t in 0..2 {
                    let body = json!({"model": "m", "messages": [{"role": "system", "content": doc},
                        {"role": "user", "content": format!("topic {t} ").repeat(80)}, {"role": "user", "content": format!("q{q}")}]});
                    lines.push((key(&serde_json::to_vec(&body).unwrap()), (d, t)));
                }
            }
        }
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        let order: Vec<(usize, usize)> = lines.iter().map(|l| l.1).collect();
        let runs = order.windows(2).filter(|w| w[0] != w[1]).count() + 1;
        assert_eq!(runs, 6, "each (document, topic) pair is one contiguous run: {order:?}");
        let docs_runs = order.windows(2).filter(|w| w[0].0 != w[1].0).count() + 1;
        assert_eq!(docs_runs, 3, "and each document's two topics are adjacent: {order:?}");
    }

    #[test]
    fn the_key_follows_the_rendering_not_the_bodys_key_order() {
        let a = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}],"temperature":0}"#;
        let b = br#"{"temperature":1,"tools":[{"type":"function"}],"messages":[{"content":"hi","role":"user"}],"model":"m"}"#;
        assert_eq!(key(a), key(b), "tools render before messages, roles before content, other keys do not count");
        let c = br#"{"model":"m","messages":[{"role":"assistant","content":"hi"}],"tools":[{"type":"function"}]}"#;
        assert_ne!(key(a), key(c), "the role is part of what the server sees");
        assert_ne!(prefix_key(CHAT, "m", a), prefix_key(CHAT, "m2", a), "another model shares nothing");
        assert_eq!(prefix_key(CHAT, "m2", a).shared_chunks(&prefix_key(CHAT, "m", a)), 0);
    }

    #[test]
    fn each_endpoint_keys_on_what_its_server_renders_first() {
        let resp = |instructions: &str, input: &str| serde_json::to_vec(&json!({"model": "m", "instructions": instructions, "input": input})).unwrap();
        let long = "x".repeat(1000);
        let (r1, r2) = (prefix_key("/v1/responses", "m", &resp(&long, "a")), prefix_key("/v1/responses", "m", &resp(&long, "b")));
        assert!(r1.shared_chunks(&r2) >= 3 && r1 != r2);
        let comp = |p: &str| serde_json::to_vec(&json!({"model": "m", "prompt": p})).unwrap();
        assert!(
            prefix_key("/v1/completions", "m", &comp(&format!("{long}1"))).shared_chunks(&prefix_key("/v1/completions", "m", &comp(&format!("{long}2")))) >= 3
        );
        let msgs = serde_json::to_vec(&json!({"model": "m", "system": long, "messages": [{"role": "user", "content": "q"}]})).unwrap();
        assert!(prefix_key("/v1/messages", "m", &msgs).words().len() > 4);
        assert_eq!(prefix_key("/v1/moderations", "m", &comp(&long)).words().len(), 1, "not cached by prefix: the model alone");
        assert_eq!(key(b"[1, 2]").words().len(), 1, "not an object: the model alone");
    }

    #[test]
    fn keys_are_bounded_and_piece_boundaries_count() {
        let huge = key(&chat(&"y".repeat(10 * CHUNK * MAX_CHUNKS), "q"));
        assert_eq!(huge.words().len(), MAX_CHUNKS + 1, "the model, then at most MAX_CHUNKS chunks");
        let split = |a: &str, b: &str| {
            serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": a}, {"role": "user", "content": b}]})).unwrap()
        };
        assert_ne!(key(&split("ab", "c")), key(&split("a", "bc")));
        let k = key(&chat("s", "q"));
        assert_eq!(k.to_bytes().len(), 4 * k.words().len());
        let mut sorted = [key(&chat("b", "q")), key(&chat("a", "q")), k.clone()];
        sorted.sort();
        let mut by_bytes = sorted.clone();
        by_bytes.sort_by_key(PrefixKey::to_bytes);
        assert_eq!(sorted, by_bytes, "bytes sort as keys do");
    }
}
