//! Progress display for long-running commands: a live bar on a terminal, plain periodic
//! lines otherwise, nothing with `--quiet`.

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
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: Option<u64>,
    pub retries_waiting: u64,
    /// Shown after the figures (a stall and its reason).
    pub note: Option<String>,
    /// Paused upstreams: "rate limited by local-vllm, 2 s".
    pub paused: Option<String>,
}

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
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
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
                bar.set_position(s.completed + s.failed);
                bar.set_message(message(s));
            }
            Display::Plain { every, last, note } => {
                // Every `every`, and at once when the note (a stall) changes.
                if last.is_none_or(|t| t.elapsed() >= *every) || *note != s.note {
                    *last = Some(Instant::now());
                    note.clone_from(&s.note);
                    eprintln!("progress: {}/{} {}", s.completed + s.failed, s.total, message(s));
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
                bar.finish_with_message(message(s));
            }
            Display::Plain { .. } => eprintln!("progress: {}/{} {}", s.completed + s.failed, s.total, message(s)),
            Display::Quiet => {}
        }
    }
}

fn message(s: &Snapshot) -> String {
    let eta = s.eta_seconds.map_or("--".to_string(), |e| human(Duration::from_secs(e)));
    let note = s.note.as_ref().map(|n| format!(" · {n}")).unwrap_or_default();
    let mut m = format!(
        "{} · done {} · failed {} · {:.1} req/s · {:.0} tok/s · retries {} · ETA {}{note}",
        s.status, s.completed, s.failed, s.requests_per_second, s.tokens_per_second, s.retries_waiting, eta
    );
    if let Some(p) = &s.paused {
        m += &format!(" · paused: {p}");
    }
    m
}

/// The paused upstreams among `progress.upstreams` (the API's JSON), in words.
pub fn paused_words(upstreams: &serde_json::Value) -> Option<String> {
    let words: Vec<String> = upstreams
        .as_array()?
        .iter()
        .filter_map(|u| {
            let until = u["paused_until_ms"].as_u64()?;
            let reason = crate::upstream::PauseReason::parse(u["pause_reason"].as_str()?)?;
            let left = crate::upstream::human(Duration::from_millis(until.saturating_sub(crate::now_unix_ms())));
            Some(format!("{}, {left}", reason.words(u["name"].as_str().unwrap_or("?"))))
        })
        .collect();
    (!words.is_empty()).then(|| words.join("; "))
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

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
