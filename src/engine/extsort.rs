//! An external sort of byte records in bounded memory, for what the validator must order
//! over a whole file: duplicate `custom_id`s (`dedup`) and the dispatch order (`order`).
//!
//! Records are added one at a time to a run buffer of at most `run_bytes` (with its index).
//! A full buffer is sorted with the caller's comparison and appended to an anonymous
//! temporary file as one sorted run; at the end the runs are merged (k-way, one small read
//! buffer per run, at most [`MERGE_BYTES`] in all unless there are very many runs). Records
//! that fit in one buffer are sorted in memory and never touch the disk. The sort is stable:
//! records that compare equal come out in the order they were added.
//!
//! The spill file has no name (it vanishes with the process, even after a crash); each record
//! is stored as its length (4 bytes) and its bytes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

/// Run buffer and its sort index together stay below this by default.
pub const RUN_BYTES: usize = 4 << 20;
/// All the merge's read buffers together (unless there are very many runs).
pub const MERGE_BYTES: usize = 2 << 20;
/// A run's read buffer holds at least this much (and always one whole record).
const MIN_READ: usize = 4096;
/// Length prefix of a stored record.
const LEN: usize = 4;
/// What one index entry costs in memory.
const INDEX_ENTRY: usize = std::mem::size_of::<u32>();

/// How two records compare.
pub type Compare = fn(&[u8], &[u8]) -> Ordering;

/// Sorts the records added to it; see the module doc.
pub struct ExtSort {
    cmp: Compare,
    run_bytes: usize,
    dir: Option<PathBuf>,
    buf: Vec<u8>,
    /// Offset in `buf` of each record of the current run (its length prefix).
    index: Vec<u32>,
    spill: Option<Spill>,
}

/// The temporary file and the byte range of each sorted run in it.
struct Spill {
    file: File,
    runs: Vec<(u64, u64)>,
    len: u64,
}

/// A new temporary file without a name, in `dir` (made when missing) or else the system's
/// temporary directory: gone when its handle closes, even after a crash. On Linux it never
/// has a name (`O_TMPFILE`); elsewhere, or on a file system without `O_TMPFILE`, it is made
/// under a fresh name and unlinked at once. Readable and writable by its owner only.
pub fn anonymous_file(dir: Option<&Path>) -> io::Result<File> {
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.to_path_buf()
        }
        None => std::env::temp_dir(),
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    #[cfg(target_os = "linux")]
    if let Ok(file) = opts.clone().custom_flags(libc::O_TMPFILE).open(&dir) {
        return Ok(file);
    }
    unlinked_at_once(&dir, &opts)
}

/// [`anonymous_file`] where `O_TMPFILE` is not there: a file made under a name no one else
/// uses, unlinked as soon as it is open.
fn unlinked_at_once(dir: &Path, opts: &OpenOptions) -> io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let path = dir.join(format!(".batchd-tmp-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Relaxed)));
        match opts.clone().create_new(true).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Makes room for `extra` more bytes in `buf`, doubling as a `Vec` does but never past `limit`
/// (unless one record needs it): plain doubling from an odd first size would reserve up to
/// twice the run buffer just before it spills.
fn reserve_within(buf: &mut Vec<u8>, extra: usize, limit: usize) {
    let need = buf.len() + extra;
    if need > buf.capacity() {
        let want = (buf.capacity() * 2).min(limit).max(need);
        buf.reserve_exact(want - buf.len());
    }
}

/// The record stored at the start of `b`, if `b` holds all of it; and its stored size.
fn parse(b: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(b.get(..LEN)?.try_into().ok()?) as usize;
    Some((b.get(LEN..LEN + len)?, LEN + len))
}

fn at(buf: &[u8], off: u32) -> &[u8] {
    parse(&buf[off as usize..]).expect("complete record").0
}

impl ExtSort {
    /// Runs spill to an anonymous file in `dir` (created if missing; the system's temporary
    /// directory if `None`).
    pub fn new(dir: Option<PathBuf>, cmp: Compare, run_bytes: usize) -> ExtSort {
        ExtSort { cmp, run_bytes, dir, buf: Vec::new(), index: Vec::new(), spill: None }
    }

    /// Adds one record.
    pub fn push(&mut self, rec: &[u8]) -> io::Result<()> {
        reserve_within(&mut self.buf, LEN + rec.len(), self.run_bytes);
        self.index.push(self.buf.len() as u32);
        self.buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(rec);
        if self.buf.len() + self.index.len() * INDEX_ENTRY >= self.run_bytes {
            self.spill_run()?;
        }
        Ok(())
    }

    /// Sorts the current run's index; equal records keep the order they were added in.
    fn sort_run(&mut self) {
        let (buf, cmp) = (&self.buf, self.cmp);
        self.index.sort_unstable_by(|&a, &b| cmp(at(buf, a), at(buf, b)).then(a.cmp(&b)));
    }

    fn spill_file(&mut self) -> io::Result<&mut Spill> {
        if self.spill.is_none() {
            let file = anonymous_file(self.dir.as_deref())?;
            self.spill = Some(Spill { file, runs: Vec::new(), len: 0 });
        }
        Ok(self.spill.as_mut().expect("just made"))
    }

    fn spill_run(&mut self) -> io::Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        self.sort_run();
        let (buf, index) = (std::mem::take(&mut self.buf), std::mem::take(&mut self.index));
        let spill = self.spill_file()?;
        let start = spill.len;
        let mut w = io::BufWriter::with_capacity(256 << 10, &spill.file);
        for &off in &index {
            let (_, size) = parse(&buf[off as usize..]).expect("complete record");
            w.write_all(&buf[off as usize..off as usize + size])?;
        }
        w.flush()?;
        drop(w);
        spill.len += buf.len() as u64;
        spill.runs.push((start, spill.len));
        // Keep the allocations for the next run.
        (self.buf, self.index) = (buf, index);
        self.buf.clear();
        self.index.clear();
        Ok(())
    }

    /// Calls `each` with every record, in order.
    pub fn finish(mut self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        if self.spill.is_none() {
            self.sort_run();
            for &off in &self.index {
                each(at(&self.buf, off));
            }
            return Ok(());
        }
        self.spill_run()?;
        (self.buf, self.index) = (Vec::new(), Vec::new());
        let spill = self.spill.take().expect("spilled");
        merge(&spill, self.cmp, each)
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
    fn next(&mut self) -> io::Result<Option<&[u8]>> {
        // A record longer than the buffer takes two refills: one for its length, one for it.
        while parse(&self.buf[self.at..]).is_none() && self.pos < self.end {
            self.refill()?;
        }
        let Some((rec, size)) = parse(&self.buf[self.at..]) else {
            return if self.at == self.buf.len() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        };
        self.at += size;
        Ok(Some(rec))
    }

    /// Moves what is left to the front and reads more: at least the whole next record.
    fn refill(&mut self) -> io::Result<()> {
        self.buf.drain(..self.at);
        self.at = 0;
        let have = self.buf.len();
        let need = match self.buf.get(..LEN) {
            Some(head) => LEN + u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize,
            None => LEN,
        };
        let room = self.buf.capacity().max(need).saturating_sub(have).min((self.end - self.pos) as usize);
        self.buf.resize(have + room, 0);
        self.file.read_exact_at(&mut self.buf[have..], self.pos)?;
        self.pos += room as u64;
        Ok(())
    }
}

/// The head record of one run, ordered so that `BinaryHeap` pops the smallest first (and of
/// equal ones, the one of the earlier run: runs hold records in the order they were added).
struct Head {
    rec: Vec<u8>,
    run: usize,
    cmp: Compare,
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
        (other.cmp)(&other.rec, &self.rec).then(other.run.cmp(&self.run))
    }
}

/// Merges the sorted runs into one sorted stream of records.
fn merge(spill: &Spill, cmp: Compare, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let cap = (MERGE_BYTES / spill.runs.len()).max(MIN_READ);
    let mut readers: Vec<RunReader<'_>> = spill.runs.iter().map(|&r| RunReader::new(&spill.file, r, cap)).collect();
    let mut heap = BinaryHeap::with_capacity(readers.len());
    for (run, r) in readers.iter_mut().enumerate() {
        if let Some(rec) = r.next()? {
            heap.push(Head { rec: rec.to_vec(), run, cmp });
        }
    }
    while let Some(mut top) = heap.peek_mut() {
        each(&top.rec);
        match readers[top.run].next()? {
            Some(rec) => {
                top.rec.clear();
                top.rec.extend_from_slice(rec);
            }
            None => drop(std::collections::binary_heap::PeekMut::pop(top)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// By the first byte only, so that stability shows.
    fn first_byte(a: &[u8], b: &[u8]) -> Ordering {
        a.first().cmp(&b.first())
    }

    fn sorted(mut s: ExtSort, recs: &[Vec<u8>]) -> Vec<Vec<u8>> {
        for r in recs {
            s.push(r).unwrap();
        }
        let mut out = vec![];
        s.finish(|r| out.push(r.to_vec())).unwrap();
        out
    }

    #[test]
    fn spilled_and_in_memory_sorts_agree_with_a_stable_sort() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let recs: Vec<Vec<u8>> =
            (0..5000u32).map(|i| (0..rng.random_range(1..40)).map(|j| if j == 0 { rng.random_range(0..20) } else { (i >> (j % 4)) as u8 }).collect()).collect();
        let mut want = recs.clone();
        want.sort_by(|a, b| first_byte(a, b));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sorted(ExtSort::new(Some(dir.path().into()), first_byte, 700), &recs), want, "dozens of runs");
        assert_eq!(sorted(ExtSort::new(None, first_byte, usize::MAX), &recs), want, "one run in memory");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spill file leaves no name behind");
    }

    /// Both ways of making the spill file: readable, writable, private, made in a missing
    /// directory, and nameless once open.
    #[test]
    fn the_spill_file_has_no_name_and_works() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("made/on/demand");
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(0o600);
        let files = [anonymous_file(Some(&sub)).unwrap(), unlinked_at_once(dir.path(), &opts).unwrap(), anonymous_file(None).unwrap()];
        for (i, mut f) in files.into_iter().enumerate() {
            f.write_all(b"spilled run").unwrap();
            let mut back = [0u8; 7];
            f.read_exact_at(&mut back, 4).unwrap();
            assert_eq!(&back, b"led run", "file {i}");
            assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600, "file {i}");
            assert_eq!(f.metadata().unwrap().nlink(), 0, "file {i} has no name");
        }
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the made directory");
    }

    #[test]
    fn records_longer_than_a_read_buffer_come_back_whole() {
        let recs: Vec<Vec<u8>> = (0..40u8).rev().map(|i| vec![i; 10_000 + usize::from(i)]).collect();
        let got = sorted(ExtSort::new(None, first_byte, 30_000), &recs);
        assert_eq!(got.len(), 40);
        assert!(got.iter().enumerate().all(|(i, r)| r.len() == 10_000 + i && r.iter().all(|&b| b as usize == i)));
    }
}
