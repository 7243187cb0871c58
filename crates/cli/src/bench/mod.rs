//! `eventplane bench`: measurements reproducible from one command.
//!
//! - [`transport`]: publisher → subscriber throughput, loss and latency.
//! - [`frontend`]: the frontend's routing overhead.
//! - [`index`]: replaying a KV workload through the prefix index.
//! - [`relay`]: engine KV events through the relay.
//! - [`host`]: how busy the (virtual) host was meanwhile.

pub mod frontend;
pub mod host;
pub mod index;
pub mod relay;
pub mod transport;

/// The middle value of `v` (the upper middle of an even count): what every
/// bench reports of repeated runs or rounds. `v` must not be empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The least confidence [`median_interval`] gives its interval.
pub(crate) const MEDIAN_CONFIDENCE: f64 = 0.95;

/// A distribution-free interval that holds the true median of what `v`
/// samples with probability at least [`MEDIAN_CONFIDENCE`]: the `k`-th
/// smallest and the `k`-th largest values of `v`, for the largest `k` such
/// that the median falls outside with probability `2 · P(B ≤ k − 1)`, `B`
/// binomial (n, ½), at most 1 − [`MEDIAN_CONFIDENCE`] (the sign test: every
/// value lies below the median with probability ½, whatever the
/// distribution). `None` when `v` has fewer than 6 values: no interval of
/// them reaches 95 %. (The binomial sum is a few lines for n ≤ 50, the
/// benches' most rounds; a statistics crate would bring more than it adds.)
///
/// It assumes the values independent. Rounds minutes apart on a shared host
/// are not quite, so read the interval as the least uncertainty there is.
pub(crate) fn median_interval(mut v: Vec<f64>) -> Option<(f64, f64)> {
    let n = v.len();
    // `term` is P(B = j), `at_most` P(B ≤ j).
    let mut term = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut at_most = 0.0;
    let mut k = 0;
    for j in 0..n / 2 {
        at_most += term;
        if 2.0 * at_most > 1.0 - MEDIAN_CONFIDENCE {
            break;
        }
        k = j + 1;
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[k - 1], v[n - k]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_widens_as_the_rounds_get_fewer() {
        let values = |n: usize| (1..=n).map(|i| i as f64).collect::<Vec<_>>();
        // Five values: even (min, max) covers the median with only
        // 1 − 2/32 = 93.75 %.
        assert_eq!(median_interval(values(5)), None);
        // Six to eight values: (min, max), at 96.9 – 99.2 %.
        assert_eq!(median_interval(values(6)), Some((1.0, 6.0)));
        assert_eq!(median_interval(values(8)), Some((1.0, 8.0)));
        // Nine: P(B ≤ 1) = 10/512, so the 2nd and the 8th (96.1 %).
        assert_eq!(median_interval(values(9)), Some((2.0, 8.0)));
        // Twenty: P(B ≤ 5) = 0.0207 but P(B ≤ 6) = 0.0577, so the 6th
        // and the 15th (95.9 %).
        assert_eq!(median_interval(values(20)), Some((6.0, 15.0)));
        // Order does not matter, and the median lies inside.
        let mut shuffled = values(20);
        shuffled.reverse();
        shuffled.swap(3, 11);
        assert_eq!(median_interval(shuffled), Some((6.0, 15.0)));
        assert!((6.0..=15.0).contains(&median(values(20))));
    }
}
