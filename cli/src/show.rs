//! Tables for people; `--json` prints the API's own JSON instead.

use gpufleet_schema::{JobStatus, TaskCounts, TaskState, TaskStatus, TaskUsage, WorkerAdvert};
use time::OffsetDateTime;

/// Left-aligned columns sized to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

fn ago(t: OffsetDateTime) -> String {
    let d = (OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    format!("{} ago", span(d))
}

/// A duration in seconds, as people say it: `42s`, `3m05s`, `2h10m`, `3d4h`.
pub fn span(d: i64) -> String {
    match d {
        ..=59 => format!("{}s", d.max(0)),
        60..=3599 => format!("{}m{:02}s", d / 60, d % 60),
        3600..=86399 => format!("{}h{:02}m", d / 3600, d % 3600 / 60),
        _ => format!("{}d{}h", d / 86400, d % 86400 / 3600),
    }
}

fn took(start: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> Option<String> {
    let start = start?;
    let end = end.unwrap_or_else(OffsetDateTime::now_utc);
    Some(span((end - start).whole_seconds()))
}

/// A size in the largest binary unit under it, one decimal: `23.5 GiB`.
pub fn size(bytes: u64) -> String {
    let (value, unit) = unit_of(bytes);
    format!("{} {unit}", decimal(bytes as f64 / value as f64))
}

/// `used/total unit`, both in the unit that suits the total: `0.8/23.5 GiB`.
pub fn used_of(used: u64, total: u64) -> String {
    let (value, unit) = unit_of(total.max(used));
    format!(
        "{}/{} {unit}",
        decimal(used as f64 / value as f64),
        decimal(total as f64 / value as f64)
    )
}

fn unit_of(bytes: u64) -> (u64, &'static str) {
    const UNITS: [(u64, &str); 5] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1, "B"),
    ];
    UNITS
        .into_iter()
        .find(|(v, _)| bytes >= *v)
        .unwrap_or((1, "B"))
}

fn decimal(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

fn or_dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

pub fn job(s: &JobStatus) -> String {
    let mut out = format!(
        "job {}{}\nstatus: {}\n",
        s.job_id,
        s.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        s.status
    );
    if let Some(r) = &s.reason {
        out.push_str(&format!("reason: {r}\n"));
    }
    let mut when = format!("submitted {}", ago(s.submitted_at));
    if let Some(t) = took(s.started_at, s.finished_at) {
        when.push_str(&format!(
            ", {} {t}",
            if s.finished_at.is_some() {
                "ran"
            } else {
                "running for"
            }
        ));
    }
    if s.error_count > 0 {
        when.push_str(&format!(
            "\n{} error{} (`gpufleet errors {}`)",
            s.error_count,
            if s.error_count == 1 { "" } else { "s" },
            s.job_id
        ));
    }
    out.push_str(&format!("{when}\n\n"));
    // A big array is summed up: counts by state, then only the tasks
    // worth a look (running, or ended other than succeeded).
    let big = s.tasks.len() > SUMMARY_OVER;
    let shown: Vec<&TaskStatus> = if big {
        out.push_str(&format!("tasks: {}\n", counts(&s.counts)));
        s.tasks
            .iter()
            .filter(|t| !matches!(t.state, TaskState::Queued | TaskState::Succeeded))
            .collect()
    } else {
        s.tasks.iter().collect()
    };
    let more = shown.len().saturating_sub(SUMMARY_ROWS);
    let shown = if big {
        &shown[..shown.len() - more]
    } else {
        &shown[..]
    };
    if big && shown.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.state.to_string(),
                t.attempt.to_string(),
                or_dash(t.worker.as_ref().map(|w| w.to_string())),
                or_dash(Some(t.gpus.join(","))),
                or_dash(t.exit_code.map(|c| c.to_string())),
                or_dash(took(t.started_at, t.finished_at)),
                or_dash(t.usage.as_ref().map(usage)),
                t.result
                    .as_ref()
                    .map(|r| truncate(&r.to_string(), 50))
                    .or_else(|| t.reason.as_ref().map(|r| truncate(r, 70)))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "TASK",
            "STATE",
            "TRY",
            "WORKER",
            "GPUS",
            "EXIT",
            "TIME",
            "USAGE",
            "RESULT / REASON",
        ],
        &rows,
    ));
    if more > 0 {
        out.push_str(&format!(
            "\n... and {more} more (--json lists every task)\n"
        ));
    }
    out
}

/// Beyond this many tasks, `status` sums a job's tasks up by state.
const SUMMARY_OVER: usize = 50;
/// The most task rows a summed-up job shows.
const SUMMARY_ROWS: usize = 20;

/// `6 tasks: 3 succeeded, 1 running, 2 queued`: the states that have any.
fn counts(c: &TaskCounts) -> String {
    let parts: Vec<String> = [
        ("succeeded", c.succeeded),
        ("running", c.running),
        ("reserved", c.reserved),
        ("queued", c.queued),
        ("failed", c.failed),
        ("interrupted", c.interrupted),
        ("timed out", c.timed_out),
        ("lost", c.lost),
        ("cancelled", c.cancelled),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(what, n)| format!("{n} {what}"))
    .collect();
    format!("{} in all: {}", c.total(), parts.join(", "))
}

/// A job's errors, oldest first, and whether they were cleared.
pub fn errors(r: &gpufleet_schema::api::ErrorsReply) -> String {
    let rows: Vec<Vec<String>> = r
        .errors
        .iter()
        .map(|e| {
            vec![
                e.at.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                e.task.clone(),
                e.attempt.to_string(),
                or_dash(e.worker.as_ref().map(|w| w.to_string())),
                e.state.to_string(),
                or_dash(e.exit_code.map(|c| c.to_string())),
                e.reason.clone(),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        format!("job {} has no errors", r.job_id)
    } else {
        table(
            &["TIME", "TASK", "TRY", "WORKER", "STATE", "EXIT", "REASON"],
            &rows,
        )
    };
    let unlisted = r.error_count as usize - r.errors.len().min(r.error_count as usize);
    if unlisted > 0 {
        out.push_str(&format!("\n({unlisted} older errors not listed)"));
    }
    if r.reset {
        out.push_str(&format!(
            "\ncleared {} error{} of job {}",
            r.error_count,
            if r.error_count == 1 { "" } else { "s" },
            r.job_id
        ));
    }
    out
}

/// What a task used, in a few words: `peak 212 MiB, 1.3s CPU, GPU 3 GiB
/// 87%` (the GPU figures marked `sim` on simulated GPUs).
pub fn usage(u: &TaskUsage) -> String {
    let mut s = format!(
        "peak {}, {}s CPU",
        size(u.peak_rss.0),
        decimal(u.cpu_seconds)
    );
    if let Some(m) = u.gpu_memory_peak {
        s.push_str(&format!(", GPU {}", size(m.0)));
    }
    if let Some(p) = u.gpu_utilization_mean {
        s.push_str(&format!(" {p:.0}%"));
    }
    if u.gpu_simulated {
        s.push_str(" (sim)");
    }
    s
}

pub fn jobs(list: &[JobStatus]) -> String {
    if list.is_empty() {
        return "no jobs".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.job_id.to_string(),
                s.name
                    .as_deref()
                    .map(|n| truncate(n, 40))
                    .unwrap_or_default(),
                s.status.to_string(),
                format!("{}/{}", s.counts.finished(), s.counts.total()),
                ago(s.submitted_at),
                s.reason
                    .as_deref()
                    .map(|r| truncate(r, 60))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["JOB", "NAME", "STATUS", "DONE", "SUBMITTED", "REASON"],
        &rows,
    )
}

/// Which tasks hold each GPU (by uuid), as the coordinator reports them
/// (with roles on, only the caller's own tasks).
pub type Holders = std::collections::HashMap<gpufleet_schema::GpuUuid, Vec<String>>;

/// [`Holders`] from a page of workers (each GPU's `held_by`).
pub fn gpu_holders(list: &[WorkerAdvert]) -> Holders {
    let mut out = Holders::new();
    for g in list.iter().flat_map(|w| &w.gpus) {
        if !g.held_by.is_empty() {
            out.entry(g.uuid.clone())
                .or_default()
                .extend(g.held_by.iter().map(|t| t.to_string()));
        }
    }
    out
}

/// Workers, one line per GPU.
pub fn workers(list: &[WorkerAdvert], holders: &Holders) -> String {
    if list.is_empty() {
        return "no workers (start one with `gpufleet-worker`, or a local fleet with `gpufleet up`)"
            .into();
    }
    let mut rows = Vec::new();
    for w in list {
        let state = if w.draining {
            "draining"
        } else if w.held {
            "held"
        } else {
            "ready"
        };
        let labels = w
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let base = vec![
            w.name.to_string(),
            state.to_string(),
            decimal(w.cpus_milli as f64 / 1000.0),
            used_of(
                w.memory_total.0.saturating_sub(w.memory_available.0),
                w.memory_total.0,
            ),
            w.running.len().to_string(),
            or_dash(Some(labels)),
        ];
        if w.gpus.is_empty() {
            let mut r = base.clone();
            r.extend(["-".into(), "-".into(), "-".into()]);
            rows.push(r);
        }
        for (i, g) in w.gpus.iter().enumerate() {
            let mut r = if i == 0 {
                base.clone()
            } else {
                vec![String::new(); base.len()]
            };
            r.push(format!("{} {}", g.index, g.model));
            r.push(used_of(g.memory_used.0, g.memory_total.0));
            r.push(
                holders
                    .get(&g.uuid)
                    .map(|t| t.join(","))
                    .unwrap_or_else(|| "-".into()),
            );
            rows.push(r);
        }
    }
    let mut out = table(
        &[
            "WORKER",
            "STATE",
            "CPUS",
            "MEMORY",
            "TASKS",
            "LABELS",
            "GPU",
            "GPU MEMORY",
            "HELD BY",
        ],
        &rows,
    );
    // What the running tasks use so far, as their workers last said.
    let running: Vec<Vec<String>> = list
        .iter()
        .flat_map(|w| {
            w.usage
                .iter()
                .map(|(t, u)| vec![t.to_string(), w.name.to_string(), usage(u)])
        })
        .collect();
    if !running.is_empty() {
        out.push_str("\n\n");
        out.push_str(&table(
            &["RUNNING TASK", "WORKER", "USAGE SO FAR"],
            &running,
        ));
    }
    out
}

/// The adverts as JSON, each GPU with `held_by`: the tasks holding it.
pub fn workers_json(list: &[WorkerAdvert], holders: &Holders) -> serde_json::Value {
    let mut v = serde_json::to_value(list).expect("adverts serialize");
    for w in v.as_array_mut().into_iter().flatten() {
        for g in w["gpus"].as_array_mut().into_iter().flatten() {
            let held = g["uuid"]
                .as_str()
                .and_then(|u| holders.get(u))
                .cloned()
                .unwrap_or_default();
            g["held_by"] = serde_json::json!(held);
        }
    }
    v
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_array_is_summed_up() {
        use gpufleet_schema::{JobId, JobState, TaskId, UserId};
        let id = JobId::new("j").unwrap();
        let mut counts = TaskCounts::default();
        let tasks: Vec<TaskStatus> = (0..1000)
            .map(|i| {
                let state = match i {
                    0..=899 => TaskState::Succeeded,
                    900..=929 => TaskState::Running,
                    930 => TaskState::Failed,
                    _ => TaskState::Queued,
                };
                counts.add(state);
                TaskStatus {
                    task_id: TaskId::for_index(&id, i),
                    name: format!("train[{i}]"),
                    state,
                    attempt: 1,
                    worker: None,
                    gpus: vec![],
                    exit_code: None,
                    result: None,
                    reason: None,
                    started_at: None,
                    finished_at: None,
                    usage: None,
                }
            })
            .collect();
        let s = JobStatus {
            job_id: id,
            owner: UserId::default_user(),
            name: None,
            status: JobState::Running,
            reason: None,
            priority: 0,
            submitted_at: OffsetDateTime::now_utc(),
            started_at: None,
            finished_at: None,
            counts,
            tasks,
            errors: Vec::new(),
            error_count: 0,
        };
        let out = job(&s);
        assert!(
            out.contains("tasks: 1000 in all: 900 succeeded, 30 running, 69 queued, 1 failed\n")
        );
        // 31 worth a look, 20 shown.
        assert_eq!(out.matches("train[").count(), 20);
        assert!(out.contains("... and 11 more"));
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22");
    }

    #[test]
    fn sizes_and_spans_read_well() {
        assert_eq!(used_of(862_535_680, 25_276_502_016), "0.8/23.5 GiB");
        assert_eq!(used_of(24 << 30, 24 << 30), "24/24 GiB");
        assert_eq!(used_of(0, 512 << 20), "0/512 MiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3), "3 B");
        assert_eq!(span(42), "42s");
        assert_eq!(span(185), "3m05s");
        assert_eq!(span(7800), "2h10m");
    }

    #[test]
    fn usage_reads_in_a_few_words() {
        let mut u = TaskUsage {
            peak_rss: gpufleet_schema::ByteSize::mib(212),
            cpu_seconds: 1.25,
            samples: 3,
            ..Default::default()
        };
        assert_eq!(usage(&u), "peak 212 MiB, 1.2s CPU");
        u.gpu_memory_peak = Some(gpufleet_schema::ByteSize::gib(3));
        u.gpu_utilization_mean = Some(87.4);
        u.gpu_simulated = true;
        assert_eq!(usage(&u), "peak 212 MiB, 1.2s CPU, GPU 3 GiB 87% (sim)");
    }
}
