//! A progress bar over a run's wall-clock time, cheap enough for hot loops.
//!
//! The measuring loops call [`Ticker::tick`] with a timestamp they already
//! took; it is one comparison except every 100 ms, when the bar is redrawn.
//! The bar lives on stderr and is absent when it was not asked for.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// Advances a progress bar measured in milliseconds of the run.
pub struct Ticker {
    bar: Option<ProgressBar>,
    start: Instant,
    next: Instant,
}

impl Ticker {
    /// A ticker that draws nothing.
    pub fn hidden() -> Self {
        let now = Instant::now();
        Ticker {
            bar: None,
            start: now,
            next: now + Duration::from_secs(365 * 24 * 3600),
        }
    }

    /// A bar on stderr labelled `label`, spanning `total` from now.
    pub fn new(label: &str, total: Duration) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total.as_millis().max(1) as u64),
            ProgressDrawTarget::stderr(),
        );
        let style = ProgressStyle::with_template("{prefix:>14} [{bar:40}] {percent:>3}%")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        let now = Instant::now();
        Ticker {
            bar: Some(bar),
            start: now,
            next: now,
        }
    }

    /// Note that the run has reached `now`.
    #[inline]
    pub fn tick(&mut self, now: Instant) {
        if now >= self.next {
            self.redraw(now);
        }
    }

    #[cold]
    fn redraw(&mut self, now: Instant) {
        if let Some(bar) = &self.bar {
            bar.set_position(now.duration_since(self.start).as_millis() as u64);
        }
        self.next = now + REDRAW_EVERY;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
