//! Order statistics of a set of samples (median, p90): the figures the harness reports.

/// The `q`-quantile (0 ≤ q ≤ 1) of `samples` by linear interpolation between the closest
/// ranks (the method numpy and criterion use by default). `None` for no samples.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    let fraction = rank - low as f64;
    Some(sorted[low] + (sorted[high] - sorted[low]) * fraction)
}

/// The median of `samples`.
pub fn median(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.5)
}

/// The 90th percentile of `samples`.
pub fn p90(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.9)
}

/// The median of integer samples (bytes), rounded to the nearest integer.
pub fn median_u64(samples: &[u64]) -> Option<u64> {
    let as_f64: Vec<f64> = samples.iter().map(|&s| s as f64).collect();
    median(&as_f64).map(|m| m.round() as u64)
}

/// Rounds to one decimal place, for microsecond figures that should not pretend to more.
pub fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// Rounds to `digits` significant digits (ratios: more would be noise). Zero, infinities and
/// NaN are returned as they are.
pub fn round_significant(value: f64, digits: i32) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    let scale = 10f64.powi(digits - 1 - value.abs().log10().floor() as i32);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_ranks() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        // 10 samples 1..=10: rank 0.9 × 9 = 8.1 → 9 + 0.1 × (10 − 9).
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert!((p90(&ten).unwrap() - 9.1).abs() < 1e-9);
        assert_eq!(median_u64(&[10, 11]), Some(11));
        assert_eq!(round1(1.26), 1.3);
        assert_eq!(round_significant(1.0 / 3.0, 4), 0.3333);
        assert_eq!(round_significant(12_345.0, 2), 12_000.0);
        assert_eq!(round_significant(0.0, 4), 0.0);
    }
}
