//! One ordered push consumer of our own, polled until its first failure and
//! never after.
//!
//! Why not async-nats' ordered consumer: it asks the server for an idle
//! heartbeat every 5 s and gives up only after two are missed, so a consumer
//! that died with its server node, or whose stream leader moved, went
//! unnoticed for 10 s, and every watch of the fleet stalled that long after
//! a node was lost. Ours asks for a heartbeat every [`HEARTBEAT`] and calls
//! the consumer dead after [`DEAD_AFTER`] without a message or heartbeat.
//! It also checks that consumer sequences follow each other and that every
//! heartbeat names the last delivery we saw, so a message lost on the way
//! is noticed at the next heartbeat at the latest. Its subscription is made
//! before the consumer, so that nothing the server pushes at once is lost.
//!
//! What to do after a failure (watch again, or resume after the last
//! sequence) is the caller's: the KV watcher and the event replay both
//! resume just after the last stream sequence they handed out.

use std::time::Duration;

use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::{self, stream};
use async_nats::{header, StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

use crate::retry::Backoff;

/// How often the server sends a heartbeat while it has nothing to deliver.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(500);
/// Silence after which the consumer is taken for gone. Three heartbeats:
/// on a busy machine one may come late, and a false alarm costs only a new
/// consumer. A consumer dies with its node even when every stream keeps its
/// leader, and the client hears nothing of it: this silence is then all
/// that stands between the loss and the resumption (the fleet's target is
/// work again within 2 s of the streams having leaders).
pub(crate) const DEAD_AFTER: Duration = Duration::from_millis(1500);
/// How long creating a consumer may take. A JetStream request sent while a
/// stream has no leader can hang for the client's whole request timeout
/// (5 s); giving up sooner lets the next try come soon after a leader is
/// back.
const CREATE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the server keeps a consumer nobody listens to any more.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(10);

pub(crate) struct OrderedMessages {
    js: jetstream::Context,
    /// `None` once the consumer failed or ended.
    sub: Option<Subscriber>,
    /// The consumer sequence of the last message delivered.
    consumer_seq: u64,
    /// When the consumer counts as gone if nothing arrives before.
    deadline: Instant,
}

impl OrderedMessages {
    /// Creates the consumer on `filters` from `deliver_policy`; returns it
    /// with the number of messages it has to deliver as it starts.
    pub(crate) async fn open<I>(
        js: &jetstream::Context,
        stream: &stream::Stream<I>,
        filters: &[String],
        deliver_policy: DeliverPolicy,
    ) -> Result<(OrderedMessages, u64), String> {
        let client = js.client();
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (filter_subject, filter_subjects) = match filters {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let config = push::Config {
            // A name makes the client ask on the create subject that
            // carries the filter, the only one a least-privilege role may
            // use (see `schema::roles`).
            name: Some(consumer_name()),
            deliver_subject: inbox,
            filter_subject,
            filter_subjects,
            deliver_policy,
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            flow_control: true,
            idle_heartbeat: HEARTBEAT,
            inactive_threshold: INACTIVE_THRESHOLD,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let consumer = tokio::time::timeout(CREATE_TIMEOUT, stream.create_consumer(config))
            .await
            .map_err(|_| format!("creating a consumer took more than {CREATE_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let pending = consumer.cached_info().num_pending;
        Ok((
            OrderedMessages {
                js: js.clone(),
                sub: Some(sub),
                consumer_seq: 0,
                deadline: Instant::now() + DEAD_AFTER,
            },
            pending,
        ))
    }

    /// The next message; `None` once the subscription ended, and for good
    /// after the first error.
    pub(crate) async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        let failure = loop {
            let sub = self.sub.as_mut()?;
            let msg = tokio::select! {
                m = sub.next() => m,
                _ = tokio::time::sleep_until(self.deadline) => {
                    break format!("no message or heartbeat for {DEAD_AFTER:?}: the consumer is gone");
                }
            };
            self.deadline = Instant::now() + DEAD_AFTER;
            let Some(msg) = msg else {
                self.sub = None;
                return None;
            };
            match msg.status {
                None => {}
                Some(StatusCode::IDLE_HEARTBEAT) => match self.heartbeat(&msg).await {
                    Ok(()) => continue,
                    Err(e) => break e,
                },
                // Anything else (the consumer deleted, say) ends it.
                Some(status) => {
                    break format!(
                        "the consumer ended: {status} {}",
                        msg.description.as_deref().unwrap_or("")
                    )
                }
            }
            let msg = jetstream::Message {
                message: msg,
                context: self.js.clone(),
            };
            let seq = match msg.info() {
                Ok(info) => info.consumer_sequence,
                Err(e) => break format!("a delivery without JetStream metadata: {e}"),
            };
            if seq != self.consumer_seq + 1 {
                break format!(
                    "delivery {seq} came after {}: messages were lost",
                    self.consumer_seq
                );
            }
            self.consumer_seq = seq;
            return Some(Ok(msg));
        };
        self.sub = None;
        Some(Err(failure))
    }

    /// Answers flow control and checks that the heartbeat names the last
    /// delivery we saw.
    async fn heartbeat(&self, msg: &async_nats::Message) -> Result<(), String> {
        let client = self.js.client();
        if let Some(reply) = &msg.reply {
            // Flow control: the server waits for this before sending more.
            let _ = client.publish(reply.clone(), bytes::Bytes::new()).await;
            return Ok(());
        }
        let Some(headers) = &msg.headers else {
            return Ok(());
        };
        if let Some(stalled) = headers.get("Nats-Consumer-Stalled") {
            let _ = client
                .publish(stalled.to_string(), bytes::Bytes::new())
                .await;
        }
        if let Some(last) = headers.get(header::NATS_LAST_CONSUMER) {
            let last: u64 = last.as_str().parse().unwrap_or(self.consumer_seq);
            if last != self.consumer_seq {
                return Err(format!(
                    "the server delivered up to {last}, we received up to {}: messages were lost",
                    self.consumer_seq
                ));
            }
        }
        Ok(())
    }
}

/// The next message of the consumer in `slot`. After the consumer's
/// failure (or its end) the slot is empty and the error says why.
pub(crate) async fn next_in(
    slot: &mut Option<OrderedMessages>,
) -> Result<jetstream::Message, String> {
    let Some(messages) = slot.as_mut() else {
        return Err("no consumer".into());
    };
    match messages.next().await {
        Some(Ok(m)) => Ok(m),
        failure => {
            *slot = None;
            Err(match failure {
                Some(Err(message)) => message,
                _ => "the consumer's subscription ended".into(),
            })
        }
    }
}

/// Consumers that fail are created again after these delays; the cap is
/// short so that a reader resumes soon after its stream has a leader again.
const RESUME_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));

/// How a reader that resumes after failures paces its new consumers.
pub(crate) struct Resumption {
    backoff: Backoff,
    /// Whether the last consumer (or the try to create one) failed.
    pub(crate) failed: bool,
    /// How many times a new consumer was tried after one failed.
    pub(crate) restarts: u64,
}

impl Resumption {
    pub(crate) fn new() -> Resumption {
        Resumption {
            backoff: RESUME_BACKOFF,
            failed: false,
            restarts: 0,
        }
    }

    /// Before a new consumer is made: a pause if the last one failed.
    pub(crate) async fn before_reopen(&mut self) {
        if self.failed {
            self.backoff.wait().await;
        }
        self.restarts += 1;
    }

    /// A message came: the consumer works.
    pub(crate) fn delivered(&mut self) {
        self.failed = false;
        self.backoff.reset();
    }
}

/// The newest message on `filter`, through a short-lived consumer rather
/// than a direct get, which least-privilege roles may not use (see
/// `schema::roles`). `None` when nothing is stored there.
pub(crate) async fn last_message<I>(
    js: &jetstream::Context,
    stream: &stream::Stream<I>,
    filter: &str,
) -> Result<Option<jetstream::Message>, String> {
    let (mut messages, pending) =
        OrderedMessages::open(js, stream, &[filter.to_string()], DeliverPolicy::Last).await?;
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
