//! Every subject, bucket, key, object and message-id name, built and parsed
//! here and nowhere else.
//!
//! Names are shaped so that NATS permissions can say who may use them (see
//! [`crate::roles`]): the API subject carries the calling user, an event's
//! subject carries the job's owner and its sender, a lease key starts with
//! its worker's name, and an artifact's subject carries the owner and the
//! worker that uploaded it.

use data_encoding::BASE64URL_NOPAD;

use crate::event::EventKind;
use crate::ids::{JobId, TaskId, UserId, WorkerId};

/// The micro service's name, as `$SRV.PING` reports it.
pub const SERVICE_NAME: &str = "gpufleet";
pub const API_PREFIX: &str = "gpufleet.api";

/// The API's endpoints: `gpufleet.api.<user>.<endpoint>` (see [`api`]).
pub mod endpoint {
    pub const JOBS_SUBMIT: &str = "jobs.submit";
    pub const JOBS_GET: &str = "jobs.get";
    pub const JOBS_LIST: &str = "jobs.list";
    pub const JOBS_CANCEL: &str = "jobs.cancel";
    pub const JOBS_DELETE: &str = "jobs.delete";
    pub const WORKERS_LIST: &str = "workers.list";
    pub const JOBS_ERRORS: &str = "jobs.errors";
    pub const JOBS_SEND: &str = "jobs.send";
    pub const JOBS_RETRY: &str = "jobs.retry";
}

/// The subjects without a user token, served (as user `default`) only
/// while roles are off, so that clients written before users keep working.
pub const JOBS_SUBMIT: &str = "gpufleet.api.jobs.submit";
pub const JOBS_GET: &str = "gpufleet.api.jobs.get";
pub const JOBS_LIST: &str = "gpufleet.api.jobs.list";
pub const JOBS_CANCEL: &str = "gpufleet.api.jobs.cancel";
pub const JOBS_DELETE: &str = "gpufleet.api.jobs.delete";
pub const WORKERS_LIST: &str = "gpufleet.api.workers.list";

/// An endpoint as `user` calls it: `gpufleet.api.<user>.<endpoint>`. A
/// user's NATS permission allows publishing under its own name only, so
/// the user token is who the server says the caller is.
pub fn api(user: &UserId, endpoint: &str) -> String {
    format!("{API_PREFIX}.{user}.{endpoint}")
}

/// An endpoint as a client calls it: as `user` when it has one, else on
/// the subject without a user token (roles off).
pub fn api_for(user: Option<&UserId>, endpoint: &str) -> String {
    match user {
        Some(u) => api(u, endpoint),
        None => format!("{API_PREFIX}.{endpoint}"),
    }
}

/// What the coordinator subscribes to: one endpoint for every user.
pub fn api_any_user(endpoint: &str) -> String {
    format!("{API_PREFIX}.*.{endpoint}")
}

/// The user token of a request's subject; `None` for the subjects without
/// one (and for anything that is not an API subject).
pub fn api_user(subject: &str, endpoint: &str) -> Option<UserId> {
    let rest = subject.strip_prefix(API_PREFIX)?.strip_prefix('.')?;
    let user = rest.strip_suffix(endpoint)?.strip_suffix('.')?;
    UserId::new(user).ok()
}

pub const WORKERS_BUCKET: &str = "gpufleet-workers";
pub const LEASES_BUCKET: &str = "gpufleet-leases";
pub const JOBS_BUCKET: &str = "gpufleet-jobs";
pub const EVENTS_STREAM: &str = "GPUFLEET_EVENTS";
pub const EVENTS_ALL: &str = "gpufleet.events.>";
pub const ARTIFACTS_STREAM: &str = "GPUFLEET_ARTIFACTS";
pub const ARTIFACTS_ALL: &str = "gpufleet.artifacts.>";

/// The key in [`JOBS_BUCKET`] the leading coordinator holds: only
/// coordinators may write that bucket, and job ids hold no dots, so it
/// never meets a job.
pub const LEADER_KEY: &str = "meta.leader";
/// The key in [`JOBS_BUCKET`] holding the events stream sequence up to
/// which the coordinator has stored every result.
pub const CHECKPOINT_KEY: &str = "meta.checkpoint";
/// The key in [`JOBS_BUCKET`] holding the scheduling policy (JSON), which
/// replaces the coordinator's `[scheduling]` settings while it exists.
pub const POLICY_KEY: &str = "meta.policy";

/// Where a job's record is in [`JOBS_BUCKET`]: unfinished jobs under
/// `active.`, finished ones under `done.`, so that a coordinator starting up
/// reads only the unfinished. A record is in parts: part 0 is
/// `<prefix>.<job>`, part n is `<prefix>.<job>.<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobRecordSet {
    Active,
    Done,
}

impl JobRecordSet {
    fn prefix(self) -> &'static str {
        match self {
            JobRecordSet::Active => "active",
            JobRecordSet::Done => "done",
        }
    }

    /// The KV key filter of every part of every record in the set.
    pub fn all(self) -> String {
        format!("{}.>", self.prefix())
    }

    /// The KV key filter of part 0 of every record in the set.
    pub fn heads(self) -> String {
        format!("{}.*", self.prefix())
    }
}

/// The key of part `part` of `job`'s record in `set`.
pub fn job_record_key(set: JobRecordSet, job: &JobId, part: usize) -> String {
    if part == 0 {
        format!("{}.{job}", set.prefix())
    } else {
        format!("{}.{job}.{part}", set.prefix())
    }
}

/// Splits a key of [`JOBS_BUCKET`] into set, job and part; `None` for any
/// other key.
pub fn parse_job_record_key(key: &str) -> Option<(JobRecordSet, JobId, usize)> {
    let mut parts = key.split('.');
    let set = match parts.next()? {
        "active" => JobRecordSet::Active,
        "done" => JobRecordSet::Done,
        _ => return None,
    };
    let job = JobId::new(parts.next()?).ok()?;
    let part = match parts.next() {
        None => 0,
        Some(n) => n.parse().ok().filter(|n| *n > 0)?,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((set, job, part))
}

/// The key filter of job records as versions before the active/done split
/// wrote them: the job id alone.
pub const LEGACY_JOB_RECORDS: &str = "*";

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

/// Who published an event: the last token of its subject. A worker may
/// publish only under its own name (its NATS permission), and worker names
/// never start with `_`, so [`COORDINATOR_SENDER`] is the coordinator's
/// alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sender {
    Coordinator,
    Worker(WorkerId),
}

/// The sender token of the coordinator's events.
pub const COORDINATOR_SENDER: &str = "_c";

impl Sender {
    pub fn token(&self) -> &str {
        match self {
            Sender::Coordinator => COORDINATOR_SENDER,
            Sender::Worker(w) => w.as_str(),
        }
    }

    fn parse(token: &str) -> Option<Sender> {
        if token == COORDINATOR_SENDER {
            Some(Sender::Coordinator)
        } else {
            WorkerId::new(token).ok().map(Sender::Worker)
        }
    }

    /// The worker, if a worker sent it.
    pub fn worker(&self) -> Option<&WorkerId> {
        match self {
            Sender::Worker(w) => Some(w),
            Sender::Coordinator => None,
        }
    }
}

/// `gpufleet.events.<owner>.<job>.<task>.<kind>.<sender>`.
pub fn events(
    owner: &UserId,
    job: &JobId,
    task: &TaskId,
    kind: EventKind,
    sender: &Sender,
) -> String {
    format!(
        "gpufleet.events.{owner}.{job}.{task}.{}.{}",
        kind.as_str(),
        sender.token()
    )
}

/// Every event of one job.
pub fn job_events(owner: &UserId, job: &JobId) -> String {
    format!("gpufleet.events.{owner}.{job}.>")
}

/// Every event of one task.
pub fn task_events(owner: &UserId, job: &JobId, task: &TaskId) -> String {
    format!("gpufleet.events.{owner}.{job}.{task}.>")
}

/// Every event of every job of one user: what a user may replay.
pub fn user_events(user: &UserId) -> String {
    format!("gpufleet.events.{user}.>")
}

/// Events of one kind across the fleet, e.g. every result.
pub fn events_of_kind(kind: EventKind) -> String {
    format!("gpufleet.events.*.*.*.{}.*", kind.as_str())
}

/// Events of one kind of every task of one job.
pub fn job_events_of_kind(owner: &UserId, job: &JobId, kind: EventKind) -> String {
    format!("gpufleet.events.{owner}.{job}.*.{}.*", kind.as_str())
}

/// Events of one kind of one task.
pub fn task_events_of_kind(owner: &UserId, job: &JobId, task: &TaskId, kind: EventKind) -> String {
    format!("gpufleet.events.{owner}.{job}.{task}.{}.*", kind.as_str())
}

/// Every event `sender` may publish.
pub fn events_from(sender: &Sender) -> String {
    format!("gpufleet.events.*.*.*.*.{}", sender.token())
}

/// The `Nats-Msg-Id` of an attempt's result: the same on every try, so
/// that the stream keeps one copy. It holds the attempt's random token,
/// which only the worker holding the lease (and the coordinator) can read,
/// so nobody else can publish it first and have the real result dropped as
/// a duplicate.
pub fn result_msg_id(task: &TaskId, attempt: u32, token: &str) -> String {
    format!("{task}.{attempt}.{token}.result")
}

/// An event subject, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSubject {
    pub owner: UserId,
    pub job: JobId,
    pub task: TaskId,
    pub kind: EventKind,
    pub sender: Sender,
}

pub fn parse_event_subject(subject: &str) -> Option<EventSubject> {
    let mut parts = subject.split('.');
    if parts.next()? != "gpufleet" || parts.next()? != "events" {
        return None;
    }
    let owner = UserId::new(parts.next()?).ok()?;
    let job = JobId::new(parts.next()?).ok()?;
    let task = TaskId::new(parts.next()?).ok()?;
    let kind = EventKind::parse(parts.next()?)?;
    let sender = Sender::parse(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(EventSubject {
        owner,
        job,
        task,
        kind,
        sender,
    })
}

/// Where the coordinator asks `worker` to deliver a message to a task it
/// runs (a request; the worker answers whether it did).
pub fn deliver(worker: &WorkerId) -> String {
    format!("gpufleet.deliver.{worker}")
}

/// Every worker's delivery subject: what the coordinator may publish to.
pub const DELIVER_ALL: &str = "gpufleet.deliver.*";

/// Where `worker`, while its JetStream writes fail, asks the leading
/// coordinator to hear it alive over core NATS (a request; see
/// `worker/src/alive.rs`). Only the worker itself may publish there.
pub fn alive(worker: &WorkerId) -> String {
    format!("{ALIVE_PREFIX}.{worker}")
}

const ALIVE_PREFIX: &str = "gpufleet.alive";

/// Every worker's alive subject: what the coordinator listens on.
pub const ALIVE_ALL: &str = "gpufleet.alive.*";

/// The worker an alive subject names (none for anything else).
pub fn parse_alive(subject: &str) -> Option<WorkerId> {
    let token = subject.strip_prefix(ALIVE_PREFIX)?.strip_prefix('.')?;
    WorkerId::new(token).ok()
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

/// The longest artifact path (relative to the task's output directory)
/// that can be stored: it travels, encoded, in a subject, and a subject
/// must fit NATS's 4 KiB control line with room to spare.
pub const MAX_ARTIFACT_PATH: usize = 1024;

/// An artifact's subjects carry its path in base64url, since a path may
/// hold any character and a subject token may not.
fn path_token(path: &str) -> String {
    BASE64URL_NOPAD.encode(path.as_bytes())
}

/// The two kinds of message of an artifact in [`ARTIFACTS_STREAM`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactPart {
    /// One chunk of the file, in order.
    Data,
    /// The description that follows the last chunk (name, size, sha256,
    /// chunks): an artifact without one is incomplete.
    Meta,
}

impl ArtifactPart {
    fn as_str(self) -> &'static str {
        match self {
            ArtifactPart::Data => "data",
            ArtifactPart::Meta => "meta",
        }
    }
}

/// `gpufleet.artifacts.<owner>.<job>.<task>.<attempt>.<worker>.<path>.<part>`.
pub fn artifact(
    owner: &UserId,
    job: &JobId,
    task: &TaskId,
    attempt: u32,
    worker: &WorkerId,
    path: &str,
    part: ArtifactPart,
) -> String {
    format!(
        "gpufleet.artifacts.{owner}.{job}.{task}.{attempt}.{worker}.{}.{}",
        path_token(path),
        part.as_str()
    )
}

/// The descriptions of every artifact of one job.
pub fn job_artifact_metas(owner: &UserId, job: &JobId) -> String {
    format!("gpufleet.artifacts.{owner}.{job}.*.*.*.*.meta")
}

/// Every artifact message of one job.
pub fn job_artifacts(owner: &UserId, job: &JobId) -> String {
    format!("gpufleet.artifacts.{owner}.{job}.>")
}

/// Every artifact message of every job of one user.
pub fn user_artifacts(user: &UserId) -> String {
    format!("gpufleet.artifacts.{user}.>")
}

/// Every artifact message a worker may publish.
pub fn worker_artifacts(worker: &WorkerId) -> String {
    format!("gpufleet.artifacts.*.*.*.*.{worker}.>")
}

/// An artifact subject, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSubject {
    pub owner: UserId,
    pub job: JobId,
    pub task: TaskId,
    pub attempt: u32,
    pub worker: WorkerId,
    pub path: String,
    pub part: ArtifactPart,
}

pub fn parse_artifact_subject(subject: &str) -> Option<ArtifactSubject> {
    let mut parts = subject.split('.');
    if parts.next()? != "gpufleet" || parts.next()? != "artifacts" {
        return None;
    }
    let owner = UserId::new(parts.next()?).ok()?;
    let job = JobId::new(parts.next()?).ok()?;
    let task = TaskId::new(parts.next()?).ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let worker = WorkerId::new(parts.next()?).ok()?;
    let path = BASE64URL_NOPAD.decode(parts.next()?.as_bytes()).ok()?;
    let path = String::from_utf8(path).ok().filter(|p| !p.is_empty())?;
    let part = match parts.next()? {
        "data" => ArtifactPart::Data,
        "meta" => ArtifactPart::Meta,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(ArtifactSubject {
        owner,
        job,
        task,
        attempt,
        worker,
        path,
        part,
    })
}

/// How an artifact is named to people and in a result:
/// `<job>/<task>/<attempt>/<path>`.
pub fn artifact_object(job: &JobId, task: &TaskId, attempt: u32, path: &str) -> String {
    format!("{job}/{task}/{attempt}/{path}")
}

/// The `Nats-Msg-Id` of one artifact message, so that an upload retried
/// within the duplicate window stores each chunk once. It holds the
/// attempt's token for the reason [`result_msg_id`] does.
pub fn artifact_msg_id(task: &TaskId, attempt: u32, token: &str, path: &str, n: u64) -> String {
    format!("{task}.{attempt}.{token}.{}.{n}", path_token(path))
}

/// JetStream API subjects, for permissions: creating a consumer whose one
/// filter is `filter` (the server refuses a body whose filter differs from
/// the subject's, and a body with several filters).
pub mod js_api {
    pub fn consumer_create_filtered(stream: &str, filter: &str) -> String {
        format!("$JS.API.CONSUMER.CREATE.{stream}.*.{filter}")
    }

    /// Flow-control replies of push consumers on `stream`.
    pub fn flow_control(stream: &str) -> String {
        format!("$JS.FC.{stream}.>")
    }

    /// Every JetStream API subject.
    pub const ALL: &str = "$JS.API.>";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::new("alice").unwrap()
    }

    #[test]
    fn names_round_trip() {
        let job = JobId::new("j1").unwrap();
        let task = TaskId::for_index(&job, 0);
        let w = WorkerId::new("w-1").unwrap();
        let s = events(
            &alice(),
            &job,
            &task,
            EventKind::Log,
            &Sender::Worker(w.clone()),
        );
        assert_eq!(s, "gpufleet.events.alice.j1.j1-0.log.w-1");
        assert_eq!(
            parse_event_subject(&s),
            Some(EventSubject {
                owner: alice(),
                job: job.clone(),
                task: task.clone(),
                kind: EventKind::Log,
                sender: Sender::Worker(w.clone()),
            })
        );
        let c = events(
            &alice(),
            &job,
            &task,
            EventKind::State,
            &Sender::Coordinator,
        );
        assert_eq!(
            parse_event_subject(&c).map(|e| e.sender),
            Some(Sender::Coordinator)
        );
        for bad in [
            "gpufleet.events.a.b.c.nope.w",
            "gpufleet.events.a.b.c.log",
            "gpufleet.events.a.b.c.log.w.x",
            "gpufleet.events._x.b.c.log.w",
            "gpufleet.events.a.b.c.log._w",
        ] {
            assert_eq!(parse_event_subject(bad), None, "{bad}");
        }
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
    fn api_subjects_carry_the_user() {
        let s = api(&alice(), endpoint::JOBS_SUBMIT);
        assert_eq!(s, "gpufleet.api.alice.jobs.submit");
        assert_eq!(api_user(&s, endpoint::JOBS_SUBMIT), Some(alice()));
        assert_eq!(api_for(None, endpoint::JOBS_SUBMIT), JOBS_SUBMIT);
        assert_eq!(api_user(JOBS_SUBMIT, endpoint::JOBS_SUBMIT), None);
        assert_eq!(
            api_user("gpufleet.api.a.b.jobs.get", endpoint::JOBS_GET),
            None
        );
        assert_eq!(
            api_any_user(endpoint::WORKERS_LIST),
            "gpufleet.api.*.workers.list"
        );
    }

    #[test]
    fn job_wide_names() {
        let job = JobId::new("j-1").unwrap();
        let task = TaskId::for_index(&job, 2);
        assert_eq!(
            job_events_of_kind(&alice(), &job, EventKind::Progress),
            "gpufleet.events.alice.j-1.*.progress.*"
        );
        assert_eq!(result_msg_id(&task, 3, "tok"), "j-1-2.3.tok.result");
        assert_eq!(
            events_from(&Sender::Coordinator),
            "gpufleet.events.*.*.*.*._c"
        );
    }

    #[test]
    fn artifact_subjects_round_trip_any_path() {
        let job = JobId::new("j1").unwrap();
        let task = TaskId::for_index(&job, 0);
        let w = WorkerId::new("w1").unwrap();
        for path in ["out/model.pt", "a b/ü.*>.txt", "x"] {
            let s = artifact(&alice(), &job, &task, 2, &w, path, ArtifactPart::Meta);
            assert!(
                s.starts_with("gpufleet.artifacts.alice.j1.j1-0.2.w1."),
                "{s}"
            );
            assert!(!s.contains(' ') && !s.contains('*') && !s.contains('>'));
            let parsed = parse_artifact_subject(&s).unwrap();
            assert_eq!(parsed.path, path);
            assert_eq!(parsed.part, ArtifactPart::Meta);
            assert_eq!((parsed.attempt, parsed.worker), (2, w.clone()));
        }
        assert_eq!(
            artifact_object(&job, &task, 2, "out/m.pt"),
            "j1/j1-0/2/out/m.pt"
        );
        for bad in [
            "gpufleet.artifacts.alice.j1.j1-0.x.w1.YQ.meta",
            "gpufleet.artifacts.alice.j1.j1-0.2.w1.YQ.other",
            "gpufleet.artifacts.alice.j1.j1-0.2.w1..meta",
            "gpufleet.artifacts.alice.j1.j1-0.2.w1.YQ",
        ] {
            assert_eq!(parse_artifact_subject(bad), None, "{bad}");
        }
    }

    #[test]
    fn alive_subjects_name_one_worker() {
        let w = WorkerId::new("w-1").unwrap();
        assert_eq!(alive(&w), "gpufleet.alive.w-1");
        assert_eq!(parse_alive(&alive(&w)), Some(w));
        for bad in [
            "gpufleet.alive",
            "gpufleet.alive.",
            "gpufleet.alive.a.b",
            "gpufleet.alivex.w",
            "gpufleet.deliver.w",
        ] {
            assert_eq!(parse_alive(bad), None, "{bad}");
        }
    }

    #[test]
    fn leader_and_checkpoint_keys_are_never_a_job() {
        assert!(JobId::new(LEADER_KEY).is_err());
        assert!(JobId::new(CHECKPOINT_KEY).is_err());
        assert!(WorkerId::new(COORDINATOR_SENDER).is_err());
        assert_eq!(parse_job_record_key(CHECKPOINT_KEY), None);
        assert_eq!(parse_job_record_key(LEADER_KEY), None);
    }

    #[test]
    fn job_record_keys_round_trip() {
        let job = JobId::new("j-1").unwrap();
        for set in [JobRecordSet::Active, JobRecordSet::Done] {
            for part in [0, 1, 17] {
                let key = job_record_key(set, &job, part);
                assert_eq!(parse_job_record_key(&key), Some((set, job.clone(), part)));
            }
        }
        assert_eq!(job_record_key(JobRecordSet::Active, &job, 0), "active.j-1");
        assert_eq!(job_record_key(JobRecordSet::Done, &job, 2), "done.j-1.2");
        for bad in [
            "active",
            "active.j.0",
            "active.j.x",
            "other.j",
            "done.j.1.2",
            "j-1",
        ] {
            assert_eq!(parse_job_record_key(bad), None, "{bad}");
        }
    }
}
