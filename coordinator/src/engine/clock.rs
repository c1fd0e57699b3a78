//! Time and chance, as inputs to the engine.
//!
//! The engine never reads a clock or makes its own randomness: the runtime
//! hands it a [`Now`] with every input and a seed at start. A unit test
//! makes its own `Now` and moves it forward, so an hour of queue policy
//! runs in microseconds, and the same inputs always decide the same.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

/// The moment an input is handled: a monotonic instant for the engine's
/// timers, and the wall time it writes into records and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: OffsetDateTime,
}

impl Now {
    /// The same clock, `d` later.
    pub fn after(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }
}

/// SplitMix64: small, fast and good enough to spread choices (ports, ids);
/// nothing here needs to be unguessable.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; `n` must not be 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_numbers_and_others_differ() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::new(7);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut other = Rng::new(8);
        assert_ne!(a[0], other.next_u64());
        assert!((0..1000).all(|_| r.below(11) < 11));
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.unit())));
    }
}
