//! What every fault must leave intact (issue 13), checked at the end of a
//! fault test from three witnesses that do not trust each other:
//!
//! - the **API** (`jobs.get`): every job ended;
//! - the **events stream**: each attempt ended once, each task has exactly
//!   one accepted result, from the worker that held the attempt, and the
//!   coordinator never started an attempt while an earlier one of the same
//!   task was still open;
//! - a **ledger** the tasks themselves write ([`Ledger::task`]): each probe
//!   task appends its start, a tick every 100 ms and its stop, with the
//!   wall clock, to one shared file. Two attempts of a task whose records
//!   interleave were alive at the same moment, whatever the fleet believed;
//!   two tasks whose records on one GPU interleave held that GPU together.
//!
//! A fourth, the **lease book** ([`LeaseWatch`]), follows `gpufleet-leases`
//! throughout the test and records any moment at which a worker's live
//! leases hold more than it has (a whole GPU granted twice, more CPUs or
//! GPU memory than exist). A lease ends when its key expires or is
//! removed, or when its holder's result for its attempt is stored (the
//! worker then leaves the key to expire).
//!
//! The checks are pure functions over what was read ([`check_history`]),
//! unit-tested below with histories that break each invariant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use gpufleet_natsutil::{KvEvent, KvOp, RawKv};
use gpufleet_schema::{
    codec, subjects, Event, EventBody, JobStatus, Lease, LeaseState, TaskState, WorkerAdvert,
};
use serde_json::{json, Value};

use crate::fleet::Fleet;

/// How often a probe task writes a tick: the resolution at which an
/// overlap of two attempts can be missed.
pub const TICK: Duration = Duration::from_millis(100);

/// The probe: records `start`, a `tick` every [`TICK`] for `argv[1]`
/// seconds, `stop`, then writes its result naming its attempt. One
/// `write` per line on an `O_APPEND` file, so that lines of concurrent
/// tasks never mix. Python (a test requirement anyway) rather than `sh`,
/// which would fork `date` and `sleep` on every tick.
const PROBE: &str = r#"
import json, os, sys, time
ledger, task, attempt = os.environ["LEDGER"], os.environ["GPUFLEET_TASK_ID"], os.environ["GPUFLEET_ATTEMPT"]
gpus = os.environ.get("GPUFLEET_GPUS") or "-"
fd = os.open(ledger, os.O_WRONLY | os.O_APPEND)
def record(mark):
    os.write(fd, f"{task} {attempt} {mark} {time.time_ns()} {gpus}\n".encode())
record("start")
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    time.sleep(float(sys.argv[2]))
    record("tick")
record("stop")
with open(os.environ["GPUFLEET_RESULT"], "w") as f:
    json.dump({"task": task, "attempt": int(attempt)}, f)
"#;

/// The shared file probe tasks record their lives in.
#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Start,
    Tick,
    Stop,
}

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub task: String,
    pub attempt: u32,
    pub mark: Mark,
    /// Wall clock, nanoseconds since the epoch.
    pub at: i128,
    /// The UUIDs of the GPUs the attempt was given (whole GPUs only).
    pub gpus: Vec<String>,
}

impl Ledger {
    /// A new, empty ledger in `dir` (made if need be) that tasks may
    /// append to, also when they run as another user (`nobody`, under a
    /// worker run by root).
    pub fn create(dir: &Path) -> Ledger {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).expect("create the ledger's directory");
        let path = dir.join("ledger");
        std::fs::write(&path, "").expect("create the ledger");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .expect("open the ledger to tasks");
        Ledger { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A task (JSON, for a job's `tasks`) that runs for `run` while
    /// recording itself here, holding `gpus` whole GPUs. Its result is
    /// `{"task": <task id>, "attempt": <n>}`.
    pub fn task(&self, name: &str, run: Duration, gpus: u32) -> Value {
        json!({
            "name": name,
            "command": ["python3", "-c", PROBE, run.as_secs_f64().to_string(),
                        TICK.as_secs_f64().to_string()],
            "env": {"LEDGER": self.path.display().to_string()},
            "resources": {"gpus": gpus, "cpus": 0.25},
        })
    }

    /// Every record so far. A line cut short (a task killed mid-write
    /// cannot cut one: each is one `write`) would be a bug in the probe.
    pub fn read(&self) -> Vec<Record> {
        let text = std::fs::read_to_string(&self.path).expect("read the ledger");
        text.lines()
            .map(|l| parse_record(l).unwrap_or_else(|| panic!("ledger line {l:?}")))
            .collect()
    }

    /// When an attempt of `task` numbered `from` or later first recorded
    /// its start (nanoseconds since the epoch).
    pub fn started_at(&self, task: &str, from: u32) -> Option<i128> {
        self.read()
            .into_iter()
            .filter(|r| r.task == task && r.attempt >= from && r.mark == Mark::Start)
            .map(|r| r.at)
            .min()
    }

    /// When `attempt` of `task` last recorded anything (nanoseconds since
    /// the epoch): the last moment it is known to have run.
    pub fn last_record(&self, task: &str, attempt: u32) -> Option<i128> {
        self.read()
            .into_iter()
            .filter(|r| r.task == task && r.attempt == attempt)
            .map(|r| r.at)
            .max()
    }

    /// The tasks that recorded a start of `attempt` (in order of their
    /// first record).
    pub fn started(&self, attempt: u32) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for r in self.read() {
            if r.attempt == attempt && r.mark == Mark::Start && !out.contains(&r.task) {
                out.push(r.task);
            }
        }
        out
    }
}

fn parse_record(line: &str) -> Option<Record> {
    let mut f = line.split(' ');
    let task = f.next()?.to_string();
    let attempt = f.next()?.parse().ok()?;
    let mark = match f.next()? {
        "start" => Mark::Start,
        "tick" => Mark::Tick,
        "stop" => Mark::Stop,
        _ => return None,
    };
    let at = f.next()?.parse().ok()?;
    let gpus = match f.next()? {
        "-" => vec![],
        g => g.split(',').map(str::to_string).collect(),
    };
    f.next().is_none().then_some(Record {
        task,
        attempt,
        mark,
        at,
        gpus,
    })
}

/// What a check found: the violations, and what the history held (so a
/// test can say how much its fault exercised).
#[derive(Debug, Default)]
pub struct Report {
    pub jobs: usize,
    pub tasks: usize,
    /// Attempts the coordinator made (RESERVED events, by attempt).
    pub attempts: usize,
    /// Attempts that ended LOST or INTERRUPTED.
    pub retried: usize,
    /// Those attempts: task, attempt, how and why they ended.
    pub retries: Vec<String>,
    /// Attempts the ledger saw start.
    pub ran: usize,
    pub violations: Vec<String>,
    /// What is not a violation but is not as it should be either: a task's
    /// history with events missing, say.
    pub notes: Vec<String>,
    /// The state and result events of each task a violation names, to
    /// tell what happened.
    pub histories: Vec<String>,
}

impl Report {
    /// Panics listing every violation.
    pub fn assert_holds(&self) {
        assert!(
            self.violations.is_empty(),
            "{} invariant violation(s) in {} job(s), {} task(s):\n  {}\nthe events of those tasks:\n{}",
            self.violations.len(),
            self.jobs,
            self.tasks,
            self.violations.join("\n  "),
            self.histories.join("\n")
        );
    }

    pub fn summary(&self) -> String {
        format!(
            "{} jobs, {} tasks, {} attempts placed ({} LOST or INTERRUPTED), {} started by the ledger, {} violations",
            self.jobs,
            self.tasks,
            self.attempts,
            self.retried,
            self.ran,
            self.violations.len()
        )
    }
}

/// Checks a whole history: the final statuses of the jobs, the events of
/// those jobs (in stream order, per job) and the ledger.
pub fn check_history(statuses: &[JobStatus], events: &[Vec<Event>], ledger: &[Record]) -> Report {
    let mut r = Report {
        jobs: statuses.len(),
        ..Report::default()
    };
    let v = &mut r.violations;
    for s in statuses {
        if !s.status.is_finished() {
            v.push(format!(
                "job {} did not end: {} ({:?})",
                s.job_id, s.status, s.reason
            ));
        }
        for t in &s.tasks {
            if !t.state.is_end() {
                v.push(format!(
                    "task {} did not end: {} (attempt {})",
                    t.task_id, t.state, t.attempt
                ));
            }
        }
    }
    let by_task = statuses
        .iter()
        .flat_map(|s| &s.tasks)
        .map(|t| (t.task_id.to_string(), t))
        .collect::<BTreeMap<_, _>>();
    r.tasks = by_task.len();
    let mut per_task: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events.iter().flatten() {
        per_task.entry(e.task_id.to_string()).or_default().push(e);
    }
    for (task, evs) in &per_task {
        let Some(status) = by_task.get(task) else {
            v.push(format!("events of task {task}, which no job has"));
            continue;
        };
        r.attempts += check_task_events(status, evs, v, &mut r.retries, &mut r.notes);
    }
    r.retried = r.retries.len();
    for task in by_task.keys().filter(|t| !per_task.contains_key(*t)) {
        v.push(format!("task {task} has no events"));
    }
    r.ran = check_ledger(&by_task, ledger, v);
    for (task, evs) in &per_task {
        let named = format!("task {task}:");
        if r.violations.iter().any(|m| m.starts_with(&named)) {
            r.histories.push(history(task, evs));
        }
    }
    r
}

/// A task's state and result events, one a line.
fn history(task: &str, evs: &[&Event]) -> String {
    let mut out = format!("  task {task}:");
    let first = evs.first().map(|e| e.at);
    for e in evs {
        let what = match &e.body {
            EventBody::State {
                state,
                reason,
                holder,
            } => format!(
                "{state} holder {:?} reason {:?}",
                holder.as_ref().map(|h| h.as_str()),
                reason
            ),
            EventBody::Result(o) => format!("result {} {:?}", o.state, o.result),
            EventBody::Log { .. } | EventBody::Progress { .. } | EventBody::Message { .. } => {
                continue
            }
        };
        let ms = first.map_or(0.0, |f| (e.at - f).as_seconds_f64() * 1e3);
        let from = e.worker.as_ref().map_or("coordinator", |w| w.as_str());
        out.push_str(&format!(
            "\n    {ms:8.1} ms  attempt {} from {from}: {what}",
            e.attempt
        ));
    }
    out
}

/// The events of one task, in stream order. Returns how many attempts
/// were placed; adds those that ended LOST or INTERRUPTED to `retries`.
fn check_task_events(
    status: &gpufleet_schema::TaskStatus,
    evs: &[&Event],
    v: &mut Vec<String>,
    retries: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> usize {
    let task = status.task_id.as_str();
    // attempt -> the worker holding it: the one the coordinator's
    // RESERVED names, else the sender of its RUNNING.
    let mut holder: BTreeMap<u32, Option<String>> = BTreeMap::new();
    // attempt -> its ending states.
    let mut ends: BTreeMap<u32, Vec<TaskState>> = BTreeMap::new();
    // attempt -> the results reported for it, with their senders.
    let mut results: BTreeMap<u32, Vec<(Option<String>, &gpufleet_schema::TaskOutcome)>> =
        BTreeMap::new();
    // Attempts a holder's SUCCEEDED result ended: the coordinator sends no
    // state event for a success, so that result is the end, unless a later
    // state event of the coordinator ends the attempt otherwise.
    let mut succeeded_by_result: BTreeSet<u32> = BTreeSet::new();
    // The attempt placed and not yet ended, in the coordinator's order.
    let mut open: Option<u32> = None;
    let mut newest = 0u32;
    for e in evs {
        match &e.body {
            EventBody::State {
                state,
                holder: named,
                reason,
            } => {
                let a = e.attempt;
                // The coordinator's RESERVED and RUNNING name the holder; a
                // worker's own RUNNING is signed by its sender.
                let from_worker = e.worker.is_some();
                let named = named.as_ref().or(e.worker.as_ref()).map(|w| w.to_string());
                if matches!(state, TaskState::Reserved | TaskState::Running) {
                    let held = holder.entry(a).or_insert(None);
                    match (&held, named) {
                        (_, None) => {}
                        (None, named) => *held = named,
                        (Some(h), Some(n)) if *h != n => v.push(format!(
                            "task {task}: attempt {a} {state} from {n}, held by {h}"
                        )),
                        _ => {}
                    }
                }
                // The order of attempts is the coordinator's: a worker's
                // RUNNING may reach the stream after the coordinator gave
                // its attempt up (the ledger says whether both really ran).
                if from_worker {
                    continue;
                }
                match state {
                    TaskState::Reserved | TaskState::Running => {
                        if a < newest {
                            v.push(format!(
                                "task {task}: {state} of attempt {a} after attempt {newest} began"
                            ));
                        }
                        if let Some(o) = open.filter(|o| *o != a) {
                            v.push(format!(
                                "task {task}: attempt {a} {state} while attempt {o} had not ended"
                            ));
                        }
                        open = Some(a);
                        newest = newest.max(a);
                    }
                    TaskState::Queued => {
                        // A reservation taken back before it was claimed:
                        // the attempt's number goes to the next holder.
                        holder.remove(&a);
                        if open == Some(a) {
                            open = None;
                        }
                    }
                    end => {
                        // It overrides a result it came after.
                        succeeded_by_result.remove(&a);
                        ends.entry(a).or_default().push(*end);
                        if end.is_retryable() {
                            retries.push(format!(
                                "{task} attempt {a} {end}: {}",
                                reason.as_deref().unwrap_or("no reason")
                            ));
                        }
                        if open == Some(a) {
                            open = None;
                        }
                    }
                }
            }
            EventBody::Result(outcome) => {
                let sender = e.worker.as_ref().map(|w| w.to_string());
                // From the holder (or nobody named one: the status's is
                // checked below), of an attempt the coordinator had not
                // ended: a result it came after does not count.
                let a = e.attempt;
                let from_holder = match holder.get(&a) {
                    Some(Some(h)) => sender.as_ref() == Some(h),
                    _ => true,
                };
                if outcome.state == TaskState::Succeeded && from_holder && !ends.contains_key(&a) {
                    succeeded_by_result.insert(a);
                    if open == Some(a) {
                        open = None;
                    }
                }
                results
                    .entry(e.attempt)
                    .or_default()
                    .push((sender, outcome));
            }
            EventBody::Log { .. } | EventBody::Progress { .. } | EventBody::Message { .. } => {}
        }
    }
    for a in succeeded_by_result {
        ends.entry(a).or_default().push(TaskState::Succeeded);
    }
    for (a, es) in &ends {
        if es.len() > 1 {
            v.push(format!(
                "task {task}: attempt {a} ended {} times: {es:?}",
                es.len()
            ));
        }
    }
    let succeeded: Vec<u32> = ends
        .iter()
        .filter(|(_, es)| es.contains(&TaskState::Succeeded))
        .map(|(a, _)| *a)
        .collect();
    if succeeded.len() > 1 {
        v.push(format!("task {task}: attempts {succeeded:?} all succeeded"));
    }
    for (a, rs) in &results {
        if rs.len() > 1 {
            v.push(format!(
                "task {task}: {} results for attempt {a} (from {:?})",
                rs.len(),
                rs.iter().map(|(w, _)| w).collect::<Vec<_>>()
            ));
        }
    }
    // The status must be the last end the stream holds, and an end the
    // coordinator took from a worker must be that worker's one result.
    let last_end = ends
        .iter()
        .next_back()
        .and_then(|(a, es)| Some((*a, *es.last()?)));
    if status.state.is_end()
        && status.state != TaskState::Cancelled
        && last_end != Some((status.attempt, status.state))
    {
        v.push(format!(
            "task {task}: ended {} as attempt {} but the stream's last end is {last_end:?}",
            status.state, status.attempt
        ));
    }
    if matches!(
        status.state,
        TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut
    ) {
        let a = status.attempt;
        let rs = results.get(&a).map(Vec::as_slice).unwrap_or_default();
        // The stream's witness of the holder, else the coordinator's record:
        // a state event may be lost while the stream has no leader.
        let held_by = match holder.get(&a).cloned().flatten() {
            Some(h) => Some(h),
            None => {
                let recorded = status.worker.as_ref().map(|w| w.to_string());
                notes.push(format!(
                    "task {task}: no event in the stream names the holder of attempt {a} (its RESERVED and RUNNING were not stored); the status names {recorded:?}"
                ));
                recorded
            }
        };
        match rs {
            [(sender, outcome)] => {
                if held_by.is_none() || *sender != held_by {
                    v.push(format!(
                        "task {task}: the accepted result of attempt {a} came from {sender:?}, the attempt was held by {held_by:?}"
                    ));
                }
                if outcome.state != status.state {
                    v.push(format!(
                        "task {task}: ended {} but its accepted result says {}",
                        status.state, outcome.state
                    ));
                }
                if outcome.result != status.result {
                    v.push(format!(
                        "task {task}: the status holds the result {:?}, the stream {:?}",
                        status.result, outcome.result
                    ));
                }
            }
            _ => v.push(format!(
                "task {task}: ended {} as attempt {a} with {} results for it in the stream (one accepted result expected)",
                status.state,
                rs.len()
            )),
        }
        // A probe's result names the attempt that wrote it.
        if let Some(r) = status.result.as_ref().and_then(|r| r.get("attempt")) {
            if r.as_u64() != Some(a.into()) {
                v.push(format!(
                    "task {task}: attempt {a} accepted the result of attempt {r}"
                ));
            }
        }
    }
    holder.len()
}

/// A task's id and an attempt of it.
type AttemptKey = (String, u32);

/// One attempt's life in the ledger.
#[derive(Debug)]
struct Life {
    starts: usize,
    first: i128,
    last: i128,
    stopped: bool,
    gpus: Vec<String>,
}

/// The ledger's checks; returns how many attempts it saw start.
fn check_ledger(
    statuses: &BTreeMap<String, &gpufleet_schema::TaskStatus>,
    ledger: &[Record],
    v: &mut Vec<String>,
) -> usize {
    let mut lives: BTreeMap<AttemptKey, Life> = BTreeMap::new();
    for r in ledger {
        let life = lives
            .entry((r.task.clone(), r.attempt))
            .or_insert_with(|| Life {
                starts: 0,
                first: r.at,
                last: r.at,
                stopped: false,
                gpus: r.gpus.clone(),
            });
        life.first = life.first.min(r.at);
        life.last = life.last.max(r.at);
        life.starts += usize::from(r.mark == Mark::Start);
        life.stopped |= r.mark == Mark::Stop;
    }
    let ms = |ns: i128| ns as f64 / 1e6;
    for ((task, a), life) in &lives {
        if life.starts != 1 {
            v.push(format!(
                "task {task}: attempt {a} started {} times",
                life.starts
            ));
        }
    }
    // Two attempts of one task alive at once: each was alive from its
    // first record to its last, so intervals that meet mean both were.
    let mut per_task: BTreeMap<&str, Vec<(u32, &Life)>> = BTreeMap::new();
    for ((task, a), life) in &lives {
        per_task.entry(task).or_default().push((*a, life));
    }
    for (task, ls) in &per_task {
        for (i, (a, x)) in ls.iter().enumerate() {
            for (b, y) in &ls[i + 1..] {
                if x.first <= y.last && y.first <= x.last {
                    let overlap = x.last.min(y.last) - x.first.max(y.first);
                    v.push(format!(
                        "task {task}: attempts {a} and {b} ran at the same time for {:.1} ms (attempt {a} recorded {:.1}..{:.1} ms, attempt {b} {:.1}..{:.1} ms into the ledger)",
                        ms(overlap),
                        ms(x.first - ledger[0].at),
                        ms(x.last - ledger[0].at),
                        ms(y.first - ledger[0].at),
                        ms(y.last - ledger[0].at),
                    ));
                }
            }
        }
    }
    // One whole GPU, two holders at once.
    let mut per_gpu: BTreeMap<&str, Vec<(&AttemptKey, &Life)>> = BTreeMap::new();
    for (key, life) in &lives {
        for g in &life.gpus {
            per_gpu.entry(g).or_default().push((key, life));
        }
    }
    for (gpu, ls) in &per_gpu {
        for (i, (k, x)) in ls.iter().enumerate() {
            for (l, y) in &ls[i + 1..] {
                if k.0 != l.0 && x.first <= y.last && y.first <= x.last {
                    v.push(format!(
                        "GPU {gpu} held by {} (attempt {}) and {} (attempt {}) at once for {:.1} ms",
                        k.0,
                        k.1,
                        l.0,
                        l.1,
                        ms(x.last.min(y.last) - x.first.max(y.first))
                    ));
                }
            }
        }
    }
    // The accepted result came from an attempt that ran to its end.
    for (task, s) in statuses {
        if s.state == TaskState::Succeeded && s.result.as_ref().is_some_and(is_probe_result) {
            match lives.get(&(task.clone(), s.attempt)) {
                Some(life) if life.stopped => {}
                Some(_) => v.push(format!(
                    "task {task}: attempt {} succeeded but never recorded its stop",
                    s.attempt
                )),
                None => v.push(format!(
                    "task {task}: attempt {} succeeded but never recorded its start",
                    s.attempt
                )),
            }
        }
    }
    lives.len()
}

fn is_probe_result(r: &Value) -> bool {
    r.get("task").is_some() && r.get("attempt").is_some()
}

/// Waits until every job has ended or `deadline` has passed, then checks
/// the history of `jobs` against `ledger` and what `leases` saw.
pub async fn check(
    fleet: &Fleet,
    jobs: &[String],
    ledger: &Ledger,
    leases: Option<&LeaseWatch>,
    deadline: Duration,
) -> Report {
    let until = tokio::time::Instant::now() + deadline;
    let mut statuses = Vec::with_capacity(jobs.len());
    for job in jobs {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        // A job still running at the deadline is reported, not panicked
        // on: the other invariants are worth seeing too.
        let status = match tokio::time::timeout(left, fleet.wait_finished(job, deadline)).await {
            Ok(s) => s,
            Err(_) => fleet.get(job).await,
        };
        statuses.push(serde_json::from_value::<JobStatus>(status).expect("a JobStatus"));
    }
    let mut events = Vec::with_capacity(jobs.len());
    for job in jobs {
        events.push(fleet.events(job).await);
    }
    let mut report = check_history(&statuses, &events, &ledger.read());
    if let Some(w) = leases {
        report.violations.extend(w.violations());
    }
    report
}

/// Follows worker adverts and `gpufleet-leases` from its start until it is
/// dropped, and records any moment at which a worker's live leases hold
/// more than it has. Survives a server restart or a node's loss: the
/// watch starts again from the bucket's current contents.
pub struct LeaseWatch {
    violations: Arc<Mutex<Vec<String>>>,
    restarts: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    /// Starts watching the fleet at `url` (one URL or several); returns
    /// once the first watch has read the buckets' contents.
    pub async fn start(url: &str) -> LeaseWatch {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let restarts = Arc::new(Mutex::new(0));
        let client = crate::fleet::connect(url).await;
        let (synced_tx, synced) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(watch_leases(
            client,
            violations.clone(),
            restarts.clone(),
            synced_tx,
        ));
        crate::wait::with_deadline(Duration::from_secs(30), "the lease watch to start", synced)
            .await
            .expect("the lease watch runs");
        LeaseWatch {
            violations,
            restarts,
            task,
        }
    }

    /// What it saw so far.
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How often the watch had to start again (after a server restart).
    pub fn restarts(&self) -> u32 {
        *self.restarts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch_leases(
    client: async_nats::Client,
    out: Arc<Mutex<Vec<String>>>,
    restarts: Arc<Mutex<u32>>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let js = jetstream::new(client);
    let mut synced = Some(synced);
    let mut caps: HashMap<String, WorkerAdvert> = HashMap::new();
    loop {
        if synced.is_none() {
            *restarts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
        let watches = async {
            let leases = RawKv::open(&js, subjects::LEASES_BUCKET).await.ok()?;
            let adverts = RawKv::open(&js, subjects::WORKERS_BUCKET).await.ok()?;
            Some((
                leases.watch(">").await.ok()?,
                adverts.watch(">").await.ok()?,
            ))
        };
        let Some((mut lw, mut aw)) = watches.await else {
            // The server is away (restarting, or electing a leader): the
            // client reconnects on its own; try again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // A new watch replays every live key: start from nothing.
        let mut live: BTreeMap<String, Lease> = BTreeMap::new();
        // Keys whose attempt has reported, until they go.
        let mut reported: std::collections::HashSet<String> = Default::default();
        let mut adverts_synced = false;
        let mut leases_synced = false;
        loop {
            tokio::select! {
                ev = aw.next() => match ev {
                    Some(Ok(KvEvent::Change(c))) if c.op == KvOp::Put => {
                        if let Ok(a) = codec::decode::<WorkerAdvert>(&c.value) {
                            caps.insert(a.name.to_string(), a);
                        }
                    }
                    Some(Ok(KvEvent::Synced)) => adverts_synced = true,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                ev = lw.next() => match ev {
                    Some(Ok(KvEvent::Change(c))) => {
                        match c.op {
                            KvOp::Put => match codec::decode::<Lease>(&c.value) {
                                Ok(l) if matches!(l.state, LeaseState::Rejected | LeaseState::Abandoned) => {
                                    live.remove(&c.key);
                                }
                                Ok(_) if reported.contains(&c.key) => {}
                                Ok(l) => {
                                    live.insert(c.key.clone(), l);
                                }
                                Err(e) => push(&out, format!("lease {} does not decode: {e}", c.key)),
                            },
                            _ => {
                                live.remove(&c.key);
                                reported.remove(&c.key);
                            }
                        }
                        let mut problems = overcommitted(&caps, &live);
                        if !problems.is_empty() {
                            // Leases whose attempt reported hold nothing:
                            // asked of the events stream only when they
                            // would make a difference.
                            for key in ended_by_result(&js, &live).await {
                                live.remove(&key);
                                reported.insert(key);
                            }
                            problems = overcommitted(&caps, &live);
                        }
                        for problem in problems {
                            push(&out, problem);
                        }
                    }
                    Some(Ok(KvEvent::Synced)) => leases_synced = true,
                    Some(Err(_)) | None => break,
                },
            }
            if adverts_synced && leases_synced {
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The keys of claimed leases in `live` whose holder's result for their
/// attempt is in the events stream.
async fn ended_by_result(js: &jetstream::Context, live: &BTreeMap<String, Lease>) -> Vec<String> {
    let Ok(stream) = js.get_stream(subjects::EVENTS_STREAM).await else {
        return Vec::new();
    };
    let mut ended = Vec::new();
    for (key, l) in live {
        if !matches!(l.state, LeaseState::Running | LeaseState::Cancelling) {
            continue;
        }
        let subject = subjects::events(
            &l.owner,
            &l.job_id,
            &l.task_id,
            gpufleet_schema::EventKind::Result,
            &gpufleet_schema::Sender::Worker(l.worker.clone()),
        );
        let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await else {
            continue;
        };
        if codec::decode::<Event>(&m.payload).is_ok_and(|e| e.attempt >= l.attempt) {
            ended.push(key.clone());
        }
    }
    ended
}

fn push(out: &Mutex<Vec<String>>, problem: String) {
    let mut v = out.lock().unwrap_or_else(|e| e.into_inner());
    // A lasting overcommit shows on every change until it ends: once is
    // enough.
    if !v.contains(&problem) {
        v.push(problem);
    }
}

/// Where the live leases hold more of a worker than its advert offers.
pub fn overcommitted(
    caps: &HashMap<String, WorkerAdvert>,
    live: &BTreeMap<String, Lease>,
) -> Vec<String> {
    let mut out = vec![];
    for (name, a) in caps {
        let mine: Vec<&Lease> = live
            .values()
            .filter(|l| l.worker.as_str() == name)
            .collect();
        let cpus: u64 = mine.iter().map(|l| l.grant.cpus_milli).sum();
        if cpus > a.cpus_milli {
            out.push(format!("{name}: {cpus} milli-CPUs of {}", a.cpus_milli));
        }
        for g in &a.gpus {
            let on: Vec<&&Lease> = mine
                .iter()
                .filter(|l| l.grant.gpus.iter().any(|x| x.uuid == g.uuid))
                .collect();
            let whole = on.iter().filter(|l| l.grant.exclusive).count();
            if whole > 1 || (whole == 1 && on.len() > 1) {
                let holders: Vec<String> = on
                    .iter()
                    .map(|l| format!("{} attempt {}", l.task_id, l.attempt))
                    .collect();
                out.push(format!("{}: whole GPU granted to {holders:?}", g.uuid));
            }
            let shared: u64 = on
                .iter()
                .filter(|l| !l.grant.exclusive)
                .flat_map(|l| l.grant.gpus.iter().filter(|x| x.uuid == g.uuid))
                .map(|x| x.memory.0)
                .sum();
            if shared > g.memory_total.0 {
                out.push(format!(
                    "{}: {shared} bytes shared of {}",
                    g.uuid, g.memory_total.0
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::{JobId, JobState, TaskCounts, TaskId, TaskOutcome, TaskStatus, WorkerId};
    use time::OffsetDateTime;

    const JOB: &str = "j";
    const TASK: &str = "j-0";

    fn status(state: TaskState, attempt: u32, result: Option<Value>) -> JobStatus {
        let job_state = if state.is_end() {
            JobState::Completed
        } else {
            JobState::Running
        };
        JobStatus {
            job_id: JobId::new(JOB).unwrap(),
            owner: gpufleet_schema::UserId::default_user(),
            name: None,
            status: job_state,
            reason: None,
            priority: 0,
            submitted_at: OffsetDateTime::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            counts: TaskCounts::default(),
            errors: Vec::new(),
            error_count: 0,
            tasks: vec![TaskStatus {
                task_id: TaskId::new(TASK).unwrap(),
                name: "t".into(),
                state,
                attempt,
                worker: None,
                gpus: vec![],
                exit_code: None,
                result,
                reason: None,
                started_at: None,
                finished_at: None,
                usage: None,
            }],
        }
    }

    fn event(attempt: u32, worker: Option<&str>, body: EventBody) -> Event {
        Event {
            job_id: JobId::new(JOB).unwrap(),
            task_id: TaskId::new(TASK).unwrap(),
            attempt,
            worker: worker.map(|w| WorkerId::new(w).unwrap()),
            lease_rev: None,
            at: OffsetDateTime::UNIX_EPOCH,
            body,
            token: None,
        }
    }

    fn state(attempt: u32, worker: Option<&str>, state: TaskState) -> Event {
        event(
            attempt,
            worker,
            EventBody::State {
                state,
                reason: None,
                holder: None,
            },
        )
    }

    /// The coordinator's RESERVED, naming the holder.
    fn reserved(attempt: u32, holder: &str) -> Event {
        event(
            attempt,
            None,
            EventBody::State {
                state: TaskState::Reserved,
                reason: None,
                holder: Some(WorkerId::new(holder).unwrap()),
            },
        )
    }

    fn result(attempt: u32, worker: &str) -> Event {
        event(
            attempt,
            Some(worker),
            EventBody::Result(TaskOutcome {
                state: TaskState::Succeeded,
                exit_code: Some(0),
                signal: None,
                result: Some(probe_result(attempt)),
                error: None,
                artifacts: vec![],
                started_at: None,
                finished_at: OffsetDateTime::UNIX_EPOCH,
                usage: None,
            }),
        )
    }

    fn probe_result(attempt: u32) -> Value {
        json!({"task": TASK, "attempt": attempt})
    }

    /// Attempt 1 lost on w1, attempt 2 succeeded on w2 (the coordinator's
    /// events name the holder; a worker's name their sender; the holder's
    /// result is the success: the coordinator sends no state event for it).
    fn retried_events() -> Vec<Event> {
        vec![
            reserved(1, "w1"),
            state(1, Some("w1"), TaskState::Running),
            state(1, None, TaskState::Lost),
            reserved(2, "w2"),
            state(2, Some("w2"), TaskState::Running),
            result(2, "w2"),
        ]
    }

    fn rec(attempt: u32, mark: Mark, ms: i128, gpu: &str) -> Record {
        Record {
            task: TASK.into(),
            attempt,
            mark,
            at: ms * 1_000_000,
            gpus: if gpu.is_empty() {
                vec![]
            } else {
                vec![gpu.into()]
            },
        }
    }

    fn retried_ledger() -> Vec<Record> {
        vec![
            rec(1, Mark::Start, 0, "g0"),
            rec(1, Mark::Tick, 100, "g0"),
            rec(2, Mark::Start, 300, "g1"),
            rec(2, Mark::Tick, 400, "g1"),
            rec(2, Mark::Stop, 450, "g1"),
        ]
    }

    fn violations(s: &JobStatus, evs: Vec<Event>, ledger: &[Record]) -> Vec<String> {
        check_history(std::slice::from_ref(s), &[evs], ledger).violations
    }

    #[test]
    fn a_clean_retry_holds() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let r = check_history(&[s], &[retried_events()], &retried_ledger());
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.attempts, r.retried, r.ran), (2, 1, 2));
    }

    #[test]
    fn records_parse_and_a_bad_line_does_not() {
        let r = parse_record("j-0 2 tick 1700000000123456789 GPU-a,GPU-b").unwrap();
        assert_eq!(r.attempt, 2);
        assert_eq!(r.mark, Mark::Tick);
        assert_eq!(r.gpus, vec!["GPU-a", "GPU-b"]);
        assert!(parse_record("j-0 2 tick 17000").is_none());
        assert!(parse_record("j-0 2 tick 1 - extra").is_none());
        assert!(parse_record("j-0 two start 1 -").is_none());
    }

    #[test]
    fn an_unfinished_job_is_a_violation() {
        let s = status(TaskState::Running, 1, None);
        let evs = vec![
            state(1, Some("w1"), TaskState::Reserved),
            state(1, Some("w1"), TaskState::Running),
        ];
        let v = violations(&s, evs, &[]);
        assert!(v.iter().any(|m| m.contains("did not end")), "{v:?}");
    }

    #[test]
    fn a_second_attempt_placed_before_the_first_ended_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut evs = retried_events();
        // LOST only after attempt 2 was reserved.
        evs.swap(2, 3);
        let v = violations(&s, evs, &retried_ledger());
        assert!(
            v.iter()
                .any(|m| m.contains("attempt 2 RESERVED while attempt 1")),
            "{v:?}"
        );
    }

    #[test]
    fn a_late_running_of_a_lost_attempt_is_not_but_another_sender_is() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        // w1's RUNNING reached the stream after the coordinator had given
        // attempt 1 up: the ledger, not the stream, says whether it ran on.
        let mut evs = retried_events();
        let late = evs.remove(1);
        evs.insert(4, late);
        let v = violations(&s, evs, &retried_ledger());
        assert!(v.is_empty(), "{v:?}");

        let mut evs = retried_events();
        evs[4] = state(2, Some("w1"), TaskState::Running);
        let v = violations(&s, evs, &retried_ledger());
        assert!(
            v.iter()
                .any(|m| m.contains("attempt 2 RUNNING from w1, held by w2")),
            "{v:?}"
        );
    }

    #[test]
    fn a_reservation_taken_back_may_go_to_another_worker_under_its_number() {
        let s = status(TaskState::Succeeded, 1, Some(probe_result(1)));
        let evs = vec![
            reserved(1, "w1"),
            state(1, None, TaskState::Queued),
            reserved(1, "w2"),
            state(1, Some("w2"), TaskState::Running),
            result(1, "w2"),
        ];
        let ledger = [rec(1, Mark::Start, 0, "g1"), rec(1, Mark::Stop, 50, "g1")];
        let v = violations(&s, evs.clone(), &ledger);
        assert!(v.is_empty(), "{v:?}");

        // Not without the coordinator taking it back first.
        let mut evs = evs;
        evs.remove(1);
        let v = violations(&s, evs, &ledger);
        assert!(
            v.iter()
                .any(|m| m.contains("attempt 1 RESERVED from w2, held by w1")),
            "{v:?}"
        );
    }

    #[test]
    fn a_holder_no_event_names_is_taken_from_the_status_and_noted() {
        let mut s = status(TaskState::Succeeded, 1, Some(probe_result(1)));
        let evs = vec![result(1, "w1")];
        let ledger = [rec(1, Mark::Start, 0, "g1"), rec(1, Mark::Stop, 50, "g1")];
        let r = check_history(
            std::slice::from_ref(&s),
            std::slice::from_ref(&evs),
            &ledger,
        );
        assert!(
            r.violations
                .iter()
                .any(|m| m.contains("came from Some(\"w1\")")),
            "{:?}",
            r.violations
        );
        s.tasks[0].worker = Some(WorkerId::new("w1").unwrap());
        let r = check_history(&[s], &[evs], &ledger);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(r.notes[0].contains("no event in the stream names the holder"));
    }

    #[test]
    fn a_success_is_the_holders_result_unless_the_coordinator_ended_the_attempt() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        // A coordinator that still sent SUCCEEDED after the result: the same.
        let mut evs = retried_events();
        evs.push(state(2, None, TaskState::Succeeded));
        let r = check_history(std::slice::from_ref(&s), &[evs], &retried_ledger());
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        // The lease lapsed first: the coordinator's LOST, after attempt 1's
        // result, overrides it; a result after the LOST does not count.
        for evs in [
            vec![
                reserved(1, "w1"),
                result(1, "w1"),
                state(1, None, TaskState::Lost),
                reserved(2, "w2"),
                result(2, "w2"),
            ],
            vec![
                reserved(1, "w1"),
                state(1, None, TaskState::Lost),
                result(1, "w1"),
                reserved(2, "w2"),
                result(2, "w2"),
            ],
        ] {
            let v = violations(&s, evs.clone(), &retried_ledger());
            assert!(v.is_empty(), "{v:?} for {evs:?}");
        }
        // Another worker's SUCCEEDED result ends nothing.
        let s = status(TaskState::Succeeded, 1, Some(probe_result(1)));
        let v = violations(&s, vec![reserved(1, "w1"), result(1, "w2")], &[]);
        assert!(
            v.iter()
                .any(|m| m.contains("the stream's last end is None")),
            "{v:?}"
        );
    }

    #[test]
    fn overlapping_attempts_in_the_ledger_are_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut ledger = retried_ledger();
        // Attempt 1 still ticked after attempt 2 started.
        ledger.push(rec(1, Mark::Tick, 350, "g0"));
        let v = violations(&s, retried_events(), &ledger);
        assert!(
            v.iter()
                .any(|m| m.contains("attempts 1 and 2 ran at the same time for 50.0 ms")),
            "{v:?}"
        );
    }

    #[test]
    fn one_gpu_held_by_two_tasks_at_once_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut ledger = retried_ledger();
        ledger.push(Record {
            task: "other".into(),
            ..rec(1, Mark::Start, 420, "g1")
        });
        let v = check_history(&[s], &[retried_events()], &ledger).violations;
        assert!(v.iter().any(|m| m.starts_with("GPU g1 held by")), "{v:?}");
    }

    #[test]
    fn a_second_result_or_one_from_another_worker_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut evs = retried_events();
        evs.insert(6, result(2, "w2"));
        let v = violations(&s, evs, &retried_ledger());
        assert!(
            v.iter().any(|m| m.contains("2 results for attempt 2")),
            "{v:?}"
        );

        let mut evs = retried_events();
        evs[5] = result(2, "w1");
        let v = violations(&s, evs, &retried_ledger());
        assert!(
            v.iter().any(|m| m.contains("came from Some(\"w1\")")),
            "{v:?}"
        );
    }

    #[test]
    fn a_result_of_a_superseded_attempt_accepted_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(1)));
        let v = violations(&s, retried_events(), &retried_ledger());
        assert!(
            v.iter()
                .any(|m| m.contains("attempt 2 accepted the result of attempt 1")),
            "{v:?}"
        );
    }

    #[test]
    fn an_attempt_ended_twice_or_a_task_succeeded_twice_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut evs = retried_events();
        evs.insert(3, state(1, None, TaskState::Succeeded));
        let v = violations(&s, evs, &retried_ledger());
        assert!(
            v.iter().any(|m| m.contains("attempt 1 ended 2 times")),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|m| m.contains("attempts [1, 2] all succeeded")),
            "{v:?}"
        );
    }

    #[test]
    fn an_attempt_started_twice_or_accepted_without_a_stop_is_a_violation() {
        let s = status(TaskState::Succeeded, 2, Some(probe_result(2)));
        let mut ledger = retried_ledger();
        ledger.pop();
        ledger.push(rec(2, Mark::Start, 500, "g1"));
        let v = violations(&s, retried_events(), &ledger);
        assert!(
            v.iter().any(|m| m.contains("attempt 2 started 2 times")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|m| m.contains("never recorded its stop")),
            "{v:?}"
        );
    }

    #[test]
    fn a_status_that_disagrees_with_the_stream_is_a_violation() {
        let s = status(TaskState::Succeeded, 1, Some(probe_result(1)));
        let v = violations(&s, retried_events(), &retried_ledger());
        assert!(
            v.iter()
                .any(|m| m.contains("the stream's last end is Some((2, Succeeded))")),
            "{v:?}"
        );
    }

    #[test]
    fn a_whole_gpu_in_two_live_leases_is_overcommitted() {
        let advert: WorkerAdvert = serde_json::from_value(json!({
            "name": "w1", "instance": "i", "version": "0", "cpus_milli": 2000,
            "memory_total": 1024, "memory_available": 1024, "ttl": 2,
            "gpus": [{"index": 0, "uuid": "GPU-0", "model": "sim", "memory_total": 100,
                      "memory_used": 0, "memory_free": 100}],
            "started_at": "2025-01-01T00:00:00Z", "sent_at": "2025-01-01T00:00:00Z"
        }))
        .unwrap_or_else(|e| panic!("the advert fixture: {e}"));
        let lease = |task: &str| -> Lease {
            serde_json::from_value(json!({
                "job_id": "j", "task_id": task, "attempt": 1, "worker": "w1",
                "state": "RUNNING", "task": {"command": ["true"]},
                "grant": {"gpus": [{"index": 0, "uuid": "GPU-0", "memory": 100}],
                          "exclusive": true, "cpus_milli": 1000, "memory": 0},
                "lease_ttl": 3, "reserved_at": "2025-01-01T00:00:00Z"
            }))
            .unwrap_or_else(|e| panic!("the lease fixture: {e}"))
        };
        let caps = HashMap::from([("w1".to_string(), advert)]);
        let mut live = BTreeMap::from([("w1.j-0.1".to_string(), lease("j-0"))]);
        assert!(overcommitted(&caps, &live).is_empty());
        live.insert("w1.j-1.1".into(), lease("j-1"));
        let v = overcommitted(&caps, &live);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("GPU-0: whole GPU granted to"), "{v:?}");
    }
}
