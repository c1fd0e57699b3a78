//! Connects the engine to NATS: restores state, runs the watchers that feed
//! it (owned: if one stops, the coordinator stops), gives it the time, and
//! carries out its effects in batches.
//!
//! One loop owns the engine. It takes every input that is waiting (up to a
//! bound), lets the engine decide, then writes everything the batch decided
//! at once: job records, reservations and state events are published
//! together and their acks awaited together (group commit). Replies that
//! promise durability (a submit) go out only after their record's ack.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use gpufleet_natsutil::{ensure_stores, KvEvent, KvOp, RawKv};
use gpufleet_schema::api::code;
use gpufleet_schema::{codec, subjects, Event, EventKind, JobId, Lease, WorkerAdvert, WorkerId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::CoordinatorConfig;
use crate::engine::{Effects, Engine, Feed, Input, LeaseChange, Now, Reply};
use crate::metrics::{Metrics, WriteKind, Writes};
use crate::state::JobRecord;

/// Inputs handled per batch at most, so that effects flow out steadily.
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Connect(#[from] gpufleet_natsutil::ConnectError),
    #[error(transparent)]
    Store(#[from] gpufleet_natsutil::stores::StoreError),
    #[error(transparent)]
    Kv(#[from] gpufleet_natsutil::KvError),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("another coordinator has taken over the fleet (this one was cut off or frozen past leader_ttl)")]
    Replaced,
    #[error("the {feeder} stopped ({why}); the coordinator cannot go on without its input")]
    FeederStopped { feeder: &'static str, why: String },
}

struct Io {
    js: jetstream::Context,
    jobs: RawKv,
    leases: RawKv,
    /// Purge markers of released leases live this long.
    marker_ttl: Duration,
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    tokio::pin!(shutdown);
    cfg.validate().map_err(CoordinatorError::Config)?;
    let client = gpufleet_natsutil::connect(
        &cfg.nats_url,
        &cfg.auth(),
        "gpufleet-coordinator",
        cfg.connect_patience.0,
    )
    .await?;
    let js = jetstream::new(client.clone());
    let stores = ensure_stores(&js, &cfg.setup()).await?;
    let io = Io {
        js: js.clone(),
        jobs: RawKv::open(&js, subjects::JOBS_BUCKET).await?,
        leases: RawKv::open(&js, subjects::LEASES_BUCKET).await?,
        marker_ttl: Duration::from_secs(60),
    };

    // The engine's inputs. Made before leadership, so that a scrape of a
    // standby has somewhere to ask; its engine answers once it leads.
    let (tx, mut rx) = mpsc::channel::<Input>(16_384);
    let metrics = Metrics::default();
    // Served by standbys too: `gpufleet_coordinator_leader` tells them apart.
    let metrics_server = gpufleet_natsutil::metrics::serve_or_warn(
        cfg.metrics_addr,
        metrics.registry(),
        Some(observe(tx.clone())),
    )
    .await;

    let workers_kv = RawKv::open(&js, subjects::WORKERS_BUCKET).await?;
    let instance = JobId::generate().to_string();
    let mut leadership = tokio::select! {
        l = crate::leader::acquire(workers_kv.clone(), &instance, cfg.leader_ttl.0) => l?,
        // A standby asked to stop stops.
        _ = &mut shutdown => return Ok(()),
    };
    metrics.leading(true);

    let mut engine = Engine::new(cfg.clone(), now(), random_seed()).with_metrics(metrics.clone());
    let restored = restore(&io.jobs, &mut engine).await?;
    tracing::info!(
        jobs = restored,
        after_seq = engine.applied_seq(),
        "restored job records"
    );

    let mut feeders = Feeders::default();
    feeders.spawn(
        "worker adverts watch",
        forward_kv(workers_kv, Feed::Workers, tx.clone(), advert_input),
    );
    feeders.spawn(
        "leases watch",
        forward_kv(io.leases.clone(), Feed::Leases, tx.clone(), lease_input),
    );
    feeders.spawn(
        "results follower",
        follow_results(
            js.clone(),
            stores.events.clone(),
            engine.applied_seq(),
            tx.clone(),
        ),
    );
    feeders.spawn("ticker", ticker(cfg.tick.0, tx.clone()));

    let mut service = None;
    let mut last_checkpoint = engine.applied_seq();
    let mut replaced = false;
    let mut failed = None;
    loop {
        // A pass cut short by its budget goes on at once; otherwise wait
        // for something to happen.
        let first = if engine.schedule_pending() {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = leadership.lost() => {
                    replaced = true;
                    break;
                }
                stopped = feeders.stopped() => {
                    tracing::error!(error = %stopped, "stopping the coordinator");
                    failed = Some(stopped);
                    break;
                }
                input = rx.recv() => match input {
                    Some(i) => Some(i),
                    None => break,
                },
            }
        };
        // One reading of the clock per batch: a batch takes microseconds.
        let batch_now = now();
        if let Some(first) = first {
            engine.handle(first, batch_now);
        }
        let mut n = 1;
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => {
                    engine.handle(i, batch_now);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        engine.metrics().batch(rx.len());
        engine.schedule_if_needed(batch_now);
        if engine.is_ready() && service.is_none() {
            service = Some(
                crate::api::start(
                    client.clone(),
                    tx.clone(),
                    engine.metrics(),
                    metrics_server.as_ref().map(|s| s.addr()),
                )
                .await
                .map_err(|e| CoordinatorError::Nats(e.to_string()))?,
            );
            tracing::info!("coordinator ready: serving the gpufleet API");
        }
        let fx = engine.take_effects();
        if !fx.is_empty() {
            let feedback = execute(fx, &engine, &io, &mut last_checkpoint).await;
            let after = now();
            for input in feedback {
                engine.handle(input, after);
            }
        }
    }
    if let Some(s) = service {
        let _ = s.stop().await;
    }
    if replaced {
        // Another coordinator leads now: writing anything more could undo
        // what it decides.
        return Err(CoordinatorError::Replaced);
    }
    // Whatever the last batch decided is written before we go.
    let fx = engine.take_effects();
    if !fx.is_empty() {
        execute(fx, &engine, &io, &mut last_checkpoint).await;
    }
    // Handing the fleet over at once lets a standby take it over without
    // waiting for leader_ttl, also when a feeder failed.
    leadership.release().await;
    // Without NATS there is nothing to flush to; do not wait for it.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    if let Some(e) = failed {
        return Err(e);
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The tasks that feed the engine its inputs. None of them may end while
/// the coordinator runs: one that stops (or panics) would silently starve
/// the engine of results, leases or ticks while it keeps leading, so its
/// end stops the coordinator with an error naming it. Dropping the set
/// stops them all.
#[derive(Default)]
struct Feeders {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Feeders {
    fn spawn(&mut self, name: &'static str, feeder: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(feeder).id();
        self.names.insert(id, name);
    }

    /// Waits until a feeder ends; returns why, naming it. Never resolves
    /// while all of them run (or if there are none).
    async fn stopped(&mut self) -> CoordinatorError {
        let Some(ended) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, why) = match ended {
            Ok((id, ())) => (id, "it returned".to_string()),
            Err(e) if e.is_panic() => {
                let id = e.id();
                let payload = e.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                (id, format!("it panicked: {msg}"))
            }
            Err(e) => (e.id(), "it was cancelled".to_string()),
        };
        CoordinatorError::FeederStopped {
            feeder: self.names.get(&id).copied().unwrap_or("unnamed"),
            why,
        }
    }
}

/// Before each scrape: the engine sets its state-derived gauges. A scrape
/// of a standby, or of a leader too busy to answer in time, is served the
/// figures as they were (`natsutil::metrics::REFRESH_WAIT`).
fn observe(tx: mpsc::Sender<Input>) -> gpufleet_natsutil::metrics::Refresh {
    Arc::new(move || {
        let tx = tx.clone();
        Box::pin(async move {
            let (done, answered) = oneshot::channel();
            // Never queue behind a full channel: the scrape can wait, the
            // engine's inputs cannot.
            if tx.try_send(Input::Observe(done)).is_ok() {
                let _ = answered.await;
            }
        })
    })
}

/// The engine's time: it reads no clock of its own.
fn now() -> Now {
    Now {
        mono: std::time::Instant::now(),
        wall: time::OffsetDateTime::now_utc(),
    }
}

/// A seed for the engine's random choices, from the std hasher's
/// per-process random keys.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Loads every job record and the events checkpoint.
async fn restore(jobs: &RawKv, engine: &mut Engine) -> Result<usize, CoordinatorError> {
    let mut watch = jobs.watch(">").await?;
    let mut n = 0;
    loop {
        match watch.next().await {
            Some(Ok(KvEvent::Synced)) | None => break,
            Some(Ok(KvEvent::Change(c))) if c.op == KvOp::Put => {
                if c.key == subjects::CHECKPOINT_KEY {
                    let seq = std::str::from_utf8(&c.value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    engine.restore_checkpoint(seq);
                    continue;
                }
                match codec::decode::<JobRecord>(&c.value) {
                    Ok(job) => {
                        engine.restore_job(job);
                        n += 1;
                    }
                    Err(e) => {
                        tracing::error!(key = %c.key, error = %e, "skipping an unreadable job record")
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Writes what one batch decided; returns inputs for the engine about
/// writes that failed.
async fn execute(fx: Effects, engine: &Engine, io: &Io, last_checkpoint: &mut u64) -> Vec<Input> {
    let Effects {
        put_jobs,
        create_leases,
        cancel_leases,
        purge_leases,
        events,
        replies,
        checkpoint,
    } = fx;
    let started = std::time::Instant::now();
    let metrics = &engine.metrics();
    let mut writes = Writes {
        job: put_jobs.len() as u64,
        lease: (create_leases.len() + cancel_leases.len() + purge_leases.len()) as u64,
        event: events.len() as u64,
        checkpoint: 0,
    };
    let records: Vec<(JobId, Result<Vec<u8>, String>)> = put_jobs
        .into_iter()
        .filter_map(|id| {
            let job = engine.job(&id)?;
            Some((id, codec::encode(job).map_err(|e| e.to_string())))
        })
        .collect();

    let job_writes = join_all(records.into_iter().map(|(id, bytes)| async move {
        let r = match bytes {
            Ok(b) => timed(
                metrics,
                WriteKind::Job,
                io.jobs.put(id.as_str(), Bytes::from(b), None),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        (id, r)
    }));
    let lease_creates = join_all(create_leases.into_iter().map(|(key, lease)| async move {
        let r = match codec::encode(&lease) {
            Ok(b) => timed(
                metrics,
                WriteKind::Lease,
                io.leases.create(
                    &key,
                    Bytes::from(b),
                    Some(lease_ttl_for_reservation(engine)),
                ),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        (key, r)
    }));
    let lease_cancels = join_all(
        cancel_leases
            .into_iter()
            .map(|(key, lease, rev)| async move {
                let ttl = lease.lease_ttl.0;
                if let Ok(b) = codec::encode(&lease) {
                    // Losing the race to a renewal is fine: the next tick sees the
                    // new revision and the cancel is asked again by the engine.
                    let update = io.leases.update(&key, Bytes::from(b), Some(ttl), rev);
                    if let Err(e) = timed(metrics, WriteKind::Lease, update).await {
                        tracing::info!(key, error = %e, "cancel of a lease did not apply");
                    }
                }
            }),
    );
    let purges = join_all(purge_leases.into_iter().map(|key| async move {
        if let Err(e) = timed(
            metrics,
            WriteKind::Lease,
            io.leases.purge(&key, io.marker_ttl),
        )
        .await
        {
            tracing::warn!(key, error = %e, "could not purge a lease");
        }
    }));
    let publishes = join_all(events.into_iter().map(|(subject, event)| async move {
        timed(
            metrics,
            WriteKind::Event,
            publish_event(&io.js, subject, &event),
        )
        .await;
    }));
    // `join!` polls in order, and the first poll of each write sends it:
    // state events go on the wire before the reservations they announce, so
    // a worker's RUNNING (sent only after it sees the reservation) is not
    // stored ahead of the coordinator's RESERVED.
    let (_, job_results, create_results, _, _) =
        tokio::join!(publishes, job_writes, lease_creates, lease_cancels, purges);

    let mut failed_jobs: HashMap<JobId, String> = HashMap::new();
    for (id, r) in job_results {
        if let Err(e) = r {
            tracing::error!(job_id = %id, error = %e, "could not write a job record");
            failed_jobs.insert(id, e);
        }
    }
    let mut feedback = Vec::new();
    for (key, r) in create_results {
        if let Err(error) = r {
            tracing::warn!(key, error = %error, "could not create a reservation");
            feedback.push(Input::LeaseCreateFailed { key, error });
        }
    }
    for (tx, reply, depends_on) in replies {
        let reply = match depends_on.and_then(|id| failed_jobs.get(&id).cloned()) {
            Some(e) => Reply::error(
                code::UNAVAILABLE,
                format!("the job could not be stored, try again: {e}"),
            ),
            None => reply,
        };
        let _ = tx.send(reply);
    }
    if failed_jobs.is_empty() {
        if let Some(seq) = checkpoint.filter(|s| *s > *last_checkpoint) {
            let put = io
                .jobs
                .put(subjects::CHECKPOINT_KEY, Bytes::from(seq.to_string()), None);
            match timed(metrics, WriteKind::Checkpoint, put).await {
                Ok(_) => {
                    *last_checkpoint = seq;
                    writes.checkpoint = 1;
                }
                Err(e) => tracing::warn!(error = %e, "could not write the events checkpoint"),
            }
        }
    }
    for id in failed_jobs.into_keys() {
        feedback.push(Input::Persist(id));
    }
    engine.metrics().flush(started.elapsed(), writes);
    feedback
}

/// Awaits one JetStream write (to its ack), counting how long it took.
async fn timed<T>(metrics: &Metrics, kind: WriteKind, write: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let r = write.await;
    metrics.write(kind, started.elapsed());
    r
}

fn lease_ttl_for_reservation(engine: &Engine) -> Duration {
    engine.config().reservation_ttl.0
}

async fn publish_event(js: &jetstream::Context, subject: String, event: &Event) {
    let Ok(body) = codec::encode(event) else {
        return;
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(codec::CONTENT_TYPE, codec::MSGPACK);
    match js.publish_with_headers(subject, headers, body.into()).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "a state event was not stored");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not publish a state event"),
    }
}

/// Forwards every change of a bucket to the engine, mapped by `map`, and
/// says `feed` once the changes that existed at the start are through.
async fn forward_kv(
    kv: RawKv,
    feed: Feed,
    tx: mpsc::Sender<Input>,
    map: impl Fn(gpufleet_natsutil::KvChange) -> Option<Input>,
) {
    let mut announced = false;
    loop {
        let mut watch = match kv.watch(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(bucket = kv.bucket(), error = %e, "cannot watch; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = watch.next().await {
            let input = match item {
                Ok(KvEvent::Synced) if !announced => {
                    announced = true;
                    Input::Synced(feed)
                }
                Ok(KvEvent::Synced) => continue,
                Ok(KvEvent::Change(c)) => match map(c) {
                    Some(i) => i,
                    None => continue,
                },
                Err(e) => {
                    tracing::warn!(bucket = kv.bucket(), error = %e, "watch error");
                    continue;
                }
            };
            if tx.send(input).await.is_err() {
                return;
            }
        }
    }
}

fn advert_input(c: gpufleet_natsutil::KvChange) -> Option<Input> {
    if crate::leader::is_leader_key(&c.key) {
        return None;
    }
    match c.op {
        KvOp::Put => match codec::decode::<WorkerAdvert>(&c.value) {
            Ok(a) => Some(Input::Advert(Box::new(a))),
            Err(e) => {
                tracing::warn!(key = %c.key, error = %e, "ignoring an unreadable worker advert");
                None
            }
        },
        _ => WorkerId::new(c.key).ok().map(Input::WorkerGone),
    }
}

fn lease_input(c: gpufleet_natsutil::KvChange) -> Option<Input> {
    let change = match c.op {
        KvOp::Put => match codec::decode::<Lease>(&c.value) {
            Ok(lease) => LeaseChange::Put {
                key: c.key,
                rev: c.revision,
                lease: Box::new(lease),
            },
            Err(e) => {
                tracing::warn!(key = %c.key, error = %e, "ignoring an unreadable lease");
                return None;
            }
        },
        KvOp::Expired => LeaseChange::Expired { key: c.key },
        KvOp::Purge | KvOp::Delete => LeaseChange::Released { key: c.key },
    };
    Some(Input::Lease(change))
}

/// Follows result events from just after `after`, so that a restarted
/// coordinator replays what it had not yet stored.
async fn follow_results(
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    after: u64,
    tx: mpsc::Sender<Input>,
) {
    let mut next = after + 1;
    let mut announced = false;
    loop {
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: js.client().new_inbox(),
                filter_subject: subjects::events_of_kind(EventKind::Result),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow results; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if consumer.cached_info().num_pending == 0 && !announced {
            announced = true;
            let _ = tx.send(Input::Synced(Feed::Events)).await;
        }
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow results; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    // Never poll a failed ordered consumer again (see
                    // natsutil's KvWatcher): start a new one after `next`.
                    tracing::warn!(error = %e, "results stream error; following again");
                    break;
                }
            };
            let Ok(info) = m.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            next = seq + 1;
            match codec::decode::<Event>(&m.payload) {
                Ok(event) => {
                    if tx
                        .send(Input::Result {
                            seq,
                            event: Box::new(event),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(subject = %m.subject, error = %e, "ignoring an unreadable result")
                }
            }
            if pending == 0 && !announced {
                announced = true;
                let _ = tx.send(Input::Synced(Feed::Events)).await;
            }
        }
    }
}

async fn ticker(every: Duration, tx: mpsc::Sender<Input>) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if tx.send(Input::Tick).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_feeder_that_panics_stops_the_coordinator_naming_it() {
        let mut feeders = Feeders::default();
        feeders.spawn("ticker", std::future::pending());
        feeders.spawn("results follower", async { panic!("decoder blew up") });
        let stopped = tokio::time::timeout(DEADLINE, feeders.stopped())
            .await
            .expect("a feeder's panic went unnoticed");
        let CoordinatorError::FeederStopped { feeder, why } = &stopped else {
            panic!("{stopped}");
        };
        assert_eq!(*feeder, "results follower");
        assert_eq!(why, "it panicked: decoder blew up");
        assert!(stopped
            .to_string()
            .starts_with("the results follower stopped"));
    }

    #[tokio::test]
    async fn a_feeder_that_returns_stops_the_coordinator_too() {
        let mut feeders = Feeders::default();
        feeders.spawn("leases watch", async {});
        let stopped = tokio::time::timeout(DEADLINE, feeders.stopped())
            .await
            .expect("a feeder's end went unnoticed");
        assert!(
            matches!(&stopped, CoordinatorError::FeederStopped { feeder: "leases watch", why } if why == "it returned"),
            "{stopped}"
        );
    }

    #[tokio::test]
    async fn running_feeders_are_not_reported() {
        let mut feeders = Feeders::default();
        feeders.spawn("ticker", std::future::pending());
        tokio::task::yield_now().await;
        let stopped = futures::FutureExt::now_or_never(feeders.stopped());
        assert!(
            stopped.is_none(),
            "a running feeder was reported as stopped"
        );
    }
}
