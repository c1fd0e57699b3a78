//! Messages for the tasks this worker runs: the coordinator asks (a
//! request on `subjects::deliver(<this worker>)`), the worker appends the
//! message as one JSON line to the task's inbox file (`GPUFLEET_INBOX`),
//! optionally sends the task `SIGUSR1`, and answers whether it did.
//!
//! The inbox lives in the attempt's `meta/`, which belongs to the task's
//! user, so the task could put anything at that path: it is opened
//! without following a link, must be a regular file with no other hard
//! link (else the worker, perhaps root, would append to a file of the
//! task's choosing), and is made if the task removed it. What one attempt's
//! inbox may receive is bounded ([`MAX_INBOX_BYTES`]), so that senders
//! cannot fill the worker's disk through it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpufleet_schema::message::{
    Delivery, DeliveryReply, InboxMessage, FROM_GPUFLEET, PREEMPTED_TOPIC,
};
use gpufleet_schema::{Lease, TaskId};
use tokio::sync::watch;

use crate::supervisor::StopReason;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The most one attempt's inbox receives; past it, messages to it are
/// refused.
pub const MAX_INBOX_BYTES: u64 = 64 << 20;

/// A task's main process, while it runs (see `supervisor::TaskRun::pid`).
pub type PidSlot = Arc<Mutex<Option<i32>>>;

/// One running attempt's mailbox.
struct Mailbox {
    inbox: PathBuf,
    pid: PidSlot,
    written: u64,
}

/// The mailboxes of the attempts this worker runs, by task and attempt.
#[derive(Clone, Default)]
pub struct Mailboxes {
    boxes: Arc<Mutex<HashMap<(TaskId, u32), Mailbox>>>,
}

impl Mailboxes {
    /// Opens the mailbox of an attempt whose inbox file is `inbox`; the
    /// slot is for its supervisor to fill with the task's pid.
    pub fn open(&self, task: &TaskId, attempt: u32, inbox: PathBuf) -> PidSlot {
        let pid = PidSlot::default();
        let mailbox = Mailbox {
            inbox,
            pid: pid.clone(),
            written: 0,
        };
        self.lock().insert((task.clone(), attempt), mailbox);
        pid
    }

    /// The attempt has ended: nothing more is delivered to it.
    pub fn close(&self, task: &TaskId, attempt: u32) {
        self.lock().remove(&(task.clone(), attempt));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TaskId, u32), Mailbox>> {
        self.boxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers one message, if its attempt runs here.
    pub async fn deliver(&self, d: &Delivery) -> DeliveryReply {
        let refused = |why: String| DeliveryReply {
            delivered: false,
            why: Some(why),
        };
        let line = match line(&d.message) {
            Ok(l) => l,
            Err(e) => return refused(format!("cannot encode the message: {e}")),
        };
        let (inbox, pid) = {
            let mut boxes = self.lock();
            let Some(m) = boxes.get_mut(&(d.task_id.clone(), d.attempt)) else {
                return refused(format!(
                    "attempt {} of task {} does not run here",
                    d.attempt, d.task_id
                ));
            };
            if m.written + line.len() as u64 > MAX_INBOX_BYTES {
                return refused(format!(
                    "the task's inbox has received {MAX_INBOX_BYTES} bytes, the most it may"
                ));
            }
            // Counted before it is written: two deliveries at once cannot
            // both pass the bound.
            m.written += line.len() as u64;
            (m.inbox.clone(), m.pid.clone())
        };
        let written = tokio::task::spawn_blocking(move || append(&inbox, &line))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        if let Err(e) = written {
            return refused(format!("cannot write the task's inbox: {e}"));
        }
        if d.signal {
            // Under the slot's lock: the supervisor clears it before the
            // process is reaped, so the pid is the task's.
            let pid = pid.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pid) = *pid {
                if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGUSR1) {
                    tracing::info!(task_id = %d.task_id, error = %e, "cannot signal a task about a message");
                }
            }
        }
        DeliveryReply {
            delivered: true,
            why: None,
        }
    }
}

impl Mailboxes {
    /// Stops an attempt as its CANCELLING `lease` asks (see
    /// [`crate::core::stop_asked`]); a task being preempted first finds a
    /// line in its inbox (topic [`PREEMPTED_TOPIC`]), once, before its
    /// SIGTERM. A stop for a lost lease stays: it outranks any other.
    pub async fn stop_as_asked(&self, stop: &watch::Sender<Option<StopReason>>, lease: &Lease) {
        let asked = crate::core::stop_asked(lease);
        let before = *stop.borrow();
        if matches!(before, Some(StopReason::Fenced)) {
            return;
        }
        if let (Some(p), false) = (
            &lease.preempt,
            matches!(before, Some(StopReason::Preempt { .. })),
        ) {
            let note = from_gpufleet(
                lease,
                PREEMPTED_TOPIC,
                serde_json::json!({"by": p.by, "grace_seconds": p.grace.0.as_secs_f64()}),
            );
            let r = self.deliver(&note).await;
            if let Some(why) = r.why {
                tracing::info!(task_id = %lease.task_id, why, "could not tell a task it is preempted");
            }
        }
        stop.send_replace(Some(asked));
    }
}

/// A line gpufleet itself puts in the inbox of `lease`'s attempt. Not
/// signalled: SIGUSR1 would end a task that does not handle it, and each
/// such line is also said another way (a SIGTERM, the control file).
pub fn from_gpufleet(lease: &Lease, topic: &str, data: serde_json::Value) -> Delivery {
    Delivery {
        job_id: lease.job_id.clone(),
        task_id: lease.task_id.clone(),
        attempt: lease.attempt,
        message: InboxMessage {
            at: time::OffsetDateTime::now_utc(),
            from: FROM_GPUFLEET.into(),
            topic: topic.into(),
            data,
        },
        signal: false,
    }
}

/// An inbox line for `message`, as the task reads it.
pub fn line(message: &InboxMessage) -> serde_json::Result<Vec<u8>> {
    let mut l = serde_json::to_vec(message)?;
    l.push(b'\n');
    Ok(l)
}

/// Appends `line` to a task's file at `path` in one write, never through
/// a link, never to a file with another hard link or to anything but a
/// regular file; makes it if it is missing. Blocking.
pub fn append(path: &Path, line: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true).mode(0o644);
    crate::supervisor::open_task_file_with(&mut options, path)?.write_all(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::JobId;
    use serde_json::json;

    fn delivery(attempt: u32, data: serde_json::Value) -> Delivery {
        Delivery {
            job_id: JobId::new("j").unwrap(),
            task_id: TaskId::new("j-0").unwrap(),
            attempt,
            message: InboxMessage {
                at: time::OffsetDateTime::UNIX_EPOCH,
                from: "user:alice".into(),
                topic: "t".into(),
                data,
            },
            signal: false,
        }
    }

    #[tokio::test]
    async fn a_message_is_one_line_in_the_inbox_of_the_attempt_it_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox.jsonl");
        let boxes = Mailboxes::default();
        boxes.open(&TaskId::new("j-0").unwrap(), 2, inbox.clone());
        assert!(boxes.deliver(&delivery(2, json!({"a": 1}))).await.delivered);
        assert!(boxes.deliver(&delivery(2, json!("x\ny"))).await.delivered);
        let other = boxes.deliver(&delivery(1, json!(1))).await;
        assert!(!other.delivered);
        assert!(other.why.unwrap().contains("does not run here"));
        let text = std::fs::read_to_string(&inbox).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["data"], json!({"a": 1}));
        assert_eq!(lines[1]["data"], json!("x\ny"));
        assert_eq!(lines[1]["from"], "user:alice");
        boxes.close(&TaskId::new("j-0").unwrap(), 2);
        assert!(!boxes.deliver(&delivery(2, json!(1))).await.delivered);
    }

    #[tokio::test]
    async fn an_inbox_swapped_for_a_link_or_a_hard_link_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "keep").unwrap();
        let inbox = dir.path().join("inbox.jsonl");
        let boxes = Mailboxes::default();
        boxes.open(&TaskId::new("j-0").unwrap(), 1, inbox.clone());
        std::os::unix::fs::symlink(&secret, &inbox).unwrap();
        let r = boxes.deliver(&delivery(1, json!(1))).await;
        assert!(r.why.unwrap().contains("symbolic link"));
        std::fs::remove_file(&inbox).unwrap();
        std::fs::hard_link(&secret, &inbox).unwrap();
        let r = boxes.deliver(&delivery(1, json!(1))).await;
        assert!(r.why.unwrap().contains("hard link"));
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "keep");
    }

    #[tokio::test]
    async fn an_inbox_takes_at_most_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let boxes = Mailboxes::default();
        boxes.open(&TaskId::new("j-0").unwrap(), 1, dir.path().join("inbox"));
        let big = json!("x".repeat(60 << 10));
        let mut delivered = 0u64;
        while boxes.deliver(&delivery(1, big.clone())).await.delivered {
            delivered += 1;
            assert!(delivered < 2000, "never refused");
        }
        let len = std::fs::metadata(dir.path().join("inbox")).unwrap().len();
        assert!(
            len <= MAX_INBOX_BYTES && len > MAX_INBOX_BYTES - (61 << 10),
            "{len}"
        );
    }
}
