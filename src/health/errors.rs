//! The error window: replies in which a member says it cannot serve (`-LOADING`, `-BUSY`,
//! `-MASTERDOWN`, `-TRYAGAIN`, `-CLUSTERDOWN`, and `-OOM` when configured), counted over a
//! sliding window against all the commands sent to it, as Envoy's outlier detection counts a
//! host's 5xx. The application's own errors (`-WRONGTYPE`, syntax, `-NOSCRIPT`, `-NOAUTH`, ...)
//! never count. Sessions bump one counter on such a reply; the checker samples the totals.
//!
//! These errors are the member's own words, repeated at a rate, so a tripped window marks the
//! member down without a confirming probe: a `-MASTERDOWN` member still answers PING.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::config::ErrorWindowConfig;
use crate::resp::reply::HEAD_LEN;

/// Samples kept per window: the window slides in steps of a tenth of its length.
const STEPS: u32 = 10;

/// Does an error reply starting with `head` (its first bytes, without the `-`, cut at
/// [`HEAD_LEN`]) say that the member cannot serve?
pub fn cannot_serve(head: &[u8], oom: bool) -> bool {
    let word = head.split(|&b| b == b' ').next().unwrap_or_default();
    // A code longer than the head is cut: `MASTERDO` stands for `MASTERDOWN`.
    let is = |code: &[u8]| word == code || word.len() == HEAD_LEN && code.starts_with(word);
    is(b"LOADING")
        || is(b"BUSY")
        || is(b"MASTERDOWN")
        || is(b"TRYAGAIN")
        || is(b"CLUSTERDOWN")
        || oom && is(b"OOM")
}

/// What tripped the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tripped {
    pub errors: u64,
    pub commands: u64,
}

/// Cumulative totals at one instant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    errors: u64,
    commands: u64,
}

/// One member's sliding window.
#[derive(Debug)]
pub struct ErrorWindow {
    config: ErrorWindowConfig,
    samples: VecDeque<Sample>,
}

impl ErrorWindow {
    pub fn new(config: ErrorWindowConfig) -> ErrorWindow {
        ErrorWindow {
            config,
            samples: VecDeque::new(),
        }
    }

    /// How often the checker should sample.
    pub fn step(&self) -> std::time::Duration {
        self.config.window / STEPS
    }

    /// Records the member's totals at `now`; returns what tripped the window, if it did
    /// (then it starts over, so one bad spell trips it once).
    pub fn observe(&mut self, now: Instant, errors: u64, commands: u64) -> Option<Tripped> {
        self.samples.push_back(Sample {
            at: now,
            errors,
            commands,
        });
        // Keep one sample at or before the window's start, as the baseline.
        while self.samples.len() > 1 && self.samples[1].at + self.config.window <= now {
            self.samples.pop_front();
        }
        let base = self.samples.front()?;
        let errors = errors.saturating_sub(base.errors);
        let commands = commands.saturating_sub(base.commands).max(errors);
        let tripped =
            errors >= self.config.min_count && errors as f64 >= self.config.rate * commands as f64;
        if !tripped {
            return None;
        }
        self.samples.clear();
        Some(Tripped { errors, commands })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn window() -> ErrorWindow {
        ErrorWindow::new(ErrorWindowConfig {
            window: Duration::from_secs(10),
            min_count: 20,
            rate: 0.5,
            oom: false,
        })
    }

    #[test]
    fn which_errors_count() {
        // (the error line's first 8 bytes, error_oom, counts)
        let cases: &[(&[u8], bool, bool)] = &[
            (b"LOADING ", false, true),
            (b"BUSY Red", false, true),
            (b"MASTERDO", false, true),
            (b"TRYAGAIN", false, true),
            (b"CLUSTERD", false, true),
            (b"OOM comm", true, true),
            (b"OOM comm", false, false),
            (b"WRONGTYP", false, false),
            (b"ERR wron", false, false),
            (b"NOSCRIPT", false, false),
            (b"NOAUTH A", false, false),
            (b"BUSYKEY ", false, false),
            (b"BUSYGROU", false, false),
            (b"EXECABOR", false, false),
            (b"", false, false),
        ];
        for &(head, oom, counts) in cases {
            let text = String::from_utf8_lossy(head);
            assert_eq!(cannot_serve(head, oom), counts, "{text} (oom {oom})");
        }
    }

    #[test]
    fn trips_on_count_and_rate_within_the_window() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // (second, errors total, commands total, trips)
        let cases: &[&[(u64, u64, u64, bool)]] = &[
            // 25 errors out of 40 commands in 2 s: trips.
            &[(0, 0, 0, false), (1, 10, 20, false), (2, 25, 40, true)],
            // Many errors but a small share of a busy member's replies: no.
            &[(0, 0, 0, false), (5, 100, 10_000, false)],
            // A high share but too few: no.
            &[(0, 0, 0, false), (5, 19, 19, false)],
            // 30 errors, but spread over 30 s: never 20 within 10 s.
            &[
                (0, 0, 0, false),
                (10, 10, 10, false),
                (20, 20, 20, false),
                (30, 30, 30, false),
            ],
            // Once tripped it starts over.
            &[
                (0, 0, 0, false),
                (1, 30, 30, true),
                (2, 40, 40, false),
                (3, 60, 60, true),
            ],
        ];
        for (n, case) in cases.iter().enumerate() {
            let mut w = window();
            for &(s, errors, commands, trips) in *case {
                assert_eq!(
                    w.observe(at(s), errors, commands).is_some(),
                    trips,
                    "case {n} at {s}s"
                );
            }
        }
    }
}
