//! The simulated engine's scheduler: continuous batching over the KV cache of
//! [`super::blocks`], one step at a time, shaped after vLLM's V1 scheduler.
//!
//! Each step:
//! 1. Every running sequence is scheduled the tokens it still has to compute: one for a
//!    sequence that is decoding, a chunk of its prompt for one still prefilling, within the
//!    step's token budget (`max_batched_tokens`, chunked prefill). Its new tokens need room;
//!    when no block is free, the most recently admitted running sequence is *preempted*: its
//!    blocks are released, it goes back to the head of the queue, and it will be computed
//!    again from the start (recompute), helped by whatever of its blocks is still cached.
//! 2. If nothing was preempted, waiting sequences are admitted in arrival order while fewer
//!    than `max_num_seqs` run, budget remains and their first chunk fits in free blocks. An
//!    admitted sequence first looks its prompt up in the prefix cache, block by block (the
//!    hash of a block chains its parent's): the blocks found are not computed again.
//! 3. The step costs `step_us` + `prefill_us_per_token` × prompt tokens computed +
//!    `decode_us_per_seq` × decoding sequences + `attn_ns_per_token` × the context those
//!    sequences attend to. A sequence whose tokens are all computed samples one; one that
//!    reaches its output length finishes and releases its blocks (cached for later hits).
//!
//! The engine is pure and deterministic: the same arrivals give the same steps, durations
//! and answers. Time is what [`Engine::step`] returns; the driver (`super`) sleeps it.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::blocks::{BlockId, BlockPool};
use crate::mock::state::mix;

/// The simulated server's shape (see the module doc and `docs/engine-sim.md`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    pub max_num_seqs: u32,
    pub max_batched_tokens: u32,
    pub block_size: u32,
    pub num_blocks: u32,
    pub prefix_caching: bool,
    pub max_model_len: u32,
    pub step_us: f64,
    pub prefill_us_per_token: f64,
    pub decode_us_per_seq: f64,
    pub attn_ns_per_token: f64,
}

impl Default for Params {
    /// A Llama-3-8B-shaped model on one 80 GB GPU (see `docs/engine-sim.md` for the sums).
    fn default() -> Params {
        super::DEFAULT
    }
}

impl Params {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        for (name, v) in [
            ("step_us", self.step_us),
            ("prefill_us_per_token", self.prefill_us_per_token),
            ("decode_us_per_seq", self.decode_us_per_seq),
            ("attn_ns_per_token", self.attn_ns_per_token),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        Ok(())
    }

    /// KV cache capacity in tokens.
    pub fn capacity_tokens(&self) -> u64 {
        u64::from(self.num_blocks) * u64::from(self.block_size)
    }
}

pub type ReqId = u64;

/// Why a request is refused on arrival (vLLM answers these 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("This model's maximum context length is {max} tokens. However, you requested {tokens} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion.")]
    TooLong { max: u32, tokens: u64, prompt: u64, output: u64 },
    #[error("The request needs {need} KV cache blocks, more than the {have} the server has.")]
    TooLarge { need: u64, have: u32 },
    #[error("The request has an empty prompt.")]
    Empty,
}

/// A finished request: what its answer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub id: ReqId,
    pub prompt_tokens: u32,
    /// Prompt tokens found in the prefix cache when it was first admitted.
    pub cached_tokens: u32,
    pub output_tokens: u32,
    /// Times it was preempted and computed again.
    pub preemptions: u32,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub duration: Duration,
    pub prefill_tokens: u32,
    pub decoding: u32,
    pub finished: Vec<Done>,
}

/// Cumulative counts, vLLM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub steps: u64,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and found (vLLM counts both in tokens).
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Prompt tokens computed (not found in the cache), decode tokens generated.
    pub prefill_tokens: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub finished: u64,
    pub aborted: u64,
    pub busy_us: u64,
}

/// The engine's state as the metrics endpoint shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Snapshot {
    pub running: u32,
    pub waiting: u32,
    /// Share of the blocks in use by some sequence (cached unused blocks do not count).
    pub kv_usage: f64,
    pub counters: Counters,
}

struct Seq {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: u32,
    max_output: u32,
    /// Tokens whose KV is in the sequence's blocks.
    computed: u32,
    blocks: Vec<BlockId>,
    /// Hash of each full block of `tokens`, chained (computed as needed).
    hashes: Vec<u64>,
    cached_tokens: Option<u32>,
    preemptions: u32,
    seed: u64,
}

impl Seq {
    fn output(&self) -> u32 {
        self.tokens.len() as u32 - self.prompt_len
    }

    /// The chained hash of full block `i`.
    fn block_hash(&mut self, i: usize, bs: usize) -> u64 {
        while self.hashes.len() <= i {
            let j = self.hashes.len();
            let parent = j.checked_sub(1).map_or(0x5eed, |p| self.hashes[p]);
            let bytes: Vec<u8> = self.tokens[j * bs..(j + 1) * bs].iter().flat_map(|t| t.to_le_bytes()).collect();
            self.hashes.push(xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, parent));
        }
        self.hashes[i]
    }
}

pub struct Engine {
    p: Params,
    pool: BlockPool,
    seqs: HashMap<ReqId, Seq>,
    waiting: VecDeque<ReqId>,
    running: Vec<ReqId>,
    counters: Counters,
}

impl Engine {
    pub fn new(p: Params) -> Engine {
        Engine {
            p,
            pool: BlockPool::new(p.num_blocks, p.prefix_caching),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: Counters::default(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    /// Queues a request of `prompt` tokens that will generate `max_output` (0: prefill only,
    /// as an embedding).
    pub fn add(&mut self, id: ReqId, prompt: Vec<u32>, max_output: u32) -> Result<(), Refused> {
        let (p, o) = (prompt.len() as u64, u64::from(max_output));
        if p == 0 {
            return Err(Refused::Empty);
        }
        if p + o > u64::from(self.p.max_model_len) {
            return Err(Refused::TooLong { max: self.p.max_model_len, tokens: p + o, prompt: p, output: o });
        }
        let need = (p + o).div_ceil(u64::from(self.p.block_size));
        if need > u64::from(self.p.num_blocks) {
            return Err(Refused::TooLarge { need, have: self.p.num_blocks });
        }
        let seq = Seq {
            prompt_len: prompt.len() as u32,
            tokens: prompt,
            max_output,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: None,
            preemptions: 0,
            seed: mix(0xdec0de, id),
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(())
    }

    /// Drops a request (its client went away); its blocks stay cached.
    pub fn abort(&mut self, id: ReqId) {
        let Some(mut seq) = self.seqs.remove(&id) else { return };
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.free_blocks(&mut seq);
        self.counters.aborted += 1;
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn snapshot(&self) -> Snapshot {
        let used = self.pool.total() - self.pool.free_count();
        Snapshot {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            kv_usage: f64::from(used) / f64::from(self.pool.total()),
            counters: self.counters,
        }
    }

    /// Runs one step; `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<Step> {
        if self.is_idle() {
            return None;
        }
        let mut budget = self.p.max_batched_tokens;
        let mut plan: Vec<(ReqId, u32)> = Vec::with_capacity(self.running.len() + 8);
        let preempted = self.schedule_running(&mut budget, &mut plan);
        if !preempted {
            self.admit_waiting(&mut budget, &mut plan);
        }
        Some(self.execute(&plan))
    }

    /// Schedules the running sequences, preempting from the back when blocks run out;
    /// whether any was preempted.
    fn schedule_running(&mut self, budget: &mut u32, plan: &mut Vec<(ReqId, u32)>) -> bool {
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let need = self.pending(id).min(*budget);
            if need == 0 {
                i += 1;
                continue;
            }
            loop {
                if self.grow(id, need) {
                    plan.push((id, need));
                    *budget -= need;
                    i += 1;
                    break;
                }
                let victim = self.running.pop().expect("the sequence being scheduled runs");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    break;
                }
            }
        }
        preempted
    }

    /// Admits waiting sequences in order while they fit.
    fn admit_waiting(&mut self, budget: &mut u32, plan: &mut Vec<(ReqId, u32)>) {
        while self.running.len() < self.p.max_num_seqs as usize && *budget > 0 {
            let Some(&id) = self.waiting.front() else { break };
            let hits = self.cached_prefix(id);
            let seq = &self.seqs[&id];
            let computed = hits.len() as u32 * self.p.block_size;
            let need = (seq.tokens.len() as u32 - computed).min(*budget);
            let new_blocks = (computed + need).div_ceil(self.p.block_size) as usize - hits.len();
            let hits_free = hits.iter().filter(|&&b| self.pool.is_free(b)).count();
            if new_blocks + hits_free > self.pool.free_count() as usize {
                break;
            }
            self.waiting.pop_front();
            self.take_hits(id, &hits);
            let grown = self.grow(id, need);
            debug_assert!(grown, "room was checked");
            self.running.push(id);
            plan.push((id, need));
            *budget -= need;
        }
    }

    /// Full blocks of the sequence's tokens found in the prefix cache, in order; at least one
    /// token is always left to compute (its logits give the next token).
    fn cached_prefix(&mut self, id: ReqId) -> Vec<BlockId> {
        let bs = self.p.block_size as usize;
        let seq = self.seqs.get_mut(&id).expect("a queued sequence exists");
        let full = (seq.tokens.len() - 1) / bs;
        let mut hits = Vec::new();
        for i in 0..full {
            match self.pool.lookup(seq.block_hash(i, bs)) {
                Some(b) => hits.push(b),
                None => break,
            }
        }
        hits
    }

    /// Makes the found blocks the sequence's first ones and counts the lookup.
    fn take_hits(&mut self, id: ReqId, hits: &[BlockId]) {
        let bs = self.p.block_size;
        hits.iter().for_each(|&b| self.pool.touch(b));
        let seq = self.seqs.get_mut(&id).expect("a queued sequence exists");
        seq.blocks.extend_from_slice(hits);
        seq.computed = hits.len() as u32 * bs;
        seq.cached_tokens.get_or_insert(seq.computed);
        self.counters.prefix_queries += seq.tokens.len() as u64;
        self.counters.prefix_hits += u64::from(seq.computed);
    }

    /// Tokens the sequence has not computed yet.
    fn pending(&self, id: ReqId) -> u32 {
        let seq = &self.seqs[&id];
        seq.tokens.len() as u32 - seq.computed
    }

    /// Allocates the blocks `need` more computed tokens take; `false` (and nothing taken)
    /// when there are not enough free blocks.
    fn grow(&mut self, id: ReqId, need: u32) -> bool {
        let bs = self.p.block_size;
        let seq = self.seqs.get_mut(&id).expect("a scheduled sequence exists");
        let want = (seq.computed + need).div_ceil(bs) as usize;
        let more = want.saturating_sub(seq.blocks.len());
        if more > self.pool.free_count() as usize {
            return false;
        }
        for _ in 0..more {
            seq.blocks.push(self.pool.allocate().expect("free blocks were counted"));
        }
        true
    }

    fn preempt(&mut self, id: ReqId) {
        let mut seq = self.seqs.remove(&id).expect("a running sequence exists");
        self.free_blocks(&mut seq);
        seq.computed = 0;
        seq.preemptions += 1;
        self.seqs.insert(id, seq);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
    }

    /// Releases a sequence's blocks, last first, so that its tail is evicted before its head.
    fn free_blocks(&mut self, seq: &mut Seq) {
        for b in seq.blocks.drain(..).rev() {
            self.pool.release(b);
        }
    }

    /// Computes the planned tokens: costs the step, registers filled blocks, samples and
    /// finishes sequences.
    fn execute(&mut self, plan: &[(ReqId, u32)]) -> Step {
        let (bs, p) = (self.p.block_size as usize, self.p);
        let (mut prefill, mut decoding, mut context, mut sampled) = (0u32, 0u32, 0u64, 0u64);
        let mut finished = Vec::new();
        for &(id, n) in plan {
            let seq = self.seqs.get_mut(&id).expect("a scheduled sequence exists");
            if seq.output() > 0 && n == 1 && seq.computed as usize + 1 == seq.tokens.len() {
                decoding += 1;
                context += seq.tokens.len() as u64;
            } else {
                prefill += n;
            }
            let before = seq.computed as usize / bs;
            seq.computed += n;
            for i in before..seq.computed as usize / bs {
                let h = seq.block_hash(i, bs);
                self.pool.register(seq.blocks[i], h);
            }
            if seq.computed as usize == seq.tokens.len() {
                let (new_token, done) = sample(seq);
                sampled += u64::from(new_token);
                if done {
                    finished.push(id);
                }
            }
        }
        let us =
            p.step_us + p.prefill_us_per_token * f64::from(prefill) + p.decode_us_per_seq * f64::from(decoding) + p.attn_ns_per_token * context as f64 / 1000.0;
        self.counters.steps += 1;
        self.counters.busy_us += us as u64;
        self.counters.prefill_tokens += u64::from(prefill);
        self.counters.generation_tokens += sampled;
        let finished = finished.into_iter().map(|id| self.finish(id)).collect();
        Step { duration: Duration::from_nanos((us * 1000.0) as u64), prefill_tokens: prefill, decoding, finished }
    }

    fn finish(&mut self, id: ReqId) -> Done {
        let mut seq = self.seqs.remove(&id).expect("a finishing sequence exists");
        self.running.retain(|&r| r != id);
        self.free_blocks(&mut seq);
        self.counters.finished += 1;
        self.counters.prompt_tokens += u64::from(seq.prompt_len);
        Done { id, prompt_tokens: seq.prompt_len, cached_tokens: seq.cached_tokens.unwrap_or(0), output_tokens: seq.output(), preemptions: seq.preemptions }
    }
}

/// A sequence whose tokens are all computed samples its next one unless it has all it
/// wants (a prefill-only request has none to sample): (sampled, done).
fn sample(seq: &mut Seq) -> (bool, bool) {
    if seq.output() >= seq.max_output {
        return (false, true);
    }
    let n = seq.tokens.len() as u64;
    seq.tokens.push(mix(seq.seed, n) as u32);
    (true, seq.output() >= seq.max_output)
}

/// Runs `requests` (prompt, output tokens), all queued at once in this order, to the end:
/// the simulated time the server takes at its own capacity, and its counters.
pub fn replay(p: Params, requests: impl IntoIterator<Item = (Vec<u32>, u32)>) -> Result<(Duration, Counters), Refused> {
    let mut e = Engine::new(p);
    for (i, (prompt, output)) in requests.into_iter().enumerate() {
        e.add(i as ReqId, prompt, output)?;
    }
    let mut t = Duration::ZERO;
    while let Some(s) = e.step() {
        t += s.duration;
    }
    Ok((t, e.counters))
}

#[cfg(test)]
mod tests;
