//! Waiting between tries of something that failed: delays that double up to
//! a cap, and an optional deadline after which the caller gives up.
//!
//! One helper, so that every retry loop backs off the same way and none
//! hammers a server that is starting or gone.

use std::time::Duration;

use tokio::time::Instant;

/// The delays between tries: `first`, then doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The same delay every time: a poll at a steady pace.
    pub const fn fixed(every: Duration) -> Backoff {
        Backoff::new(every, every)
    }

    /// The delay before the next try; each call doubles the one after it,
    /// up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next.saturating_mul(2)).min(self.max.max(self.first));
        delay
    }

    /// The delay before the next try if that try would still start before
    /// `deadline`; `None` means give up now.
    pub fn next_before(&mut self, deadline: Instant) -> Option<Duration> {
        if Instant::now() + self.next < deadline {
            Some(self.next_delay())
        } else {
            None
        }
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Sleeps the next delay and returns true, or returns false at once if
    /// the next try would start past `deadline`.
    pub async fn wait_before(&mut self, deadline: Instant) -> bool {
        match self.next_before(deadline) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(50 * MS, 300 * MS);
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [50 * MS, 100 * MS, 200 * MS, 300 * MS, 300 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 50 * MS);
    }

    #[test]
    fn a_fixed_pace_never_grows() {
        let mut b = Backoff::fixed(100 * MS);
        assert!((0..4).all(|_| b.next_delay() == 100 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_the_next_try_would_start_past_the_deadline() {
        let mut b = Backoff::new(100 * MS, 400 * MS);
        let start = Instant::now();
        let deadline = start + 1000 * MS;
        let mut tries = 1;
        while b.wait_before(deadline).await {
            tries += 1;
        }
        // Tries at 0, 100, 300 and 700 ms; the next would be at 1100 ms.
        assert_eq!(tries, 4);
        assert_eq!(Instant::now() - start, 700 * MS);
    }
}
