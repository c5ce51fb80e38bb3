//! Progress of long operations (`-p` on convert, commit and rebase): one helper for every
//! command. When standard error is a terminal, an indicatif bar there with rate and ETA;
//! otherwise qemu-img's own lines on the command's output, exactly as qemu-img prints them
//! (`    (12.00/100%)` each ended by a carriage return, a newline at the end), so scripts that
//! read qemu-img's progress read ours.

use std::io::{IsTerminal, Write};

/// qemu-img prints a new line only after the percentage moved by more than this, and at 0 and
/// 100 (its `min_skip`).
const MIN_SKIP: f64 = 1.0;

/// A progress display; [`Progress::update`] as work proceeds, [`Progress::finish`] at the end.
pub struct Progress<'a> {
    mode: Mode<'a>,
}

enum Mode<'a> {
    Off,
    Bar(indicatif::ProgressBar),
    Lines {
        out: &'a mut dyn Write,
        /// The value last printed.
        last: f64,
        /// The value reached (qemu's `current`, single precision as qemu keeps it).
        current: f32,
        /// The move that prints a new line (qemu's `min_skip`).
        min_skip: f32,
    },
}

impl<'a> Progress<'a> {
    /// Shows nothing unless `enabled`; a bar if standard error is a terminal, else qemu-img's
    /// lines on `out`.
    pub fn new(enabled: bool, out: &'a mut dyn Write) -> Self {
        let mut progress = Self::unstarted(enabled, out);
        progress.print(0.0);
        progress
    }

    /// As [`Progress::new`], but the lines start with the first value shown (qemu-img commit
    /// prints its first line only once the image is open).
    pub fn unstarted(enabled: bool, out: &'a mut dyn Write) -> Self {
        if !enabled {
            Self { mode: Mode::Off }
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{wide_bar} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Self {
                mode: Mode::Bar(bar),
            }
        } else {
            Self::lines_unstarted(out)
        }
    }

    /// qemu-img's lines on `out`, whatever the terminal (what [`Progress::new`] picks when
    /// standard error is not a terminal). Prints the first line, 0.00%, at once, as qemu-img.
    pub fn lines(out: &'a mut dyn Write) -> Self {
        let mut progress = Self::lines_unstarted(out);
        progress.print(0.0);
        progress
    }

    fn lines_unstarted(out: &'a mut dyn Write) -> Self {
        Self {
            mode: Mode::Lines {
                out,
                last: 0.0,
                current: 0.0,
                min_skip: MIN_SKIP as f32,
            },
        }
    }

    /// Reports `done` of `total` units (bytes).
    pub fn update(&mut self, done: u64, total: u64) {
        let percent = if total == 0 {
            100.0
        } else {
            (done.min(total) as f64 * 100.0 / total as f64).min(100.0)
        };
        match &mut self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done.min(total));
            }
            Mode::Lines { last, .. } => {
                if percent > *last + MIN_SKIP || percent < *last - MIN_SKIP || percent >= 100.0 {
                    *last = percent;
                    self.print(percent);
                }
            }
        }
    }

    /// The move since the last line that prints a new one, as qemu-img's `qemu_progress_init`
    /// sets it per command (1 by default; `rebase` uses 2).
    pub fn set_min_skip(&mut self, skip: f32) {
        if let Mode::Lines { min_skip, .. } = &mut self.mode {
            *min_skip = skip;
        }
    }

    /// Shows `percent` as qemu-img's `qemu_progress_print(percent, 0)` does, for commands whose
    /// library reports qemu's own progress values (amend, commit): a line when it moved by more
    /// than the minimum skip since the last line, or is exactly 0 or 100 (again, if it already
    /// was), compared in single precision as qemu compares them; a bar moves to it.
    pub fn set_percent(&mut self, percent: f32) {
        self.show_qemu_value(percent.min(100.0));
    }

    /// Adds `delta` percent to the value reached, as qemu-img's `qemu_progress_print(delta,
    /// 100)` does for commands that count their steps (rebase): in single precision, at most
    /// 100, then shown as [`Progress::set_percent`] shows a value.
    pub fn advance_percent(&mut self, delta: f32) {
        let current = match &self.mode {
            Mode::Lines { current, .. } => *current,
            Mode::Bar(bar) => bar.position() as f32 / 100.0,
            Mode::Off => return,
        };
        self.show_qemu_value((current + delta / 100.0 * 100.0).min(100.0));
    }

    fn show_qemu_value(&mut self, percent: f32) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => {
                bar.set_length(10_000);
                bar.set_position((percent * 100.0) as u64);
            }
            Mode::Lines {
                last,
                current,
                min_skip,
                ..
            } => {
                *current = percent;
                let last_print = *last as f32;
                if percent > last_print + *min_skip
                    || percent < last_print - *min_skip
                    || percent == 100.0
                    || percent == 0.0
                {
                    *last = f64::from(percent);
                    self.print(f64::from(percent));
                }
            }
        }
    }

    /// Ends the display where a command failed: the newline qemu-img prints after its last
    /// line whatever the outcome (lines), the bar left where it stopped.
    pub fn abandon(mut self) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.abandon(),
            Mode::Lines { out, .. } => {
                let _ = writeln!(out).and_then(|()| out.flush());
            }
        }
    }

    /// Ends the display: 100% and a newline (lines), or a finished bar. Nothing was shown for a
    /// disabled progress, so nothing is printed.
    pub fn finish(mut self) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.finish(),
            Mode::Lines { last, .. } => {
                if *last < 100.0 {
                    *last = 100.0;
                    self.print(100.0);
                }
                if let Mode::Lines { out, .. } = &mut self.mode {
                    // Best effort: a closed output is reported by the command's own writes.
                    let _ = writeln!(out).and_then(|()| out.flush());
                }
            }
        }
    }

    fn print(&mut self, percent: f64) {
        if let Mode::Lines { out, .. } = &mut self.mode {
            let _ = write!(out, "    ({percent:.2}/100%)\r").and_then(|()| out.flush());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn lines_read_as_qemu_img_prints_them() {
        let mut out = Vec::new();
        let mut progress = Progress::lines(&mut out);
        for done in [0, 5, 10, 100, 150, 1000] {
            progress.update(done, 1000);
        }
        progress.finish();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "    (0.00/100%)\r    (10.00/100%)\r    (15.00/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn qemu_values_print_as_qemu_img_prints_them() {
        let mut out = Vec::new();
        let mut progress = Progress::lines(&mut out);
        for percent in [0.0, 0.5, 1.5, 2.0, 100.0, 100.0] {
            progress.set_percent(percent);
        }
        progress.finish();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (0.00/100%)\r    (1.50/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn steps_add_up_and_skip_as_qemu_img_rebase_does() {
        let mut out = Vec::new();
        let mut progress = Progress::lines(&mut out);
        progress.set_min_skip(2.0);
        for _ in 0..4 {
            progress.advance_percent(100.0 / 64.0);
        }
        progress.set_percent(100.0);
        progress.finish();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (3.12/100%)\r    (6.25/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn an_abandoned_progress_ends_its_line_and_an_unstarted_one_waits() {
        let mut out = Vec::new();
        Progress::lines(&mut out).abandon();
        assert_eq!(String::from_utf8(out).unwrap(), "    (0.00/100%)\r\n");
        let mut out = Vec::new();
        let mut progress = Progress::lines_unstarted(&mut out);
        progress.set_percent(0.0);
        progress.set_percent(0.0);
        progress.set_percent(50.0);
        progress.set_percent(100.0);
        progress.set_percent(100.0);
        progress.finish();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    (0.00/100%)\r    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
        );
    }

    #[test]
    fn disabled_progress_prints_nothing() {
        let mut out = Vec::new();
        let mut progress = Progress::new(false, &mut out);
        progress.update(1, 2);
        progress.finish();
        assert!(out.is_empty());
    }
}
