//! Connects the engine to NATS: restores state, runs the tasks that feed it
//! (owned: if one stops, the coordinator stops), gives it the time, and
//! carries out its effects in batches.
//!
//! One loop owns the engine. It takes every input that is waiting (up to a
//! bound), lets the engine decide, then writes everything the batch decided
//! at once: job records, reservations and state events are published
//! together and their acks awaited together (group commit). Replies that
//! promise durability (a submit) go out only after their record's ack.
//!
//! A batch writes in up to three stages, each waiting for the one before:
//! 1. job records, and the reservations and events of jobs already stored;
//! 2. the reservations and events of jobs stored in stage 1 (nothing of a
//!    job runs before its record is stored: a submit whose record cannot
//!    be written is answered 503 and forgotten), and removals of records
//!    (a reopened job's done record once its active one is stored);
//! 3. the checkpoint, when nothing of the above failed.
//!
//! Active records of unfinished jobs are written again before their TTL
//! ends, a few per batch (`store::Written`), so that a finished job's
//! expires without a write (see `store.rs`).
//!
//! The loop also fences itself: it writes nothing while its leadership is
//! not recently confirmed (see `leader.rs`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::join_all;
use gpufleet_natsutil::events::{self, Replay, ReplayEvent, Until};
use gpufleet_natsutil::{create_stores, Backoff, KvEvent, KvOp, RawKv};
use gpufleet_schema::api::code;
use gpufleet_schema::api::MAX_TASKS_PER_PAGE;
use gpufleet_schema::subjects::JobRecordSet;
use gpufleet_schema::{
    codec, subjects, Event, EventKind, JobId, JobSpec, JobState, Lease, UserId, WorkerAdvert,
    WorkerId,
};
use nkeys::KeyPair;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::CoordinatorConfig;
use crate::engine::{
    Caller, Effects, Engine, Feed, Fetch, Input, LeaseChange, Now, Reply, PART_BUDGET,
};
use crate::metrics::{Metrics, WriteKind, Writes};
use crate::state::JobRecord;
use crate::store;

/// Inputs handled per batch at most, so that effects flow out steadily.
const MAX_BATCH: usize = 4096;

/// How many stream messages before the last a start-up looks through for
/// recently finished jobs to list.
const RECENT_SCAN: u64 = 20_000;

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
    #[error("the {feeder} stopped ({why}); the coordinator cannot go on without it")]
    FeederStopped { feeder: &'static str, why: String },
}

struct Io {
    js: jetstream::Context,
    jobs: RawKv,
    leases: RawKv,
    events: jetstream::stream::Stream,
    artifacts: jetstream::stream::Stream,
    /// Signs every reservation, when set (`signing_key`).
    signer: Option<KeyPair>,
    /// Purge markers of released leases and moved records live this long.
    marker_ttl: Duration,
    /// The TTL of done records, if the bucket allows per-message TTLs.
    retention: Option<Duration>,
    /// The TTL of active records, likewise: without it, a finished job's
    /// active record is removed once its done record is stored.
    active_ttl: Option<Duration>,
}

/// What the runtime remembers of the stored records between batches.
struct Records {
    /// Each part of each unfinished job as last stored.
    written: store::Written,
    /// Active record keys still to remove, with the job whose move they
    /// finish (none for leftovers found at start).
    purges: Vec<(Option<JobId>, Vec<String>)>,
    last_checkpoint: u64,
    /// Keys of records an earlier version wrote, removed once their job is
    /// written anew.
    legacy: HashMap<JobId, String>,
    /// Finished jobs reopened by a retry whose active record is not stored
    /// yet, with how many parts their done record has.
    reopened: HashMap<JobId, usize>,
}

impl Records {
    fn new(active_ttl: Option<Duration>) -> Self {
        Records {
            written: store::Written::new(active_ttl),
            purges: Vec::new(),
            last_checkpoint: 0,
            legacy: HashMap::new(),
            reopened: HashMap::new(),
        }
    }
}

/// Active records renewed per batch at most, so that renewals never
/// crowd out a batch's own writes.
const MAX_RENEWALS: usize = 256;

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    tokio::pin!(shutdown);
    cfg.validate().map_err(CoordinatorError::Config)?;
    let signer = cfg.signing_key().map_err(CoordinatorError::Config)?;
    let client = gpufleet_natsutil::connect(
        &cfg.nats_url,
        &cfg.auth(),
        "gpufleet-coordinator",
        cfg.connect_patience.0,
    )
    .await?;
    let js = jetstream::new(client.clone());
    let (stores, differences) = create_stores(&js, &cfg.setup()).await?;
    for d in &differences {
        tracing::warn!("a store differs from the settings (stores are never changed; change it with `nats stream edit`, or the setting): {d}");
    }
    let jobs = RawKv::open(&js, subjects::JOBS_BUCKET).await?;
    let msg_ttl = js
        .get_stream(subjects::kv_stream(subjects::JOBS_BUCKET))
        .await
        .map(|s| s.cached_info().config.allow_message_ttl)
        .unwrap_or(false);
    if !msg_ttl {
        tracing::warn!("gpufleet-jobs does not allow per-message TTLs: finished jobs are kept until deleted (job_retention does not apply)");
    }
    let io = Io {
        js: js.clone(),
        jobs,
        leases: RawKv::open(&js, subjects::LEASES_BUCKET).await?,
        events: stores.events.clone(),
        artifacts: stores.artifacts.clone(),
        signer,
        marker_ttl: Duration::from_secs(60),
        retention: msg_ttl.then_some(cfg.job_retention.0),
        active_ttl: msg_ttl.then_some(cfg.active_record_ttl.0),
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
        l = crate::leader::acquire(io.jobs.clone(), &instance, cfg.leader_ttl.0) => l?,
        // A standby asked to stop stops.
        _ = &mut shutdown => return Ok(()),
    };
    metrics.leading(true);

    let mut engine = Engine::new(cfg.clone(), now(), random_seed()).with_metrics(metrics.clone());
    if !leadership.follows_a_leader() {
        engine.no_predecessor(gpufleet_natsutil::stores::MARKER_TTL);
    }
    let max_payload = client.server_info().max_payload;
    engine.set_part_budget(PART_BUDGET.min(max_payload / 2));
    if let Some(policy) = crate::policy::read(&io.jobs).await {
        engine.set_policy(Some(policy));
    }
    let started = std::time::Instant::now();
    let mut records = Records::new(io.active_ttl);
    let restored = restore(&io, &mut engine, &mut records).await?;
    records.last_checkpoint = engine.applied_seq();
    tracing::info!(
        jobs = restored,
        after_seq = engine.applied_seq(),
        took = ?started.elapsed(),
        "restored the unfinished jobs"
    );

    let mut feeders = Feeders::default();
    feeders.spawn(
        "worker adverts watch",
        forward_kv(workers_kv, Feed::Workers, tx.clone(), advert_input),
    );
    feeders.spawn(
        "leases watch",
        forward_kv(io.leases.clone(), Feed::Leases, tx.clone(), {
            let ours = own_key(&io.signer);
            move |c| lease_input(c, ours.as_ref())
        }),
    );
    feeders.spawn(
        "results follower",
        follow_results(js.clone(), engine.applied_seq(), tx.clone()),
    );
    feeders.spawn("ticker", ticker(cfg.tick.0, tx.clone()));
    feeders.spawn(
        "scheduling policy watch",
        crate::policy::follow(io.jobs.clone(), tx.clone()),
    );
    feeders.spawn(
        "messages follower",
        follow_messages(js.clone(), stores.events.clone(), tx.clone()),
    );
    feeders.spawn(
        "alive responder",
        crate::alive::serve(client.clone(), tx.clone(), leadership.tenure(), cfg.roles),
    );
    let (post_tx, post_rx) = mpsc::channel(POSTS_WAITING);
    feeders.spawn("postman", crate::post::run(client.clone(), post_rx));
    // Reads of jobs the engine no longer holds; each ends with an input
    // for the engine, or none.
    let mut fetches: JoinSet<Option<Input>> = JoinSet::new();

    let mut service = None;
    let mut replaced = false;
    let mut failed = None;
    loop {
        // A pass cut short by its budget goes on at once; otherwise wait
        // for something to happen (or a retry's pause to end).
        let wake = [engine.next_wakeup(), records.written.next_due()]
            .into_iter()
            .flatten()
            .min()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
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
                Some(done) = fetches.join_next(), if !fetches.is_empty() => {
                    match done {
                        Ok(input) => input,
                        Err(e) => {
                            tracing::error!(error = %e, "a read of a stored job failed");
                            None
                        }
                    }
                }
                input = rx.recv() => match input {
                    Some(i) => Some(i),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => Some(Input::Wake),
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
            let (s, endpoints) = crate::api::start(
                client.clone(),
                tx.clone(),
                engine.metrics(),
                access(&cfg),
                &instance,
                metrics_server.as_ref().map(|s| s.addr()),
            )
            .await
            .map_err(|e| CoordinatorError::Nats(e.to_string()))?;
            for (name, task) in endpoints {
                feeders.spawn(name, task);
            }
            service = Some(s);
            tracing::info!(took = ?started.elapsed(), "coordinator ready: serving the gpufleet API");
        }
        let mut fx = engine.take_effects();
        fx.put_jobs
            .extend(records.written.due(std::time::Instant::now(), MAX_RENEWALS));
        // Handed over after this batch's events (their audit) are stored.
        let posts = std::mem::take(&mut fx.posts);
        for (job, caller, fetch) in std::mem::take(&mut fx.fetches) {
            fetches.spawn(fetch_stored(
                io.jobs.clone(),
                io.retention,
                [io.events.clone(), io.artifacts.clone()],
                job,
                caller,
                fetch,
            ));
        }
        if fx.is_empty() && records.purges.is_empty() {
            hand_over(&post_tx, posts);
            continue;
        }
        // Nothing is written unless we still lead (a frozen process wakes
        // up here with stale decisions).
        if !leadership.holds(tokio::time::Instant::now()) && !leadership.confirm().await {
            replaced = true;
            break;
        }
        let feedback = execute(fx, &engine, &io, &mut records).await;
        hand_over(&post_tx, posts);
        let after = now();
        for input in feedback {
            engine.handle(input, after);
        }
        engine.metrics().held(engine.jobs_in_memory());
    }
    if let Some(s) = service {
        s.stop().await;
    }
    // Promises no more (the alive responder is one of them) before the
    // leadership can pass to another, who would not know of them.
    drop(feeders);
    if replaced {
        // Another coordinator leads now: writing anything more could undo
        // what it decides.
        return Err(CoordinatorError::Replaced);
    }
    // Whatever the last batch decided is written before we go.
    let fx = engine.take_effects();
    if !fx.is_empty() {
        execute(fx, &engine, &io, &mut records).await;
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

/// The tasks that feed the engine its inputs or serve its API. None of
/// them may end while the coordinator runs: one that stops (or panics)
/// would silently starve the engine of results, leases or ticks, or leave
/// an endpoint unanswered, while it keeps leading; so its end stops the
/// coordinator with an error naming it. Dropping the set stops them all.
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

fn access(cfg: &CoordinatorConfig) -> crate::api::Access {
    crate::api::Access {
        roles: cfg.roles,
        admins: cfg.admins.iter().cloned().collect(),
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

/// Awaits one JetStream write (to its ack), counting how long it took.
async fn timed<T>(metrics: &Metrics, kind: WriteKind, write: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let r = write.await;
    metrics.write(kind, started.elapsed());
    r
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
    use std::hash::BuildHasher;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Reads every entry of `kv` on `filter` that exists now.
async fn read_all(
    kv: &RawKv,
    filter: &str,
    mut each: impl FnMut(gpufleet_natsutil::KvChange),
) -> Result<(), CoordinatorError> {
    let mut watch = kv.watch(filter).await?;
    loop {
        match watch.next().await {
            Some(Ok(KvEvent::Synced)) | None => return Ok(()),
            Some(Ok(KvEvent::Change(c))) => each(c),
            Some(Err(e)) => tracing::warn!(error = %e, "reading the job records; resuming"),
        }
    }
}

/// Loads the unfinished jobs, the events checkpoint and the newest
/// finished jobs (for `jobs.list`); returns how many jobs it loaded.
///
/// First the done records written since the oldest active record (those
/// that may outdate one: see `store.rs`), then the active records, skipping
/// every one outdated.
async fn restore(
    io: &Io,
    engine: &mut Engine,
    records: &mut Records,
) -> Result<usize, CoordinatorError> {
    if let Some(e) = io.jobs.get(subjects::CHECKPOINT_KEY).await? {
        let seq = std::str::from_utf8(&e.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        engine.restore_checkpoint(seq);
    }

    // Done records since the oldest active record may outdate one; the
    // newest ones are also what `jobs.list` shows.
    let kv_stream = subjects::kv_stream(subjects::JOBS_BUCKET);
    let stream = io
        .js
        .get_stream(&kv_stream)
        .await
        .map_err(|e| CoordinatorError::Nats(e.to_string()))?;
    let end = stream.cached_info().state.last_sequence;
    let active_filter = subjects::kv_subject(subjects::JOBS_BUCKET, &JobRecordSet::Active.all());
    let oldest_active = match stream
        .get_first_raw_message_by_subject(&active_filter, 1)
        .await
    {
        Ok(m) => m.sequence,
        Err(e)
            if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
        {
            end + 1
        }
        Err(e) => return Err(CoordinatorError::Nats(e.to_string())),
    };
    let from = oldest_active.min(end.saturating_sub(RECENT_SCAN)).max(1);
    let filter = subjects::kv_subject(subjects::JOBS_BUCKET, &JobRecordSet::Done.heads());
    let mut replay = Replay::start(&io.js, &kv_stream, vec![filter], from, Until::CaughtUp)
        .await
        .map_err(|e| CoordinatorError::Nats(e.to_string()))?;
    let mut shadows = store::Shadows::default();
    while let Some(r) = replay.next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the finished jobs; resuming");
                continue;
            }
        };
        let Some((_, job, _)) = subjects::kv_key(subjects::JOBS_BUCKET, r.message.subject.as_str())
            .and_then(subjects::parse_job_record_key)
        else {
            continue;
        };
        let removed = r.message.payload.is_empty();
        if r.sequence >= oldest_active {
            shadows.done(job.clone(), r.sequence, removed);
        }
        if removed {
            // Deleted (or expired) since.
            engine.forget_finished(&job);
            continue;
        }
        match store::summary(&r.message.payload) {
            Ok((seq, summary)) => engine.restore_finished(seq, summary),
            Err(e) => {
                tracing::warn!(job_id = %job, error = %e, "skipping an unreadable done record")
            }
        }
    }

    let mut parts = store::Assembler::default();
    // When each job's oldest part was written, to renew it in time.
    let mut written_at: HashMap<JobId, time::OffsetDateTime> = HashMap::new();
    read_all(&io.jobs, &JobRecordSet::Active.all(), |c| {
        if c.op != KvOp::Put {
            return;
        }
        parts.add(&c.key, c.revision, &c.value, &shadows);
        if let Some((_, job, _)) = subjects::parse_job_record_key(&c.key) {
            let oldest = written_at.entry(job).or_insert(c.published);
            *oldest = (*oldest).min(c.published);
        }
    })
    .await?;
    for (key, e) in &parts.unreadable {
        tracing::error!(key, error = %e, "skipping an unreadable job record");
    }
    let assembled = parts.finish(JobRecordSet::Active);
    let mut active: HashMap<JobId, JobRecord> = assembled
        .jobs
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect();
    if !assembled.garbage.is_empty() {
        records.purges.push((None, assembled.garbage));
    }
    let (mono, wall) = (std::time::Instant::now(), time::OffsetDateTime::now_utc());
    for job in active.values() {
        // A record older than this host's clock can go back to has no
        // TTL (an earlier version's): renewing it later is harmless.
        let age = written_at
            .get(&job.id)
            .and_then(|&at| Duration::try_from(wall - at).ok())
            .unwrap_or_default();
        let at = mono.checked_sub(age).unwrap_or(mono);
        records
            .written
            .restored(job.id.clone(), job.parts.len(), at);
    }

    // Records as versions before the active/done split kept them: each is
    // taken in and written anew (finished ones as done).
    let mut legacy = HashMap::new();
    read_all(&io.jobs, subjects::LEGACY_JOB_RECORDS, |c| {
        if c.op != KvOp::Put {
            return;
        }
        match codec::decode::<JobRecord>(&c.value) {
            Ok(mut job) => {
                job.parts = store::plan_parts(&job.spec, PART_BUDGET).unwrap_or_else(|_| vec![0]);
                job.share_specs();
                legacy.insert(job.id.clone(), c.key.clone());
                active.insert(job.id.clone(), job);
            }
            Err(e) => {
                tracing::error!(key = %c.key, error = %e, "skipping an unreadable job record")
            }
        }
    })
    .await?;
    if !legacy.is_empty() {
        tracing::info!(
            jobs = legacy.len(),
            "taking in job records of an earlier version"
        );
    }

    let n = active.len();
    for job in active.into_values() {
        let id = job.id.clone();
        engine.restore_job(job);
        if legacy.contains_key(&id) {
            engine.rewrite(&id);
        }
    }
    records.legacy = legacy;
    Ok(n)
}

fn part_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// One record write: its job, whether it is the job's first, the parts to
/// send (key, bytes, hash) and, for a finished job, the active keys its
/// move removes.
struct RecordWrite {
    job: JobId,
    new: bool,
    finished: bool,
    /// A new job under a client's id (its owner and spec): the id may be a
    /// finished job's.
    verify: Option<(UserId, JobSpec)>,
    parts: Vec<(String, Bytes, u64)>,
    /// For an unfinished job: the hash of every part, to remember, and
    /// which parts are sent.
    hashes: Vec<u64>,
    sent: Vec<bool>,
    /// For a finished job in a bucket without TTLs: its active keys, to
    /// remove once its done record is stored.
    moves: Option<Vec<String>>,
}

/// What the first write of a job whose id was the client's found of a
/// finished job with that id: its owner, spec and status.
type Taken = Option<(UserId, JobSpec, JobState)>;

fn plan_write(
    job: &JobRecord,
    records: &Records,
    io: &Io,
    now: std::time::Instant,
) -> Result<RecordWrite, String> {
    let encoded = store::encode(job)?;
    let finished = job.status.is_finished();
    let set = if finished {
        JobRecordSet::Done
    } else {
        JobRecordSet::Active
    };
    let keys = store::keys(&job.id, encoded.len(), set);
    let mut parts = Vec::new();
    let mut hashes = Vec::new();
    let mut sent = Vec::new();
    for (p, (key, bytes)) in keys.into_iter().zip(encoded).enumerate() {
        let h = part_hash(&bytes);
        hashes.push(h);
        let same = !finished && records.written.same(&job.id, p, h, now);
        sent.push(!same);
        if !same {
            parts.push((key, Bytes::from(bytes), h));
        }
    }
    Ok(RecordWrite {
        job: job.id.clone(),
        new: !job.stored,
        verify: (!job.stored && job.verify).then(|| (job.owner.clone(), job.full_spec())),
        finished,
        parts,
        hashes,
        sent,
        moves: (finished && io.active_ttl.is_none())
            .then(|| store::keys(&job.id, job.parts.len(), JobRecordSet::Active)),
    })
}

/// Writes what one batch decided; returns inputs for the engine about
/// writes that succeeded or failed.
async fn execute(fx: Effects, engine: &Engine, io: &Io, records: &mut Records) -> Vec<Input> {
    let Effects {
        put_jobs,
        create_leases,
        cancel_leases,
        purge_leases,
        events,
        replies,
        fetches: _,
        checkpoint,
        posts: _,
        grant_leases,
        reopened,
    } = fx;
    let started = std::time::Instant::now();
    let metrics = &engine.metrics();
    let mut feedback = Vec::new();
    let mut failed_jobs: HashMap<JobId, String> = HashMap::new();
    let mut plans = Vec::new();
    let planned = std::time::Instant::now();
    for id in put_jobs {
        let Some(job) = engine.job(&id) else {
            records.written.forget(&id);
            continue;
        };
        match plan_write(job, records, io, planned) {
            Ok(p) => plans.push(p),
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "cannot encode a job record");
                failed_jobs.insert(id, e);
            }
        }
    }
    let new: HashSet<JobId> = plans
        .iter()
        .filter(|p| p.new)
        .map(|p| p.job.clone())
        .collect();
    let (later_leases, now_leases): (Vec<_>, Vec<_>) = create_leases
        .into_iter()
        .partition(|(_, l)| new.contains(&l.job_id));
    let (later_events, now_events): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|(_, e)| new.contains(&e.job_id));
    let mut writes = Writes {
        job: plans.iter().map(|p| p.parts.len() as u64).sum(),
        lease: (now_leases.len()
            + later_leases.len()
            + cancel_leases.len()
            + grant_leases.len()
            + purge_leases.len()) as u64,
        event: (now_events.len() + later_events.len()) as u64,
        checkpoint: 0,
    };

    // Stage 1.
    let record_writes = join_all(plans.iter().map(|p| async move {
        let ttl = if p.finished {
            io.retention
        } else {
            io.active_ttl
        };
        let puts = join_all(p.parts.iter().map(|(key, bytes, _)| {
            timed(
                metrics,
                WriteKind::Job,
                io.jobs.put(key, bytes.clone(), ttl),
            )
        }));
        // A client's id is looked up beside the write, not before it: a
        // submit costs one round trip either way.
        let lookup = async {
            match p.verify {
                Some(_) => store::read(&io.jobs, JobRecordSet::Done, &p.job)
                    .await
                    .map(|found| found.map(|j| (j.owner.clone(), j.full_spec(), j.status))),
                None => Ok(None),
            }
        };
        let (sent, taken) = tokio::join!(puts, lookup);
        match sent.into_iter().find_map(|r| r.err()) {
            Some(e) => Err(e.to_string()),
            None => taken.map_err(|e| format!("cannot tell whether the id is taken: {e}")),
        }
    }));
    // `join!` polls in order, and the first poll of each write sends it:
    // state events go on the wire before the reservations they announce, so
    // a worker's RUNNING (sent only after it sees the reservation) is not
    // stored ahead of the coordinator's RESERVED.
    let (_, record_results, mut create_failures, ..) = tokio::join!(
        publish_events(io, metrics, now_events),
        record_writes,
        create_leases_now(io, engine, now_leases),
        update_leases_now(io, metrics, cancel_leases),
        update_leases_now(io, metrics, signed_grants(io, grant_leases)),
        purge_leases_now(io, metrics, purge_leases),
    );

    // What stage 1 stored decides stage 2.
    let mut moves = Vec::new();
    let mut taken: HashMap<JobId, (bool, JobState)> = HashMap::new();
    let mut written = HashSet::new();
    for (plan, result) in plans.into_iter().zip(record_results) {
        let result: Result<Taken, String> = result;
        if result.is_ok() {
            written.insert(plan.job.clone());
        }
        match result {
            Ok(Some((owner, spec, status))) => {
                // The id is a finished job's: the new record goes, nothing
                // of it runs, and its submit is answered from the old job
                // (the same job only if the same user sent the same spec).
                let same = plan.verify == Some((owner, spec));
                taken.insert(plan.job.clone(), (same, status));
                moves.push((None, plan.parts.into_iter().map(|(k, ..)| k).collect()));
                feedback.push(Input::Duplicate(plan.job));
            }
            Ok(None) => {
                if plan.new {
                    feedback.push(Input::Stored(plan.job.clone()));
                }
                if let Some(key) = records.legacy.remove(&plan.job) {
                    moves.push((None, vec![key]));
                }
                if !plan.finished {
                    records
                        .written
                        .stored(&plan.job, &plan.hashes, &plan.sent, planned);
                } else if let Some(keys) = plan.moves {
                    moves.push((Some(plan.job), keys));
                } else {
                    // Its done record is the finish; the active one expires.
                    records.written.forget(&plan.job);
                    feedback.push(Input::Moved(plan.job));
                }
            }
            Err(e) => {
                tracing::error!(job_id = %plan.job, error = %e, "could not write a job record");
                // What was stored of it may differ from what we hold now.
                records.written.forget(&plan.job);
                feedback.push(if plan.new {
                    Input::NotStored(plan.job.clone())
                } else {
                    Input::Persist(plan.job.clone())
                });
                failed_jobs.insert(plan.job, e);
            }
        }
    }
    // A reopened job's done record goes once its active one is stored
    // (a restart would take the active one for the leftover of a move).
    // (Until then it waits here: the engine writes the record again.)
    records.reopened.extend(reopened);
    let stored: Vec<JobId> = records
        .reopened
        .keys()
        .filter(|j| written.contains(*j))
        .cloned()
        .collect();
    for job in stored {
        let parts = records.reopened.remove(&job).unwrap_or(1);
        moves.push((None, store::keys(&job, parts, JobRecordSet::Done)));
    }
    let runs = |job: &JobId| !failed_jobs.contains_key(job) && !taken.contains_key(job);
    let later_leases: Vec<_> = later_leases
        .into_iter()
        .filter(|(_, l)| runs(&l.job_id))
        .collect();
    let later_events: Vec<_> = later_events
        .into_iter()
        .filter(|(_, e)| runs(&e.job_id))
        .collect();
    moves.append(&mut records.purges);
    writes.job += moves.iter().map(|(_, k)| k.len() as u64).sum::<u64>();

    // Stage 2.
    let purge_moves = join_all(moves.into_iter().map(|(job, keys)| async move {
        let done = join_all(keys.iter().map(|k| io.jobs.purge(k, io.marker_ttl))).await;
        let ok = done.iter().all(Result::is_ok);
        (job, keys, ok)
    }));
    // Events first, as in stage 1.
    let (_, purged, more_failures) = tokio::join!(
        publish_events(io, metrics, later_events),
        purge_moves,
        create_leases_now(io, engine, later_leases),
    );
    create_failures.extend(more_failures);
    for (job, keys, ok) in purged {
        if ok {
            if let Some(job) = job {
                records.written.forget(&job);
                feedback.push(Input::Moved(job));
            }
        } else {
            tracing::warn!(keys = ?keys, "could not remove job records; trying again");
            records.purges.push((job, keys));
        }
    }
    feedback.extend(create_failures);

    for (tx, reply, depends_on) in replies {
        let reply = match depends_on {
            Some(id) if failed_jobs.contains_key(&id) => Reply::error(
                code::UNAVAILABLE,
                format!(
                    "the job could not be stored, try again: {}",
                    failed_jobs[&id]
                ),
            ),
            Some(id) if taken.contains_key(&id) => answer_taken(&id, taken[&id], reply),
            _ => reply,
        };
        let _ = tx.send(reply);
    }

    // Stage 3.
    if failed_jobs.is_empty() && records.purges.is_empty() {
        if let Some(seq) = checkpoint.filter(|s| *s > records.last_checkpoint) {
            let put = io
                .jobs
                .put(subjects::CHECKPOINT_KEY, Bytes::from(seq.to_string()), None);
            match timed(metrics, WriteKind::Checkpoint, put).await {
                Ok(_) => {
                    records.last_checkpoint = seq;
                    writes.checkpoint = 1;
                }
                Err(e) => tracing::warn!(error = %e, "could not write the events checkpoint"),
            }
        }
    }
    engine.metrics().flush(started.elapsed(), writes);
    feedback
}

/// Posts waiting for the postman; past it, a send is answered 503.
const POSTS_WAITING: usize = 4096;

/// Gives the postman what a batch posted; a post it has no room for is
/// refused (its sender hears so).
fn hand_over(postman: &mpsc::Sender<crate::engine::Post>, posts: Vec<crate::engine::Post>) {
    for post in posts {
        let Err(mpsc::error::TrySendError::Full(post)) = postman.try_send(post) else {
            continue;
        };
        match post.then {
            crate::engine::AfterPost::Reply { tx, .. } => {
                let _ = tx.send(Reply::error(
                    code::UNAVAILABLE,
                    "too many messages waiting to be delivered; try again",
                ));
            }
            crate::engine::AfterPost::Bounce { sender, .. } => {
                tracing::warn!(task_id = %sender.1.task_id, "too many messages waiting to be delivered; dropped one of a task's");
            }
        }
    }
}

/// The answer to a submit whose id turned out to be a finished job's
/// (`same`: with the same spec), in place of `reply`.
fn answer_taken(id: &JobId, (same, status): (bool, JobState), reply: Reply) -> Reply {
    match reply {
        Reply::Submit(_) if same => Reply::Submit(gpufleet_schema::api::SubmitReply {
            job_id: id.clone(),
            status,
            created: false,
        }),
        Reply::Submit(_) => Reply::error(
            code::CONFLICT,
            format!("job {id} already exists with a different spec or owner; choose another id"),
        ),
        other => other,
    }
}

/// Creates reservations; returns an input for each that failed.
async fn create_leases_now(io: &Io, engine: &Engine, leases: Vec<(String, Lease)>) -> Vec<Input> {
    let ttl = engine.config().reservation_ttl.0;
    let metrics = &engine.metrics();
    let created = join_all(leases.into_iter().map(|(key, mut lease)| async move {
        if let Some(signer) = &io.signer {
            if let Err(e) = lease.sign(signer) {
                return (key, Err(e.to_string()));
            }
        }
        let r = match codec::encode(&lease) {
            Ok(b) => timed(
                metrics,
                WriteKind::Lease,
                io.leases.create(&key, Bytes::from(b), Some(ttl)),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        (key, r)
    }))
    .await;
    created
        .into_iter()
        .filter_map(|(key, r)| {
            let error = r.err()?;
            tracing::warn!(key, error = %error, "could not create a reservation");
            Some(Input::LeaseCreateFailed { key, error })
        })
        .collect()
}

/// Compare-and-sets leases over the revision the engine saw (a cancel, a
/// GPU grant).
async fn update_leases_now(io: &Io, metrics: &Metrics, updates: Vec<(String, Lease, u64)>) {
    join_all(updates.into_iter().map(|(key, lease, rev)| async move {
        let ttl = lease.lease_ttl.0;
        if let Ok(b) = codec::encode(&lease) {
            // Losing the race to a renewal is fine: the engine sees the
            // new revision and asks again (a cancel on the next tick, a
            // GPU grant in the next pass).
            let update = io.leases.update(&key, Bytes::from(b), Some(ttl), rev);
            if let Err(e) = timed(metrics, WriteKind::Lease, update).await {
                tracing::info!(key, error = %e, "an update of a lease did not apply");
            }
        }
    }))
    .await;
}

/// GPU grants with their signature; one that cannot be signed is not
/// written (its task waits, and the error is logged).
fn signed_grants(io: &Io, grants: Vec<(String, Lease, u64)>) -> Vec<(String, Lease, u64)> {
    let Some(signer) = &io.signer else {
        return grants;
    };
    grants
        .into_iter()
        .filter_map(|(key, mut lease, rev)| match lease.sign_upgrade(signer) {
            Ok(()) => Some((key, lease, rev)),
            Err(e) => {
                tracing::error!(key, error = %e, "cannot sign a GPU grant");
                None
            }
        })
        .collect()
}

async fn purge_leases_now(io: &Io, metrics: &Metrics, keys: Vec<String>) {
    join_all(keys.into_iter().map(|key| async move {
        let purge = io.leases.purge(&key, io.marker_ttl);
        if let Err(e) = timed(metrics, WriteKind::Lease, purge).await {
            tracing::warn!(key, error = %e, "could not purge a lease");
        }
    }))
    .await;
}

/// Sends every state event, then awaits their acks.
async fn publish_events(io: &Io, metrics: &Metrics, events: Vec<(String, Event)>) {
    let mut acks = Vec::with_capacity(events.len());
    for (subject, event) in events {
        let Ok(body) = codec::encode(&event) else {
            continue;
        };
        let sent = std::time::Instant::now();
        match events::send(&io.js, subject, Bytes::from(body), None).await {
            Ok(ack) => acks.push(async move {
                let r = ack.await;
                metrics.write(WriteKind::Event, sent.elapsed());
                r
            }),
            Err(e) => tracing::warn!(error = %e, "could not publish a state event"),
        }
    }
    for r in join_all(acks).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "a state event was not stored");
        }
    }
}

/// A finished job's errors, from its done record; with `reset`, the
/// record is written again without them (every part, so that they keep
/// expiring together).
async fn reset_stored_errors(
    jobs: &RawKv,
    retention: Option<Duration>,
    mut job: JobRecord,
    reset: bool,
) -> Reply {
    let (errors, error_count) = if reset {
        job.reset_errors()
    } else {
        (job.errors.clone(), job.error_count)
    };
    if reset {
        let written = match store::encode(&job) {
            Ok(parts) => {
                let keys = store::keys(&job.id, parts.len(), JobRecordSet::Done);
                let puts = join_all(
                    keys.iter()
                        .zip(parts)
                        .map(|(k, b)| jobs.put(k, Bytes::from(b), retention)),
                )
                .await;
                puts.into_iter()
                    .find_map(Result::err)
                    .map_or(Ok(()), |e| Err(e.to_string()))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            return Reply::error(
                code::UNAVAILABLE,
                format!("cannot reset the errors of job {}, try again: {e}", job.id),
            );
        }
    }
    Reply::Errors(Box::new(gpufleet_schema::api::ErrorsReply {
        job_id: job.id,
        errors,
        error_count,
        reset,
    }))
}

/// Answers from a job's stored done record, for a job the engine no
/// longer holds.
async fn fetch_stored(
    jobs: RawKv,
    retention: Option<Duration>,
    [events, artifacts]: [jetstream::stream::Stream; 2],
    id: JobId,
    caller: Caller,
    fetch: Fetch,
) -> Option<Input> {
    let not_found = || Reply::error(code::NOT_FOUND, format!("job {id} not found"));
    let unavailable = |e: &str| {
        Reply::error(
            code::UNAVAILABLE,
            format!("cannot read job {id}, try again: {e}"),
        )
    };
    // Another user's job is not found either.
    let read = store::read(&jobs, JobRecordSet::Done, &id)
        .await
        .map(|found| found.filter(|j| caller.sees(&j.owner)));
    match fetch {
        Fetch::Get { offset, limit, tx } => {
            let reply = match read {
                Ok(Some(j)) => Reply::Job(Box::new(j.page(offset, limit))),
                Ok(None) => not_found(),
                Err(e) => unavailable(&e),
            };
            let _ = tx.send(reply);
            None
        }
        Fetch::Cancel(tx) => {
            let reply = match read {
                Ok(Some(j)) => Reply::Job(Box::new(j.page(0, MAX_TASKS_PER_PAGE as usize))),
                Ok(None) => not_found(),
                Err(e) => unavailable(&e),
            };
            let _ = tx.send(reply);
            None
        }
        Fetch::Retry { task, tx } => match read {
            Ok(Some(j)) => Some(Input::Reopen {
                job: Box::new(j),
                task,
                caller,
                tx,
            }),
            Ok(None) => {
                let _ = tx.send(not_found());
                None
            }
            Err(e) => {
                let _ = tx.send(unavailable(&e));
                None
            }
        },
        Fetch::Send(tx) => {
            let reply = match read {
                // Finished: nothing runs to receive it.
                Ok(Some(j)) => crate::engine::talk_sent(&j.id, vec![]),
                Ok(None) => not_found(),
                Err(e) => unavailable(&e),
            };
            let _ = tx.send(reply);
            None
        }
        Fetch::Errors { reset, tx } => {
            let reply = match read {
                Ok(Some(j)) => reset_stored_errors(&jobs, retention, j, reset).await,
                Ok(None) => not_found(),
                Err(e) => unavailable(&e),
            };
            let _ = tx.send(reply);
            None
        }
        Fetch::Delete(tx) => {
            let job = match read {
                Ok(Some(j)) => j,
                Ok(None) => {
                    let _ = tx.send(not_found());
                    return None;
                }
                Err(e) => {
                    let _ = tx.send(unavailable(&e));
                    return None;
                }
            };
            // The events and artifacts first: once the record is gone,
            // nobody can find the job to delete what is left.
            let (events_purged, artifacts_purged) = tokio::join!(
                async {
                    events
                        .purge()
                        .filter(subjects::job_events(&job.owner, &id))
                        .await
                },
                async {
                    artifacts
                        .purge()
                        .filter(subjects::job_artifacts(&job.owner, &id))
                        .await
                },
            );
            let purged = events_purged
                .and(artifacts_purged)
                .map_err(|e| e.to_string());
            // Its active record first: until it expires, it would make a
            // start-up take the job for an unfinished one once the done
            // record is gone.
            let purge = |set| {
                let keys = store::keys(&id, job.parts.len(), set);
                let jobs = &jobs;
                async move {
                    join_all(keys.iter().map(|k| jobs.purge(k, Duration::from_secs(60)))).await
                }
            };
            let mut removed = purge(JobRecordSet::Active).await;
            if removed.iter().all(Result::is_ok) {
                removed = purge(JobRecordSet::Done).await;
            }
            let reply = match (purged, removed.into_iter().find_map(Result::err)) {
                (Ok(_), None) => {
                    tracing::info!(job_id = %id, "deleted a finished job, its events and artifacts");
                    Reply::Job(Box::new(job.status(false)))
                }
                (Err(e), _) => unavailable(&format!(
                    "its events or artifacts could not be removed: {e}"
                )),
                (_, Some(e)) => unavailable(&format!("its record could not be removed: {e}")),
            };
            let deleted = matches!(reply, Reply::Job(_));
            let _ = tx.send(reply);
            deleted.then_some(Input::Deleted(id))
        }
    }
}

/// Forwards every change of a bucket to the engine, mapped by `map`; says
/// `feed` once the changes that existed at the start are through, and
/// when the watch's consumer fails or comes back.
async fn forward_kv(
    kv: RawKv,
    feed: Feed,
    tx: mpsc::Sender<Input>,
    map: impl Fn(gpufleet_natsutil::KvChange) -> Option<Input>,
) {
    let mut watch = open_watch(&kv, ">").await;
    let mut announced = false;
    let mut down = false;
    // The watch goes on after a failure (it resumes after the last change).
    while let Some(item) = watch.next().await {
        let input = match item {
            Ok(KvEvent::Synced) if !announced => {
                announced = true;
                Input::Synced(feed)
            }
            Ok(KvEvent::Synced) if down => {
                down = false;
                Input::FeedUp(feed)
            }
            Ok(KvEvent::Synced) => continue,
            Ok(KvEvent::Change(c)) => match map(c) {
                Some(i) => i,
                None => continue,
            },
            Err(e) => {
                tracing::warn!(bucket = kv.bucket(), error = %e, "watch failed; resuming");
                if down {
                    continue;
                }
                down = true;
                Input::FeedDown(feed)
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// A watch of `filter` in `kv`, tried until it opens.
pub(crate) async fn open_watch(kv: &RawKv, filter: &str) -> gpufleet_natsutil::KvWatcher {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        match kv.watch(filter).await {
            Ok(w) => return w,
            Err(e) => {
                tracing::warn!(bucket = kv.bucket(), error = %e, "cannot watch; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// An advert counts only under its own worker's key: with roles on, a
/// worker may write its own key alone, so the key says who sent it.
fn advert_input(c: gpufleet_natsutil::KvChange) -> Option<Input> {
    match c.op {
        KvOp::Put => match codec::decode::<WorkerAdvert>(&c.value) {
            Ok(a) if a.name.as_str() != c.key => {
                tracing::warn!(key = %c.key, name = %a.name, "ignoring an advert under another worker's key");
                None
            }
            Ok(a) if a.gpus.iter().any(|g| g.uuid.as_str().len() > 128) => {
                tracing::warn!(key = %c.key, "ignoring a worker advert with a GPU UUID over 128 bytes");
                None
            }
            Ok(a) => Some(Input::Advert(Box::new(a))),
            Err(e) => {
                tracing::warn!(key = %c.key, error = %e, "ignoring an unreadable worker advert");
                None
            }
        },
        op => WorkerId::new(c.key).ok().map(|name| Input::WorkerGone {
            name,
            expired: op == KvOp::Expired,
        }),
    }
}

/// The public half of the signing key, to check GPU grants by.
fn own_key(signer: &Option<KeyPair>) -> Option<KeyPair> {
    KeyPair::from_public_key(&signer.as_ref()?.public_key()).ok()
}

/// A lease counts only under its own key: the worker, task and attempt it
/// names must be those of the key, which (with roles on) only that worker
/// and the coordinator may write. A GPU grant counts only with our
/// signature: a worker cannot give itself a GPU (`ours`: the key we sign
/// with, when we sign).
fn lease_input(c: gpufleet_natsutil::KvChange, ours: Option<&KeyPair>) -> Option<Input> {
    let change = match c.op {
        KvOp::Put => match codec::decode::<Lease>(&c.value) {
            Ok(lease)
                if subjects::parse_lease_key(&c.key)
                    != Some(subjects::lease_key(
                        &lease.worker,
                        &lease.task_id,
                        lease.attempt,
                    ))
                    || lease.task_id.job_and_index().map(|(j, _)| j)
                        != Some(lease.job_id.clone()) =>
            {
                tracing::warn!(key = %c.key, "ignoring a lease that names another key's attempt");
                return None;
            }
            Ok(mut lease) => {
                if let (Some(key), Some(_)) = (ours, &lease.gpu_grant) {
                    if let Err(e) = lease.verify_upgrade(std::slice::from_ref(key)) {
                        tracing::warn!(key = %c.key, error = %e, "ignoring a GPU grant we did not make");
                        lease.gpu_grant = None;
                    }
                }
                LeaseChange::Put {
                    key: c.key,
                    rev: c.revision,
                    lease: Box::new(lease),
                }
            }
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
/// coordinator replays what it had not yet stored; says when it has caught
/// up, and when its consumer fails or comes back.
async fn follow_results(js: jetstream::Context, after: u64, tx: mpsc::Sender<Input>) {
    let filters = vec![subjects::events_of_kind(EventKind::Result)];
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut replay = loop {
        match Replay::start(
            &js,
            subjects::EVENTS_STREAM,
            filters.clone(),
            after + 1,
            Until::Live,
        )
        .await
        {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow results; retrying");
                backoff.wait().await;
            }
        }
    };
    let mut announced = false;
    let mut down = false;
    let mut behind = false;
    loop {
        if !announced && replay.caught_up() {
            announced = true;
            if tx.send(Input::Synced(Feed::Events)).await.is_err() {
                return;
            }
        }
        let Some(event) = replay.next_event().await else {
            return;
        };
        // Sent after the input, so that "caught up" follows the last
        // result of a backlog.
        let mut after = None;
        let input = match event {
            ReplayEvent::Message(r) => {
                let back = std::mem::take(&mut down).then_some(Input::FeedUp(Feed::Events));
                if let Some(up) = back {
                    if tx.send(up).await.is_err() {
                        return;
                    }
                }
                // Said on changes only: lagging before this result, caught
                // up after it.
                let lags = r.pending > 0;
                if lags && !behind {
                    if tx.send(Input::ResultsBehind(true)).await.is_err() {
                        return;
                    }
                } else if !lags && behind {
                    after = Some(Input::ResultsBehind(false));
                }
                behind = lags;
                match result_input(r.message.subject.as_str(), &r.message.payload, r.sequence) {
                    Ok(input) => input,
                    Err(e) => {
                        tracing::warn!(subject = %r.message.subject, error = %e, "ignoring an unreadable result");
                        match after.take() {
                            Some(caught_up) => caught_up,
                            None => continue,
                        }
                    }
                }
            }
            ReplayEvent::Resumed if down => {
                down = false;
                Input::FeedUp(Feed::Events)
            }
            ReplayEvent::Resumed => continue,
            ReplayEvent::Failed(e) => {
                tracing::warn!(error = %e, "following results failed; resuming");
                if down {
                    continue;
                }
                down = true;
                Input::FeedDown(Feed::Events)
            }
        };
        if tx.send(input).await.is_err() {
            return;
        }
        if let Some(after) = after {
            if tx.send(after).await.is_err() {
                return;
            }
        }
    }
}

/// A result (or message) event as the engine takes it: its sender from
/// the subject (which the server vouches for), and only if its body agrees
/// with it.
fn result_input(subject: &str, payload: &[u8], seq: u64) -> Result<Input, String> {
    let subject =
        subjects::parse_event_subject(subject).ok_or_else(|| "not an event subject".to_string())?;
    let event = codec::decode::<Event>(payload).map_err(|e| e.to_string())?;
    if !event.matches_subject(&subject) {
        return Err("its body names another job, task, kind or sender than its subject".into());
    }
    let (event, sender) = (Box::new(event), subject.sender);
    Ok(match event.kind() {
        EventKind::Message => Input::Message { event, sender },
        _ => Input::Result { seq, event, sender },
    })
}

/// Follows the messages tasks write to their outboxes (`message` events
/// from workers), from those stored after this coordinator began to lead:
/// delivery is at most once, and a message sent while no coordinator led
/// is not delivered.
async fn follow_messages(
    js: jetstream::Context,
    mut stream: jetstream::stream::Stream,
    tx: mpsc::Sender<Input>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut replay = loop {
        let from = match stream.info().await {
            Ok(info) => info.state.last_sequence + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow messages; retrying");
                backoff.wait().await;
                continue;
            }
        };
        let filters = vec![subjects::events_of_kind(EventKind::Message)];
        match Replay::start(&js, subjects::EVENTS_STREAM, filters, from, Until::Live).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow messages; retrying");
                backoff.wait().await;
            }
        }
    };
    while let Some(event) = replay.next_event().await {
        let ReplayEvent::Message(r) = event else {
            continue;
        };
        let subject = r.message.subject.as_str();
        match result_input(subject, &r.message.payload, r.sequence) {
            Ok(input @ Input::Message { .. }) => {
                if tx.send(input).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(subject, error = %e, "ignoring an unreadable message"),
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

    #[test]
    fn a_submit_under_a_finished_job_s_id_is_answered_from_it() {
        use gpufleet_schema::api::SubmitReply;
        let id = JobId::new("old").unwrap();
        let created = || {
            Reply::Submit(SubmitReply {
                job_id: id.clone(),
                status: JobState::Queued,
                created: true,
            })
        };
        let same = answer_taken(&id, (true, JobState::Completed), created());
        assert!(matches!(same, Reply::Submit(r) if !r.created && r.status == JobState::Completed));
        let other = answer_taken(&id, (false, JobState::Completed), created());
        assert!(matches!(other, Reply::Error { code: 409, .. }));
    }

    /// A worker can write its own leases, so it could write a GPU grant
    /// into one: only a grant signed with our key is taken.
    #[test]
    fn a_gpu_grant_counts_only_with_our_signature() {
        let job = JobId::new("j").unwrap();
        let task_id = gpufleet_schema::TaskId::for_index(&job, 0);
        let worker = gpufleet_schema::WorkerId::new("w1").unwrap();
        let key = subjects::lease_key(&worker, &task_id, 1).to_string();
        let task: gpufleet_schema::TaskSpec = serde_json::from_str(
            r#"{"command": ["t"], "resources": {"gpus": 1}, "load": {"cpus": 1}}"#,
        )
        .unwrap();
        let load = gpufleet_schema::Grant {
            cpus_milli: 1000,
            loading: true,
            ..Default::default()
        };
        let mut lease = Lease {
            owner: gpufleet_schema::UserId::default_user(),
            job_id: job,
            task_id,
            attempt: 1,
            worker,
            state: gpufleet_schema::LeaseState::Running,
            reason: None,
            task,
            grant: load.clone(),
            rendezvous: None,
            lease_ttl: gpufleet_schema::Dur::secs(30),
            instance: Some("i".into()),
            reserved_at: time::OffsetDateTime::UNIX_EPOCH,
            token: gpufleet_schema::lease::new_token(),
            signer: None,
            signature: None,
            claim_rev: Some(3),
            preempt: None,
            ready: true,
            gpu_grant: Some(gpufleet_schema::GpuUpgrade {
                grant: gpufleet_schema::Grant {
                    loading: false,
                    ..load
                },
                signer: None,
                signature: None,
            }),
        };
        let ours = KeyPair::new_account();
        let public = own_key(&Some(KeyPair::from_seed(&ours.seed().unwrap()).unwrap()));
        let seen = |lease: &Lease, ours: Option<&KeyPair>| {
            let change = gpufleet_natsutil::KvChange {
                key: key.clone(),
                revision: 4,
                op: KvOp::Put,
                ttl: None,
                value: Bytes::from(codec::encode(lease).unwrap()),
                published: time::OffsetDateTime::UNIX_EPOCH,
            };
            match lease_input(change, ours) {
                Some(Input::Lease(LeaseChange::Put { lease, .. })) => lease.gpu_grant.is_some(),
                _ => panic!("the lease was not passed on"),
            }
        };
        assert!(!seen(&lease, public.as_ref()), "unsigned");
        lease.sign_upgrade(&KeyPair::new_account()).unwrap();
        assert!(!seen(&lease, public.as_ref()), "signed by another key");
        lease.sign_upgrade(&ours).unwrap();
        assert!(seen(&lease, public.as_ref()), "signed by us");
        lease.gpu_grant.as_mut().unwrap().grant.cpus_milli = 2000;
        assert!(!seen(&lease, public.as_ref()), "changed after signing");
        // Without roles nothing is signed, and nothing is checked.
        assert!(seen(&lease, None));
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
