//! The simulated KV cache: a fixed number of blocks of `block_size` tokens, shared between
//! sequences by reference count, with automatic prefix caching over them, as vLLM's V1 block
//! pool does it.
//!
//! - A block that a sequence has filled is *registered* under the hash of its content chained
//!   to its parent block's hash, so a hash names a whole prefix, not just one block.
//! - A block no sequence uses (reference count 0) goes to the tail of the free queue but
//!   keeps its hash: it is still a cache hit until it is allocated again. Allocation takes
//!   the head of the queue — the block freed longest ago — and evicts its hash: an LRU cache
//!   over unused blocks.
//! - A hit on a block in the free queue takes it out of the queue; a hit on a block in use
//!   shares it (its count goes up).
//!
//! Invariant: a block is in the free queue exactly when its reference count is 0, and every
//! registered hash names a block that holds it.

use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

pub struct BlockPool {
    refs: Vec<u32>,
    hashes: Vec<Option<u64>>,
    /// Where each free block stands in the queue (`None` while in use).
    queued_at: Vec<Option<u64>>,
    /// The free queue: position → block, the smallest position evicted first.
    free: BTreeMap<u64, BlockId>,
    next_pos: u64,
    cached: HashMap<u64, BlockId>,
    caching: bool,
    /// Cached blocks evicted to make room, since the start.
    pub evictions: u64,
}

impl BlockPool {
    pub fn new(blocks: u32, caching: bool) -> BlockPool {
        let n = blocks as usize;
        let mut pool = BlockPool {
            refs: vec![0; n],
            hashes: vec![None; n],
            queued_at: vec![None; n],
            free: BTreeMap::new(),
            next_pos: 0,
            cached: HashMap::new(),
            caching,
            evictions: 0,
        };
        (0..blocks).for_each(|b| pool.enqueue(b));
        pool
    }

    pub fn total(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Blocks no sequence uses (cached ones included: they can be evicted).
    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    /// The block holding the prefix named `hash`, if it is cached.
    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        if !self.caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// Whether `b` is unused (a hit on it costs one free block).
    pub fn is_free(&self, b: BlockId) -> bool {
        self.refs[b as usize] == 0
    }

    /// One more sequence uses `b` (a cache hit).
    pub fn touch(&mut self, b: BlockId) {
        if let Some(pos) = self.queued_at[b as usize].take() {
            self.free.remove(&pos);
        }
        self.refs[b as usize] += 1;
    }

    /// A fresh block for one sequence, evicting the least recently freed one's hash.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, b) = self.free.pop_first()?;
        self.queued_at[b as usize] = None;
        if let Some(h) = self.hashes[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
                self.evictions += 1;
            }
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One sequence stops using `b`; at 0 it joins the free queue's tail, still cached.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than used");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.enqueue(b);
        }
    }

    /// `b` is full and holds the prefix named `hash`. When another block already holds it
    /// (two sequences computed the same prefix at once), that one stays the cached copy.
    pub fn register(&mut self, b: BlockId, hash: u64) {
        if !self.caching || self.hashes[b as usize].is_some() {
            return;
        }
        self.hashes[b as usize] = Some(hash);
        self.cached.entry(hash).or_insert(b);
    }

    fn enqueue(&mut self, b: BlockId) {
        self.queued_at[b as usize] = Some(self.next_pos);
        self.free.insert(self.next_pos, b);
        self.next_pos += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_block_stays_a_hit_until_it_is_the_least_recently_freed() {
        let mut p = BlockPool::new(3, true);
        let (a, b, c) = (p.allocate().unwrap(), p.allocate().unwrap(), p.allocate().unwrap());
        assert_eq!((p.free_count(), p.allocate()), (0, None), "all three in use");
        p.register(a, 10);
        p.register(b, 20);
        p.release(a);
        p.release(b);
        assert_eq!((p.lookup(10), p.lookup(20), p.free_count()), (Some(a), Some(b), 2), "freed blocks keep their prefix");
        p.touch(a);
        assert_eq!(p.free_count(), 1, "a hit on a free block takes it out of the queue");
        p.release(a);
        let fresh = p.allocate().unwrap();
        assert_eq!((fresh, p.lookup(20), p.lookup(10)), (b, None, Some(a)), "b was freed longest ago: evicted first");
        assert_eq!(p.evictions, 1);
        p.release(c);
        assert_eq!(p.allocate(), Some(a), "then a");
        assert_eq!(p.allocate(), Some(c));
    }

    #[test]
    fn a_shared_block_is_freed_only_by_its_last_user_and_first_registration_wins() {
        let mut p = BlockPool::new(2, true);
        let a = p.allocate().unwrap();
        p.register(a, 7);
        p.touch(a);
        p.release(a);
        assert!(!p.is_free(a) && p.free_count() == 1, "still used once");
        let b = p.allocate().unwrap();
        p.register(b, 7);
        assert_eq!(p.lookup(7), Some(a), "the first copy stays the cached one");
        p.release(b);
        p.allocate();
        assert_eq!((p.lookup(7), p.evictions), (Some(a), 0), "evicting the duplicate copy evicts nothing");
        let off = BlockPool::new(1, false);
        assert_eq!(off.lookup(7), None);
    }
}
