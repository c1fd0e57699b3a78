//! One coordinator leads; any other waits.
//!
//! The leader holds the key `meta.leader` in `gpufleet-jobs`, which only
//! coordinators may write (with roles on; job ids hold no dots, so it never
//! meets a job), written with a TTL and renewed by compare-and-set. A second coordinator waits on
//! the key and takes over when it is released (a clean stop) or expires (a
//! leader that died). A leader that finds the key taken when it renews has
//! been replaced (it was frozen or cut off past the TTL) and must stop at
//! once, before it places anything more.

use std::time::Duration;

use bytes::Bytes;
use gpufleet_natsutil::{KvError, KvEvent, KvOp, RawKv};
use tokio::sync::watch;

pub const LEADER_KEY: &str = gpufleet_schema::subjects::LEADER_KEY;

pub struct Leadership {
    kv: RawKv,
    lost: watch::Receiver<bool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Resolves when another coordinator has taken over.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
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
    let rev = loop {
        match kv.create(LEADER_KEY, value.clone(), Some(ttl)).await {
            Ok(rev) => break rev,
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
    let renewal = tokio::spawn(renew(kv.clone(), value, ttl, rev, lost_tx));
    Ok(Leadership { kv, lost, renewal })
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

async fn renew(kv: RawKv, value: Bytes, ttl: Duration, mut rev: u64, lost: watch::Sender<bool>) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match kv.update(LEADER_KEY, value.clone(), Some(ttl), rev).await {
            Ok(r) => rev = r,
            Err(KvError::Conflict { .. }) => {
                // Expired while we could not renew: ours again if nobody
                // took it meanwhile.
                match kv.create(LEADER_KEY, value.clone(), Some(ttl)).await {
                    Ok(r) => {
                        tracing::warn!("the leadership lapsed and was taken back");
                        rev = r;
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
