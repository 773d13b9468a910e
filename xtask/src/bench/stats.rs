//! Summary statistics of benchmark samples: min, median and max over N runs (the issue's
//! reporting unit), rounded for humans but computed on the raw values.

use serde::Serialize;

/// Min, median and max of a set of samples, and how many there were.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    /// Smallest sample.
    pub min: f64,
    /// Middle sample (mean of the two middle ones for an even count).
    pub median: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stats {
    /// Summarises `samples`; `None` when there are none (or any is not a number).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Self {
            min: round(sorted[0]),
            median: round(median),
            max: round(sorted[sorted.len() - 1]),
            n: sorted.len(),
        })
    }
}

/// Rounds to three decimals: microseconds for milliseconds, far below lab noise.
pub fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `a / b` rounded, `None` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| round(a / b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_counts_take_the_middle_sample() {
        let stats = Stats::of(&[30.0, 10.0, 20.0]).expect("samples");
        assert_eq!(
            (stats.min, stats.median, stats.max, stats.n),
            (10.0, 20.0, 30.0, 3)
        );
    }

    #[test]
    fn even_counts_average_the_two_middle_samples() {
        let stats = Stats::of(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!((stats.min, stats.median, stats.max), (1.0, 2.5, 4.0));
        assert_eq!(Stats::of(&[7.0]).map(|s| s.median), Some(7.0));
    }

    #[test]
    fn nothing_to_summarise_is_none() {
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn values_and_ratios_round_to_three_decimals() {
        let stats = Stats::of(&[1.00049, 2.0004]).expect("samples");
        assert_eq!((stats.min, stats.median, stats.max), (1.0, 1.5, 2.0));
        assert_eq!(ratio(1.0, 3.0), Some(0.333));
        assert_eq!(ratio(1.0, 0.0), None);
    }
}
