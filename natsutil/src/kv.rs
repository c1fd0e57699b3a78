//! KV operations done as raw JetStream publishes with headers, and a KV
//! watcher that keeps the headers.
//!
//! Why not the client's own KV helpers: (1) a plain update without a TTL
//! cancels the key's expiry (nats-server#6959), so every write to a leased
//! key must carry `Nats-TTL`; (2) `create_with_ttl` on a key whose last entry
//! is an expiry marker or tombstone falls back to an update without the TTL,
//! so the re-created key would never expire; (3) the client's watcher maps
//! both an expiry (`Nats-Marker-Reason: MaxAge`) and a purge to `Purge`,
//! and the coordinator must tell "the worker released it" from "nobody
//! renewed it". The tests in `natsutil/tests/kv_facts.rs` pin each fact.

use std::time::Duration;

use async_nats::header::{self, HeaderMap};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use gpufleet_schema::subjects;
use time::OffsetDateTime;

use crate::ordered::{next_in, OrderedMessages, Resumption};

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Compare-and-set lost: the key is not at the expected revision
    /// (or, for a create, already holds a value).
    #[error("{bucket}/{key}: revision conflict")]
    Conflict { bucket: String, key: String },
    #[error("{bucket}/{key}: {message}")]
    Other {
        bucket: String,
        key: String,
        message: String,
    },
}

/// One bucket, written with raw publishes.
#[derive(Clone)]
pub struct RawKv {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    bucket: String,
    /// Reads with direct gets (the coordinator), or through consumers (a
    /// worker, whose permissions allow no direct get: see `schema::roles`).
    direct: bool,
}

/// TTLs are whole seconds on the wire and the server refuses 0; round up so
/// that a lease never lives shorter than asked.
fn ttl_secs(ttl: Duration) -> u64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    s.max(1)
}

impl RawKv {
    /// A handle on `bucket`. It reads no stream info (a worker may not), so
    /// a missing bucket shows at the first read or write.
    pub async fn open(js: &jetstream::Context, bucket: &str) -> Result<RawKv, KvError> {
        Self::open_with(js, bucket, true).await
    }

    /// [`RawKv::open`] for a program with a role's least privilege, which
    /// reads the last entry of a key through a consumer on that key.
    pub async fn open_scoped(js: &jetstream::Context, bucket: &str) -> Result<RawKv, KvError> {
        Self::open_with(js, bucket, false).await
    }

    async fn open_with(
        js: &jetstream::Context,
        bucket: &str,
        direct: bool,
    ) -> Result<RawKv, KvError> {
        let stream = js
            .get_stream_no_info(subjects::kv_stream(bucket))
            .await
            .map_err(|e| KvError::Other {
                bucket: bucket.into(),
                key: String::new(),
                message: format!("bucket not found: {e}"),
            })?;
        Ok(RawKv {
            js: js.clone(),
            stream,
            bucket: bucket.into(),
            direct,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn other(&self, key: &str, message: impl ToString) -> KvError {
        KvError::Other {
            bucket: self.bucket.clone(),
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// Publishes and waits for the ack; returns the new revision.
    async fn send(&self, key: &str, msg: Publish) -> Result<u64, KvError> {
        let ack = self
            .js
            .send_publish(subjects::kv_subject(&self.bucket, key), msg)
            .await
            .map_err(|e| self.other(key, e))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(KvError::Conflict {
                bucket: self.bucket.clone(),
                key: key.into(),
            }),
            Err(e) => Err(self.other(key, e)),
        }
    }

    fn message(value: Bytes, ttl: Option<Duration>) -> Publish {
        let msg = Publish::build().payload(value);
        match ttl {
            Some(ttl) => msg.header(header::NATS_MESSAGE_TTL, ttl_secs(ttl).to_string()),
            None => msg,
        }
    }

    /// Writes unconditionally (last writer wins).
    pub async fn put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<u64, KvError> {
        self.send(key, Self::message(value, ttl)).await
    }

    /// Writes only if the key's last revision is `expected`.
    pub async fn update(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        expected: u64,
    ) -> Result<u64, KvError> {
        let msg = Self::message(value, ttl).expected_last_subject_sequence(expected);
        self.send(key, msg).await
    }

    /// Writes only if the key holds no value: never written, or its last
    /// entry is a delete, purge or expiry marker.
    pub async fn create(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<u64, KvError> {
        match self.update(key, value.clone(), ttl, 0).await {
            Err(KvError::Conflict { .. }) => {}
            other => return other,
        }
        // The key has history; only a marker may be overwritten.
        match self.last(key).await? {
            Some(Entry { revision, op, .. }) if op != KvOp::Put => {
                self.update(key, value, ttl, revision).await
            }
            _ => Err(KvError::Conflict {
                bucket: self.bucket.clone(),
                key: key.into(),
            }),
        }
    }

    /// Removes every revision of the key, leaving one purge marker that
    /// itself expires after `marker_ttl`, so released keys do not pile up.
    pub async fn purge(&self, key: &str, marker_ttl: Duration) -> Result<u64, KvError> {
        let msg = Publish::build()
            .header("KV-Operation", "PURGE")
            .header(header::NATS_ROLLUP, "sub")
            .header(header::NATS_MESSAGE_TTL, ttl_secs(marker_ttl).to_string());
        self.send(key, msg).await
    }

    /// Purges only if the key is still at `expected`.
    pub async fn purge_expect(
        &self,
        key: &str,
        marker_ttl: Duration,
        expected: u64,
    ) -> Result<u64, KvError> {
        let msg = Publish::build()
            .header("KV-Operation", "PURGE")
            .header(header::NATS_ROLLUP, "sub")
            .header(header::NATS_MESSAGE_TTL, ttl_secs(marker_ttl).to_string())
            .expected_last_subject_sequence(expected);
        self.send(key, msg).await
    }

    /// The key's last entry, markers included.
    pub async fn last(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let subject = subjects::kv_subject(&self.bucket, key);
        if !self.direct {
            let last = crate::ordered::last_message(&self.js, &self.stream, &subject)
                .await
                .map_err(|e| self.other(key, e))?;
            let Some(m) = last else { return Ok(None) };
            let info = m.info().map_err(|e| self.other(key, e))?;
            return Ok(Some(Entry {
                key: key.into(),
                revision: info.stream_sequence,
                op: op_from_headers(m.headers.as_ref()),
                value: m.payload.clone(),
            }));
        }
        match self.stream.direct_get_last_for_subject(&subject).await {
            Ok(m) => Ok(Some(Entry {
                key: key.into(),
                revision: m.sequence,
                op: op_from_headers(Some(&m.headers)),
                value: m.payload,
            })),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(self.other(key, e)),
        }
    }

    /// The key's value and revision, or `None` if it holds none.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        Ok(self.last(key).await?.filter(|e| e.op == KvOp::Put))
    }

    /// Watches keys matching `filter` (a KV key pattern such as `w1.>`):
    /// first the last entry of every matching key, then [`KvEvent::Synced`],
    /// then every change as it happens.
    pub async fn watch(&self, filter: &str) -> Result<KvWatcher, KvError> {
        self.watch_from(filter, DeliverPolicy::LastPerSubject).await
    }

    async fn watch_from(
        &self,
        filter: &str,
        deliver_policy: DeliverPolicy,
    ) -> Result<KvWatcher, KvError> {
        let mut watcher = KvWatcher {
            js: self.js.clone(),
            stream: self.stream.clone(),
            bucket: self.bucket.clone(),
            filter: subjects::kv_subject(&self.bucket, filter),
            first_policy: deliver_policy,
            messages: None,
            next: None,
            announce_synced: false,
            synced: false,
            resume: Resumption::new(),
        };
        watcher.open().await?;
        Ok(watcher)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOp {
    Put,
    Delete,
    /// Purged by a client.
    Purge,
    /// The key's TTL (or the bucket's max age) ran out.
    Expired,
}

fn op_from_headers(headers: Option<&HeaderMap>) -> KvOp {
    let Some(h) = headers else {
        return KvOp::Put;
    };
    if let Some(reason) = h.get(header::NATS_MARKER_REASON) {
        return match reason.as_str() {
            "MaxAge" => KvOp::Expired,
            "Remove" => KvOp::Delete,
            _ => KvOp::Purge,
        };
    }
    match h.get("KV-Operation").map(|v| v.as_str()) {
        Some("DEL") => KvOp::Delete,
        Some("PURGE") => KvOp::Purge,
        _ => KvOp::Put,
    }
}

/// The `Nats-TTL` an entry was written with: seconds, or a Go duration
/// such as `30s` or `1m30s`.
fn ttl_from_headers(headers: Option<&HeaderMap>) -> Option<Duration> {
    let v = headers?.get(header::NATS_MESSAGE_TTL)?.as_str().trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<gpufleet_schema::Dur>().ok().map(|d| d.0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub revision: u64,
    pub op: KvOp,
    pub value: Bytes,
}

#[derive(Debug, Clone)]
pub struct KvChange {
    pub key: String,
    pub revision: u64,
    pub op: KvOp,
    /// The entry's own TTL (`Nats-TTL`), if it was written with one.
    pub ttl: Option<Duration>,
    pub value: Bytes,
    pub published: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub enum KvEvent {
    Change(KvChange),
    /// Every entry that existed when the watch began has been delivered;
    /// said again when the watch has resumed after a failure and caught up.
    Synced,
}

pub struct KvWatcher {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    bucket: String,
    /// The subject filter of the watched keys.
    filter: String,
    /// How the first consumer starts; later ones resume after `next`.
    first_policy: DeliverPolicy,
    /// `None` after the consumer failed, until the next is created.
    messages: Option<OrderedMessages>,
    /// The revision to resume from: every earlier change on our keys has
    /// been handed out. `None` before the first.
    next: Option<u64>,
    /// Synced must be announced before the next change.
    announce_synced: bool,
    synced: bool,
    resume: Resumption,
}

impl KvWatcher {
    async fn open(&mut self) -> Result<(), KvError> {
        let policy = match self.next {
            Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            None => self.first_policy,
        };
        let filters = [self.filter.clone()];
        let (messages, pending) = OrderedMessages::open(&self.js, &self.stream, &filters, policy)
            .await
            .map_err(|message| self.error(message))?;
        // In sync again after a failure: said at once if nothing is
        // pending, else after the last pending change.
        if self.resume.failed {
            self.synced = false;
        }
        if !self.synced && pending == 0 {
            self.synced = true;
            self.announce_synced = true;
        }
        self.messages = Some(messages);
        Ok(())
    }

    fn error(&self, message: String) -> KvError {
        KvError::Other {
            bucket: self.bucket.clone(),
            key: String::new(),
            message,
        }
    }

    /// How many times a new consumer was tried after one failed.
    pub fn restarts(&self) -> u64 {
        self.resume.restarts
    }

    /// The next change. An error says the watch's consumer failed (its
    /// server node died, its stream lost its leader, a message was lost);
    /// the watch goes on, and the next call resumes just after the last
    /// change handed out, after a pause that grows while failures go on.
    /// Never `None`.
    pub async fn next(&mut self) -> Option<Result<KvEvent, KvError>> {
        loop {
            if self.announce_synced {
                self.announce_synced = false;
                return Some(Ok(KvEvent::Synced));
            }
            if self.messages.is_none() {
                self.resume.before_reopen().await;
                if let Err(e) = self.open().await {
                    self.resume.failed = true;
                    return Some(Err(e));
                }
                continue;
            }
            let msg = match next_in(&mut self.messages).await {
                Ok(m) => m,
                Err(message) => {
                    self.resume.failed = true;
                    return Some(Err(self.error(message)));
                }
            };
            let info = match msg.info() {
                Ok(i) => i,
                Err(e) => {
                    self.messages = None;
                    self.resume.failed = true;
                    return Some(Err(self.error(e.to_string())));
                }
            };
            let (revision, pending, published) =
                (info.stream_sequence, info.pending, info.published);
            if self.next.is_some_and(|n| revision < n) {
                continue;
            }
            self.next = Some(revision + 1);
            self.resume.delivered();
            if !self.synced && pending == 0 {
                self.synced = true;
                self.announce_synced = true;
            }
            let key = subjects::kv_key(&self.bucket, msg.subject.as_str())
                .unwrap_or_default()
                .to_string();
            let headers = msg.headers.as_ref();
            return Some(Ok(KvEvent::Change(KvChange {
                key,
                revision,
                op: op_from_headers(headers),
                ttl: ttl_from_headers(headers),
                value: msg.payload.clone(),
                published,
            })));
        }
    }
}
