//! A small log-linear histogram of durations: constant memory, about 6%
//! relative error, cheap enough to record on every placement.

use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: u32 = 16;
const BUCKETS: usize = 64 * SUB as usize;

#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max_ns: u64,
    sum_ns: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max_ns: 0,
            sum_ns: 0,
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let shift = exp - SUB.trailing_zeros();
    let mantissa = (ns >> shift) as u32 - SUB;
    ((exp - SUB.trailing_zeros() + 1) * SUB + mantissa) as usize
}

/// The smallest value that falls in bucket `b` (its lower bound).
fn lower_bound(b: usize) -> u64 {
    let b = b as u32;
    if b < SUB {
        return b as u64;
    }
    let shift = b / SUB - 1;
    let mantissa = (b % SUB + SUB) as u64;
    mantissa << shift
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.counts[bucket(ns).min(BUCKETS - 1)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
        self.sum_ns += ns as u128;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), or zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The bucket's midpoint, capped by what was really seen.
                let lo = lower_bound(b);
                let hi = lower_bound(b + 1);
                return Duration::from_nanos(((lo + hi) / 2).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    pub fn mean(&self) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.sum_ns / self.total as u128) as u64)
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
        self.sum_ns += other.sum_ns;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, want) in [(0.5, 500.0), (0.99, 990.0), (0.01, 10.0)] {
            let got = h.quantile(q).as_secs_f64() * 1e6;
            assert!((got - want).abs() / want < 0.07, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), Duration::from_micros(1000));
        assert_eq!(Histogram::default().quantile(0.5), Duration::ZERO);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for ns in (0..1_000_000u64).step_by(7) {
            let b = bucket(ns);
            assert!(b >= last);
            assert!(lower_bound(b) <= ns && ns < lower_bound(b + 1), "{ns}");
            last = b;
        }
    }
}
