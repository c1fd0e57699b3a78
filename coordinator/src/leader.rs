//! One coordinator leads; any other waits.
//!
//! The leader holds the key `meta.leader` in `gpufleet-jobs`, which only
//! coordinators may write (with roles on; job ids hold no dots, so it never
//! meets a job), written with a TTL and renewed by compare-and-set. A second coordinator waits on
//! the key and takes over when it is released (a clean stop) or expires (a
//! leader that died). A leader that finds the key taken when it renews has
//! been replaced (it was frozen or cut off past the TTL) and must stop at
//! once, before it places anything more.
//!
//! A leader also fences itself by its own clock: it writes nothing while
//! its last confirmed renewal is older than three quarters of the TTL
//! ([`Leadership::holds`]). A process that was frozen (SIGSTOP, a stalled
//! VM) past the TTL wakes up with requests and decisions in hand; it must
//! learn whether it still leads before it acts on any of them.

use std::time::Duration;

use bytes::Bytes;
use gpufleet_natsutil::{KvError, KvEvent, KvOp, RawKv};
use tokio::sync::watch;
use tokio::time::Instant;

pub const LEADER_KEY: &str = gpufleet_schema::subjects::LEADER_KEY;

/// How long past its leadership's TTL (from its last confirmed renewal)
/// a leader still answers workers that ask to be heard alive: a stream
/// election that holds up its renewals also holds up the workers' adverts,
/// and they need the answers most then. A new leader keeps what such an
/// answer promised by giving every worker this long past its own start
/// (plus the worker's advert TTL) before an advert's expiry counts as a
/// death (`engine/alive.rs`); it starts no earlier than the old
/// leadership's TTL after that leader's last confirmed renewal.
/// As long again as the TTL: with the defaults a leader answers up to
/// 16.7-20 s into an outage of the jobs' stream (which is what stops its
/// renewals), and a new leader waits 20 s past its start before it takes
/// an expired advert for a dead worker; longer would make the workers of
/// a fleet whose leader just changed wait longer to be found dead.
pub fn promise_reach(ttl: Duration) -> Duration {
    ttl
}

/// What the alive responder needs of the leadership: whether it may still
/// promise anything.
#[derive(Clone)]
pub struct Tenure {
    lost: watch::Receiver<bool>,
    confirmed: watch::Receiver<Instant>,
    ttl: Duration,
}

impl Tenure {
    /// Whether a promise made at `now` is kept by whoever leads next:
    /// the leadership is not known lost and was confirmed within its TTL
    /// and [`promise_reach`] (on our own clock, which counts a freeze).
    pub fn may_promise(&self, now: Instant) -> bool {
        !*self.lost.borrow() && now < *self.confirmed.borrow() + self.ttl + promise_reach(self.ttl)
    }
}

pub struct Leadership {
    kv: RawKv,
    lost: watch::Receiver<bool>,
    /// When the last renewal that the server confirmed was sent.
    confirmed: watch::Receiver<Instant>,
    ttl: Duration,
    renewal: tokio::task::JoinHandle<()>,
    /// Whether the leader key had any entry (a holder, or the marker of
    /// its expiry or release, kept `MARKER_TTL`) when we first tried.
    predecessor: bool,
}

impl Leadership {
    /// Whether an earlier leader may have answered workers within the
    /// life of the leader key's markers before we took over: if not, no
    /// promise it made can outlast that life (see `engine/alive.rs`).
    pub fn follows_a_leader(&self) -> bool {
        self.predecessor
    }

    /// Resolves when another coordinator has taken over.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    /// Whether the leadership was confirmed recently enough at `now` to
    /// act on: within three quarters of the TTL.
    pub fn holds(&self, now: Instant) -> bool {
        now < *self.confirmed.borrow() + self.ttl * 3 / 4
    }

    /// Waits until the leadership is confirmed again (true) or lost
    /// (false).
    pub async fn confirm(&mut self) -> bool {
        let ttl = self.ttl;
        tokio::select! {
            _ = self.lost.wait_for(|l| *l) => false,
            r = self.confirmed.wait_for(|at| Instant::now() < *at + ttl * 3 / 4) => r.is_ok(),
        }
    }

    /// What the alive responder watches.
    pub fn tenure(&self) -> Tenure {
        Tenure {
            lost: self.lost.clone(),
            confirmed: self.confirmed.clone(),
            ttl: self.ttl,
        }
    }

    /// Lets a waiting coordinator take over now rather than after the TTL.
    pub async fn release(self) {
        self.renewal.abort();
        if let Err(e) = self.kv.purge(LEADER_KEY, Duration::from_secs(60)).await {
            tracing::warn!(error = %e, "could not release the leadership; it expires on its own");
        }
    }
}

/// Becomes the leader, waiting as long as another coordinator leads.
pub async fn acquire(kv: RawKv, instance: &str, ttl: Duration) -> Result<Leadership, KvError> {
    let value = Bytes::from(instance.to_string());
    let mut announced = false;
    // Unknown (an error) counts as a predecessor: the safe side.
    let predecessor = !matches!(kv.last(LEADER_KEY).await, Ok(None));
    let (rev, sent) = loop {
        let sent = Instant::now();
        match kv.create(LEADER_KEY, value.clone(), Some(ttl)).await {
            Ok(rev) => break (rev, sent),
            Err(KvError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
        if !announced {
            announced = true;
            let holder = kv
                .get(LEADER_KEY)
                .await
                .ok()
                .flatten()
                .map(|e| String::from_utf8_lossy(&e.value).to_string())
                .unwrap_or_default();
            tracing::info!(leader = %holder, "another coordinator leads; standing by");
        }
        wait_until_free(&kv, ttl).await?;
    };
    tracing::info!(instance, "leading the fleet");
    let (lost_tx, lost) = watch::channel(false);
    let (confirmed_tx, confirmed) = watch::channel(sent);
    let renewal = tokio::spawn(renew(kv.clone(), value, ttl, rev, lost_tx, confirmed_tx));
    Ok(Leadership {
        kv,
        lost,
        confirmed,
        ttl,
        renewal,
        predecessor,
    })
}

/// Waits for the leader key to be released or to expire (or a while, in
/// case the change was missed).
async fn wait_until_free(kv: &RawKv, ttl: Duration) -> Result<(), KvError> {
    let mut w = kv.watch(LEADER_KEY).await?;
    let free = async {
        while let Some(ev) = w.next().await {
            if let Ok(KvEvent::Change(c)) = ev {
                if c.op != KvOp::Put {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(ttl * 2, free).await;
    Ok(())
}

async fn renew(
    kv: RawKv,
    value: Bytes,
    ttl: Duration,
    mut rev: u64,
    lost: watch::Sender<bool>,
    confirmed: watch::Sender<Instant>,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent = Instant::now();
        match kv.update(LEADER_KEY, value.clone(), Some(ttl), rev).await {
            Ok(r) => {
                rev = r;
                confirmed.send_replace(sent);
            }
            Err(KvError::Conflict { .. }) => {
                // Expired while we could not renew: ours again if nobody
                // took it meanwhile.
                match kv.create(LEADER_KEY, value.clone(), Some(ttl)).await {
                    Ok(r) => {
                        tracing::warn!("the leadership lapsed and was taken back");
                        rev = r;
                        confirmed.send_replace(sent);
                    }
                    Err(_) => {
                        tracing::error!("another coordinator has taken over the fleet; stopping");
                        let _ = lost.send(true);
                        return;
                    }
                }
            }
            // Without NATS nothing can be placed either; renew when back.
            Err(e) => tracing::warn!(error = %e, "could not renew the leadership; retrying"),
        }
    }
}
