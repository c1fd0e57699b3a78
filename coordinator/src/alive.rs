//! Answers workers that ask to be heard alive over core NATS while their
//! advert writes fail (a stream electing its leader): the leader records
//! the promise in the engine, then answers (see `engine/alive.rs` for
//! what the promise is and how it is kept).
//!
//! This runs beside the engine's loop, not in it: that loop may wait
//! seconds on writes JetStream cannot take during the very outage the
//! workers ask about. The promise goes into the engine's input channel
//! before the answer goes out, so the engine takes it before any advert
//! expiry it receives later; an answer the engine has no room for is not
//! sent (the worker asks again, and stops its tasks if nobody answers).

use futures::StreamExt;
use gpufleet_schema::{codec, roles, subjects, AliveAsk, AliveHeard, Dur};
use std::time::Duration;
use tokio::sync::mpsc;

use crate::engine::Input;
use crate::leader::Tenure;

/// The longest promise: a TTL a worker may not ask beyond (adverts live
/// seconds; this bounds what a confused or hostile worker can ask).
const MAX_PROMISE: Duration = Duration::from_secs(600);

/// Serves `gpufleet.alive.*` while this coordinator leads; returns when
/// the subscription ends (the connection closed for good).
pub async fn serve(
    client: async_nats::Client,
    tx: mpsc::Sender<Input>,
    tenure: Tenure,
    roles_on: bool,
) {
    let mut asks = match client.subscribe(subjects::ALIVE_ALL).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for workers asking to be heard alive");
            return;
        }
    };
    while let Some(m) = asks.next().await {
        let Some(worker) = subjects::parse_alive(&m.subject) else {
            continue;
        };
        let Some(reply) = m.reply else { continue };
        // With roles on only the worker may ask on its subject; its answer
        // goes to its own inbox only.
        if roles_on && !roles::in_inbox_of(worker.as_str(), &reply) {
            tracing::warn!(worker = %worker, reply = %reply, "ignored an alive request whose answer would leave the worker's inbox");
            continue;
        }
        let ask: AliveAsk = match codec::decode(&m.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(worker = %worker, error = %e, "ignored an alive request that does not decode");
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        if !tenure.may_promise(now) {
            continue;
        }
        let ttl = ask.ttl.0.min(MAX_PROMISE);
        let input = Input::Alive {
            worker: worker.clone(),
            heard: now.into_std(),
            ttl,
        };
        if tx.try_send(input).is_err() {
            tracing::warn!(worker = %worker, "the engine is too busy to take a promise; not answering");
            continue;
        }
        let Ok(body) = codec::encode(&AliveHeard { ttl: Dur(ttl) }) else {
            continue;
        };
        if let Err(e) = client.publish(reply, body.into()).await {
            tracing::warn!(worker = %worker, error = %e, "cannot answer an alive request");
        }
    }
}
