//! Heard alive: while the advert cannot be stored (a stream electing its
//! leader after a server node died), the worker asks the leading
//! coordinator over core NATS to hear it alive, and counts the answer as
//! an advert stored when it asked.
//!
//! The fence ([`crate::fence`]) stops the tasks once no advert was stored
//! for nearly its TTL, because the coordinator may take an expired advert
//! for a dead worker and run its tasks elsewhere. In an election nobody's
//! advert can be stored, yet core NATS still flows across the cluster: the
//! leader answers, and its answer promises not to take the advert's expiry
//! for a death within the advert's TTL of hearing us
//! (`coordinator/src/engine/alive.rs`), which is what a stored advert
//! would have promised. A worker whose server is cut off from the leader
//! hears nothing and stops its tasks as before; a dead one asks nothing.
//!
//! The lease is not covered: its TTL is the server's, which nobody's
//! promise can move, so each attempt's lease deadline stands (elections
//! are far shorter than a lease).
//!
//! Load: nothing is asked while adverts are stored, nor while no task
//! runs; during an outage, one request per [`ask_every`] at most.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_schema::{codec, subjects, AliveAsk, AliveHeard, Dur, WorkerId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::advert::AdvertInputs;
use crate::fence::Confirmed;

/// How old the last stored advert gets before the worker asks: past two
/// heartbeats (one lost write is no outage), a third of the TTL at least
/// and half of it at most, and early enough for two requests before the
/// fence can start ([`crate::core::fence_after`], whose grace is at most
/// a sixth of the TTL).
pub fn ask_after(ttl: Duration, heartbeat: Duration) -> Duration {
    let fence = crate::core::fence_after(ttl, ttl / 6);
    let latest = fence.saturating_sub(ask_every(ttl) * 2);
    heartbeat
        .saturating_mul(2)
        .clamp(ttl / 3, ttl / 2)
        .min(latest)
}

/// How often the worker asks while it must, and how long it waits for
/// each answer.
pub fn ask_every(ttl: Duration) -> Duration {
    (ttl / 8).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Whether to ask now: the advert was last stored `age` ago and a task
/// runs (without one, nothing needs the promise).
pub fn should_ask(age: Duration, ttl: Duration, heartbeat: Duration, running: bool) -> bool {
    running && age >= ask_after(ttl, heartbeat)
}

/// Asks while [`should_ask`] says so, for ever; marks `advert` confirmed
/// as of each request the leader answered.
pub async fn ask(
    client: async_nats::Client,
    worker: WorkerId,
    instance: String,
    (ttl, heartbeat): (Duration, Duration),
    advert: Arc<Confirmed>,
    inputs: watch::Receiver<AdvertInputs>,
) {
    let every = ask_every(ttl);
    let subject = subjects::alive(&worker);
    let Ok(body) = codec::encode(&AliveAsk {
        instance,
        ttl: Dur(ttl),
    }) else {
        return;
    };
    let body = bytes::Bytes::from(body);
    let mut asking = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let running = !inputs.borrow().running.is_empty();
        if !should_ask(advert.age(), ttl, heartbeat, running) {
            if asking {
                tracing::info!("adverts are stored again: no longer asking to be heard alive");
            }
            asking = false;
            continue;
        }
        if !asking {
            tracing::warn!(since = ?advert.age(), "no advert stored lately: asking the coordinator to hear this worker alive");
            asking = true;
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(every, client.request(subject.clone(), body.clone()));
        match answer.await {
            Ok(Ok(m)) => match codec::decode::<AliveHeard>(&m.payload) {
                // Promised as long as a stored advert would have been.
                Ok(h) if h.ttl.0 >= ttl => advert.mark(sent),
                Ok(h) => {
                    tracing::warn!(promised = ?h.ttl, "the coordinator promised less than the advert's TTL")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an answer to an alive request that does not decode")
                }
            },
            Ok(Err(e)) => tracing::debug!(error = %e, "no answer to an alive request"),
            Err(_) => tracing::debug!("no answer to an alive request in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{fence_after, fence_grace};

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_worker_asks_only_with_a_task_running_and_its_adverts_late() {
        let (ttl, hb) = (10 * S, 2 * S);
        assert_eq!(ask_after(ttl, hb), 4 * S);
        assert!(!should_ask(3 * S, ttl, hb, true), "adverts flow");
        assert!(!should_ask(9 * S, ttl, hb, false), "nothing runs");
        assert!(should_ask(4 * S, ttl, hb, true));
        // The test settings (2 s TTL, 500 ms heartbeats): two heartbeats
        // would leave too few chances before the fence (at 1.42 s).
        let first = ask_after(2 * S, 500 * MS);
        assert!(first > 900 * MS && first < S, "{first:?}");
        assert_eq!(ask_every(2 * S), 250 * MS);
        assert_eq!(ask_every(10 * S), S);
    }

    #[test]
    fn the_first_request_goes_out_well_before_the_fence() {
        for ttl_ms in [1000u32, 2000, 5000, 10_000, 60_000] {
            let ttl = ttl_ms * MS;
            // Every heartbeat the settings allow (under half the TTL).
            for hb in [100 * MS, ttl / 4, ttl / 2 - MS] {
                let grace = fence_grace(ttl, 30 * S);
                let fence = fence_after(ttl, grace);
                let first = ask_after(ttl, hb);
                // Two chances to be answered before the fence at least.
                assert!(
                    first + 2 * ask_every(ttl) <= fence,
                    "ttl {ttl:?} heartbeat {hb:?}: asks at {first:?}, fenced at {fence:?}"
                );
            }
        }
    }
}
