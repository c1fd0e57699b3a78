//! One ordered push consumer, polled until its first error and never after.
//!
//! async-nats 0.51's ordered consumer panics ("async fn resumed after
//! completion") when polled after its connection-state watcher ended, so
//! after an error (or the end of the stream) it is dropped, and a panic
//! inside it is caught and reported as an error. What to do next (watch
//! again, or resume after the last sequence) is the caller's: the KV
//! watcher and the event replay decide differently.

use std::panic::AssertUnwindSafe;

use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::{self, stream};
use futures::{FutureExt, StreamExt};

pub(crate) struct OrderedMessages {
    /// `None` once the consumer failed or ended.
    inner: Option<push::Ordered>,
}

impl OrderedMessages {
    /// Creates the consumer on `filters` from `deliver_policy`; returns it
    /// with the number of messages it has to deliver as it starts.
    pub(crate) async fn open<I>(
        stream: &stream::Stream<I>,
        client: &async_nats::Client,
        filters: &[String],
        deliver_policy: DeliverPolicy,
    ) -> Result<(OrderedMessages, u64), String> {
        let (filter_subject, filter_subjects) = match filters {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                // A name makes the client ask on the create subject that
                // carries the filter, the only one a least-privilege role
                // may use (see `schema::roles`).
                name: Some(consumer_name()),
                deliver_subject: client.new_inbox(),
                filter_subject,
                filter_subjects,
                replay_policy: ReplayPolicy::Instant,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok((
            OrderedMessages {
                inner: Some(messages),
            },
            pending,
        ))
    }

    /// The next message; `None` once the consumer ended, and for good
    /// after its first error.
    pub(crate) async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        let messages = self.inner.as_mut()?;
        let item = AssertUnwindSafe(messages.next()).catch_unwind().await;
        let failure = match item {
            Ok(Some(Ok(m))) => return Some(Ok(m)),
            Ok(Some(Err(e))) => e.to_string(),
            Ok(None) => {
                self.inner = None;
                return None;
            }
            Err(_) => "the consumer panicked".to_string(),
        };
        self.inner = None;
        Some(Err(failure))
    }
}

/// The newest message on `filter`, through a short-lived consumer rather
/// than a direct get, which least-privilege roles may not use (see
/// `schema::roles`). `None` when nothing is stored there.
pub(crate) async fn last_message<I>(
    stream: &stream::Stream<I>,
    client: &async_nats::Client,
    filter: &str,
) -> Result<Option<jetstream::Message>, String> {
    let (mut messages, pending) =
        OrderedMessages::open(stream, client, &[filter.to_string()], DeliverPolicy::Last).await?;
    if pending == 0 {
        return Ok(None);
    }
    match tokio::time::timeout(LAST_MESSAGE_WAIT, messages.next()).await {
        Ok(Some(Ok(m))) => Ok(Some(m)),
        Ok(Some(Err(e))) => Err(e),
        Ok(None) => Err("the consumer ended before its first message".into()),
        Err(_) => Err(format!(
            "no message within {LAST_MESSAGE_WAIT:?} though one is stored"
        )),
    }
}

/// How long the one message of [`last_message`] may take to arrive.
const LAST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A fresh consumer name; random, so that nobody can guess and delete it.
fn consumer_name() -> String {
    format!("gpufleet-{}", uuid::Uuid::new_v4().simple())
}
