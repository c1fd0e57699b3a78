//! What a client submits: a job of one or more tasks.
//!
//! Input types reject unknown fields (a typo like `gpu_memroy` must not be
//! silently ignored) and are checked by [`JobSpec::validate`], whose errors
//! name the field path (`tasks[2].resources.gpus`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::array::ArraySpec;
use crate::ids::{JobId, WorkerId};
use crate::units::{ByteSize, Dur};

/// The most tasks one job may hold; the job record must fit one NATS message.
pub const MAX_TASKS_PER_JOB: usize = 5_000;
/// The most GPUs one task may ask for.
pub const MAX_GPUS_PER_TASK: u32 = 64;
/// The longest timeout: a task's deadline is a clock plus this, and must
/// never overflow it.
pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
/// The largest memory (host or GPU) a task may ask for, 1 PiB: sums of
/// many such requests still fit a u64.
pub const MAX_MEMORY: u64 = 1 << 50;
/// The most CPUs one task may ask for.
pub const MAX_CPUS: f64 = 4096.0;
/// The longest program argument or environment value Linux passes to a
/// program (`MAX_ARG_STRLEN`); longer ones would fail at start.
pub const MAX_ARG_BYTES: usize = 128 * 1024;
/// The longest name (of a job, a task, an environment variable).
pub const MAX_NAME_BYTES: usize = 256;
/// The most entries of each list in a task or job (arguments, variables,
/// artifact globs, labels, workers).
pub const MAX_LIST: usize = 4096;
/// Environment names a task may not set: the worker owns them.
pub const RESERVED_ENV_PREFIX: &str = "GPUFLEET_";
pub const RESERVED_ENV: &[&str] = &[
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "MASTER_ADDR",
    "MASTER_PORT",
];

fn default_max_retries() -> u32 {
    2
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Client-chosen id: resubmitting the same spec under it is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Higher runs first.
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: i32,
    /// How often a task that was LOST or INTERRUPTED is tried again.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Place every task at once or none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub gang: bool,
    /// With `gang`, the smallest number of tasks that may start together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tasks: Option<u32>,
    /// The most of the job's tasks that may hold a worker at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Jobs that must complete (`FINISHED:COMPLETED`) before this one
    /// starts; if one ends otherwise, this one ends without running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_ok: Vec<JobId>,
    /// Jobs that must finish, however, before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_any: Vec<JobId>,
    /// Once a task of the job has waited this long for a worker that no
    /// worker in the fleet could ever fit, the job ends `FAILED_TO_RUN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unschedulable_after: Option<Dur>,
    /// Its running tasks may be stopped (with a grace to save their work)
    /// for waiting work of a higher priority whose owner may preempt, and
    /// run again later without spending a retry.
    #[serde(default, skip_serializing_if = "is_default")]
    pub preemptible: bool,
    #[serde(default, skip_serializing_if = "Constraints::is_empty")]
    pub constraints: Constraints,
    pub tasks: Vec<TaskSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Every label must be on the worker with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Only these workers may run the job's tasks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerId>,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.workers.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Program and arguments; run directly, not through a shell.
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Globs, relative to `GPUFLEET_OUTPUT_DIR`, of files to upload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
    /// Parameters: this template stands for one task per combination
    /// (see [`crate::array`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArraySpec>,
    /// A load phase: the task starts with only these CPUs and memory, and
    /// gets its GPUs (on the same worker) once it writes that it is ready
    /// to its control file (`GPUFLEET_CONTROL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadSpec>,
}

/// What a task holds while it loads, before its GPUs: CPUs and memory
/// only, each at most what the whole task asks for, so that the GPU phase
/// only adds to what the load phase holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
}

impl LoadSpec {
    pub fn cpus_milli(&self) -> u64 {
        (self.cpus * 1000.0).round() as u64
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.map_or(0, |m| m.0)
    }
}

fn default_cpus() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Whole GPUs. `0` with `gpu_memory` set asks for a share of one GPU.
    #[serde(default)]
    pub gpus: u32,
    /// Free memory needed on each GPU (or on the shared GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<ByteSize>,
    /// Logical CPUs; fractions allowed.
    #[serde(default = "default_cpus")]
    pub cpus: f64,
    /// Host memory; enforced by the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            gpus: 0,
            gpu_memory: None,
            cpus: default_cpus(),
            memory: None,
        }
    }
}

/// What kind of GPU access a task needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuRequest {
    None,
    /// `count` GPUs used by nobody else, each with `memory` free.
    Whole {
        count: u32,
        memory: u64,
    },
    /// One GPU, shared with others, with `memory` of it set aside.
    Share {
        memory: u64,
    },
}

impl Resources {
    pub fn gpu_request(&self) -> GpuRequest {
        match (self.gpus, self.gpu_memory) {
            (0, None) | (0, Some(ByteSize(0))) => GpuRequest::None,
            (0, Some(m)) => GpuRequest::Share { memory: m.0 },
            (n, m) => GpuRequest::Whole {
                count: n,
                memory: m.map_or(0, |m| m.0),
            },
        }
    }

    /// CPUs in thousandths, the unit placement counts in.
    pub fn cpus_milli(&self) -> u64 {
        (self.cpus * 1000.0).round() as u64
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.map_or(0, |m| m.0)
    }
}

/// A spec that failed validation; `field` is a path such as
/// `tasks[0].resources.cpus`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// A name a client sent, cut short for a message that quotes it.
fn shorten(s: &str) -> String {
    crate::text::cut(s, 72)
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
}

impl JobSpec {
    /// Checks what serde cannot: counts, ranges, reserved names.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.tasks.is_empty() {
            return Err(err("tasks", "a job needs at least one task"));
        }
        if self.tasks.len() > MAX_TASKS_PER_JOB {
            return Err(err(
                "tasks",
                format!(
                    "{} tasks is more than the {MAX_TASKS_PER_JOB} one job may hold; split the job",
                    self.tasks.len()
                ),
            ));
        }
        if let Some(name) = &self.name {
            if name.len() > MAX_NAME_BYTES {
                return Err(err("name", format!("at most {MAX_NAME_BYTES} bytes")));
            }
        }
        if self.max_retries > 100 {
            return Err(err("max_retries", "at most 100"));
        }
        let expanded = self.tasks.iter().try_fold(0usize, |n, t| {
            let len = t.array.as_ref().map_or(Some(1), ArraySpec::len)?;
            Some(n + len).filter(|&n| n <= MAX_TASKS_PER_JOB)
        });
        if expanded.is_none() {
            return Err(err(
                "tasks",
                format!("its arrays stand for more than the {MAX_TASKS_PER_JOB} tasks one job may hold; split the job"),
            ));
        }
        for (field, deps) in [("after_ok", &self.after_ok), ("after_any", &self.after_any)] {
            if deps.len() > MAX_LIST {
                return Err(err(field, format!("at most {MAX_LIST} jobs")));
            }
            if self.id.as_ref().is_some_and(|id| deps.contains(id)) {
                return Err(err(field, "a job cannot wait for itself"));
            }
        }
        if let Some(d) = self.unschedulable_after {
            if d.0.is_zero() || d.0 > MAX_TIMEOUT {
                return Err(err("unschedulable_after", "more than 0, at most 366 days"));
            }
        }
        if let Some(m) = self.max_parallel {
            if m == 0 {
                return Err(err("max_parallel", "at least 1"));
            }
            if self.gang {
                return Err(err("max_parallel", "a gang's tasks all run at once"));
            }
        }
        if let Some(min) = self.min_tasks {
            if !self.gang {
                return Err(err("min_tasks", "only applies with \"gang\": true"));
            }
            if min == 0 || min as usize > self.tasks.len() {
                return Err(err(
                    "min_tasks",
                    format!(
                        "must be between 1 and the number of tasks ({})",
                        self.tasks.len()
                    ),
                ));
            }
        }
        if self.constraints.labels.len() > MAX_LIST {
            return Err(err("constraints.labels", format!("at most {MAX_LIST}")));
        }
        if self.constraints.workers.len() > MAX_LIST {
            return Err(err("constraints.workers", format!("at most {MAX_LIST}")));
        }
        for (k, v) in &self.constraints.labels {
            if !valid_label(k) {
                return Err(err(
                    format!("constraints.labels.{}", shorten(k)),
                    "label names use A-Z a-z 0-9 _ - . / (at most 63)",
                ));
            }
            if v.len() > 256 {
                return Err(err(format!("constraints.labels.{k}"), "at most 256 bytes"));
            }
        }
        for (i, task) in self.tasks.iter().enumerate() {
            task.validate(&format!("tasks[{i}]"))?;
            if self.gang && task.load.is_some() {
                return Err(err(
                    format!("tasks[{i}].load"),
                    "a gang's tasks start together: a load phase is for tasks that run alone",
                ));
            }
        }
        Ok(())
    }
}

impl JobSpec {
    /// The job with each array template replaced by its tasks (see
    /// [`crate::array`]); for a spec that [`JobSpec::validate`] accepted.
    pub fn expand(mut self) -> Result<JobSpec, SpecError> {
        if self.tasks.iter().all(|t| t.array.is_none()) {
            return Ok(self);
        }
        let mut tasks = Vec::new();
        for (i, t) in std::mem::take(&mut self.tasks).into_iter().enumerate() {
            tasks.extend(crate::array::expand_task(t, &format!("tasks[{i}]"))?);
        }
        self.tasks = tasks;
        Ok(self)
    }
}

impl TaskSpec {
    pub fn validate(&self, at: &str) -> Result<(), SpecError> {
        if let Some(a) = &self.array {
            a.validate(&format!("{at}.array"))?;
        }
        if let Some(name) = &self.name {
            if name.len() > MAX_NAME_BYTES {
                return Err(err(
                    format!("{at}.name"),
                    format!("at most {MAX_NAME_BYTES} bytes"),
                ));
            }
        }
        match self.command.first() {
            None => return Err(err(format!("{at}.command"), "must name a program")),
            Some(p) if p.is_empty() => {
                return Err(err(format!("{at}.command[0]"), "program must not be empty"))
            }
            _ => {}
        }
        if self.command.len() > MAX_LIST {
            return Err(err(
                format!("{at}.command"),
                format!("at most {MAX_LIST} arguments"),
            ));
        }
        for (j, a) in self.command.iter().enumerate() {
            if a.contains('\0') {
                return Err(err(format!("{at}.command[{j}]"), "must not contain NUL"));
            }
            if a.len() > MAX_ARG_BYTES {
                return Err(err(
                    format!("{at}.command[{j}]"),
                    format!("at most {MAX_ARG_BYTES} bytes (Linux passes no longer argument)"),
                ));
            }
        }
        if self.env.len() > MAX_LIST {
            return Err(err(
                format!("{at}.env"),
                format!("at most {MAX_LIST} variables"),
            ));
        }
        for (k, v) in &self.env {
            let field = format!("{at}.env.{}", shorten(k));
            if k.is_empty()
                || k.len() > MAX_NAME_BYTES
                || k.contains('=')
                || k.chars().any(char::is_control)
            {
                return Err(err(
                    field,
                    format!(
                        "names are 1 to {MAX_NAME_BYTES} bytes, without '=' or control characters"
                    ),
                ));
            }
            if v.contains('\0') || v.len() > MAX_ARG_BYTES {
                return Err(err(
                    field,
                    format!("values are at most {MAX_ARG_BYTES} bytes, without NUL"),
                ));
            }
            if k.starts_with(RESERVED_ENV_PREFIX) || RESERVED_ENV.contains(&k.as_str()) {
                return Err(err(field, "is set by the worker and cannot be overridden"));
            }
        }
        let r = &self.resources;
        if r.gpus > MAX_GPUS_PER_TASK {
            return Err(err(
                format!("{at}.resources.gpus"),
                format!("at most {MAX_GPUS_PER_TASK}"),
            ));
        }
        // A task that asks for no CPU at all would let any number run at
        // once on one machine.
        if !r.cpus.is_finite() || r.cpus_milli() == 0 || r.cpus > MAX_CPUS {
            return Err(err(
                format!("{at}.resources.cpus"),
                format!("must be a number from 0.001 to {MAX_CPUS}"),
            ));
        }
        for (name, size) in [("memory", r.memory), ("gpu_memory", r.gpu_memory)] {
            if size.is_some_and(|m| m.0 > MAX_MEMORY) {
                return Err(err(
                    format!("{at}.resources.{name}"),
                    format!("at most {}", ByteSize(MAX_MEMORY)),
                ));
            }
        }
        if let Some(load) = &self.load {
            validate_load(load, r, &format!("{at}.load"))?;
        }
        if let Some(t) = self.timeout {
            if t.0.is_zero() {
                return Err(err(format!("{at}.timeout"), "must be more than 0"));
            }
            if t.0 > MAX_TIMEOUT {
                return Err(err(format!("{at}.timeout"), "at most 366 days"));
            }
        }
        if self.artifacts.len() > MAX_LIST {
            return Err(err(
                format!("{at}.artifacts"),
                format!("at most {MAX_LIST} globs"),
            ));
        }
        for (j, pattern) in self.artifacts.iter().enumerate() {
            if pattern.is_empty()
                || pattern.len() > 4096
                || pattern.starts_with('/')
                || pattern.split('/').any(|c| c == "..")
            {
                return Err(err(
                    format!("{at}.artifacts[{j}]"),
                    "must be a relative glob inside the output directory (at most 4096 bytes)",
                ));
            }
        }
        Ok(())
    }

    /// The name shown to people: the given one, or the program's.
    pub fn display_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("task-{index}"))
    }
}

/// A load phase makes sense only before a GPU, and holds at most what the
/// whole task holds.
fn validate_load(load: &LoadSpec, r: &Resources, at: &str) -> Result<(), SpecError> {
    if r.gpu_request() == GpuRequest::None {
        return Err(err(
            at,
            "a load phase waits for a GPU: the task must ask for one (resources.gpus or resources.gpu_memory)",
        ));
    }
    if !load.cpus.is_finite() || load.cpus_milli() == 0 || load.cpus_milli() > r.cpus_milli() {
        return Err(err(
            format!("{at}.cpus"),
            format!(
                "must be a number from 0.001 to the task's resources.cpus ({})",
                r.cpus
            ),
        ));
    }
    if load.memory_bytes() > r.memory_bytes() {
        return Err(err(
            format!("{at}.memory"),
            format!(
                "at most the task's resources.memory ({})",
                ByteSize(r.memory_bytes())
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(cmd: &[&str]) -> TaskSpec {
        TaskSpec {
            name: None,
            command: cmd.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            resources: Resources::default(),
            timeout: None,
            artifacts: vec![],
            array: None,
            load: None,
        }
    }

    fn job(tasks: Vec<TaskSpec>) -> JobSpec {
        JobSpec {
            id: None,
            name: None,
            priority: 0,
            max_retries: 2,
            gang: false,
            min_tasks: None,
            max_parallel: None,
            after_ok: vec![],
            after_any: vec![],
            unschedulable_after: None,
            preemptible: false,
            constraints: Constraints::default(),
            tasks,
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(job(vec![]).validate().unwrap_err().field, "tasks");
        assert_eq!(
            job(vec![task(&["true"]), task(&[])])
                .validate()
                .unwrap_err()
                .field,
            "tasks[1].command"
        );
        let mut t = task(&["true"]);
        t.env.insert("CUDA_VISIBLE_DEVICES".into(), "3".into());
        assert_eq!(
            job(vec![t]).validate().unwrap_err().field,
            "tasks[0].env.CUDA_VISIBLE_DEVICES"
        );
        let mut t = task(&["true"]);
        t.resources.cpus = f64::NAN;
        assert_eq!(
            job(vec![t]).validate().unwrap_err().field,
            "tasks[0].resources.cpus"
        );
        let mut t = task(&["true"]);
        t.artifacts = vec!["../etc/passwd".into()];
        assert_eq!(
            job(vec![t]).validate().unwrap_err().field,
            "tasks[0].artifacts[0]"
        );
        let mut j = job(vec![task(&["true"])]);
        j.min_tasks = Some(1);
        assert_eq!(j.validate().unwrap_err().field, "min_tasks");
        j.gang = true;
        assert!(j.validate().is_ok());
        j.min_tasks = Some(2);
        assert_eq!(j.validate().unwrap_err().field, "min_tasks");
    }

    #[test]
    fn what_cannot_be_stored_or_run_is_refused_naming_the_field() {
        let with = |f: fn(&mut TaskSpec)| {
            let mut t = task(&["true"]);
            f(&mut t);
            job(vec![t]).validate().map_err(|e| e.to_string())
        };
        let e = with(|t| t.timeout = Some(Dur::secs(u64::MAX))).unwrap_err();
        assert!(e.starts_with("tasks[0].timeout: at most"), "{e}");
        assert!(with(|t| t.timeout = Some(Dur::secs(365 * 24 * 3600))).is_ok());
        let e = with(|t| t.resources.cpus = 0.0).unwrap_err();
        assert!(e.starts_with("tasks[0].resources.cpus"), "{e}");
        let e = with(|t| t.resources.cpus = 0.0001).unwrap_err();
        assert!(e.starts_with("tasks[0].resources.cpus"), "{e}");
        let e = with(|t| t.resources.memory = Some(ByteSize(u64::MAX))).unwrap_err();
        assert!(e.starts_with("tasks[0].resources.memory"), "{e}");
        let e = with(|t| t.resources.gpu_memory = Some(ByteSize(u64::MAX))).unwrap_err();
        assert!(e.starts_with("tasks[0].resources.gpu_memory"), "{e}");
        for bad in ["A\r\nB", "A\nB", "A\tB", "A\u{7f}"] {
            let mut t = task(&["true"]);
            t.env.insert(bad.into(), "1".into());
            let e = job(vec![t]).validate().unwrap_err();
            assert!(e.message.contains("control characters"), "{bad:?}: {e}");
        }
        let e = with(|t| t.command.push("x".repeat(MAX_ARG_BYTES + 1))).unwrap_err();
        assert!(e.starts_with("tasks[0].command[1]"), "{e}");
        // A huge name is not echoed whole.
        let mut t = task(&["true"]);
        t.env.insert("A".repeat(300_000), "1".into());
        let e = job(vec![t]).validate().unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
    }

    #[test]
    fn a_load_phase_is_checked_naming_its_field() {
        let with = |f: fn(&mut TaskSpec)| {
            let mut t = task(&["true"]);
            t.resources.gpus = 1;
            t.resources.cpus = 4.0;
            t.resources.memory = Some(ByteSize::gib(8));
            t.load = Some(LoadSpec {
                cpus: 2.0,
                memory: Some(ByteSize::gib(4)),
            });
            f(&mut t);
            job(vec![t]).validate().map_err(|e| e.field)
        };
        assert_eq!(with(|_| {}), Ok(()));
        assert_eq!(
            with(|t| t.resources.gpus = 0).unwrap_err(),
            "tasks[0].load",
            "no GPU to wait for"
        );
        assert_eq!(
            with(|t| t.resources.gpu_memory = Some(ByteSize::gib(1))),
            Ok(())
        );
        for bad in [
            with(|t| t.load.as_mut().unwrap().cpus = 0.0),
            with(|t| t.load.as_mut().unwrap().cpus = 4.5),
            with(|t| t.load.as_mut().unwrap().cpus = f64::NAN),
            with(|t| t.load.as_mut().unwrap().cpus = f64::INFINITY),
        ] {
            assert_eq!(bad.unwrap_err(), "tasks[0].load.cpus");
        }
        assert_eq!(
            with(|t| t.load.as_mut().unwrap().memory = Some(ByteSize::gib(9))).unwrap_err(),
            "tasks[0].load.memory"
        );
        assert_eq!(
            with(|t| t.resources.memory = None).unwrap_err(),
            "tasks[0].load.memory"
        );
        let mut t = task(&["true"]);
        t.resources.gpus = 1;
        t.load = Some(LoadSpec {
            cpus: 1.0,
            memory: None,
        });
        let mut j = job(vec![t]);
        j.gang = true;
        assert_eq!(j.validate().unwrap_err().field, "tasks[0].load");
        // Unknown fields are refused (a typo must not pass silently).
        let e = serde_json::from_str::<LoadSpec>(r#"{"cpus": 1, "gpus": 1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `gpus`"), "{e}");
    }

    #[test]
    fn gpu_request_kinds() {
        let mut r = Resources::default();
        assert_eq!(r.gpu_request(), GpuRequest::None);
        r.gpu_memory = Some(ByteSize::gib(10));
        assert_eq!(r.gpu_request(), GpuRequest::Share { memory: 10 << 30 });
        r.gpus = 2;
        assert_eq!(
            r.gpu_request(),
            GpuRequest::Whole {
                count: 2,
                memory: 10 << 30
            }
        );
        r.cpus = 0.5;
        assert_eq!(r.cpus_milli(), 500);
    }
}
