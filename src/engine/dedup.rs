//! Duplicate `custom_id` detection in bounded memory: an external sort.
//!
//! Each full line adds one record — the 64-bit hash of its `custom_id`, its line number and
//! the id itself — to the external sort of `engine::extsort` (a run buffer of at most
//! [`RUN_BYTES`], sorted runs spilled to an anonymous file, merged at the end), ordered by
//! (hash, id): records with the same id come out next to each other in line order (the sort
//! is stable), so every record after the first of its group is a duplicate of that first
//! line. A file whose records fit in one buffer (about 100,000 short ids) is sorted in
//! memory and never touches the disk.
//!
//! Why this method rather than the alternatives:
//! - a set of hashes in memory (what this replaced: 128-bit hashes in a `HashMap`, 52 MB at
//!   1,000,000 lines) grows with the number of lines, even at 8 bytes a line;
//! - 64-bit hashes with collisions re-checked against the input would need random reads of
//!   the input (a blob, perhaps remote) for every member of a colliding group, and a file
//!   that repeats one id a million times makes that group a million lines long;
//! - an on-disk index (B-tree) costs a random write per line; the sort writes each record
//!   once, sequentially, and reads it back once.
//!
//! The hash only makes comparisons cheap: two ids are equal only when their bytes are, so a
//! collision between different ids costs one extra comparison and is never reported as a
//! duplicate. Memory: the run buffer and its index (at most [`RUN_BYTES`] together), plus
//! the merge's read buffers (at most `extsort::MERGE_BYTES`; 4 KiB a run beyond 512 runs,
//! which a 2 GB input cannot reach, its records being shorter than its lines). Disk: 20
//! bytes plus the id per line.

use std::cmp::Ordering;
use std::io;
use std::path::PathBuf;

use super::extsort::{ExtSort, RUN_BYTES};

/// Record header: hash (8), line (8); the id follows.
const HEAD: usize = 16;
/// Ids are compared by at most this many bytes: 512 characters of UTF-8, the validator's limit.
pub const MAX_ID: usize = 2048;

/// The hash of an id; replaceable in tests to force collisions.
pub type HashFn = fn(&[u8]) -> u64;

fn xxh3(id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id)
}

/// One record as the sort holds it.
struct Rec<'a> {
    hash: u64,
    line: u64,
    id: &'a [u8],
}

impl<'a> Rec<'a> {
    fn parse(b: &'a [u8]) -> Rec<'a> {
        Rec { hash: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")), line: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")), id: &b[HEAD..] }
    }
}

/// By (hash, id): the sort is stable and records are added in line order, so each group of
/// equal ids comes out in line order.
fn by_id(a: &[u8], b: &[u8]) -> Ordering {
    let (a, b) = (Rec::parse(a), Rec::parse(b));
    (a.hash, a.id).cmp(&(b.hash, b.id))
}

/// A duplicate: `line` repeats the `custom_id` first used on `first`.
pub struct Duplicate<'a> {
    pub line: u64,
    pub first: u64,
    pub custom_id: &'a str,
}

/// Finds repeated ids among the records added; see the module doc.
pub struct DupFinder {
    hash: HashFn,
    sort: ExtSort,
    rec: Vec<u8>,
}

impl Default for DupFinder {
    fn default() -> Self {
        DupFinder::new(None)
    }
}

impl DupFinder {
    /// Runs spill to an anonymous file in `dir` (created if missing; the system's temporary
    /// directory if `None`), which has no name and so vanishes with the process, even after
    /// a crash.
    pub fn new(dir: Option<PathBuf>) -> Self {
        DupFinder::with_hash(dir, xxh3, RUN_BYTES)
    }

    /// With another hash function and run size (tests force collisions and spills).
    pub fn with_hash(dir: Option<PathBuf>, hash: HashFn, run_bytes: usize) -> Self {
        DupFinder { hash, sort: ExtSort::new(dir, by_id, run_bytes), rec: Vec::new() }
    }

    /// Adds the id of `line`; lines must be added in increasing order. Only the first
    /// [`MAX_ID`] bytes of an id count.
    pub fn add(&mut self, line: u64, id: &str) -> io::Result<()> {
        let id = &id.as_bytes()[..id.len().min(MAX_ID)];
        self.rec.clear();
        self.rec.extend_from_slice(&(self.hash)(id).to_le_bytes());
        self.rec.extend_from_slice(&line.to_le_bytes());
        self.rec.extend_from_slice(id);
        self.sort.push(&self.rec)
    }

    /// Reports every duplicate, in no particular order.
    pub fn finish(self, mut report: impl FnMut(Duplicate<'_>)) -> io::Result<()> {
        let mut groups = Groups::default();
        self.sort.finish(|r| groups.next(Rec::parse(r), &mut report))
    }
}

/// Follows the sorted stream of records, keeping only the first record of the current group.
#[derive(Default)]
struct Groups {
    first: Option<(u64, Vec<u8>, u64)>,
}

impl Groups {
    fn next(&mut self, rec: Rec<'_>, report: &mut impl FnMut(Duplicate<'_>)) {
        match &mut self.first {
            Some((hash, id, first)) if *hash == rec.hash && id.as_slice() == rec.id => {
                // From a `&str`; a cut at MAX_ID may split a character, hence the lossy read.
                let custom_id = String::from_utf8_lossy(rec.id);
                report(Duplicate { line: rec.line, first: *first, custom_id: &custom_id });
            }
            Some((hash, id, first)) => {
                *hash = rec.hash;
                id.clear();
                id.extend_from_slice(rec.id);
                *first = rec.line;
            }
            None => self.first = Some((rec.hash, rec.id.to_vec(), rec.line)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every duplicate as (line, first line, id), found the obvious way.
    fn reference(ids: &[String]) -> Vec<(u64, u64, String)> {
        let mut first = std::collections::HashMap::new();
        let mut out = vec![];
        for (i, id) in ids.iter().enumerate() {
            let line = i as u64 + 1;
            match first.get(id) {
                Some(&f) => out.push((line, f, id.clone())),
                None => drop(first.insert(id.clone(), line)),
            }
        }
        out
    }

    fn found(mut d: DupFinder, ids: &[String]) -> Vec<(u64, u64, String)> {
        for (i, id) in ids.iter().enumerate() {
            d.add(i as u64 + 1, id).unwrap();
        }
        let mut out = vec![];
        d.finish(|x| out.push((x.line, x.first, x.custom_id.to_string()))).unwrap();
        out.sort();
        out
    }

    fn random_ids(n: usize, distinct: u64, seed: u64) -> Vec<String> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| format!("id-{}", rng.random_range(0..distinct))).collect()
    }

    #[test]
    fn in_memory_finds_each_repeat_against_its_first_line() {
        let ids: Vec<String> = ["a", "b", "a", "c", "b", "a"].iter().map(|s| s.to_string()).collect();
        let got = found(DupFinder::default(), &ids);
        assert_eq!(got, vec![(3, 1, "a".into()), (5, 2, "b".into()), (6, 1, "a".into())]);
        assert!(found(DupFinder::default(), &[]).is_empty());
    }

    /// A 2-bit hash makes almost every pair of distinct ids collide, and 512-byte runs spill
    /// dozens of runs: the answer must still be exactly the naive one, because a hash tie is
    /// settled by comparing the ids themselves.
    #[test]
    fn collisions_are_rechecked_exactly_across_spilled_runs() {
        let tiny: HashFn = |id| xxhash_rust::xxh3::xxh3_64(id) & 0b11;
        let ids = random_ids(3000, 2000, 7);
        let want = reference(&ids);
        assert!(want.len() > 500, "the sample has duplicates");
        let dir = tempfile::tempdir().unwrap();
        let spilled = DupFinder::with_hash(Some(dir.path().into()), tiny, 512);
        assert_eq!(found(spilled, &ids), want);
        let in_memory = DupFinder::with_hash(None, tiny, usize::MAX);
        assert_eq!(found(in_memory, &ids), want);
        let all_collide = DupFinder::with_hash(None, |_| 42, 1024);
        assert_eq!(found(all_collide, &ids), want);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spill file leaves no name behind");
    }

    #[test]
    fn one_id_repeated_everywhere_and_long_ids() {
        let mut ids = vec!["same".to_string(); 5000];
        ids.push("é".repeat(512));
        ids.push("é".repeat(512));
        let want = reference(&ids);
        assert_eq!(want.len(), 5000);
        assert_eq!(found(DupFinder::with_hash(None, xxh3, 4096), &ids), want);
    }
}
