//! Duplicate `custom_id` detection in bounded memory: an external sort.
//!
//! Each full line adds one record — the 64-bit hash of its `custom_id`, its line number and
//! the id itself — to a run buffer of at most [`RUN_BYTES`]. A full buffer is sorted by
//! (hash, id, line) and appended to an anonymous temporary file as one sorted run. At the
//! end the runs are merged (k-way, one small read buffer per run): records with the same id
//! come out next to each other in line order, so every record after the first of its group
//! is a duplicate of that first line. A file whose records fit in one buffer (about 100,000
//! short ids) is sorted in memory and never touches the disk.
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
//! the merge's read buffers (at most [`MERGE_BYTES`]; 4 KiB a run beyond 512 runs, which a
//! 2 GB input cannot reach, its records being shorter than its lines). Disk: 18 bytes plus
//! the id per line.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Run buffer and its sort index together stay below this.
pub const RUN_BYTES: usize = 4 << 20;
/// All the merge's read buffers together (unless there are very many runs).
pub const MERGE_BYTES: usize = 2 << 20;
/// Record header: hash (8), line (8), id length (2).
const HEAD: usize = 18;
/// Ids are compared by at most this many bytes: 512 characters of UTF-8, the validator's limit.
pub const MAX_ID: usize = 2048;
/// A run's read buffer holds at least one whole record.
const MIN_READ: usize = 4096;
/// What one index entry costs in memory.
const INDEX_ENTRY: usize = std::mem::size_of::<(u64, u32)>();

/// The hash of an id; replaceable in tests to force collisions.
pub type HashFn = fn(&[u8]) -> u64;

fn xxh3(id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id)
}

/// One record as stored in a run.
#[derive(Clone, Copy)]
struct Rec<'a> {
    hash: u64,
    line: u64,
    id: &'a [u8],
}

impl<'a> Rec<'a> {
    /// The record at the start of `b`, if `b` holds all of it.
    fn parse(b: &'a [u8]) -> Option<Rec<'a>> {
        let head = b.get(..HEAD)?;
        let len = u16::from_le_bytes([head[16], head[17]]) as usize;
        Some(Rec {
            hash: u64::from_le_bytes(head[..8].try_into().unwrap()),
            line: u64::from_le_bytes(head[8..16].try_into().unwrap()),
            id: b.get(HEAD..HEAD + len)?,
        })
    }

    fn size(&self) -> usize {
        HEAD + self.id.len()
    }

    fn order(&self, other: &Rec<'_>) -> Ordering {
        (self.hash, self.id, self.line).cmp(&(other.hash, other.id, other.line))
    }
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
    run_bytes: usize,
    dir: Option<PathBuf>,
    buf: Vec<u8>,
    /// (hash, offset in `buf`) of each record of the current run.
    index: Vec<(u64, u32)>,
    spill: Option<Spill>,
}

/// The temporary file and the byte range of each sorted run in it.
struct Spill {
    file: File,
    runs: Vec<(u64, u64)>,
    len: u64,
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
        DupFinder { hash, run_bytes, dir, buf: Vec::new(), index: Vec::new(), spill: None }
    }

    /// Adds the id of `line`; lines must be added in increasing order. Only the first
    /// [`MAX_ID`] bytes of an id count.
    pub fn add(&mut self, line: u64, id: &str) -> io::Result<()> {
        let id = &id.as_bytes()[..id.len().min(MAX_ID)];
        let hash = (self.hash)(id);
        self.index.push((hash, self.buf.len() as u32));
        self.buf.extend_from_slice(&hash.to_le_bytes());
        self.buf.extend_from_slice(&line.to_le_bytes());
        self.buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(id);
        if self.buf.len() + self.index.len() * INDEX_ENTRY >= self.run_bytes {
            self.spill_run()?;
        }
        Ok(())
    }

    /// Sorts the current run's index by (hash, id, line); records were added in line order,
    /// so their offsets break ties between equal ids.
    fn sort_run(&mut self) {
        let buf = &self.buf;
        let id_at = |off: u32| Rec::parse(&buf[off as usize..]).expect("complete record").id;
        self.index.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| id_at(a.1).cmp(id_at(b.1))).then(a.1.cmp(&b.1)));
    }

    fn spill_run(&mut self) -> io::Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        self.sort_run();
        let spill = match &mut self.spill {
            Some(s) => s,
            None => {
                let file = match &self.dir {
                    Some(d) => {
                        std::fs::create_dir_all(d)?;
                        tempfile::tempfile_in(d)?
                    }
                    None => tempfile::tempfile()?,
                };
                self.spill.insert(Spill { file, runs: Vec::new(), len: 0 })
            }
        };
        let start = spill.len;
        let mut w = io::BufWriter::with_capacity(256 << 10, &spill.file);
        for &(_, off) in &self.index {
            let rec = Rec::parse(&self.buf[off as usize..]).expect("complete record");
            w.write_all(&self.buf[off as usize..off as usize + rec.size()])?;
        }
        w.flush()?;
        drop(w);
        spill.len += self.buf.len() as u64;
        spill.runs.push((start, spill.len));
        self.buf.clear();
        self.index.clear();
        Ok(())
    }

    /// Reports every duplicate, in no particular order.
    pub fn finish(mut self, mut report: impl FnMut(Duplicate<'_>)) -> io::Result<()> {
        let mut groups = Groups::default();
        if self.spill.is_none() {
            self.sort_run();
            for &(_, off) in &self.index {
                groups.next(Rec::parse(&self.buf[off as usize..]).expect("complete record"), &mut report);
            }
            return Ok(());
        }
        self.spill_run()?;
        self.buf = Vec::new();
        self.index = Vec::new();
        let spill = self.spill.take().expect("spilled");
        merge(&spill, |rec| groups.next(rec, &mut report))
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

/// Reads one sorted run of the spill file through a small buffer.
struct RunReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'f> RunReader<'f> {
    fn new(file: &'f File, (start, end): (u64, u64), cap: usize) -> Self {
        RunReader { file, pos: start, end, buf: Vec::with_capacity(cap), at: 0 }
    }

    /// The next record, refilling the buffer when it does not hold a whole one.
    fn next(&mut self) -> io::Result<Option<Rec<'_>>> {
        if Rec::parse(&self.buf[self.at..]).is_none() {
            self.refill()?;
        }
        let Some(rec) = Rec::parse(&self.buf[self.at..]) else {
            return if self.at == self.buf.len() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        };
        self.at += rec.size();
        Ok(Some(rec))
    }

    fn refill(&mut self) -> io::Result<()> {
        self.buf.drain(..self.at);
        self.at = 0;
        let have = self.buf.len();
        let room = (self.buf.capacity() - have).min((self.end - self.pos) as usize);
        self.buf.resize(have + room, 0);
        self.file.read_exact_at(&mut self.buf[have..], self.pos)?;
        self.pos += room as u64;
        Ok(())
    }
}

/// The head record of one run, ordered so that `BinaryHeap` pops the smallest first.
struct Head {
    hash: u64,
    id: Vec<u8>,
    line: u64,
    run: usize,
}

impl Head {
    fn rec(&self) -> Rec<'_> {
        Rec { hash: self.hash, line: self.line, id: &self.id }
    }

    fn set(&mut self, r: Rec<'_>) {
        (self.hash, self.line) = (r.hash, r.line);
        self.id.clear();
        self.id.extend_from_slice(r.id);
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        other.rec().order(&self.rec())
    }
}

/// Merges the sorted runs into one sorted stream of records.
fn merge(spill: &Spill, mut each: impl FnMut(Rec<'_>)) -> io::Result<()> {
    let cap = (MERGE_BYTES / spill.runs.len()).max(MIN_READ);
    let mut readers: Vec<RunReader<'_>> = spill.runs.iter().map(|&r| RunReader::new(&spill.file, r, cap)).collect();
    let mut heap = BinaryHeap::with_capacity(readers.len());
    for (run, r) in readers.iter_mut().enumerate() {
        if let Some(rec) = r.next()? {
            heap.push(Head { hash: rec.hash, id: rec.id.to_vec(), line: rec.line, run });
        }
    }
    while let Some(mut top) = heap.peek_mut() {
        each(top.rec());
        match readers[top.run].next()? {
            Some(rec) => top.set(rec),
            None => drop(std::collections::binary_heap::PeekMut::pop(top)),
        }
    }
    Ok(())
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
        (0..n).map(|_| format!("id-{}", rng.gen_range(0..distinct))).collect()
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
