//! `histogram_quantile` as Prometheus computes it over classic (`le`) buckets, so that
//! `weft stat --from-proxies` and `weft stat --prometheus` report the same latencies for the
//! same counts.

/// The `q`-quantile of cumulative buckets `(upper bound, count)` in any order. Mirrors
/// Prometheus' `bucketQuantile`: NaN without a `+Inf` bucket, with fewer than two buckets or
/// no observations; buckets of equal bound merge; counts are forced non-decreasing; the rank
/// `q × total` is found in the first bucket whose count reaches it and interpolated linearly
/// between that bucket's bounds (the first bucket starts at 0); a rank in the `+Inf` bucket
/// answers the highest finite bound.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let mut sorted = buckets.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    if sorted.last().is_none_or(|(le, _)| *le != f64::INFINITY) {
        return f64::NAN;
    }
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(sorted.len());
    for (le, count) in sorted {
        match merged.last_mut() {
            Some(last) if last.0 == le => last.1 += count,
            _ => merged.push((le, count)),
        }
    }
    let mut max = f64::NEG_INFINITY;
    for bucket in &mut merged {
        max = max.max(bucket.1);
        bucket.1 = max;
    }
    if merged.len() < 2 {
        return f64::NAN;
    }
    let observations = merged[merged.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let finite = merged.len() - 1;
    let b = merged[..finite]
        .iter()
        .position(|(_, count)| *count >= rank)
        .unwrap_or(finite);
    if b == finite {
        return merged[finite - 1].0;
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return merged[0].0;
    }
    let (mut start, end, mut count) = (0.0, merged[b].0, merged[b].1);
    if b > 0 {
        start = merged[b - 1].0;
        count -= merged[b - 1].1;
        rank -= merged[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn interpolates_within_the_bucket_holding_the_rank() {
        // 100 observations: 10 ≤ 0.1, 60 in (0.1, 0.2], 25 in (0.2, 0.4], 5 above.
        let b = [(0.1, 10.0), (0.2, 70.0), (0.4, 95.0), (INF, 100.0)];
        // p50: rank 50, bucket (0.1, 0.2] holds ranks 10..70: 0.1 + 0.1 × 40/60.
        assert!(close(histogram_quantile(0.5, &b), 0.1 + 0.1 * 40.0 / 60.0));
        // p90: rank 90 in (0.2, 0.4] (70..95): 0.2 + 0.2 × 20/25 = 0.36.
        assert!(close(histogram_quantile(0.9, &b), 0.36));
        // p05: rank 5 in the first bucket, which starts at 0: 0.1 × 5/10.
        assert!(close(histogram_quantile(0.05, &b), 0.05));
        // p99: rank 99 is in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.99, &b), 0.4);
        // Exactly on a bucket's count: that bucket's upper bound.
        assert!(close(histogram_quantile(0.7, &b), 0.2));
    }

    #[test]
    fn the_ground_truth_mix_lands_in_its_bucket() {
        // 600 requests: 594 in (0.064, 0.128], 6 in (0.128, 0.256] (proxy buckets 1 ms × 2^k).
        let mut b: Vec<(f64, f64)> = (0..15).map(|k| (0.001 * 2f64.powi(k), 0.0)).collect();
        for (le, count) in &mut b {
            if *le > 0.1 {
                *count = if *le > 0.2 { 600.0 } else { 594.0 };
            }
        }
        b.push((INF, 600.0));
        let p99 = histogram_quantile(0.99, &b);
        // rank 594 = the 0.128 bucket's count: its upper bound.
        assert!(close(p99, 0.128), "{p99}");
        let p50 = histogram_quantile(0.5, &b);
        assert!(close(p50, 0.064 + 0.064 * 300.0 / 594.0), "{p50}");
    }

    #[test]
    fn degenerate_inputs_follow_prometheus() {
        assert!(histogram_quantile(0.5, &[]).is_nan());
        assert!(histogram_quantile(0.5, &[(INF, 3.0)]).is_nan());
        assert!(histogram_quantile(0.5, &[(0.1, 1.0), (0.2, 2.0)]).is_nan());
        assert!(histogram_quantile(0.5, &[(0.1, 0.0), (INF, 0.0)]).is_nan());
        assert!(histogram_quantile(f64::NAN, &[(0.1, 1.0), (INF, 1.0)]).is_nan());
        assert_eq!(
            histogram_quantile(-0.1, &[(0.1, 1.0), (INF, 1.0)]),
            f64::NEG_INFINITY
        );
        assert_eq!(histogram_quantile(1.1, &[(0.1, 1.0), (INF, 1.0)]), INF);
        // Order does not matter; a non-monotonic count is raised to its predecessor's.
        let shuffled = [(INF, 10.0), (0.2, 4.0), (0.1, 6.0)];
        // Counts become 6, 6, 10: rank 5 in the first bucket → 0.1 × 5/6.
        assert!(close(histogram_quantile(0.5, &shuffled), 0.1 * 5.0 / 6.0));
        // Equal bounds (two series summed without `sum by (le)`) are merged.
        let dup = [(0.1, 2.0), (0.1, 2.0), (INF, 4.0), (INF, 4.0)];
        assert!(close(histogram_quantile(0.5, &dup), 0.1 * 4.0 / 4.0));
        // A non-positive first bound answers itself.
        assert_eq!(histogram_quantile(0.1, &[(0.0, 5.0), (INF, 10.0)]), 0.0);
    }
}
