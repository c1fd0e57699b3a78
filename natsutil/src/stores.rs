//! The buckets and the streams of the contract.
//!
//! Only the coordinator creates them ([`create_stores`]), with its settings;
//! every other program waits for them by trying its own reads again (a
//! worker or a user may not read a store's info under roles). A worker that
//! came first used to create them with default settings (one replica, no
//! limits), and a coordinator set to three replicas then ran on them
//! unaware; started together, the two raced and one failed. An existing
//! store is never changed (that is an operator's decision), but the
//! coordinator says at start where one differs from its settings.
//!
//! On a cluster that is still starting, JetStream may have no leader yet,
//! and a store just created may not have one either: [`create_stores`]
//! keeps trying instead of failing, and does not return before every store
//! answers through its leader.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use gpufleet_schema::subjects;
use tokio::time::Instant;

use crate::retry::Backoff;

#[derive(Debug, thiserror::Error)]
#[error("cannot set up JetStream {what} {name:?}: {message}")]
pub struct StoreError {
    pub what: &'static str,
    pub name: String,
    pub message: String,
}

/// How the coordinator creates the stores. The size limits are reserved
/// by the server when a store is made (it refuses one that does not fit its
/// `max_file_store`), so the defaults are modest: 6 GiB in all.
#[derive(Debug, Clone)]
pub struct Setup {
    /// JetStream replicas; 3 on a production cluster.
    pub replicas: usize,
    /// How long events (logs, results) are kept.
    pub events_max_age: Duration,
    /// Upper bound of the events stream in bytes; the oldest go first.
    pub events_max_bytes: i64,
    /// Upper bound of the job records in bytes; when it is reached, new
    /// jobs are refused (records are never dropped to make room).
    pub jobs_max_bytes: i64,
    /// How long artifacts are kept (0 = forever).
    pub artifacts_max_age: Duration,
    /// Upper bound of the artifacts in bytes; when it is reached, uploads
    /// fail (and say so in the task's result).
    pub artifacts_max_bytes: i64,
}

pub const GIB: i64 = 1 << 30;

impl Default for Setup {
    fn default() -> Self {
        Setup {
            replicas: 1,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_bytes: GIB,
            jobs_max_bytes: GIB,
            artifacts_max_age: Duration::from_secs(30 * 24 * 3600),
            artifacts_max_bytes: 4 * GIB,
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
pub const MARKER_TTL: Duration = Duration::from_secs(60);

/// Tries are this far apart at most while JetStream is not ready.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// How long one JetStream request may take here. While a cluster has no
/// JetStream leader yet, requests go unanswered until the client gives up
/// (30 s): asking again sooner gets the answer soon after a leader is there.
const REQUEST: Duration = Duration::from_secs(2);
/// How often a wait for JetStream says it still waits.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// `fut` within [`REQUEST`].
async fn bounded<T, E: ToString>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::time::timeout(REQUEST, fut)
        .await
        .map_err(|_| format!("no answer within {REQUEST:?}"))?
        .map_err(|e| e.to_string())
}

/// One store as the stream behind it, and the settings that matter.
struct Spec {
    what: &'static str,
    name: &'static str,
    stream: String,
    replicas: usize,
    max_age: Duration,
    max_bytes: i64,
    /// Revisions kept per key (KV only).
    history: Option<i64>,
    /// Per-message TTLs allowed (the leases, the adverts, the job records
    /// and the leader key beside them).
    msg_ttl: bool,
    /// The subjects of a stream.
    subjects: &'static str,
}

fn specs(setup: &Setup) -> Vec<Spec> {
    let kv = |name: &'static str, max_bytes: i64| Spec {
        what: "bucket",
        name,
        stream: subjects::kv_stream(name),
        replicas: setup.replicas,
        max_age: Duration::ZERO,
        max_bytes,
        history: Some(1),
        msg_ttl: true,
        subjects: "",
    };
    vec![
        kv(subjects::WORKERS_BUCKET, -1),
        kv(subjects::LEASES_BUCKET, -1),
        kv(subjects::JOBS_BUCKET, setup.jobs_max_bytes),
        Spec {
            what: "stream",
            name: subjects::EVENTS_STREAM,
            stream: subjects::EVENTS_STREAM.into(),
            replicas: setup.replicas,
            max_age: setup.events_max_age,
            max_bytes: setup.events_max_bytes,
            history: None,
            msg_ttl: false,
            subjects: subjects::EVENTS_ALL,
        },
        Spec {
            what: "stream",
            name: subjects::ARTIFACTS_STREAM,
            stream: subjects::ARTIFACTS_STREAM.into(),
            replicas: setup.replicas,
            max_age: setup.artifacts_max_age,
            max_bytes: setup.artifacts_max_bytes,
            history: None,
            msg_ttl: false,
            subjects: subjects::ARTIFACTS_ALL,
        },
    ]
}

fn bytes(n: i64) -> String {
    if n < 0 {
        "unlimited".into()
    } else {
        gpufleet_schema::ByteSize(n as u64).to_string()
    }
}

impl Spec {
    /// Where an existing store differs from this spec, one line each.
    fn differences(&self, have: &stream::Config) -> Vec<String> {
        let mut out = Vec::new();
        let mut differ = |setting: &str, have: String, want: String| {
            if have != want {
                out.push(format!(
                    "{} {}: {setting} is {have}, the settings say {want}",
                    self.what, self.name
                ));
            }
        };
        differ(
            "replicas",
            have.num_replicas.max(1).to_string(),
            self.replicas.to_string(),
        );
        differ(
            "max_age",
            gpufleet_schema::Dur(have.max_age).to_string(),
            gpufleet_schema::Dur(self.max_age).to_string(),
        );
        differ("max_bytes", bytes(have.max_bytes), bytes(self.max_bytes));
        if let Some(h) = self.history {
            differ(
                "history",
                have.max_messages_per_subject.to_string(),
                h.to_string(),
            );
        }
        if self.msg_ttl && !have.allow_message_ttl {
            differ(
                "per-message TTLs",
                "off".into(),
                "on (gpufleet needs them)".into(),
            );
        }
        out
    }

    fn error(&self, message: impl ToString) -> StoreError {
        StoreError {
            what: self.what,
            name: self.name.into(),
            message: message.to_string(),
        }
    }

    async fn create(&self, js: &jetstream::Context) -> Result<(), String> {
        let description = match self.name {
            subjects::WORKERS_BUCKET => {
                "gpufleet worker adverts; each expires when its heartbeats stop"
            }
            subjects::LEASES_BUCKET => "gpufleet reservations and running leases (per-key TTLs)",
            subjects::JOBS_BUCKET => "gpufleet job and task records",
            subjects::EVENTS_STREAM => "gpufleet task state changes, logs, progress and results",
            _ => "gpufleet task artifacts: chunks, then a description",
        };
        match self.what {
            "bucket" => bounded(js.create_key_value(kv::Config {
                bucket: self.name.into(),
                description: description.into(),
                history: self.history.unwrap_or(1),
                num_replicas: self.replicas,
                max_bytes: self.max_bytes,
                // Job records are written in parts well below this;
                // the server's max_payload is the real bound.
                max_value_size: if self.name == subjects::JOBS_BUCKET {
                    8 << 20
                } else {
                    -1
                },
                limit_markers: Some(MARKER_TTL),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
            _ => bounded(js.create_stream(stream::Config {
                name: self.name.into(),
                description: Some(description.into()),
                subjects: vec![self.subjects.into()],
                max_age: self.max_age,
                max_bytes: self.max_bytes,
                // Events make room by dropping the oldest; artifacts, whose
                // uploads fail instead, are never dropped early.
                discard: if self.name == subjects::EVENTS_STREAM {
                    stream::DiscardPolicy::Old
                } else {
                    stream::DiscardPolicy::New
                },
                num_replicas: self.replicas,
                allow_direct: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        }
    }
}

/// What a look at one store found.
enum Found {
    /// It exists and answers through its leader.
    Ready(Box<stream::Config>),
    Missing,
    /// JetStream (or the store's leader) did not answer as it should.
    NotReady(String),
}

async fn look(js: &jetstream::Context, spec: &Spec) -> Found {
    use jetstream::context::GetStreamErrorKind;
    use jetstream::ErrorCode;
    let got = tokio::time::timeout(REQUEST, js.get_stream(&spec.stream)).await;
    let Ok(got) = got else {
        return Found::NotReady(format!("no answer within {REQUEST:?}"));
    };
    let mut stream = match got {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Found::Missing
                }
                _ => Found::NotReady(e.to_string()),
            }
        }
    };
    // The info comes from the leader; a replicated store just created may
    // not have elected one yet.
    match bounded(stream.info()).await {
        Ok(info) => {
            let leaderless = info
                .cluster
                .as_ref()
                .is_some_and(|c| c.name.is_some() && c.leader.is_none());
            if leaderless {
                Found::NotReady("it has no leader yet".into())
            } else {
                Found::Ready(Box::new(info.config.clone()))
            }
        }
        Err(e) => Found::NotReady(e.to_string()),
    }
}

/// Opens every store, creating what is missing with `setup`; waits as long
/// as JetStream or a store has no leader (saying so every 10 s). Returns
/// the stores and, one line each, where existing ones differ from `setup`.
/// Fails only on what waiting cannot mend (a store JetStream has no room
/// for).
pub async fn create_stores(
    js: &jetstream::Context,
    setup: &Setup,
) -> Result<(Stores, Vec<String>), StoreError> {
    let started = Instant::now();
    let mut said = started;
    let mut differences = Vec::new();
    for spec in specs(setup) {
        let mut backoff = RETRY;
        let mut created = false;
        loop {
            let last = match look(js, &spec).await {
                Found::Ready(mut config) => {
                    if spec.name == subjects::JOBS_BUCKET && !config.allow_message_ttl {
                        // Made before the leader key moved here.
                        allow_ttls(js, spec.name).await?;
                        config.allow_message_ttl = true;
                    }
                    if !created {
                        differences.extend(spec.differences(&config));
                    }
                    break;
                }
                Found::Missing if !created => match spec.create(js).await {
                    Ok(()) => {
                        tracing::info!(store = spec.name, replicas = spec.replicas, "created");
                        created = true;
                        continue;
                    }
                    // Not ready, or created meanwhile by another coordinator:
                    // the next look tells.
                    Err(e) => e,
                },
                Found::Missing => "created, but not found since".into(),
                Found::NotReady(why) => why,
            };
            if last.contains("insufficient") {
                return Err(spec.error(format!(
                    "{last} (lower the store's size limit in the settings, or give JetStream more storage)"
                )));
            }
            if said.elapsed() >= SAY_EVERY {
                said = Instant::now();
                tracing::warn!(store = spec.name, waited = ?started.elapsed(), why = %last, "waiting for JetStream to be ready");
            } else {
                tracing::debug!(store = spec.name, why = %last, "waiting for JetStream to be ready");
            }
            backoff.wait().await;
        }
    }
    Ok((open(js).await?, differences))
}

/// Turns on per-message TTLs in a bucket made before it needed them (the
/// jobs bucket holds the leader key since roles came): a setting added,
/// nothing of the operator's changed.
async fn allow_ttls(js: &jetstream::Context, bucket: &str) -> Result<(), StoreError> {
    let fail = |message: String| StoreError {
        what: "bucket",
        name: bucket.into(),
        message,
    };
    let mut stream = bounded(js.get_stream(subjects::kv_stream(bucket)))
        .await
        .map_err(fail)?;
    let mut config = bounded(stream.info()).await.map_err(fail)?.config.clone();
    if config.allow_message_ttl {
        return Ok(());
    }
    tracing::info!(bucket, "allowing per-message TTLs in an existing bucket");
    config.allow_message_ttl = true;
    config.subject_delete_marker_ttl = Some(MARKER_TTL);
    bounded(js.update_stream(config))
        .await
        .map(|_| ())
        .map_err(fail)
}

async fn open(js: &jetstream::Context) -> Result<Stores, StoreError> {
    let kv = |name: &'static str| async move {
        js.get_key_value(name).await.map_err(|e| StoreError {
            what: "bucket",
            name: name.into(),
            message: e.to_string(),
        })
    };
    let stream = |name: &'static str| async move {
        js.get_stream(name).await.map_err(|e| StoreError {
            what: "stream",
            name: name.into(),
            message: e.to_string(),
        })
    };
    Ok(Stores {
        js: js.clone(),
        workers: kv(subjects::WORKERS_BUCKET).await?,
        leases: kv(subjects::LEASES_BUCKET).await?,
        jobs: kv(subjects::JOBS_BUCKET).await?,
        events: stream(subjects::EVENTS_STREAM).await?,
        artifacts: stream(subjects::ARTIFACTS_STREAM).await?,
    })
}
