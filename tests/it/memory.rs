//! Memory that does not grow with the number of lines (issue 15), measured exactly: the
//! test binary's global allocator wraps the system's and, on a thread that asked for it,
//! counts every heap byte that thread allocates, so the other tests running beside this one
//! do not disturb the figure (the validator runs on the calling thread). The server-wide
//! figures (peak RSS of 100,000 against 1,000,000 lines through `batchd serve`) are the
//! bench's job (`bench/run.sh --only flat`); this keeps CI fast.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use batchd::config::{Limits, RawConfig, RawUpstream};
use batchd::engine::lines::LineSplitter;
use batchd::engine::validator::{Report, Validator};
use batchd::upstream::Router;

struct Counting;

thread_local! {
    /// Whether this thread's allocations are counted, its live bytes, and their peak.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    // `try_with`: a thread being torn down has no thread-locals left, and is not measured.
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let now = LIVE.with(|l| l.get()) + n as isize;
        LIVE.with(|l| l.set(now));
        PEAK.with(|p| p.set(p.get().max(now)));
    }
}

fn shrank(n: usize) {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        LIVE.with(|l| l.set(l.get() - n as isize));
    }
}

// SAFETY: every call is passed to `System` unchanged; only byte counts are kept aside, in
// const-initialised thread-locals (which never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        shrank(l.size());
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // Counted as a fresh block first: a moving realloc holds both for a moment.
        grew(new);
        shrank(l.size());
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` with this thread's allocations counted; returns its value and the peak of heap
/// bytes it held meanwhile (above what was live when it started).
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, PEAK.with(Cell::get).max(0) as usize)
}

/// Validates `n` generated chat lines with 100-byte custom_ids (so that few lines fill the
/// duplicate finder's run buffer), where every 25,000th line repeats the `custom_id` of
/// line 1; returns the report and the peak of heap bytes allocated meanwhile.
fn validate(router: &Router, n: usize) -> (Report, usize) {
    validate_lines(router, n, false, |i| {
        let id = if i > 0 && i % 25_000 == 0 { 0 } else { i };
        format!(
            r#"{{"custom_id":"req-{id:0>96}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"user","content":"line {i}"}}]}}}}"#
        )
    })
}

/// Validates `n` lines made by `line(i)`, in prefix order if `ordered`; the report and the
/// peak of heap bytes allocated meanwhile.
fn validate_lines(router: &Router, n: usize, ordered: bool, line: impl Fn(usize) -> String) -> (Report, usize) {
    let limits = Limits { max_lines: 10_000_000, max_file_bytes: u64::MAX, ..Limits::default() };
    let mut chunk: Vec<u8> = Vec::with_capacity(1 << 20);
    peak_heap(move || {
        let mut v = Validator::new("batch_memory", "/v1/chat/completions", router, limits, 2000);
        if ordered {
            v = v.order_by_prefix(None);
        }
        let mut splitter = LineSplitter::new(limits.max_line_bytes as usize, 1, 0);
        let mut i = 0;
        while i < n {
            chunk.clear();
            while chunk.len() < (1 << 20) - 1024 && i < n {
                let line = line(i);
                chunk.extend_from_slice(line.as_bytes());
                chunk.push(b'\n');
                i += 1;
            }
            splitter.feed(&chunk, &mut |l| v.line(l));
        }
        splitter.finish(&mut |l| v.line(l));
        v.finish().expect("validation")
    })
}

/// Issue 15: validating twice as many lines takes no more memory. Both sizes are past the
/// point where duplicate detection spills sorted runs to disk; before that change, the
/// `HashMap` of custom_id hashes and the per-line vectors grew by about 30 bytes a line
/// (+3 MB between these two sizes, 52 MB at 1,000,000 lines). Duplicates are still found,
/// each against its first line.
#[test]
fn validation_memory_does_not_grow_with_lines() {
    let mut raw = RawConfig::default();
    raw.upstreams.push(RawUpstream { name: "any".into(), base_url: "http://127.0.0.1:9/v1".into(), models: vec!["*".into()], ..Default::default() });
    let router = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
    let (small, small_peak) = validate(&router, 40_000);
    let (big, big_peak) = validate(&router, 80_000);
    println!("peak heap: {small_peak} bytes for 40,000 lines, {big_peak} bytes for 80,000 lines");
    for (r, n) in [(&small, 40_000), (&big, 80_000)] {
        assert_eq!(r.validated.total, n);
        let dups: Vec<_> = r.errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        let want: Vec<_> = (1..=(n - 1) / 25_000).map(|k| ("duplicate_custom_id", Some(k * 25_000 + 1))).collect();
        assert_eq!(dups, want);
        assert!(r.errors[0].message.contains("already used on line 1"), "{}", r.errors[0].message);
    }
    assert!(big_peak < 10 << 20, "validating 80,000 lines peaked at {big_peak} heap bytes");
    assert!(big_peak < small_peak + (256 << 10), "twice the lines took more memory: {small_peak} → {big_peak} bytes");
}

/// Issue 26: keying every line by its prompt prefix and sorting the lines into a dispatch
/// order keeps validation's memory flat too: a million lines take no more heap than two
/// hundred thousand, where both sorts (duplicates and order) already spill sorted runs to
/// anonymous files; the order itself is written to another, and only the units (a few
/// hundred) stay in memory.
#[test]
fn ordering_memory_does_not_grow_with_lines() {
    let mut raw = RawConfig::default();
    raw.upstreams.push(RawUpstream { name: "any".into(), base_url: "http://127.0.0.1:9/v1".into(), models: vec!["*".into()], ..Default::default() });
    let router = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
    let prompts: Vec<String> = (0..100).map(|p| format!("system prompt {p:03} ").repeat(20)).collect();
    let line = |i: usize| {
        format!(
            r#"{{"custom_id":"r{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"q{i}"}}]}}}}"#,
            prompts[(i * 7919) % 100]
        )
    };
    let (small, small_peak) = validate_lines(&router, 200_000, true, line);
    let (big, big_peak) = validate_lines(&router, 1_000_000, true, line);
    println!("peak heap in prefix order: {small_peak} bytes for 200,000 lines, {big_peak} bytes for 1,000,000 lines");
    for (r, n) in [(&small, 200_000u64), (&big, 1_000_000)] {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let order = r.order.as_ref().expect("the lines share 100 prompts: ordered");
        assert_eq!(order.len, n * 20, "one record per line");
        assert_eq!(r.validated.units.iter().map(|u| u.line_count).sum::<u64>(), n);
        assert!(r.validated.units.iter().all(|u| u.ordered));
    }
    assert!(big_peak < 16 << 20, "ordering 1,000,000 lines peaked at {big_peak} heap bytes");
    assert!(big_peak < small_peak + (1 << 20), "five times the lines took more memory: {small_peak} → {big_peak} bytes");
}
