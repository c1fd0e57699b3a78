//! Self-fencing: a worker that cannot reach NATS stops its tasks before
//! the coordinator may run them elsewhere, so that two attempts of one task
//! never run at once.
//!
//! The coordinator runs a task again when its lease lapses, or when its
//! worker's advert does (the worker is gone). Both are key-value entries
//! with a TTL that the server counts from when it stored the last write.
//! The worker cannot see the server's clock, but it knows when it sent
//! each write the server confirmed ([`Confirmed`], on its own monotonic
//! clock): the entry cannot lapse before that plus its TTL. So each
//! attempt's [`watchdog`] stops the task once either clock says the end is
//! near ([`crate::core::fence_after`]), with a grace short enough that the
//! task is gone before it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_schema::LeaseKey;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::supervisor::StopReason;

/// When the last write that the server stored (of a lease, of the
/// advert) was sent, on the monotonic clock (which keeps counting while
/// the process is frozen).
#[derive(Debug)]
pub struct Confirmed {
    last: Mutex<Instant>,
    marked: Notify,
}

impl Confirmed {
    /// Confirmed as of now (a write about to be made, say).
    pub fn now() -> Confirmed {
        Confirmed {
            last: Mutex::new(Instant::now()),
            marked: Notify::new(),
        }
    }

    /// A write sent at `sent` was stored: the server's clock for the entry
    /// started after that.
    pub fn mark(&self, sent: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(sent);
        drop(last);
        self.marked.notify_waiters();
    }

    /// When the last confirmed write was sent.
    pub fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long ago the last confirmed write was sent.
    pub fn age(&self) -> Duration {
        Instant::now().saturating_duration_since(self.last())
    }

    /// Calls `f` with [`Confirmed::last`] now and after every new
    /// confirmation, for ever (the watchdog's deadlines follow it).
    pub async fn follow(&self, mut f: impl FnMut(Instant)) {
        loop {
            let marked = self.marked.notified();
            tokio::pin!(marked);
            marked.as_mut().enable();
            f(self.last());
            marked.await;
        }
    }

    /// Whether a write younger than `max_age` is confirmed now or within
    /// `patience` (just back in touch, the next one is on its way).
    pub async fn fresh_within(&self, max_age: Duration, patience: Duration) -> bool {
        let until = Instant::now() + patience;
        loop {
            let marked = self.marked.notified();
            tokio::pin!(marked);
            marked.as_mut().enable();
            if self.age() < max_age {
                return true;
            }
            if tokio::time::timeout_at(until, marked).await.is_err() {
                return self.age() < max_age;
            }
        }
    }
}

/// A clock to watch and how old it may get.
pub struct Deadline {
    pub what: &'static str,
    pub confirmed: Arc<Confirmed>,
    pub after: Duration,
}

/// Stops the task (`StopReason::LostContact`) as soon as one of
/// `deadlines` has passed, then returns.
pub async fn watchdog(
    key: LeaseKey,
    deadlines: Vec<Deadline>,
    stop: Arc<watch::Sender<Option<StopReason>>>,
) {
    loop {
        let late = deadlines.iter().find(|d| d.confirmed.age() >= d.after);
        let Some(late) = late else {
            let wait = deadlines
                .iter()
                .map(|d| d.after.saturating_sub(d.confirmed.age()))
                .min()
                .unwrap_or(Duration::MAX);
            tokio::time::sleep(wait).await;
            continue;
        };
        let stopped = stop.send_if_modified(|s| match s {
            // Already being killed, or already stopping for this.
            Some(StopReason::Fenced | StopReason::LostContact) => false,
            _ => {
                *s = Some(StopReason::LostContact);
                true
            }
        });
        if stopped {
            tracing::warn!(
                %key,
                unconfirmed = late.what,
                since = ?late.confirmed.age(),
                "no write to NATS confirmed in time: stopping the task before the coordinator may run it elsewhere"
            );
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_task_is_stopped_when_either_clock_runs_out_and_not_before() {
        let lease = Arc::new(Confirmed::now());
        let advert = Arc::new(Confirmed::now());
        let (stop, mut rx) = watch::channel(None);
        let stop = Arc::new(stop);
        let deadlines = vec![
            Deadline {
                what: "lease",
                confirmed: lease.clone(),
                after: Duration::from_secs(22),
            },
            Deadline {
                what: "advert",
                confirmed: advert.clone(),
                after: Duration::from_secs(7),
            },
        ];
        let key = gpufleet_schema::subjects::parse_lease_key("w.j-0.1").unwrap();
        let dog = tokio::spawn(watchdog(key, deadlines, stop.clone()));
        // Adverts go out every 5 s, leases every 10 s: nothing happens.
        for i in 1..=6 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            advert.mark(Instant::now());
            if i % 2 == 0 {
                lease.mark(Instant::now());
            }
            assert_eq!(*rx.borrow_and_update(), None, "{i}");
        }
        // A cancel under way when the adverts stop.
        stop.send_replace(Some(StopReason::Cancel));
        rx.borrow_and_update();
        let cut = Instant::now();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), Some(StopReason::LostContact));
        assert_eq!(
            Instant::now() - cut,
            Duration::from_secs(7),
            "7 s after the last advert"
        );
        dog.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_is_waited_for_as_long_as_patience_allows() {
        let c = Arc::new(Confirmed::now());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let second = Duration::from_secs(1);
        assert!(!c.fresh_within(second, second).await);
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.fresh_within(second, Duration::from_secs(3)).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.mark(Instant::now());
        assert!(waiting.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_sent_earlier_but_confirmed_later_counts_from_its_sending() {
        let c = Confirmed::now();
        let sent = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.mark(sent);
        assert_eq!(c.age(), Duration::from_secs(3));
        // An older confirmation arriving late changes nothing.
        c.mark(sent - Duration::from_secs(1));
        assert_eq!(c.age(), Duration::from_secs(3));
    }
}
