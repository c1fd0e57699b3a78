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
    pub(crate) async fn open(
        stream: &stream::Stream,
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
