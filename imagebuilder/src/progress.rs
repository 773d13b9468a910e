//! Progress reporting: indicatif bars on stderr when it is a terminal (and the user did not
//! ask for quiet), hidden bars otherwise, so library code reports progress unconditionally.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Reports nothing.
    pub fn hidden() -> Self {
        Self { multi: None }
    }

    /// Bars on stderr if it is a terminal and `quiet` is false.
    pub fn stderr(quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self::hidden();
        }
        Self {
            multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A byte-counting bar for one transfer (hidden when reporting nothing).
    pub fn bytes(&self, label: &str, total: Option<u64>) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::no_length().with_style(
                ProgressStyle::with_template("{prefix:>14} {spinner} {bytes:>10} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        multi.add(bar.with_prefix(label.to_string()))
    }

    /// A line above the bars (nothing when hidden).
    pub fn message(&self, text: &str) {
        if let Some(multi) = &self.multi {
            let _ = multi.println(text);
        }
    }

    /// Whether anything is shown.
    pub fn is_visible(&self) -> bool {
        self.multi.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_and_hidden_draw_nothing() {
        assert!(!Progress::stderr(true).is_visible());
        let p = Progress::hidden();
        assert!(p.bytes("x", Some(10)).is_hidden());
        assert!(p.bytes("x", None).is_hidden());
        p.message("not shown");
    }
}
