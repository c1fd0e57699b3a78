//! JetStream outages, as the engine's feeds saw them.
//!
//! When a stream loses its leader (a server node died) nothing can be
//! written to it for seconds: workers cannot renew leases or heartbeat, and
//! results cannot be stored. Timers that would declare work lost must not
//! count that time against the workers. So while any feed's consumer is
//! down, and for a grace after the last one is back (as long as the outage
//! lasted, from 2 s up to `lease_ttl`), the engine is not "calm": an advert
//! that expires then is not taken for a dead worker, and the wait for the
//! result of a released lease starts again once results flow.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::Feed;

/// The least grace after an outage: what the servers need to expire the
/// keys the outage made stale, and the feeds to deliver the markers.
const MIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Health {
    down: HashSet<FeedKey>,
    /// When the first feed of the current outage went down.
    since: Option<Instant>,
    /// Not calm before this.
    calm_at: Option<Instant>,
    /// The grace's upper bound (`lease_ttl`).
    max_grace: Duration,
    /// Whether the results follower, at its last delivery, had more stored
    /// after it: it lags behind the stream.
    results_behind: bool,
}

/// `Feed` as a set member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FeedKey(u8);

impl From<Feed> for FeedKey {
    fn from(f: Feed) -> FeedKey {
        FeedKey(match f {
            Feed::Workers => 0,
            Feed::Leases => 1,
            Feed::Events => 2,
        })
    }
}

impl Health {
    pub fn new(max_grace: Duration) -> Health {
        Health {
            max_grace: max_grace.max(MIN_GRACE),
            ..Health::default()
        }
    }

    pub fn down(&mut self, feed: Feed, now: Instant) {
        if self.down.insert(feed.into()) && self.since.is_none() {
            self.since = Some(now);
            tracing::warn!(
                ?feed,
                "a JetStream feed is down; nothing is declared lost until it is back"
            );
        }
    }

    pub fn up(&mut self, feed: Feed, now: Instant) {
        if !self.down.remove(&feed.into()) || !self.down.is_empty() {
            return;
        }
        let lasted = self.since.take().map_or(Duration::ZERO, |s| now - s);
        let grace = lasted.clamp(MIN_GRACE, self.max_grace.max(MIN_GRACE));
        self.calm_at = Some(now + grace);
        tracing::info!(outage = ?lasted, ?grace, "JetStream feeds are back");
    }

    /// Whether nothing is down and the last outage is far enough behind.
    pub fn calm(&self, now: Instant) -> bool {
        self.down.is_empty() && self.calm_at.is_none_or(|t| now >= t)
    }

    /// Whether the results feed is down (results cannot arrive).
    pub fn results_down(&self) -> bool {
        self.down.contains(&Feed::Events.into())
    }

    /// What the results follower said of its lag at its last delivery.
    pub fn set_results_behind(&mut self, behind: bool) {
        self.results_behind = behind;
    }

    /// Whether a result stored by now may still be on its way to the
    /// engine: its feed is down, or its follower lags behind the stream. A
    /// worker stores its result before it releases the lease, so the
    /// result of a released lease is overdue only while neither holds.
    pub fn results_unsettled(&self) -> bool {
        self.results_down() || self.results_behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn not_calm_while_a_feed_is_down_nor_for_as_long_as_the_outage_after() {
        let t0 = Instant::now();
        let mut h = Health::new(30 * S);
        assert!(h.calm(t0));
        h.down(Feed::Leases, t0);
        h.down(Feed::Events, t0 + S);
        assert!(!h.calm(t0 + 2 * S));
        assert!(h.results_down());
        h.up(Feed::Leases, t0 + 5 * S);
        assert!(!h.calm(t0 + 6 * S), "the events feed is still down");
        h.up(Feed::Events, t0 + 7 * S);
        assert!(!h.results_down());
        // The outage lasted 7 s: so does the grace.
        assert!(!h.calm(t0 + 13 * S));
        assert!(h.calm(t0 + 14 * S));
    }

    #[test]
    fn the_grace_is_at_least_two_seconds_and_at_most_its_bound() {
        let t0 = Instant::now();
        let mut h = Health::new(3 * S);
        h.down(Feed::Workers, t0);
        h.up(Feed::Workers, t0 + S / 10);
        assert!(!h.calm(t0 + S));
        assert!(h.calm(t0 + 3 * S));
        h.down(Feed::Workers, t0 + 10 * S);
        h.up(Feed::Workers, t0 + 70 * S);
        assert!(h.calm(t0 + 73 * S));
    }

    #[test]
    fn an_up_without_a_down_changes_nothing() {
        let t0 = Instant::now();
        let mut h = Health::new(3 * S);
        h.up(Feed::Workers, t0);
        assert!(h.calm(t0));
    }
}
