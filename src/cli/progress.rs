//! Progress display for long-running commands: a live bar on a terminal (a line that fits 80
//! columns, the details on a second line cut to the terminal's width), plain periodic lines
//! otherwise, nothing with `--quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One reading of a batch's progress.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub status: String,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    /// Lines and output tokens per second, over the same window (so that they agree).
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: Option<u64>,
    pub retries_waiting: u64,
    /// Shown after the figures (a stall and its reason).
    pub note: Option<String>,
    /// Paused upstreams, each with when its pause ends: the countdown is drawn at each redraw.
    pub paused: Vec<Pause>,
    /// Seconds from start to end, once the batch has ended (for the final line).
    pub took_seconds: Option<u64>,
    /// Lines a hosted Batch API counts done in remote batches not yet brought back.
    pub at_remote: u64,
}

impl Snapshot {
    /// Lines done so far, those done at a remote included.
    pub fn position(&self) -> u64 {
        (self.completed + self.failed + self.at_remote).min(self.total.max(self.completed + self.failed))
    }
}

/// An upstream's pause: "rate limited by local-vllm" until a time (Unix ms).
#[derive(Debug, Clone)]
pub struct Pause {
    pub words: String,
    pub until_ms: u64,
}

impl Pause {
    /// "rate limited by local-vllm, 2s": the time left now.
    fn now(&self) -> String {
        let left = Duration::from_millis(self.until_ms.saturating_sub(crate::now_unix_ms()));
        let left = if left < Duration::from_secs(10) { format!("{:.1}s", left.as_secs_f64()) } else { human(left) };
        format!("{}, {left}", self.words)
    }
}

/// The widest a terminal line is drawn when the terminal's width is unknown, and the narrowest
/// terminal that gets the details line.
const DEFAULT_COLUMNS: usize = 80;
const DETAILS_MIN_COLUMNS: usize = 40;

pub enum Display {
    Bar(ProgressBar),
    Plain { every: Duration, last: Option<Instant>, note: Option<String> },
    Quiet,
}

impl Display {
    pub fn new(quiet: bool) -> Display {
        if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            // Length 1, not 0: indicatif draws 0/0 as a full bar, which would flash "done"
            // before the first update (`update` also keeps the length at least 1).
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr_with_hz(4));
            // At most 79 columns with a million lines: spinner, elapsed, a 16-column bar,
            // done/total, then `headline` (≤ 40); the details go on a second line.
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {bar:16.cyan/blue} {pos}/{len} {msg}").expect("a valid template").progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            Display::Bar(bar)
        } else {
            Display::Plain { every: Duration::from_secs(2), last: None, note: None }
        }
    }

    pub fn update(&mut self, s: &Snapshot) {
        match self {
            Display::Bar(bar) => {
                bar.set_length(s.total.max(1));
                bar.set_position(s.position());
                bar.set_message(terminal_message(s));
            }
            Display::Plain { every, last, note } => {
                // Every `every`, and at once when the note (a stall) changes.
                if last.is_none_or(|t| t.elapsed() >= *every) || *note != s.note {
                    *last = Some(Instant::now());
                    note.clone_from(&s.note);
                    eprintln!("{}", plain_line(s));
                }
            }
            Display::Quiet => {}
        }
    }

    pub fn finish(&mut self, s: &Snapshot) {
        match self {
            Display::Bar(bar) => {
                bar.set_length(s.total.max(1));
                bar.set_position(s.completed + s.failed);
                bar.finish_with_message(terminal_message(s));
            }
            Display::Plain { .. } => eprintln!("{}", plain_line(s)),
            Display::Quiet => {}
        }
    }
}

/// The short part that fits the bar's line: status, rate, ETA (or, at the end, how long it
/// took and the average rate).
pub fn headline(s: &Snapshot) -> String {
    if let Some(took) = s.took_seconds {
        let done = s.completed + s.failed;
        let avg = done as f64 / took.max(1) as f64;
        return format!("{} in {} · {} req/s avg", s.status, human(Duration::from_secs(took)), rate(avg));
    }
    let eta = s.eta_seconds.map_or("--".to_string(), |e| human(Duration::from_secs(e)));
    format!("{} · {} req/s · ETA {eta}", s.status, rate(s.requests_per_second))
}

/// The rest, for a second line: counts, tokens, retries, pauses, a stall.
pub fn details(s: &Snapshot) -> String {
    let mut parts = vec![format!("done {}", s.completed), format!("failed {}", s.failed)];
    if s.tokens_per_second > 0.0 {
        parts.push(format!("{} tok/s", rate(s.tokens_per_second)));
    }
    if s.retries_waiting > 0 {
        parts.push(format!("retries {}", s.retries_waiting));
    }
    if !s.paused.is_empty() {
        parts.push(format!("paused: {}", s.paused.iter().map(Pause::now).collect::<Vec<_>>().join("; ")));
    }
    if s.at_remote > 0 {
        parts.push(format!("{} done at the remote, coming back", s.at_remote));
    }
    if let Some(n) = &s.note {
        parts.push(n.clone());
    }
    parts.join(" · ")
}

/// A bar's message: the headline, and the details on a second line cut to the terminal's width
/// (none on a very narrow one), so that no line wraps and a redraw leaves no stale fragments.
fn terminal_message(s: &Snapshot) -> String {
    let columns = terminal_columns().unwrap_or(DEFAULT_COLUMNS);
    if columns < DETAILS_MIN_COLUMNS {
        return headline(s);
    }
    format!("{}\n  {}", headline(s), fit(&details(s), columns - 3))
}

/// A line for a log (stderr not a terminal): everything on one line.
fn plain_line(s: &Snapshot) -> String {
    format!("progress: {}/{} {} · {}", s.position(), s.total, headline(s), details(s))
}

/// `text` cut to `width` characters, an ellipsis marking the cut.
pub fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// "812", "17.8", "0.4": a rate with the digits that matter.
fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// The width of the terminal on stderr, read at each draw (it may have been resized).
fn terminal_columns() -> Option<usize> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass; fd 2 is only read.
    let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// The paused upstreams among `progress.upstreams` (the API's JSON).
pub fn paused_list(upstreams: &serde_json::Value) -> Vec<Pause> {
    let Some(all) = upstreams.as_array() else { return vec![] };
    all.iter()
        .filter_map(|u| {
            let until_ms = u["paused_until_ms"].as_u64()?;
            let reason = crate::upstream::PauseReason::parse(u["pause_reason"].as_str()?)?;
            Some(Pause { words: reason.words(u["name"].as_str().unwrap_or("?")), until_ms })
        })
        .collect()
}

/// One line per upstream of `progress.upstreams`: its window, what it learned, its pause.
pub fn upstream_lines(upstreams: &serde_json::Value) -> Vec<String> {
    let Some(all) = upstreams.as_array() else { return vec![] };
    all.iter()
        .map(|u| {
            let mut l = format!(
                "upstream {} ({}): window {} of {}, {} in flight",
                u["name"].as_str().unwrap_or("?"),
                u["mode"].as_str().unwrap_or("?"),
                u["window"],
                u["limit"],
                u["in_flight"]
            );
            if let Some(r) = u["learned_rpm"].as_f64() {
                l += &format!(", learned {r:.0} rpm");
            }
            let (rl, ov) = (u["rate_limited_last_minute"].as_u64().unwrap_or(0), u["overloaded_last_minute"].as_u64().unwrap_or(0));
            if rl + ov > 0 {
                l += &format!(", {rl} rate-limited and {ov} overloaded answers in the last minute");
            }
            if u["paused"] == true {
                l += &format!("; paused ({})", u["pause_detail"].as_str().unwrap_or_default());
            }
            if let Some(e) = u["last_error"].as_str() {
                l += &format!("; last error: {e}");
                if let Some(at) = u["last_error_at_ms"].as_u64() {
                    l += &format!(" ({} ago)", human(Duration::from_millis(crate::now_unix_ms().saturating_sub(at))));
                }
            }
            if let Some(w) = u["warning"].as_str() {
                l += &format!("; warning: {w}");
            }
            l
        })
        .collect()
}

/// Lines and output tokens per second over the last few seconds, from the same samples (so the
/// two rates describe the same moments).
pub struct Rates {
    samples: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    const WINDOW: Duration = Duration::from_secs(5);

    pub fn new() -> Rates {
        Rates { samples: Default::default() }
    }

    /// Records `done` lines and `tokens` output tokens so far; returns (lines/s, tokens/s).
    pub fn observe(&mut self, done: u64, tokens: u64) -> (f64, f64) {
        let now = Instant::now();
        self.samples.push_back((now, done, tokens));
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|s| now.duration_since(s.0) >= Self::WINDOW) {
            self.samples.pop_front();
        }
        let (t0, d0, k0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.5 {
            return (0.0, 0.0);
        }
        (done.saturating_sub(d0) as f64 / dt, tokens.saturating_sub(k0) as f64 / dt)
    }
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bar's line at its widest: a million lines, five-digit rates, a day's ETA, the
    /// longest status. The template's fixed part is spinner, elapsed (4), the 16-column bar,
    /// done/total and the spaces between them.
    #[test]
    fn the_bar_line_fits_80_columns_at_its_widest() {
        let s = Snapshot {
            status: "in_progress".into(),
            total: 1_000_000,
            completed: 999_999,
            failed: 0,
            requests_per_second: 99_999.9,
            tokens_per_second: 9_999_999.0,
            eta_seconds: Some(86_399),
            ..Default::default()
        };
        let fixed = 1 + 1 + 4 + 1 + 16 + 1 + "1000000/1000000".len() + 1;
        assert!(fixed + headline(&s).chars().count() < 80, "{}", headline(&s));
        let done = Snapshot { status: "cancelled".into(), took_seconds: Some(86_399), ..s.clone() };
        assert!(fixed + headline(&done).chars().count() < 80, "{}", headline(&done));
        assert_eq!(fit(&details(&s), 20).chars().count(), 20);
        assert!(fit(&details(&s), 20).ends_with('…'));
    }

    /// A pause's countdown is computed when drawn, from when the pause ends.
    #[test]
    fn a_pause_counts_down() {
        let p = Pause { words: "rate limited by u".into(), until_ms: crate::now_unix_ms() + 2_500 };
        let first = p.now();
        std::thread::sleep(Duration::from_millis(300));
        let later = p.now();
        assert!(first.starts_with("rate limited by u, 2."), "{first}");
        assert_ne!(first, later, "the countdown moves");
    }

    #[test]
    fn rates_are_over_the_same_samples() {
        let mut r = Rates::new();
        r.observe(0, 0);
        std::thread::sleep(Duration::from_millis(600));
        let (req, tok) = r.observe(60, 960);
        assert!((tok / req - 16.0).abs() < 1e-9, "{req} {tok}");
    }
}
