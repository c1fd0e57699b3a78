//! Job records in `gpufleet-jobs`, in the coordinator's own format.
//!
//! **In parts.** One NATS message holds at most the server's `max_payload`
//! (1 MiB by default), and a job of 5,000 tasks, or of a few hundred with
//! results, is larger than that. So a record is split by task into parts,
//! each written as its own key: part 0 (the head) holds the job's own fields
//! and its first tasks, part n its n-th run of tasks, each task's spec with
//! its record. Where the parts start is decided once, at submit
//! ([`plan_parts`]), from what each task may grow to (its spec, a worker's
//! name, a reason, a grant, an inline result), so that no part can outgrow
//! its message; a job whose single task or own fields cannot fit is refused
//! then, with 413. A write sends only the parts that changed.
//!
//! Each part is a whole record of its tasks, so a write cut short leaves
//! every part readable, some older than others: exactly what a record
//! that lags behind looks like, which restart already mends (results are
//! replayed from the checkpoint, reservations adopted from the leases).
//!
//! **Active and done.** Unfinished jobs live under `active.`, finished ones
//! under `done.` (with a TTL of `job_retention`), so that a coordinator
//! taking over reads only the unfinished ones, however long the history.
//! A job finishes in one write, its done record: its active record is not
//! removed but expires, having been written with a TTL (`active_record_ttl`)
//! that the coordinator renews while the job lives ([`Written`]). Until it
//! expires, the newer record wins: an active record with a done record of
//! a higher revision is a finished job's ([`Shadows`]); a job reopened by a
//! retry writes its active record anew, above its done one, then removes
//! that. A bucket without per-message TTLs (none made by this version)
//! falls back to removing the active record after the done one is stored.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use std::sync::Arc;

use gpufleet_schema::{
    codec, codec::CodecError, subjects, subjects::JobRecordSet, JobId, JobSpec, JobStatus, TaskSpec,
};
use serde::{Deserialize, Serialize};

use crate::state::{
    JobRecord, TaskRecord, INLINE_RESULT_BYTES, MAX_ERROR_REASON_BYTES, MAX_REASON_BYTES,
};
use gpufleet_schema::status::MAX_JOB_ERRORS;

/// The format of the parts below; a newer coordinator may read older ones.
const VERSION: u32 = 2;

/// What a task's record may take beyond its spec, at most: ids, a worker's
/// name, a reason, times and counters, an inline result; and per GPU of
/// its grant, a UUID and its figures.
const TASK_RESERVE: usize = 1024 + MAX_REASON_BYTES + INLINE_RESULT_BYTES;
const GPU_RESERVE: usize = 256;
/// What the head may take beyond the job's spec: status, reasons, times,
/// counts, where the parts start, and the errors.
const HEAD_RESERVE: usize = 2048 + 2 * MAX_REASON_BYTES + MAX_JOB_ERRORS * ERROR_RESERVE;
/// What one of a job's errors may take: a task's id and name (256 bytes at
/// most), a worker's name, the reason, times and numbers.
const ERROR_RESERVE: usize = 768 + MAX_ERROR_REASON_BYTES;
/// A part's own framing.
const PART_OVERHEAD: usize = 64;

/// A job whose record cannot be stored: one of its parts would be larger
/// than one message may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// What does not fit: "the job's own fields" or "task 3".
    pub what: String,
    pub needed: usize,
    pub budget: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the job cannot be stored: the record of {} needs up to {} bytes, more than the {} bytes one stored message may hold (the server's max_payload, less room for headers); make it smaller",
            self.what, self.needed, self.budget
        )
    }
}

fn encoded_len<T: Serialize>(v: &T) -> usize {
    codec::encode(v).map_or(usize::MAX / 4, |b| b.len())
}

/// The job's own spec without its tasks: what the head keeps of it.
fn spec_head(spec: &JobSpec) -> JobSpec {
    JobSpec {
        id: spec.id.clone(),
        name: spec.name.clone(),
        priority: spec.priority,
        max_retries: spec.max_retries,
        gang: spec.gang,
        min_tasks: spec.min_tasks,
        max_parallel: spec.max_parallel,
        after_ok: spec.after_ok.clone(),
        after_any: spec.after_any.clone(),
        unschedulable_after: spec.unschedulable_after,
        preemptible: spec.preemptible,
        constraints: spec.constraints.clone(),
        tasks: Vec::new(),
    }
}

/// The most a task's spec and record may take together.
fn task_reserve(task: &TaskSpec) -> usize {
    let gpus = task.resources.gpus.max(1) as usize;
    encoded_len(task) + TASK_RESERVE + gpus * GPU_RESERVE
}

/// Where each part of a new job's record starts (task indices; the first
/// is 0), each part at most `budget` bytes however its tasks turn out.
pub fn plan_parts(spec: &JobSpec, budget: usize) -> Result<Vec<u32>, TooLarge> {
    let head = encoded_len(&spec_head(spec)) + HEAD_RESERVE;
    if head > budget {
        return Err(TooLarge {
            what: "the job's own fields".into(),
            needed: head,
            budget,
        });
    }
    let mut starts = vec![0u32];
    let mut used = head;
    for (i, t) in spec.tasks.iter().enumerate() {
        let need = task_reserve(t);
        if need + PART_OVERHEAD > budget {
            return Err(TooLarge {
                what: format!("task {i}"),
                needed: need + PART_OVERHEAD,
                budget,
            });
        }
        // The head may stay without tasks when even the first does not
        // fit beside the job's own fields: its part is then empty.
        if used + need > budget {
            starts.push(i as u32);
            used = PART_OVERHEAD;
        }
        used += need;
    }
    Ok(starts)
}

/// The tasks a part holds, as indices.
fn part_range(job: &JobRecord, part: usize) -> std::ops::Range<usize> {
    let start = job.parts.get(part).map_or(0, |&s| s as usize);
    let end = job
        .parts
        .get(part + 1)
        .map_or(job.tasks.len(), |&s| s as usize);
    start.min(job.tasks.len())..end.min(job.tasks.len())
}

/// What [`encode`] writes for a part, as serde would (the test that they
/// agree byte for byte keeps it so).
#[cfg(test)]
#[derive(Serialize)]
struct PartOut<'a> {
    start: u32,
    specs: Vec<&'a TaskSpec>,
    tasks: &'a [TaskRecord],
}

#[derive(Deserialize)]
struct PartIn {
    start: u32,
    specs: Vec<TaskSpec>,
    tasks: Vec<TaskRecord>,
}

/// The head: the job's own fields (its summary, as `jobs.list` shows it,
/// which a start-up reads alone for its window of finished jobs) and its
/// first part; [`encode`] writes it field by field (see [`PartOut`]).
#[cfg(test)]
#[derive(Serialize)]
struct HeadOut<'a> {
    v: u32,
    seq: u64,
    spec: JobSpec,
    job: JobStatus,
    cancel_requested: bool,
    gang_broken: &'a Option<String>,
    tasks_total: u32,
    parts: &'a [u32],
    first: PartOut<'a>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [gpufleet_schema::AttemptError],
    error_count: u32,
}

#[derive(Deserialize)]
struct HeadIn {
    v: u32,
    seq: u64,
    spec: JobSpec,
    job: JobStatus,
    #[serde(default)]
    cancel_requested: bool,
    #[serde(default)]
    gang_broken: Option<String>,
    tasks_total: u32,
    parts: Vec<u32>,
    first: PartIn,
    #[serde(default)]
    errors: Vec<gpufleet_schema::AttemptError>,
    #[serde(default)]
    error_count: u32,
}

/// Every part of a job's record, encoded, in order. Written piece by
/// piece rather than through serde, so that a spec shared by a run of
/// tasks is encoded once and its bytes repeated: specs never change, and
/// encoding them was most of a record's cost (the rest is the tasks).
pub fn encode(job: &JobRecord) -> Result<Vec<Vec<u8>>, String> {
    let n = job.parts.len().max(1);
    let mut out = Vec::with_capacity(n);
    for p in 0..n {
        let r = part_range(job, p);
        let mut buf = Vec::new();
        if p == 0 {
            encode_head(&mut buf, job, r).map_err(|e| e.to_string())?;
        } else {
            encode_part(&mut buf, job, r).map_err(|e| e.to_string())?;
        }
        out.push(buf);
    }
    Ok(out)
}

/// A key and its value, as a struct's field.
fn field<T: Serialize + ?Sized>(buf: &mut Vec<u8>, key: &str, value: &T) -> Result<(), CodecError> {
    codec::encode_into(buf, key)?;
    codec::encode_into(buf, value)
}

/// [`HeadOut`], field by field.
fn encode_head(
    buf: &mut Vec<u8>,
    job: &JobRecord,
    first: std::ops::Range<usize>,
) -> Result<(), CodecError> {
    let errors = !job.errors.is_empty();
    codec::encode_map_header(buf, if errors { 11 } else { 10 });
    field(buf, "v", &VERSION)?;
    field(buf, "seq", &job.seq)?;
    field(buf, "spec", &spec_head(&job.spec))?;
    field(buf, "job", &job.status(false))?;
    field(buf, "cancel_requested", &job.cancel_requested)?;
    field(buf, "gang_broken", &job.gang_broken)?;
    field(buf, "tasks_total", &(job.tasks.len() as u32))?;
    field(buf, "parts", &job.parts)?;
    codec::encode_into(buf, "first")?;
    encode_part(buf, job, first)?;
    if errors {
        field(buf, "errors", &job.errors)?;
    }
    field(buf, "error_count", &job.error_count)
}

/// [`PartOut`] of tasks `r`, each run of a shared spec encoded once.
fn encode_part(
    buf: &mut Vec<u8>,
    job: &JobRecord,
    r: std::ops::Range<usize>,
) -> Result<(), CodecError> {
    codec::encode_map_header(buf, 3);
    field(buf, "start", &(r.start as u32))?;
    codec::encode_into(buf, "specs")?;
    codec::encode_array_header(buf, r.len() as u32);
    let mut last: Option<(&Arc<TaskSpec>, std::ops::Range<usize>)> = None;
    for spec in &job.specs[r.clone()] {
        match &last {
            Some((shared, bytes)) if Arc::ptr_eq(shared, spec) => {
                buf.extend_from_within(bytes.clone());
            }
            _ => {
                let at = buf.len();
                codec::encode_into(buf, &**spec)?;
                last = Some((spec, at..buf.len()));
            }
        }
    }
    field(buf, "tasks", &job.tasks[r])
}

/// The keys of a record's parts in `set`, in order.
pub fn keys(job: &JobId, parts: usize, set: JobRecordSet) -> Vec<String> {
    (0..parts.max(1))
        .map(|p| subjects::job_record_key(set, job, p))
        .collect()
}

/// The summary of a job from its head's bytes, for `jobs.list`, with its
/// place in the submission order.
pub fn summary(head: &[u8]) -> Result<(u64, JobStatus), String> {
    codec::decode::<HeadIn>(head)
        .map(|h| (h.seq, h.job))
        .map_err(|e| e.to_string())
}

/// Puts records together from their parts, in whatever order they come.
#[derive(Default)]
pub struct Assembler {
    heads: HashMap<JobId, HeadIn>,
    parts: HashMap<JobId, BTreeMap<usize, PartIn>>,
    /// Keys that could not be read, with why.
    pub unreadable: Vec<(String, String)>,
}

/// What assembling found.
pub struct Assembled {
    pub jobs: Vec<JobRecord>,
    /// Keys of records that are not whole (a first write cut short, or a
    /// purge cut short): nothing relies on them; they are to be removed.
    pub garbage: Vec<String>,
}

impl Assembler {
    /// Takes one key of the bucket and its value, unless it is the head of
    /// a finished job's active record (`shadows`): that is skipped
    /// undecoded, so that jobs finished since it was written cost a start-up
    /// no memory. (Its other parts, if any, end up as garbage.)
    pub fn add(&mut self, key: &str, revision: u64, value: &[u8], shadows: &Shadows) {
        let Some((_, job, part)) = subjects::parse_job_record_key(key) else {
            return;
        };
        if part == 0 && shadows.finished(&job, revision) {
            return;
        }
        let decoded = if part == 0 {
            codec::decode::<HeadIn>(value).map(|h| {
                self.heads.insert(job, h);
            })
        } else {
            codec::decode::<PartIn>(value).map(|p| {
                self.parts.entry(job).or_default().insert(part, p);
            })
        };
        if let Err(e) = decoded {
            self.unreadable.push((key.to_string(), e.to_string()));
        }
    }

    /// The whole records, and the keys of what is not whole, in `set`.
    pub fn finish(mut self, set: JobRecordSet) -> Assembled {
        let mut jobs = Vec::new();
        let mut garbage = Vec::new();
        for (id, head) in std::mem::take(&mut self.heads) {
            let parts = self.parts.remove(&id).unwrap_or_default();
            let n = head.parts.len().max(1);
            match assemble(head, parts) {
                Ok(job) => jobs.push(job),
                Err(why) => {
                    tracing::warn!(job_id = %id, why, "dropping a job record that was never whole");
                    garbage.extend(keys(&id, n, set));
                }
            }
        }
        for (id, parts) in self.parts {
            for p in parts.keys() {
                garbage.push(subjects::job_record_key(set, &id, *p));
            }
        }
        Assembled { jobs, garbage }
    }
}

fn assemble(head: HeadIn, mut parts: BTreeMap<usize, PartIn>) -> Result<JobRecord, String> {
    let HeadIn {
        v,
        seq,
        spec,
        job,
        cancel_requested,
        gang_broken,
        tasks_total,
        parts: mut starts,
        first,
        errors,
        error_count,
    } = head;
    if v > VERSION {
        return Err(format!("written by a newer coordinator (format {v})"));
    }
    if starts.is_empty() {
        starts.push(0);
    }
    let total = tasks_total as usize;
    let mut specs = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    let mut first = Some(first);
    for (p, &start) in starts.iter().enumerate() {
        let part = if p == 0 {
            first.take()
        } else {
            parts.remove(&p)
        };
        let part = part.ok_or_else(|| format!("part {p} is missing"))?;
        let end = starts.get(p + 1).map_or(total, |&s| s as usize);
        if part.start != start
            || part.specs.len() != part.tasks.len()
            || start as usize + part.tasks.len() != end
        {
            return Err(format!("part {p} does not hold tasks {start}..{end}"));
        }
        specs.extend(part.specs);
        tasks.extend(part.tasks);
    }
    if tasks.len() != total {
        return Err(format!("{} of {total} tasks found", tasks.len()));
    }
    Ok(JobRecord {
        specs: crate::state::share(specs),
        id: job.job_id,
        owner: job.owner,
        seq,
        spec,
        status: job.status,
        reason: job.reason,
        submitted_at: job.submitted_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        cancel_requested,
        gang_broken,
        tasks,
        errors,
        error_count,
        parts: starts,
        stored: true,
        verify: false,
    })
}

/// The newest done record of each job seen by a start-up's scan, by
/// revision: an active record older than its job's done record is left
/// over from the job's finish (it expires on its own).
#[derive(Default)]
pub struct Shadows {
    done: HashMap<JobId, u64>,
}

impl Shadows {
    /// A done record's head written (or, `removed`, deleted or expired) at
    /// `revision`; the scan goes in revision order.
    pub fn done(&mut self, job: JobId, revision: u64, removed: bool) {
        if removed {
            self.done.remove(&job);
        } else {
            self.done.insert(job, revision);
        }
    }

    /// Whether an active record written at `revision` is of a job that has
    /// finished since.
    pub fn finished(&self, job: &JobId, revision: u64) -> bool {
        self.done.get(job).is_some_and(|&d| d > revision)
    }
}

/// What was last stored of each unfinished job's active record: the hash
/// of each part and when it was written, so that a write sends only the
/// parts that changed, and each part is written again before its TTL ends
/// (at half of it, off the hot path: [`Written::due`]).
pub struct Written {
    /// `None`: the parts' TTL is not used (the bucket has none): nothing
    /// is renewed.
    ttl: Option<Duration>,
    parts: HashMap<JobId, Vec<(Option<u64>, Instant)>>,
    /// Each job with when its oldest part was written, soonest first; an
    /// entry may be out of date (the job was written or forgotten since).
    renew: BinaryHeap<Reverse<(Instant, JobId)>>,
}

impl Written {
    pub fn new(ttl: Option<Duration>) -> Self {
        Written {
            ttl,
            parts: HashMap::new(),
            renew: BinaryHeap::new(),
        }
    }

    /// How long after its write a part is written again.
    fn renew_after(&self) -> Option<Duration> {
        self.ttl.map(|t| t / 2)
    }

    /// Whether part `part` of `job` is stored as `hash` and needs no
    /// renewal yet.
    pub fn same(&self, job: &JobId, part: usize, hash: u64, now: Instant) -> bool {
        let Some(&(stored, at)) = self.parts.get(job).and_then(|p| p.get(part)) else {
            return false;
        };
        stored == Some(hash)
            && self
                .renew_after()
                .is_none_or(|r| now.saturating_duration_since(at) < r)
    }

    /// The parts of `job` (all of them, by hash) are stored; those `sent`
    /// were written at `now`, the others kept what they had.
    pub fn stored(&mut self, job: &JobId, hashes: &[u64], sent: &[bool], now: Instant) {
        let before = self.parts.get(job);
        let parts: Vec<(Option<u64>, Instant)> = hashes
            .iter()
            .enumerate()
            .map(|(p, &h)| match before.and_then(|b| b.get(p)) {
                Some(&(_, at)) if !sent.get(p).copied().unwrap_or(true) => (Some(h), at),
                _ => (Some(h), now),
            })
            .collect();
        self.track(job.clone(), parts);
    }

    /// A job read at start-up whose record's oldest part was written at
    /// `at` (by what this process cannot tell: its parts' hashes are
    /// unknown, so its next write sends them all).
    pub fn restored(&mut self, job: JobId, parts: usize, at: Instant) {
        self.track(job, vec![(None, at); parts.max(1)]);
    }

    fn track(&mut self, job: JobId, parts: Vec<(Option<u64>, Instant)>) {
        let oldest = parts.iter().map(|&(_, at)| at).min();
        let new = self.parts.insert(job.clone(), parts).is_none();
        if let (true, Some(oldest), Some(_)) = (new, oldest, self.ttl) {
            self.renew.push(Reverse((oldest, job)));
        }
    }

    /// The job is finished (or gone): nothing of it is renewed.
    pub fn forget(&mut self, job: &JobId) {
        self.parts.remove(job);
    }

    /// Up to `max` jobs with a part due to be written again, oldest first.
    /// One whose write fails is due again a quarter TTL later, still
    /// before its record expires.
    pub fn due(&mut self, now: Instant, max: usize) -> Vec<JobId> {
        let Some(after) = self.renew_after() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            let Some(Reverse((at, _))) = self.renew.peek() else {
                break;
            };
            if now.saturating_duration_since(*at) < after {
                break;
            }
            let Some(Reverse((_, job))) = self.renew.pop() else {
                break;
            };
            let Some(parts) = self.parts.get_mut(&job) else {
                continue;
            };
            let oldest = parts.iter().map(|&(_, at)| at).min().unwrap_or(now);
            if now.saturating_duration_since(oldest) < after {
                self.renew.push(Reverse((oldest, job)));
                continue;
            }
            // Looked at again a quarter TTL on, in case the write fails.
            let retry = now.checked_sub(after / 2).unwrap_or(now);
            self.renew.push(Reverse((retry, job.clone())));
            out.push(job);
        }
        out
    }

    /// When the next renewal is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        let after = self.renew_after()?;
        self.renew.peek().map(|Reverse((at, _))| *at + after)
    }
}

/// Reads a job's whole record from `set`; `None` if there is none.
pub async fn read(
    kv: &gpufleet_natsutil::RawKv,
    set: JobRecordSet,
    job: &JobId,
) -> Result<Option<JobRecord>, String> {
    let Some(head) = kv
        .get(&subjects::job_record_key(set, job, 0))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let decoded: HeadIn = codec::decode(&head.value).map_err(|e| e.to_string())?;
    let n = decoded.parts.len().max(1);
    let mut parts = BTreeMap::new();
    for p in 1..n {
        let Some(e) = kv
            .get(&subjects::job_record_key(set, job, p))
            .await
            .map_err(|e| e.to_string())?
        else {
            return Err(format!("part {p} of the record of job {job} is missing"));
        };
        parts.insert(
            p,
            codec::decode::<PartIn>(&e.value).map_err(|e| e.to_string())?,
        );
    }
    assemble(decoded, parts).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{Encoding, GpuGrant, Grant, TaskState, WorkerId};
    use time::OffsetDateTime;

    const BUDGET: usize = 256 * 1024;

    fn spec(n: usize, command: &str) -> JobSpec {
        let task = format!(r#"{{"command": ["{command}"]}}"#);
        let tasks = (0..n)
            .map(|_| Encoding::Json.decode(task.as_bytes()).unwrap())
            .collect();
        JobSpec {
            id: None,
            name: Some("big".into()),
            priority: 0,
            max_retries: 2,
            gang: false,
            min_tasks: None,
            max_parallel: None,
            after_ok: vec![],
            after_any: vec![],
            unschedulable_after: None,
            preemptible: false,
            constraints: Default::default(),
            tasks,
        }
    }

    fn job(spec: JobSpec) -> JobRecord {
        let parts = plan_parts(&spec, BUDGET).unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let mut j = JobRecord::new(JobId::new("j").unwrap(), 1, spec, at);
        j.parts = parts;
        j
    }

    /// Every task grown as large as its record may get.
    fn grow(j: &mut JobRecord) {
        let at = j.submitted_at;
        j.owner = gpufleet_schema::UserId::new("u".repeat(128)).unwrap();
        for t in &mut j.tasks {
            t.reserve(
                WorkerId::new("w".repeat(128)).unwrap(),
                Grant {
                    gpus: vec![GpuGrant {
                        index: 7,
                        uuid: ("GPU-".to_string() + &"f".repeat(120)).into(),
                        memory: gpufleet_schema::ByteSize(u64::MAX),
                    }],
                    ..Grant::default()
                },
                gpufleet_schema::lease::new_token(),
            );
            t.start(at, u64::MAX);
            t.record_report(
                Some(serde_json::json!({"x": "y".repeat(INLINE_RESULT_BYTES - 20)})),
                u64::MAX,
                Some(at),
                Some(gpufleet_schema::TaskUsage {
                    peak_rss: gpufleet_schema::ByteSize(u64::MAX),
                    cpu_seconds: f64::MAX,
                    gpu_memory_peak: Some(gpufleet_schema::ByteSize(u64::MAX)),
                    gpu_utilization_mean: Some(f64::MAX),
                    gpu_simulated: true,
                    samples: u32::MAX,
                }),
            );
            t.end(TaskState::Failed, Some(-1), Some("r".repeat(100_000)), at);
        }
        j.reason = Some("q".repeat(100_000));
        j.derive_status(at);
    }

    #[test]
    fn the_largest_job_fits_in_parts_however_its_tasks_grow() {
        let mut j = job(spec(gpufleet_schema::spec::MAX_TASKS_PER_JOB, "true"));
        assert!(j.parts.len() > 1);
        grow(&mut j);
        let parts = encode(&j).unwrap();
        assert_eq!(parts.len(), j.parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= BUDGET, "part {i} is {} bytes", p.len());
        }
        let mut a = Assembler::default();
        for (i, p) in parts.iter().enumerate() {
            a.add(
                &subjects::job_record_key(JobRecordSet::Active, &j.id, i),
                1,
                p,
                &Shadows::default(),
            );
        }
        let out = a.finish(JobRecordSet::Active);
        assert!(out.garbage.is_empty());
        j.stored = true;
        // Not assert_eq: a difference would print megabytes.
        assert!(out.jobs == vec![j], "the record read back differs");
    }

    #[test]
    fn a_record_read_back_gives_the_spec_it_was_submitted_with() {
        // What a submit under a finished job's id is compared with: a
        // record keeps its tasks' specs apart from the job's own.
        let mut submitted = spec(5, "true");
        submitted.tasks[3].command.push("x".into());
        let j = job(submitted.clone());
        let mut a = Assembler::default();
        for (i, p) in encode(&j).unwrap().iter().enumerate() {
            let key = subjects::job_record_key(JobRecordSet::Done, &j.id, i);
            a.add(&key, 1, p, &Shadows::default());
        }
        let read = a.finish(JobRecordSet::Done).jobs.remove(0);
        assert_eq!(read.full_spec(), submitted);
        assert!(read.same_spec(&submitted));
        assert!(!read.same_spec(&spec(5, "true")));
    }

    /// The record as serde writes [`HeadOut`] and [`PartOut`].
    fn encode_by_serde(job: &JobRecord) -> Vec<Vec<u8>> {
        let specs: Vec<TaskSpec> = job.specs.iter().map(|s| TaskSpec::clone(s)).collect();
        (0..job.parts.len().max(1))
            .map(|p| {
                let r = part_range(job, p);
                let part = PartOut {
                    start: r.start as u32,
                    specs: specs[r.clone()].iter().collect(),
                    tasks: &job.tasks[r],
                };
                if p > 0 {
                    return codec::encode(&part).unwrap();
                }
                codec::encode(&HeadOut {
                    v: VERSION,
                    seq: job.seq,
                    spec: spec_head(&job.spec),
                    job: job.status(false),
                    cancel_requested: job.cancel_requested,
                    gang_broken: &job.gang_broken,
                    tasks_total: job.tasks.len() as u32,
                    parts: &job.parts,
                    first: part,
                    errors: &job.errors,
                    error_count: job.error_count,
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_record_encoded_piece_by_piece_is_what_serde_writes() {
        // Shared specs (a run of copies), specs of their own, several
        // parts, errors or none.
        let mut mixed = spec(40, "true");
        for (i, t) in mixed.tasks.iter_mut().enumerate() {
            if i % 7 == 3 {
                t.command.push(format!("arg-{i}"));
            }
        }
        for spec in [spec(1, "true"), spec(300, "true"), mixed] {
            let mut j = job(spec);
            j.parts = (0..j.tasks.len() as u32).step_by(17).collect();
            assert_eq!(encode(&j).unwrap(), encode_by_serde(&j));
            grow(&mut j);
            let at = j.submitted_at;
            j.note_end(0, TaskState::Failed, Some(1), "it broke", at);
            assert!(!j.errors.is_empty());
            assert_eq!(encode(&j).unwrap(), encode_by_serde(&j));
        }
    }

    #[test]
    fn a_small_job_is_one_part() {
        let j = job(spec(3, "true"));
        assert_eq!(j.parts, vec![0]);
        let parts = encode(&j).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(summary(&parts[0]).unwrap().1.counts.queued, 3);
    }

    #[test]
    fn a_task_too_large_for_one_message_is_named() {
        let s = spec(2, &"x".repeat(300_000));
        let e = plan_parts(&s, BUDGET).unwrap_err();
        assert_eq!(e.what, "task 0");
        assert!(e.to_string().contains("max_payload"), "{e}");
    }

    #[test]
    fn a_record_missing_a_part_is_garbage_not_a_job() {
        let j = job(spec(gpufleet_schema::spec::MAX_TASKS_PER_JOB, "true"));
        let parts = encode(&j).unwrap();
        let mut a = Assembler::default();
        for (i, p) in parts.iter().enumerate().filter(|(i, _)| *i != 1) {
            a.add(
                &subjects::job_record_key(JobRecordSet::Active, &j.id, i),
                1,
                p,
                &Shadows::default(),
            );
        }
        // A stray part of a job whose head is gone.
        let other = JobId::new("k").unwrap();
        a.add(
            &subjects::job_record_key(JobRecordSet::Active, &other, 3),
            1,
            &parts[2],
            &Shadows::default(),
        );
        let out = a.finish(JobRecordSet::Active);
        assert!(out.jobs.is_empty());
        assert_eq!(out.garbage.len(), parts.len() + 1);
    }

    fn one_head(id: &str) -> (JobRecord, Vec<u8>) {
        let mut j = job(spec(1, "true"));
        j.id = JobId::new(id).unwrap();
        let head = encode(&j).unwrap().remove(0);
        (j, head)
    }

    fn assemble_active(heads: &[(&JobRecord, u64, &[u8])], shadows: &Shadows) -> Vec<JobId> {
        let mut a = Assembler::default();
        for (j, rev, head) in heads {
            let key = subjects::job_record_key(JobRecordSet::Active, &j.id, 0);
            a.add(&key, *rev, head, shadows);
        }
        let mut ids: Vec<JobId> = a
            .finish(JobRecordSet::Active)
            .jobs
            .into_iter()
            .map(|j| j.id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_done_record_newer_than_the_active_one_wins_at_load() {
        let (done, done_head) = one_head("done");
        let (live, live_head) = one_head("live");
        let mut shadows = Shadows::default();
        // The finished job's active record (rev 1) is older than its done
        // record (rev 3); the live job has none.
        shadows.done(done.id.clone(), 3, false);
        let ids = assemble_active(&[(&done, 1, &done_head), (&live, 2, &live_head)], &shadows);
        assert_eq!(ids, vec![live.id.clone()]);
    }

    #[test]
    fn a_reopened_job_loads_as_active() {
        let (j, head) = one_head("again");
        // Finished (done at 3), reopened by a retry: active written anew
        // (5), then its done record removed (6).
        let mut shadows = Shadows::default();
        shadows.done(j.id.clone(), 3, false);
        assert_eq!(
            assemble_active(&[(&j, 5, &head)], &shadows),
            vec![j.id.clone()]
        );
        // Also when the removal of the done record was cut short: the
        // newer record wins.
        shadows.done(j.id.clone(), 6, true);
        assert_eq!(
            assemble_active(&[(&j, 5, &head)], &shadows),
            vec![j.id.clone()]
        );
        let mut cut_short = Shadows::default();
        cut_short.done(j.id.clone(), 3, false);
        assert_eq!(assemble_active(&[(&j, 5, &head)], &cut_short), vec![j.id]);
    }

    #[test]
    fn an_active_record_of_a_live_job_is_renewed_before_its_ttl() {
        let ttl = Duration::from_secs(600);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Written::new(Some(ttl));
        let (a, b) = (JobId::new("a").unwrap(), JobId::new("b").unwrap());
        w.stored(&a, &[1, 2], &[true, true], at(0));
        w.stored(&b, &[7], &[true], at(100));
        assert!(w.same(&a, 0, 1, at(10)));
        assert!(!w.same(&a, 0, 9, at(10)), "a changed part is sent");
        assert!(w.due(at(299), 10).is_empty());
        assert_eq!(w.next_due(), Some(at(300)));
        // Half a TTL on, its parts are due, and are sent though unchanged.
        assert_eq!(w.due(at(300), 10), vec![a.clone()]);
        assert!(!w.same(&a, 1, 2, at(300)));
        // Part 1 changed at 200: it was sent then; both go again at 300
        // because part 0 is due, and the job is fresh afterwards.
        w.stored(&a, &[1, 3], &[true, true], at(300));
        assert!(w.due(at(399), 10).is_empty());
        assert_eq!(w.due(at(400), 10), vec![b.clone()]);
        // A write that failed: due again a quarter TTL later, long before
        // its record (written at 100) expires at 700.
        assert!(w.due(at(549), 10).is_empty());
        assert_eq!(w.due(at(550), 10), vec![b.clone()]);
        // A finished job is renewed no more.
        w.forget(&b);
        w.forget(&a);
        assert!(w.due(at(10_000), 10).is_empty());
    }

    #[test]
    fn a_part_changed_later_keeps_the_job_due_by_its_oldest_part() {
        let ttl = Duration::from_secs(600);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Written::new(Some(ttl));
        let a = JobId::new("a").unwrap();
        w.stored(&a, &[1, 2], &[true, true], at(0));
        // Only part 1 changes at 200; part 0 keeps its write at 0.
        w.stored(&a, &[1, 3], &[false, true], at(200));
        assert!(w.same(&a, 1, 3, at(300)));
        assert!(!w.same(&a, 0, 1, at(300)));
        assert_eq!(w.due(at(300), 10), vec![a.clone()]);
        // Restored jobs are renewed by their stored age.
        let r = JobId::new("r").unwrap();
        w.restored(r.clone(), 1, at(100));
        assert!(!w.same(&r, 0, 0, at(101)), "its hash is unknown");
        assert_eq!(w.due(at(400), 10), vec![r]);
        // Without TTLs nothing is ever due.
        let mut none = Written::new(None);
        none.stored(&a, &[1], &[true], at(0));
        assert!(none.same(&a, 0, 1, at(1_000_000)));
        assert!(none.due(at(1_000_000), 10).is_empty());
    }
}
