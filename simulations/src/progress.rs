//! Progress of a scenario run: a progress bar on a terminal, and plain time-stamped lines
//! when stderr is a file or a pipe (a bar there would print nothing for the whole run).

use std::io::IsTerminal;
use std::time::Instant;

/// Rounds done out of those planned, and what the run is doing now.
#[derive(Debug)]
pub struct Progress {
    bar: indicatif::ProgressBar,
    /// Plain lines instead of a bar.
    plain: bool,
    started: Instant,
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
        Self { bar, plain, started: Instant::now() }
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
        self.message(format!("{} (round {done}/{total} of the run)", message.into()));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if self.plain {
            self.message("done");
        }
    }
}
