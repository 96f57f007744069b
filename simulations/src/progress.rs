//! Progress of a scenario run: a progress bar on a terminal, and plain time-stamped lines
//! when stderr is a file or a pipe (a bar there would print nothing for the whole run).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Rounds done out of those planned, and what the run is doing now.
#[derive(Debug)]
pub struct Progress {
    bar: indicatif::ProgressBar,
    /// Plain lines instead of a bar.
    plain: bool,
    started: Instant,
    /// When the run's first federated round ended: the rounds' pace is measured from it.
    first_round: OnceLock<Instant>,
}

impl Progress {
    /// Progress over `rounds` federated rounds in all.
    pub fn new(rounds: u64) -> Self {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(rounds) };
        bar.set_length(rounds);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} rounds  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self { bar, plain, started: Instant::now(), first_round: OnceLock::new() }
    }

    /// Says what the run is doing now.
    pub fn message(&self, message: impl Into<String>) {
        let message = message.into();
        if self.plain {
            let s = self.started.elapsed().as_secs();
            eprintln!("[{:02}:{:02}:{:02}] {message}", s / 3600, s / 60 % 60, s % 60);
        }
        self.bar.set_message(message);
    }

    /// One more federated round done, with what it showed.
    pub fn round_done(&self, message: impl Into<String>) {
        self.bar.inc(1);
        let done = self.bar.position();
        let total = self.bar.length().unwrap_or(done);
        let now = Instant::now();
        let first = *self.first_round.get_or_init(|| now);
        let left = match rounds_left(now - first, done, total) {
            Some(left) => format!(", about {} of rounds left", minutes(left)),
            None => String::new(),
        };
        self.message(format!("{} (round {done}/{total} of the run{left})", message.into()));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if self.plain {
            self.message("done");
        }
    }
}

/// The time the run's remaining rounds will take at the pace of those since the first
/// ended (`since_first`, over `done − 1` rounds, the arms' setup and evaluation between them
/// included): `None` before there is a pace, or when nothing is left.
fn rounds_left(since_first: Duration, done: u64, total: u64) -> Option<Duration> {
    (done >= 2 && total > done).then(|| since_first.mul_f64((total - done) as f64 / (done - 1) as f64))
}

/// `d` rounded for a progress line: "40 s" under two minutes, else whole minutes.
fn minutes(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 120.0 {
        format!("{} s", (s / 10.0).round() as u64 * 10)
    } else {
        format!("{} min", (s / 60.0).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rounds_left_follow_the_pace_since_the_first_round() {
        let s = Duration::from_secs;
        assert_eq!(rounds_left(s(0), 1, 40), None, "no pace after one round");
        assert_eq!(rounds_left(s(30), 4, 40), Some(s(360)), "10 s a round, 36 left");
        assert_eq!(rounds_left(s(90), 40, 40), None, "nothing left");
        assert_eq!(minutes(s(360)), "6 min");
        assert_eq!(minutes(s(44)), "40 s");
        assert_eq!(minutes(s(150)), "3 min");
    }
}
