//! The dispatch order of a batch whose lines share prompt prefixes: which lines go together.
//!
//! The validator gives [`OrderBuilder`] every request line with its prefix key
//! (`engine::prefix`); the external sort of `engine::extsort` orders them by key, stably (so
//! lines with equal keys keep their file order), in bounded memory: a depth-first walk of the
//! batch's prefix tree, where lines sharing the longest prefixes sit next to each other.
//!
//! When enough lines share a prefix with the line before them in that order ([`worth_it`]),
//! the order is written as the batch's *order file* — one [`RECORD`] per line: its number,
//! its offset and its length in the input — and the batch's work units become ranges of that
//! file (`WorkUnit::ordered`): a unit's `byte_offset..+byte_len` is a range of records, its
//! `first_line..end_line` the span of the lines it lists. The feeder reads a unit's records,
//! then its lines by ranged reads of the input (nearby lines in one read, see [`spans`]).
//! Results stay keyed by line number, so resume and exactly-once are those of any unit, and
//! the output is one line per input line, `custom_id` unchanged.
//!
//! A batch that shares nothing keeps file-order units (one sequential read per unit): the
//! order file is dropped unread.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use super::extsort::{anonymous_file, ExtSort, RUN_BYTES};
use super::prefix::PrefixKey;
use crate::store::{BatchId, WorkUnit};

/// The blob holding a batch's order file (deleted when the batch is final).
pub fn order_key(batch_id: &str) -> String {
    format!("orders/{batch_id}")
}

/// One line of the order file: line number (8), offset in the input (8), length (4), little-endian.
pub const RECORD: usize = 20;

/// A line as the order file lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub line: u64,
    pub offset: u64,
    pub len: u32,
}

impl Entry {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    fn read(b: &[u8]) -> Entry {
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        Entry { line: word(0..8), offset: word(8..16), len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")) }
    }

    /// The entries of an order file's bytes (a whole number of records).
    pub fn parse_all(bytes: &[u8]) -> Vec<Entry> {
        bytes.chunks_exact(RECORD).map(Entry::read).collect()
    }
}

/// Sort records: the entry, then the key's bytes (which sort as the key does).
fn by_key(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a[RECORD..].cmp(&b[RECORD..])
}

/// Whether `shared` lines (of `lines`) sharing a prefix with their predecessor make an order
/// worth its scattered reads: at least one in a hundred.
pub fn worth_it(shared: u64, lines: u64) -> bool {
    shared > 0 && shared * 100 >= lines
}

/// Collects lines and their keys; see the module doc.
pub struct OrderBuilder {
    sort: ExtSort,
    rec: Vec<u8>,
}

/// A batch's dispatch order, ready to be stored: its units and the order file's bytes in an
/// anonymous temporary file.
#[derive(Debug)]
pub struct Ordered {
    pub units: Vec<WorkUnit>,
    pub file: File,
    pub len: u64,
    /// Lines that share at least one chunk of prefix with the line before them.
    pub shared: u64,
}

/// How units are cut: at most `lines` lines and about `bytes` bytes of input each, and
/// smaller late in a batch (see [`Cut::lines_now`]) when the batch's `total` lines are known.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub lines: u64,
    pub bytes: u64,
    /// The batch's request lines (0: unknown, no tapering).
    pub total: u64,
}

/// A unit holds at most this fraction (1/TAPER) of the lines still to cut ...
const TAPER: u64 = 16;
/// ... but no fewer lines than this (unless `Cut::lines` is smaller).
const MIN_UNIT_LINES: u64 = 25;

impl Cut {
    /// The most lines the next unit may hold when `remaining` lines are still to cut: units
    /// shrink towards the end of a batch, so that every node with a share of the upstream has
    /// lines to send until the batch's last moments (a node holding no unit leaves its share
    /// unused: one 2,000-line unit ran on one node of three at a third of the rate).
    pub fn lines_now(&self, remaining: u64) -> u64 {
        if self.total == 0 {
            return self.lines;
        }
        (remaining / TAPER).max(MIN_UNIT_LINES).min(self.lines).max(1)
    }
}

impl OrderBuilder {
    /// Sorted runs spill to an anonymous file in `dir` (the system's temporary directory if `None`).
    pub fn new(dir: Option<PathBuf>) -> OrderBuilder {
        OrderBuilder::with_run_bytes(dir, RUN_BYTES)
    }

    /// With another run size (tests force spills).
    pub fn with_run_bytes(dir: Option<PathBuf>, run_bytes: usize) -> OrderBuilder {
        OrderBuilder { sort: ExtSort::new(dir, by_key, run_bytes), rec: Vec::new() }
    }

    /// Adds a request line; lines must come in file order.
    pub fn add(&mut self, key: &PrefixKey, e: Entry) -> io::Result<()> {
        self.rec.clear();
        e.write(&mut self.rec);
        for w in key.words() {
            self.rec.extend_from_slice(&w.to_be_bytes());
        }
        self.sort.push(&self.rec)
    }

    /// The order, when [`worth_it`]; `None` when the lines share (almost) nothing. Units are
    /// numbered from 0 and cut by `cut`.
    pub fn finish(self, batch_id: &str, cut: Cut, dir: Option<PathBuf>) -> io::Result<Option<Ordered>> {
        let file = anonymous_file(dir.as_deref())?;
        let mut w = Writer { out: BufWriter::with_capacity(64 << 10, file), units: Units::new(batch_id, cut), prev: Vec::new(), shared: 0, lines: 0 };
        let mut failed = None;
        self.sort.finish(|rec| {
            if failed.is_none() {
                failed = w.next(rec).err();
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let (shared, lines) = (w.shared, w.lines);
        let units = w.units.finish();
        let file = w.out.into_inner().map_err(|e| e.into_error())?;
        Ok(worth_it(shared, lines).then_some(Ordered { units, file, len: lines * RECORD as u64, shared }))
    }
}

/// Writes sorted records out as entries, counting shared prefixes and cutting units.
struct Writer {
    out: BufWriter<File>,
    units: Units,
    prev: Vec<u8>,
    shared: u64,
    lines: u64,
}

impl Writer {
    fn next(&mut self, rec: &[u8]) -> io::Result<()> {
        let key = &rec[RECORD..];
        // The model's word and the first chunk's: shared means at least one chunk in common.
        if key.len() >= 8 && self.prev.len() >= 8 && key[..8] == self.prev[..8] {
            self.shared += 1;
        }
        self.prev.clear();
        self.prev.extend_from_slice(key);
        self.out.write_all(&rec[..RECORD])?;
        self.units.push(Entry::read(rec));
        self.lines += 1;
        Ok(())
    }
}

/// Cuts consecutive entries of the order into units.
struct Units {
    batch_id: BatchId,
    cut: Cut,
    done: Vec<WorkUnit>,
    open: Option<(WorkUnit, u64)>,
    pos: u64,
}

impl Units {
    fn new(batch_id: &str, cut: Cut) -> Units {
        Units { batch_id: batch_id.into(), cut, done: Vec::new(), open: None, pos: 0 }
    }

    fn push(&mut self, e: Entry) {
        let (idx, pos) = (self.done.len() as i64, self.pos);
        let (u, bytes) = self.open.get_or_insert_with(|| {
            let u = WorkUnit {
                batch_id: BatchId::default(),
                idx,
                first_line: e.line,
                end_line: e.line + 1,
                line_count: 0,
                byte_offset: pos * RECORD as u64,
                byte_len: 0,
                epoch: 0,
                ordered: true,
            };
            (u, 0)
        });
        u.first_line = u.first_line.min(e.line);
        u.end_line = u.end_line.max(e.line + 1);
        u.line_count += 1;
        u.byte_len += RECORD as u64;
        *bytes += u64::from(e.len);
        self.pos += 1;
        if u.line_count >= self.cut.lines_now(self.cut.total.saturating_sub(self.pos - u.line_count)) || *bytes >= self.cut.bytes {
            self.close();
        }
    }

    fn close(&mut self) {
        if let Some((mut u, _)) = self.open.take() {
            u.batch_id.clone_from(&self.batch_id);
            self.done.push(u);
        }
    }

    fn finish(mut self) -> Vec<WorkUnit> {
        self.close();
        self.done
    }
}

/// Byte ranges of the input that cover `entries` (sorted by offset), nearby lines in one
/// read: a gap of at most `gap` bytes is read through, and no read exceeds `max` bytes
/// (unless one line does). Each range lists the indexes of the entries it holds.
pub fn spans(entries: &[Entry], gap: u64, max: u64) -> Vec<(std::ops::Range<u64>, Vec<usize>)> {
    let mut by_offset: Vec<usize> = (0..entries.len()).collect();
    by_offset.sort_by_key(|&i| entries[i].offset);
    let mut out: Vec<(std::ops::Range<u64>, Vec<usize>)> = Vec::new();
    for i in by_offset {
        let e = entries[i];
        let end = e.offset + u64::from(e.len);
        match out.last_mut() {
            Some((r, members)) if e.offset <= r.end + gap && end.max(r.end) - r.start <= max => {
                r.end = r.end.max(end);
                members.push(i);
            }
            _ => out.push((e.offset..end, vec![i])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::prefix::prefix_key;
    use serde_json::json;

    fn body(doc: &str, q: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}]})).unwrap()
    }

    /// `docs` documents × `per` questions, interleaved in the file (doc = line % docs).
    fn build(docs: usize, per: usize, run_bytes: usize, cut: Cut) -> (Option<Ordered>, Vec<usize>) {
        let texts: Vec<String> = (0..docs).map(|d| format!("document {d} says ").repeat(40)).collect();
        let mut b = OrderBuilder::with_run_bytes(None, run_bytes);
        let mut doc_of = vec![];
        for i in 0..docs * per {
            let line = i as u64 + 1;
            // Document 3's lines all ask the same: equal keys.
            let q = if i % docs == 3 { "the same".to_string() } else { format!("question {i}") };
            let k = prefix_key("/v1/chat/completions", "m", &body(&texts[i % docs], &q));
            b.add(&k, Entry { line, offset: i as u64 * 1000, len: 900 }).unwrap();
            doc_of.push(i % docs);
        }
        (b.finish("batch_o", cut, None).unwrap(), doc_of)
    }

    fn read(o: &mut Ordered) -> Vec<Entry> {
        use std::io::{Read, Seek};
        let mut bytes = vec![];
        o.file.rewind().unwrap();
        o.file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, o.len);
        Entry::parse_all(&bytes)
    }

    #[test]
    fn units_shrink_late_in_a_batch_and_never_grow_past_the_cut() {
        let cut = Cut { lines: 2000, bytes: u64::MAX, total: 2000 };
        assert_eq!(cut.lines_now(2000), 125, "a 2,000-line batch starts with sixteenths");
        assert_eq!(cut.lines_now(100), MIN_UNIT_LINES, "and ends with units of 25");
        assert_eq!(cut.lines_now(10_000_000), 2000, "a big batch is cut by unit_lines");
        assert_eq!(Cut { lines: 10, bytes: u64::MAX, total: 2000 }.lines_now(2000), 10, "never more than unit_lines");
        assert_eq!(Cut { lines: 2000, bytes: u64::MAX, total: 0 }.lines_now(5), 2000, "no tapering without a total");
    }

    #[test]
    fn lines_sharing_a_document_are_listed_together_and_units_cover_the_order() {
        for run_bytes in [usize::MAX, 2000] {
            let (o, doc_of) = build(7, 30, run_bytes, Cut { lines: 16, bytes: u64::MAX, total: 0 });
            let mut o = o.expect("every line shares its document");
            let entries = read(&mut o);
            let mut lines: Vec<u64> = entries.iter().map(|e| e.line).collect();
            let docs: Vec<usize> = lines.iter().map(|&l| doc_of[l as usize - 1]).collect();
            assert_eq!(docs.windows(2).filter(|w| w[0] != w[1]).count(), 6, "one run per document ({run_bytes}): {docs:?}");
            let one_doc: Vec<u64> = entries.iter().filter(|e| doc_of[e.line as usize - 1] == 3).map(|e| e.line).collect();
            assert!(one_doc.windows(2).all(|w| w[0] < w[1]), "equal prefixes keep file order");
            assert_eq!(o.shared, 7 * 29);
            lines.sort();
            assert_eq!(lines, (1..=210).collect::<Vec<u64>>(), "every line once");
            assert_eq!(o.units.len(), 210usize.div_ceil(16));
            let mut pos = 0;
            for (i, u) in o.units.iter().enumerate() {
                assert_eq!((u.idx, u.byte_offset, u.batch_id.as_str(), u.ordered), (i as i64, pos, "batch_o", true));
                let listed = &entries[(u.byte_offset / RECORD as u64) as usize..][..u.line_count as usize];
                assert!(listed.iter().all(|e| (u.first_line..u.end_line).contains(&e.line)));
                pos += u.byte_len;
            }
            assert_eq!(pos, o.len);
        }
    }

    #[test]
    fn a_batch_that_shares_nothing_gets_no_order_and_units_end_at_their_bytes() {
        assert!(build(300, 1, usize::MAX, Cut { lines: 16, bytes: u64::MAX, total: 0 }).0.is_none(), "no line shares a document");
        let (o, _) = build(2, 10, usize::MAX, Cut { lines: 1000, bytes: 2700, total: 0 });
        assert_eq!(o.unwrap().units.iter().map(|u| u.line_count).collect::<Vec<_>>(), [3, 3, 3, 3, 3, 3, 2], "900-byte lines, 2,700 bytes a unit");
        assert!(!worth_it(0, 0) && !worth_it(9, 1000) && worth_it(10, 1000));
    }

    #[test]
    fn nearby_lines_are_read_together() {
        let e = |offset, len| Entry { line: offset, offset, len };
        let entries = [e(5000, 100), e(0, 100), e(150, 100), e(100_000, 10), e(5200, 50)];
        let got = spans(&entries, 100, 10_000);
        assert_eq!(got, vec![(0..250, vec![1, 2]), (5000..5250, vec![0, 4]), (100_000..100_010, vec![3])]);
        let capped = spans(&entries, 10_000, 300);
        assert_eq!(capped.len(), 3, "no read longer than 300 bytes: {capped:?}");
    }
}
