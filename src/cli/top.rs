//! `weir top`: the busiest keys, live.
//!
//! Each refresh asks the admin API for the busiest keys. Offered/s and released/s come from
//! the difference between two polls of each key's `offered` and `released` counters, so they
//! show `-` for a key's first appearance and when its counters restarted (a key's counters
//! count from the start of its current backlog).
//!
//! On a terminal the view takes the alternate screen in raw mode, so `q` quits without Enter,
//! through crossterm: it restores the terminal on every way out (q, Ctrl-C, SIGTERM, an error,
//! a panic) through one guard, which plain ANSI codes cannot do for raw mode. Off a terminal it
//! prints one frame per refresh, like `weir demo`. `--once` prints a single frame, measured
//! over one interval, and exits.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};

use super::api::{next_release, Top, TopKey};
use super::http::{error_message, AdminClient};
use super::table::Table;
use super::CliError;

/// `weir top` flags.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The admin API of a running `weir run`.
    #[arg(long, env = "WEIR_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
    /// For an `https://` admin URL: the CA that signed the admin API's certificate (default:
    /// the system's roots).
    #[arg(long, env = "WEIR_ADMIN_CA_FILE")]
    pub admin_ca_file: Option<std::path::PathBuf>,
    /// How many keys to show.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Milliseconds between refreshes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Print one frame (two polls one interval apart, so the rates are measured) and exit.
    #[arg(long)]
    pub once: bool,
}

/// Each key's `(offered, released)` counters at one poll.
pub struct Sample {
    at: Instant,
    counts: HashMap<String, (u64, u64)>,
}

impl Sample {
    fn of(keys: &[TopKey]) -> Sample {
        Sample {
            at: Instant::now(),
            counts: keys
                .iter()
                .map(|k| (k.key.clone(), (k.offered, k.released)))
                .collect(),
        }
    }
}

/// `weir top`.
pub async fn main(a: TopArgs) -> Result<(), CliError> {
    let client = AdminClient::with_ca(&a.admin_url, a.admin_ca_file.as_deref())?;
    let interval = Duration::from_millis(a.interval_ms);
    let path = format!("/v1/keys?sort=backlog&limit={}", a.limit);
    if a.once {
        // Sampled at the poll, not after the sleep: the rates divide by the time between polls.
        let first = Sample::of(&poll(&client, &path).await?);
        tokio::time::sleep(interval).await;
        let keys = poll(&client, &path).await?;
        let f = frame(client.url(), interval, &keys, Some(&first), false);
        print!("{}", f.join("\n") + "\n");
        return Ok(());
    }
    live(&client, &path, interval).await
}

async fn poll(client: &AdminClient, path: &str) -> Result<Vec<TopKey>, CliError> {
    let answer = client.get(path).await?;
    match answer.status {
        200 => Ok(client.json::<Top>(path, &answer)?.keys),
        400..=499 => Err(CliError::Usage(error_message(&answer))),
        _ => Err(CliError::Unavailable(error_message(&answer))),
    }
}

/// One frame's lines: a title, then the table.
pub fn frame(
    url: &str,
    interval: Duration,
    keys: &[TopKey],
    prev: Option<&Sample>,
    live: bool,
) -> Vec<String> {
    let dt = prev.map(|p| p.at.elapsed().as_secs_f64().max(1e-3));
    let rate = |now: u64, before: Option<u64>| match (before, dt) {
        (Some(b), Some(dt)) if now >= b => format!("{:.1}", (now - b) as f64 / dt),
        _ => "-".to_string(),
    };
    let mut t = Table::new(
        &[
            "KEY",
            "LIMIT",
            "FROM",
            "OFFERED/S",
            "RELEASED/S",
            "BACKLOG",
            "HELD",
            "PARKED",
            "NEXT RELEASE",
        ],
        &[3, 4, 5, 6, 7],
    );
    for k in keys {
        let before = prev.and_then(|p| p.counts.get(&k.key));
        t.row(vec![
            k.key.clone(),
            k.limit.short(),
            k.limit.source.clone(),
            rate(k.offered, before.map(|b| b.0)),
            rate(k.released, before.map(|b| b.1)),
            k.backlog.to_string(),
            k.held.to_string(),
            k.parked.to_string(),
            next_release(k.next_release_in_ms, k.paused, k.backlog),
        ]);
    }
    let mut out = vec![
        format!(
            "weir top: {url}, {} busiest keys, every {:.1} s{}",
            keys.len(),
            interval.as_secs_f64(),
            if live { " (q or Ctrl-C quits)" } else { "" }
        ),
        String::new(),
    ];
    if keys.is_empty() {
        out.push("no key holds a backlog".into());
    } else {
        out.extend(t.lines());
    }
    out
}

/// Refreshes until q, Ctrl-C or SIGTERM; a failed poll shows its error and the view goes on.
async fn live(client: &AdminClient, path: &str, interval: Duration) -> Result<(), CliError> {
    let tty = std::io::stdout().is_terminal();
    let (quit_tx, mut quit) = tokio::sync::mpsc::channel::<()>(1);
    let screen =
        if tty {
            Some(Screen::enter(quit_tx).map_err(|e| {
                CliError::Unavailable(format!("cannot take over the terminal: {e}"))
            })?)
        } else {
            None
        };
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev: Option<Sample> = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = quit.recv() => break,
            _ = tick.tick() => {
                let lines = match poll(client, path).await {
                    Ok(keys) => {
                        let f = frame(client.url(), interval, &keys, prev.as_ref(), tty);
                        prev = Some(Sample::of(&keys));
                        f
                    }
                    Err(e) => vec![
                        format!("weir top: {}", client.url()),
                        String::new(),
                        format!("cannot read the busiest keys: {e}"),
                    ],
                };
                draw(&lines, tty);
            }
        }
    }
    drop(screen);
    Ok(())
}

/// SIGINT (off a raw terminal) or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn draw(lines: &[String], tty: bool) {
    let mut out = std::io::stdout().lock();
    if tty {
        // Raw mode: a line end is "\r\n", and what does not fit is cut rather than wrapped.
        let (cols, rows) = terminal::size().unwrap_or((120, 40));
        let _ = queue!(
            out,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        );
        for l in lines.iter().take(rows as usize) {
            let cut: String = l.chars().take(cols as usize).collect();
            let _ = write!(out, "{cut}\r\n");
        }
    } else {
        let _ = writeln!(out, "{}\n", lines.join("\n"));
    }
    let _ = out.flush();
}

/// The terminal in raw mode on the alternate screen, and a thread reading keys; dropping it
/// restores the terminal.
struct Screen {
    stop: Arc<AtomicBool>,
}

impl Screen {
    fn enter(quit: tokio::sync::mpsc::Sender<()>) -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen {
            stop: Arc::new(AtomicBool::new(false)),
        };
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        let stop = screen.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let Ok(ready) = event::poll(Duration::from_millis(200)) else {
                    return;
                };
                if !ready {
                    continue;
                }
                if let Ok(Event::Key(k)) = event::read() {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    let quits = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c;
                    if k.kind == KeyEventKind::Press && quits {
                        let _ = quit.try_send(());
                        return;
                    }
                }
            }
        });
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::api::Limit;

    fn key(name: &str, offered: u64, released: u64) -> TopKey {
        TopKey {
            key: name.into(),
            held: 3,
            parked: 7,
            backlog: 10,
            next_release_in_ms: Some(25),
            paused: false,
            offered,
            released,
            limit: Limit {
                rate: "40/s".into(),
                burst: 10,
                source: "key".into(),
            },
        }
    }

    #[test]
    fn rates_come_from_successive_polls() {
        let mut prev = Sample::of(&[key("acme", 100, 40), key("gone", 5, 5)]);
        prev.at = Instant::now() - Duration::from_secs(2);
        let keys = [key("acme", 300, 120), key("new", 9, 1)];
        let f = frame(
            "http://x",
            Duration::from_secs(1),
            &keys,
            Some(&prev),
            false,
        );
        let acme = f.iter().find(|l| l.starts_with("acme")).expect("acme row");
        let cells: Vec<&str> = acme.split_whitespace().collect();
        // KEY, LIMIT (3 words), FROM, OFFERED/S, RELEASED/S, ...
        let (offered, released): (f64, f64) =
            (cells[5].parse().unwrap(), cells[6].parse().unwrap());
        assert!((99.0..=100.1).contains(&offered), "{acme}");
        assert!((39.5..=40.1).contains(&released), "{acme}");
        let new = f.iter().find(|l| l.starts_with("new")).expect("new row");
        assert_eq!(new.split_whitespace().nth(5), Some("-"), "{new}");
        assert!(f[0].contains("2 busiest keys"), "{}", f[0]);
    }
}
