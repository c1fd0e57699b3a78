//! Tables for people; `--json` prints the API's own JSON instead.

use std::collections::HashMap;

use gpufleet_schema::{ByteSize, JobStatus, WorkerAdvert};
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
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
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
    out.push_str(&format!("submitted: {}\n\n", ago(s.submitted_at)));
    let rows: Vec<Vec<String>> = s
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.state.to_string(),
                t.attempt.to_string(),
                t.worker
                    .as_ref()
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "-".into()),
                if t.gpus.is_empty() {
                    "-".into()
                } else {
                    t.gpus.join(",")
                },
                t.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                t.result
                    .as_ref()
                    .map(|r| truncate(&r.to_string(), 40))
                    .or_else(|| t.reason.as_ref().map(|r| truncate(r, 60)))
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
            "RESULT / REASON",
        ],
        &rows,
    ));
    out
}

pub fn jobs(list: &[JobStatus]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.job_id.to_string(),
                s.name.clone().unwrap_or_default(),
                s.status.to_string(),
                format!("{}/{}", s.counts.succeeded, s.counts.total()),
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

/// Workers, one line per GPU; `holders` maps GPU uuid to the tasks on it.
pub fn workers(list: &[WorkerAdvert], holders: &HashMap<String, Vec<String>>) -> String {
    let mut rows = Vec::new();
    for w in list {
        let state = if w.draining { "draining" } else { "ready" };
        let base = vec![
            w.name.to_string(),
            state.to_string(),
            format!("{:.1}", w.cpus_milli as f64 / 1000.0),
            format!(
                "{}/{}",
                ByteSize(w.memory_total.0 - w.memory_available.0.min(w.memory_total.0)),
                w.memory_total
            ),
            w.running.len().to_string(),
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
            r.push(format!("{}/{}", g.memory_used, g.memory_total));
            r.push(
                holders
                    .get(&g.uuid)
                    .map(|t| t.join(","))
                    .unwrap_or_else(|| "-".into()),
            );
            rows.push(r);
        }
    }
    table(
        &[
            "WORKER",
            "STATE",
            "CPUS",
            "MEMORY",
            "TASKS",
            "GPU",
            "GPU MEMORY",
            "HELD BY",
        ],
        &rows,
    )
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
}
