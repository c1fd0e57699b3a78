//! Every subject, bucket, key, object and message-id name, built and parsed
//! here and nowhere else.

use crate::event::EventKind;
use crate::ids::{JobId, TaskId, WorkerId};

/// The micro service's name, as `$SRV.PING` reports it.
pub const SERVICE_NAME: &str = "gpufleet";
pub const API_PREFIX: &str = "gpufleet.api";

pub const JOBS_SUBMIT: &str = "gpufleet.api.jobs.submit";
pub const JOBS_GET: &str = "gpufleet.api.jobs.get";
pub const JOBS_LIST: &str = "gpufleet.api.jobs.list";
pub const JOBS_CANCEL: &str = "gpufleet.api.jobs.cancel";
pub const WORKERS_LIST: &str = "gpufleet.api.workers.list";

pub const WORKERS_BUCKET: &str = "gpufleet-workers";
pub const LEASES_BUCKET: &str = "gpufleet-leases";
pub const JOBS_BUCKET: &str = "gpufleet-jobs";
pub const ARTIFACTS_BUCKET: &str = "gpufleet-artifacts";
pub const EVENTS_STREAM: &str = "GPUFLEET_EVENTS";
pub const EVENTS_ALL: &str = "gpufleet.events.>";

/// The key in [`WORKERS_BUCKET`] the leading coordinator holds (worker
/// names hold no dots, so it never meets a worker's advert).
pub const LEADER_KEY: &str = "coordinator.leader";
/// The key in [`JOBS_BUCKET`] holding the events stream sequence up to
/// which the coordinator has stored every result.
pub const CHECKPOINT_KEY: &str = "meta.checkpoint";

/// The stream behind a KV bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject a KV key is stored on, for raw publishes with headers.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The key of a KV subject, if it belongs to `bucket`.
pub fn kv_key<'a>(bucket: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix("$KV.")?
        .strip_prefix(bucket)?
        .strip_prefix('.')
}

pub fn events(job: &JobId, task: &TaskId, kind: EventKind) -> String {
    format!("gpufleet.events.{job}.{task}.{}", kind.as_str())
}

/// Every event of one job.
pub fn job_events(job: &JobId) -> String {
    format!("gpufleet.events.{job}.>")
}

/// Events of one kind across the fleet, e.g. every result.
pub fn events_of_kind(kind: EventKind) -> String {
    format!("gpufleet.events.*.*.{}", kind.as_str())
}

/// Events of one kind of every task of one job.
pub fn job_events_of_kind(job: &JobId, kind: EventKind) -> String {
    format!("gpufleet.events.{job}.*.{}", kind.as_str())
}

/// The `Nats-Msg-Id` of an attempt's result: the same on every try, so
/// that the stream keeps one copy.
pub fn result_msg_id(task: &TaskId, attempt: u32) -> String {
    format!("{task}.{attempt}.result")
}

/// Splits an event subject into job, task and kind.
pub fn parse_event_subject(subject: &str) -> Option<(JobId, TaskId, EventKind)> {
    let mut parts = subject.split('.');
    if parts.next()? != "gpufleet" || parts.next()? != "events" {
        return None;
    }
    let job = JobId::new(parts.next()?).ok()?;
    let task = TaskId::new(parts.next()?).ok()?;
    let kind = EventKind::parse(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((job, task, kind))
}

/// A key in [`LEASES_BUCKET`], `<worker>.<task>.<attempt>`: one key per
/// attempt, so a key is never reused by a later attempt (see the KV notes
/// in the README). Made only by [`lease_key`] and [`parse_lease_key`], so
/// one in hand always names the worker, task and attempt it holds.
#[derive(Debug, Clone)]
pub struct LeaseKey {
    key: String,
    worker: WorkerId,
    task: TaskId,
    attempt: u32,
}

impl LeaseKey {
    pub fn as_str(&self) -> &str {
        &self.key
    }
    pub fn worker(&self) -> &WorkerId {
        &self.worker
    }
    pub fn task(&self) -> &TaskId {
        &self.task
    }
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

// The parts follow from the key, so the key alone decides equality.
impl PartialEq for LeaseKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for LeaseKey {}

impl std::hash::Hash for LeaseKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}

impl PartialOrd for LeaseKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LeaseKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

// A lease key goes to the KV store as the text it is.
impl std::ops::Deref for LeaseKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.key
    }
}

impl AsRef<str> for LeaseKey {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

impl From<LeaseKey> for String {
    fn from(k: LeaseKey) -> String {
        k.key
    }
}

impl serde::Serialize for LeaseKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.key)
    }
}

impl<'de> serde::Deserialize<'de> for LeaseKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        parse_lease_key(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid lease key {s:?}: expected <worker>.<task>.<attempt>"
            ))
        })
    }
}

pub fn lease_key(worker: &WorkerId, task: &TaskId, attempt: u32) -> LeaseKey {
    LeaseKey {
        key: format!("{worker}.{task}.{attempt}"),
        worker: worker.clone(),
        task: task.clone(),
        attempt,
    }
}

pub fn parse_lease_key(key: &str) -> Option<LeaseKey> {
    let mut parts = key.split('.');
    let worker = WorkerId::new(parts.next()?).ok()?;
    let task = TaskId::new(parts.next()?).ok()?;
    let attempt = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(LeaseKey {
        key: key.to_string(),
        worker,
        task,
        attempt,
    })
}

/// The lease keys one worker watches.
pub fn worker_leases(worker: &WorkerId) -> String {
    format!("{worker}.>")
}

/// An artifact's object name in [`ARTIFACTS_BUCKET`]:
/// `<job>/<task>/<attempt>/<path>`, `path` relative to the task's output
/// directory.
pub fn artifact_object(job: &JobId, task: &TaskId, attempt: u32, path: &str) -> String {
    format!("{job}/{task}/{attempt}/{path}")
}

/// The prefix of every artifact object of one job.
pub fn job_artifacts(job: &JobId) -> String {
    format!("{job}/")
}

/// Splits an artifact object name into job, task, attempt and path.
pub fn parse_artifact_object(name: &str) -> Option<(JobId, TaskId, u32, &str)> {
    let mut parts = name.splitn(4, '/');
    let job = JobId::new(parts.next()?).ok()?;
    let task = TaskId::new(parts.next()?).ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let path = parts.next().filter(|p| !p.is_empty())?;
    Some((job, task, attempt, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let job = JobId::new("j1").unwrap();
        let task = TaskId::for_index(&job, 0);
        let s = events(&job, &task, EventKind::Log);
        assert_eq!(s, "gpufleet.events.j1.j1-0.log");
        assert_eq!(
            parse_event_subject(&s),
            Some((job, task.clone(), EventKind::Log))
        );
        assert_eq!(parse_event_subject("gpufleet.events.a.b.nope"), None);
        let w = WorkerId::new("w-1").unwrap();
        let key = lease_key(&w, &task, 3);
        let parsed = parse_lease_key(key.as_str()).unwrap();
        assert_eq!(
            (parsed.worker(), parsed.task(), parsed.attempt()),
            (&w, &task, 3)
        );
        assert_eq!(parsed, key);
        assert_eq!(
            kv_key(LEASES_BUCKET, &kv_subject(LEASES_BUCKET, key.as_str())),
            Some(key.as_str())
        );
        for bad in ["w-1.t", "w-1.t.x", "w-1.t.1.2", "w 1.t.1"] {
            assert_eq!(parse_lease_key(bad), None, "{bad}");
        }
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{key}\""));
        assert_eq!(serde_json::from_str::<LeaseKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<LeaseKey>("\"w-1.t\"").is_err());
        assert_eq!(kv_key(WORKERS_BUCKET, "$KV.gpufleet-workersx.a"), None);
    }

    #[test]
    fn job_wide_names() {
        let job = JobId::new("j-1").unwrap();
        let task = TaskId::for_index(&job, 2);
        assert_eq!(
            job_events_of_kind(&job, EventKind::Progress),
            "gpufleet.events.j-1.*.progress"
        );
        assert_eq!(result_msg_id(&task, 3), "j-1-2.3.result");
        // Never a worker's advert key.
        assert!(WorkerId::new(LEADER_KEY).is_err());
    }

    #[test]
    fn artifact_objects_round_trip() {
        let job = JobId::new("j1").unwrap();
        let task = TaskId::for_index(&job, 0);
        let name = artifact_object(&job, &task, 2, "out/sub/model.pt");
        assert_eq!(name, "j1/j1-0/2/out/sub/model.pt");
        assert!(name.starts_with(&job_artifacts(&job)));
        assert_eq!(
            parse_artifact_object(&name),
            Some((job, task, 2, "out/sub/model.pt"))
        );
        for bad in ["j1/j1-0/2/", "j1/j1-0/x/a", "j1/j1-0", "j.1/t/1/a", ""] {
            assert_eq!(parse_artifact_object(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_checkpoint_key_is_never_a_job_id() {
        assert!(JobId::new(CHECKPOINT_KEY).is_err());
    }
}
