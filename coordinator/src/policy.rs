//! The scheduling policy's key: read at start, then followed, so that an
//! admin changes weights and quotas without a restart.
//!
//! A value that does not decode or check is logged and ignored: the policy
//! in force stays (a typo must not lift every quota).

use gpufleet_natsutil::{KvChange, KvEvent, KvOp, RawKv};
use gpufleet_schema::policy::SchedPolicy;
use gpufleet_schema::{subjects, Encoding};
use tokio::sync::mpsc;

use crate::engine::Input;

/// The policy the key holds now, if it holds a good one.
pub async fn read(jobs: &RawKv) -> Option<SchedPolicy> {
    match jobs.get(subjects::POLICY_KEY).await {
        Ok(Some(e)) => checked(&e.value),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the scheduling policy; following the settings' until it comes");
            None
        }
    }
}

/// Sends every change of the key to the engine.
pub async fn follow(jobs: RawKv, tx: mpsc::Sender<Input>) {
    let mut watch = crate::runtime::open_watch(&jobs, subjects::POLICY_KEY).await;
    while let Some(item) = watch.next().await {
        let input = match item {
            Ok(KvEvent::Change(c)) => match input(c) {
                Some(i) => i,
                None => continue,
            },
            Ok(KvEvent::Synced) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the scheduling policy's watch failed; resuming");
                continue;
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

fn input(c: KvChange) -> Option<Input> {
    match c.op {
        KvOp::Put => checked(&c.value).map(|p| Input::Policy(Some(Box::new(p)))),
        KvOp::Delete | KvOp::Purge | KvOp::Expired => Some(Input::Policy(None)),
    }
}

/// A policy that decodes (JSON) and checks; otherwise says why, and none.
fn checked(value: &[u8]) -> Option<SchedPolicy> {
    let policy = Encoding::Json
        .decode::<SchedPolicy>(value)
        .map_err(|e| e.to_string())
        .and_then(|p| p.validate().map(|()| p).map_err(|e| e.to_string()));
    match policy {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(key = subjects::POLICY_KEY, error = %e, "ignoring a bad scheduling policy; the one in force stays");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_policy_is_ignored_and_a_removed_one_goes_back_to_the_settings() {
        assert!(checked(br#"{"users": {"a": {"weight": 2}}}"#).is_some());
        assert!(checked(br#"{"users": {"a": {"weight": -1}}}"#).is_none());
        assert!(checked(b"not json").is_none());
        let removed = KvChange {
            key: subjects::POLICY_KEY.into(),
            value: Default::default(),
            revision: 3,
            op: KvOp::Delete,
            ttl: None,
            published: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert!(matches!(input(removed), Some(Input::Policy(None))));
    }
}
