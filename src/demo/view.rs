//! What `weir demo` shows: the live table (or one line per refresh off a terminal) and the summary.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Instant;

use super::{Seen, KEYS};

/// Per key: jobs offered (stored in `WEIR_JOBS`) and released so far.
pub(super) type Counts = Vec<(u64, u64)>;

/// The live display: redrawn in place on a terminal, one line per refresh otherwise.
pub(super) struct Screen {
    tty: bool,
    url: String,
    /// The last two refreshes' counts, for rates over about one second.
    history: VecDeque<(Instant, Counts)>,
}

impl Screen {
    pub(super) fn new(url: &str) -> Self {
        Screen {
            tty: std::io::stdout().is_terminal(),
            url: url.to_string(),
            history: VecDeque::new(),
        }
    }

    pub(super) fn refresh(&mut self, now: Instant, status: &str, counts: Counts) {
        // No rates before a previous refresh to measure from.
        let (t0, old) = self
            .history
            .front()
            .cloned()
            .unwrap_or((now, counts.clone()));
        let dt = (now - t0).as_secs_f64().max(1e-3);
        let mut out = String::new();
        if self.tty {
            // Cursor home, clear to the end of the screen.
            out.push_str("\x1b[H\x1b[J");
            let _ = writeln!(out, "weir demo on {}: {status} (Ctrl-C stops)\n", self.url);
            let _ = writeln!(
                out,
                "{:<9} {:>16} {:>10} {:>11} {:>9} {:>9}",
                "key", "limit", "offered/s", "released/s", "backlog", "released"
            );
        } else {
            out.push_str(status);
        }
        for (((k, rate, burst), &(o, r)), &(o0, r0)) in KEYS.iter().zip(&counts).zip(&old) {
            let (orate, rrate) = ((o - o0) as f64 / dt, (r - r0) as f64 / dt);
            let backlog = o.saturating_sub(r);
            let _ = if self.tty {
                let limit = format!("{rate}/s burst {burst}");
                writeln!(
                    out,
                    "{k:<9} {limit:>16} {orate:>10.1} {rrate:>11.1} {backlog:>9} {r:>9}"
                )
            } else {
                write!(out, " | {k} limit {rate}/s offered {orate:.0}/s released {rrate:.0}/s backlog {backlog} released {r}")
            };
        }
        if !self.tty {
            out.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        self.history.push_back((now, counts));
        if self.history.len() > 2 {
            self.history.pop_front();
        }
    }
}

/// The status line: flooding, draining (with a rough time to go) or drained.
pub(super) fn status(
    factor: f64,
    seconds: f64,
    elapsed: f64,
    since_flood: Option<f64>,
    counts: &Counts,
) -> String {
    let eta = (counts.iter().zip(KEYS))
        .map(|((o, r), (_, rate, _))| o.saturating_sub(*r) as f64 / f64::from(rate))
        .fold(0.0, f64::max);
    match since_flood {
        None => format!("flooding at {factor}x the limits: {elapsed:.1} s of {seconds:.0} s"),
        Some(ago) if eta == 0.0 => format!("flood over; drained {ago:.1} s after it"),
        Some(ago) => format!("flood over {ago:.1} s ago; draining, about {eta:.0} s to go"),
    }
}

/// The final table: per key, offered, released, the observed release rate against the limit.
pub(super) fn summary(offered: &[u64], seen: &[Seen], failed: u64) {
    println!(
        "\n{:<9} {:>7} {:>9} {:>9} {:>15} {:>9} {:>13}",
        "key", "limit", "offered", "released", "release rate", "of limit", "out of order"
    );
    for (((k, rate, burst), o), s) in KEYS.iter().zip(offered).zip(seen) {
        // After its initial burst a saturated key releases one job per period, so (n - burst)
        // jobs fall between its first and last release.
        let span = match (s.first, s.last) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let n = s.distinct().saturating_sub(u64::from(*burst));
        let observed = if span > 0.0 { n as f64 / span } else { 0.0 };
        println!(
            "{k:<9} {:>7} {o:>9} {:>9} {observed:>13.2}/s {:>8.1}% {:>13}",
            format!("{rate}/s"),
            s.distinct(),
            100.0 * observed / f64::from(*rate),
            s.out_of_order
        );
    }
    let left: u64 = (offered.iter().zip(seen))
        .map(|(o, s)| o.saturating_sub(s.distinct()))
        .sum();
    if left > 0 {
        println!("{left} jobs were still queued when the demo stopped");
    }
    if failed > 0 {
        println!("{failed} publishes of the flood failed");
    }
}
