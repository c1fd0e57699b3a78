//! The buckets and the stream of the contract.
//!
//! Each program calls [`ensure_stores`] at start: whichever comes first
//! creates what is missing; an existing store is used as it is (its settings
//! are an operator's to change, never a racing program's).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use gpufleet_schema::subjects;

#[derive(Debug, thiserror::Error)]
#[error("cannot set up JetStream {what} {name:?}: {message}")]
pub struct StoreError {
    pub what: &'static str,
    pub name: String,
    pub message: String,
}

/// How the stores are created when missing.
#[derive(Debug, Clone)]
pub struct Setup {
    /// JetStream replicas; 3 on a production cluster.
    pub replicas: usize,
    /// How long events (logs, results) are kept.
    pub events_max_age: Duration,
    /// Upper bound of the events stream; the oldest go first.
    pub events_max_bytes: i64,
    /// How long finished jobs' records are kept (0 = forever).
    pub jobs_max_age: Duration,
    /// How long artifacts are kept (0 = forever).
    pub artifacts_max_age: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            replicas: 1,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_bytes: -1,
            jobs_max_age: Duration::ZERO,
            artifacts_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Handles on every store.
#[derive(Clone)]
pub struct Stores {
    pub js: jetstream::Context,
    pub workers: kv::Store,
    pub leases: kv::Store,
    pub jobs: kv::Store,
    pub events: stream::Stream,
    pub artifacts: stream::Stream,
}

/// Expiry markers stay this long so that every watcher sees them.
const MARKER_TTL: Duration = Duration::from_secs(60);

async fn ensure_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, StoreError> {
    let name = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Someone else created it between our look and our create.
        Err(first) => js.get_key_value(&name).await.map_err(|_| StoreError {
            what: "bucket",
            name,
            message: first.to_string(),
        }),
    }
}

/// Turns on per-message TTLs in a bucket made before it needed them (the
/// jobs bucket holds the leader key since roles came): a setting added,
/// nothing of the operator's changed.
async fn allow_ttls(js: &jetstream::Context, bucket: &str) -> Result<(), StoreError> {
    let name = subjects::kv_stream(bucket);
    let fail = |message: String| StoreError {
        what: "bucket",
        name: bucket.into(),
        message,
    };
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| fail(e.to_string()))?
        .config
        .clone();
    if config.allow_message_ttl {
        return Ok(());
    }
    tracing::info!(bucket, "allowing per-message TTLs in an existing bucket");
    config.allow_message_ttl = true;
    config.subject_delete_marker_ttl = Some(MARKER_TTL);
    js.update_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| fail(e.to_string()))
}

pub async fn ensure_stores(js: &jetstream::Context, setup: &Setup) -> Result<Stores, StoreError> {
    let workers = ensure_kv(
        js,
        kv::Config {
            bucket: subjects::WORKERS_BUCKET.into(),
            description: "gpufleet worker adverts; each expires when its heartbeats stop".into(),
            history: 1,
            num_replicas: setup.replicas,
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        },
    )
    .await?;
    let leases = ensure_kv(
        js,
        kv::Config {
            bucket: subjects::LEASES_BUCKET.into(),
            description: "gpufleet reservations and running leases (per-key TTLs)".into(),
            history: 1,
            num_replicas: setup.replicas,
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        },
    )
    .await?;
    let jobs = ensure_kv(
        js,
        kv::Config {
            bucket: subjects::JOBS_BUCKET.into(),
            description: "gpufleet job and task records".into(),
            history: 1,
            num_replicas: setup.replicas,
            max_age: setup.jobs_max_age,
            max_value_size: 8 << 20,
            // The leader key lives here, with a TTL (only coordinators may
            // write this bucket).
            limit_markers: Some(MARKER_TTL),
            ..Default::default()
        },
    )
    .await?;
    allow_ttls(js, subjects::JOBS_BUCKET).await?;
    let events = match js.get_stream(subjects::EVENTS_STREAM).await {
        Ok(s) => s,
        Err(_) => js
            .get_or_create_stream(stream::Config {
                name: subjects::EVENTS_STREAM.into(),
                description: Some("gpufleet task state changes, logs, progress and results".into()),
                subjects: vec![subjects::EVENTS_ALL.into()],
                max_age: setup.events_max_age,
                max_bytes: setup.events_max_bytes,
                discard: stream::DiscardPolicy::Old,
                num_replicas: setup.replicas,
                allow_direct: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError {
                what: "stream",
                name: subjects::EVENTS_STREAM.into(),
                message: e.to_string(),
            })?,
    };
    let artifacts = match js.get_stream(subjects::ARTIFACTS_STREAM).await {
        Ok(s) => s,
        Err(_) => js
            .get_or_create_stream(stream::Config {
                name: subjects::ARTIFACTS_STREAM.into(),
                description: Some("gpufleet task artifacts: chunks, then a description".into()),
                subjects: vec![subjects::ARTIFACTS_ALL.into()],
                max_age: setup.artifacts_max_age,
                num_replicas: setup.replicas,
                allow_direct: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError {
                what: "stream",
                name: subjects::ARTIFACTS_STREAM.into(),
                message: e.to_string(),
            })?,
    };
    Ok(Stores {
        js: js.clone(),
        workers,
        leases,
        jobs,
        events,
        artifacts,
    })
}
