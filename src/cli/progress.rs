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
    format!(
        "{} · done {} · failed {} · {:.1} req/s · {:.0} tok/s · retries {} · ETA {}{note}",
        s.status, s.completed, s.failed, s.requests_per_second, s.tokens_per_second, s.retries_waiting, eta
    )
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
