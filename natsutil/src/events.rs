//! The events stream: publishing an event with its headers, and replaying a
//! subject from a sequence.
//!
//! Every event is MessagePack (`schema::codec`) and says so in its
//! `Content-Type` header, so that clients in other languages decode it
//! without sniffing. A `Nats-Msg-Id` makes the stream keep one copy of a
//! message sent again within its duplicate window (a retried result).
//!
//! A replay is an ordered push consumer (see [`crate::ordered`]). When one
//! fails (a lost message, a dead server node, a stream leader that moved:
//! noticed within seconds), the replay creates a new consumer that starts
//! just after the last sequence it handed out, so that nothing is skipped
//! or handed out twice.

use async_nats::header;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use gpufleet_schema::codec;

use crate::ordered::{next_in, OrderedMessages, Resumption};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("could not publish on {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: PublishError,
    },
    #[error("the stream did not store the message on {subject}: {source}")]
    NotStored {
        subject: String,
        #[source]
        source: PublishError,
    },
    #[error("reading stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("replaying {filters:?} from sequence {from}: {message}")]
    Consumer {
        filters: Vec<String>,
        from: u64,
        message: String,
    },
}

/// Sends `body` (a message encoded with `schema::codec`'s MessagePack) on
/// `subject` without waiting for the stream; the ack comes back as a
/// future, so that a batch can be sent before any ack is awaited.
pub async fn send(
    js: &jetstream::Context,
    subject: impl Into<Subject>,
    body: Bytes,
    msg_id: Option<&str>,
) -> Result<PublishAckFuture, EventsError> {
    let subject = subject.into();
    let mut headers = HeaderMap::new();
    headers.insert(codec::CONTENT_TYPE, codec::MSGPACK);
    if let Some(id) = msg_id {
        headers.insert(header::NATS_MESSAGE_ID, id);
    }
    js.publish_with_headers(subject.clone(), headers, body)
        .await
        .map_err(|source| EventsError::Publish {
            subject: subject.to_string(),
            source,
        })
}

/// Publishes `body` as [`send`] does and waits until the stream has it.
pub async fn publish(
    js: &jetstream::Context,
    subject: impl Into<Subject>,
    body: Bytes,
    msg_id: Option<&str>,
) -> Result<PublishAck, EventsError> {
    let subject = subject.into();
    let ack = send(js, subject.clone(), body, msg_id).await?;
    ack.await.map_err(|source| EventsError::NotStored {
        subject: subject.to_string(),
        source,
    })
}

/// Where a replay ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// At what the stream held when the replay began: messages stored
    /// later are not handed out.
    CaughtUp,
    /// Never: after the stored messages, new ones as they are stored.
    Live,
}

/// One message of a replay.
#[derive(Debug)]
pub struct Replayed {
    /// Its sequence in the stream.
    pub sequence: u64,
    /// Messages on the replay's subjects stored after this one, as the
    /// consumer counted when it delivered this one.
    pub pending: u64,
    pub message: async_nats::Message,
}

/// What a replay has to say: a message, or news of its consumer.
#[derive(Debug)]
pub enum ReplayEvent {
    Message(Replayed),
    /// The consumer failed; the replay goes on (see [`Replay::next`]).
    Failed(EventsError),
    /// A new consumer took over after a failure: the replay is live again.
    Resumed,
}

/// The messages of a stream on some subjects, in order, from a sequence.
pub struct Replay {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    stream_name: String,
    filters: Vec<String>,
    until: Until,
    /// The sequence to hand out next: every earlier one on our subjects
    /// has been handed out (or came before the start).
    next: u64,
    /// The stream's last sequence when the replay began.
    end: u64,
    caught_up: bool,
    /// `None` after the consumer failed, until the next is created.
    messages: Option<OrderedMessages>,
    resume: Resumption,
}

impl Replay {
    /// Replays the messages of `stream` on `filters` from sequence `from`
    /// (1 for the beginning) until `until`.
    pub async fn start(
        js: &jetstream::Context,
        stream: &str,
        filters: Vec<String>,
        from: u64,
        until: Until,
    ) -> Result<Replay, EventsError> {
        // No stream info: a user may not read it (it would list every
        // subject, other users' jobs included). Where the replay ends is
        // the newest message on its own subjects, read directly.
        let stream_name = stream;
        let stream = js
            .get_stream_no_info(stream_name)
            .await
            .map_err(|e| EventsError::Stream {
                stream: stream_name.to_string(),
                message: e.to_string(),
            })?;
        let end = last_on(js, &stream, stream_name, &filters).await?;
        let from = from.max(1);
        let mut replay = Replay {
            js: js.clone(),
            stream,
            stream_name: stream_name.to_string(),
            filters,
            until,
            next: from,
            end,
            caught_up: from > end,
            messages: None,
            resume: Resumption::new(),
        };
        replay.open().await?;
        Ok(replay)
    }

    async fn open(&mut self) -> Result<(), EventsError> {
        let policy = DeliverPolicy::ByStartSequence {
            start_sequence: self.next,
        };
        let opened = OrderedMessages::open(&self.js, &self.stream, &self.filters, policy).await;
        let (messages, pending) = opened.map_err(|message| self.consumer_error(message))?;
        if pending == 0 {
            self.caught_up = true;
        }
        self.messages = Some(messages);
        Ok(())
    }

    fn consumer_error(&self, message: String) -> EventsError {
        EventsError::Consumer {
            filters: self.filters.clone(),
            from: self.next,
            message,
        }
    }

    /// The next message; `None` once caught up (never when live).
    ///
    /// An error means the consumer failed; the replay goes on, and the next
    /// call resumes after the last message handed out (after a pause that
    /// grows while the failures go on).
    pub async fn next(&mut self) -> Option<Result<Replayed, EventsError>> {
        loop {
            return match self.next_event().await? {
                ReplayEvent::Message(m) => Some(Ok(m)),
                ReplayEvent::Failed(e) => Some(Err(e)),
                ReplayEvent::Resumed => continue,
            };
        }
    }

    /// As [`Replay::next`], and also says when a new consumer has taken
    /// over after a failure (so that a quiet stream is known to be back).
    pub async fn next_event(&mut self) -> Option<ReplayEvent> {
        loop {
            if self.until == Until::CaughtUp && self.caught_up {
                return None;
            }
            if self.messages.is_none() {
                self.resume.before_reopen().await;
                if let Err(e) = self.open().await {
                    self.resume.failed = true;
                    return Some(ReplayEvent::Failed(e));
                }
                if self.resume.failed {
                    return Some(ReplayEvent::Resumed);
                }
                continue;
            }
            let message = match next_in(&mut self.messages).await {
                Ok(m) => m,
                Err(message) => {
                    self.resume.failed = true;
                    return Some(ReplayEvent::Failed(self.consumer_error(message)));
                }
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let (sequence, pending) = (info.stream_sequence, info.pending);
            // Never hand out twice what an earlier consumer delivered.
            if sequence < self.next {
                continue;
            }
            if self.until == Until::CaughtUp && sequence > self.end {
                self.caught_up = true;
                return None;
            }
            self.next = sequence + 1;
            self.resume.delivered();
            if sequence >= self.end || pending == 0 {
                self.caught_up = true;
            }
            return Some(ReplayEvent::Message(Replayed {
                sequence,
                pending,
                message: message.message,
            }));
        }
    }

    /// Whether every message stored on our subjects when the replay began
    /// has been handed out.
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// The sequence of the last message handed out (or the one before the
    /// start, before any).
    pub fn last_sequence(&self) -> u64 {
        self.next - 1
    }

    /// How many times a new consumer was tried after one failed.
    pub fn restarts(&self) -> u64 {
        self.resume.restarts
    }

    /// The sequence of the newest message stored on our subjects now (0 if
    /// none): a replay whose [`Replay::last_sequence`] has reached it has
    /// handed out everything stored so far.
    pub async fn stored_tail(&self) -> Result<u64, EventsError> {
        last_on(&self.js, &self.stream, &self.stream_name, &self.filters).await
    }
}

/// The sequence of the newest message stored on any of `filters` (0 if
/// none), read through consumers, which a user's permissions allow on its
/// own subjects (direct gets they do not: see `schema::roles`).
pub async fn last_on(
    js: &jetstream::Context,
    stream: &stream::Stream<()>,
    name: &str,
    filters: &[String],
) -> Result<u64, EventsError> {
    let mut tail = 0;
    for f in filters {
        let last = crate::ordered::last_message(js, stream, f)
            .await
            .map_err(|message| EventsError::Stream {
                stream: name.to_string(),
                message,
            })?;
        if let Some(m) = last {
            let seq = m.info().map_err(|e| EventsError::Stream {
                stream: name.to_string(),
                message: e.to_string(),
            })?;
            tail = tail.max(seq.stream_sequence);
        }
    }
    Ok(tail)
}
