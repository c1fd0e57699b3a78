//! Messages to running tasks (issue 16): what a client sends
//! (`jobs.send`), what the coordinator hands a worker to deliver, and the
//! line the worker appends to the task's inbox file (`GPUFLEET_INBOX`).
//! Tasks never speak NATS: the worker mediates through files in the
//! attempt's directory.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{JobId, TaskId};

/// The longest topic, in bytes.
pub const MAX_TOPIC: usize = 128;
/// The most a message's `data` may take, as JSON.
pub const MAX_DATA: usize = 64 * 1024;
/// The topic by which a running task is asked to change its logging
/// (`data`: a level name such as `"DEBUG"`); a convention, which the
/// task's own code follows (see the README's Python example).
pub const LOG_LEVEL_TOPIC: &str = "log_level";
/// Topics starting with this are the worker's and the coordinator's own
/// (an undeliverable message reported back, a GPU granted); a sender may
/// not use them.
pub const RESERVED_TOPIC_PREFIX: &str = "gpufleet.";
/// Reported to a sender's inbox for a message that reached nobody.
pub const UNDELIVERABLE_TOPIC: &str = "gpufleet.undeliverable";
/// The inbox line that tells a running task it is preempted (`data`:
/// `{"by": JOB, "grace_seconds": n}`); SIGTERM follows, SIGKILL after
/// the grace.
pub const PREEMPTED_TOPIC: &str = "gpufleet.preempted";
/// `from` of what the gpufleet itself writes to an inbox.
pub const FROM_GPUFLEET: &str = "gpufleet";
/// The signal a delivery sends with `signal: true`: `SIGUSR1`, whose
/// default action ends a process, so only a task that handles it should
/// be sent one.
pub const SIGNAL_NAME: &str = "SIGUSR1";

/// Request of `jobs.send`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub job_id: JobId,
    /// A task's id or name; without it, every running task of the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub topic: String,
    #[serde(default)]
    pub data: serde_json::Value,
    /// Also send the task [`SIGNAL_NAME`] once the line is in its inbox.
    #[serde(default)]
    pub signal: bool,
}

/// Reply to `jobs.send`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendReply {
    pub job_id: JobId,
    /// How many running tasks have the message in their inbox.
    pub delivered: u32,
    /// Which.
    #[serde(default)]
    pub tasks: Vec<TaskId>,
}

/// One line of a task's inbox file: JSON, one message per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxMessage {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `user:<name>` for a client's, the sending task's name for a task's,
    /// [`FROM_GPUFLEET`] for the system's own.
    pub from: String,
    pub topic: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What the coordinator asks a worker to deliver, on
/// `subjects::deliver(worker)`; the worker answers [`DeliveryReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub job_id: JobId,
    pub task_id: TaskId,
    /// Delivered only while this attempt runs there.
    pub attempt: u32,
    pub message: InboxMessage,
    #[serde(default)]
    pub signal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReply {
    pub delivered: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The longest `to` of an outbox line.
pub const MAX_TO: usize = 256;
/// `to` for every other running task of the job.
pub const TO_ALL: &str = "*";

/// One line a task appends to its outbox file (`GPUFLEET_OUTBOX`): a
/// message for another task of its job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxLine {
    /// A task of the same job, by name or id, or [`TO_ALL`].
    pub to: String,
    pub topic: String,
    #[serde(default)]
    pub data: serde_json::Value,
    /// Also send the receivers [`SIGNAL_NAME`].
    #[serde(default)]
    pub signal: bool,
}

impl OutboxLine {
    /// A line as the task wrote it, checked; the error says what is wrong.
    pub fn parse(line: &[u8]) -> Result<OutboxLine, String> {
        let l: OutboxLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        if l.to.is_empty() || l.to.len() > MAX_TO || l.to.chars().any(char::is_control) {
            return Err(format!(
                "to: must be a task's name or id, or \"*\" (1 to {MAX_TO} bytes)"
            ));
        }
        check(&l.topic, &l.data)?;
        Ok(l)
    }
}

/// Checks a topic and data a sender chose; the error says what is wrong.
pub fn check(topic: &str, data: &serde_json::Value) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC {
        return Err(format!("topic: must be 1 to {MAX_TOPIC} bytes"));
    }
    if topic.chars().any(char::is_control) {
        return Err("topic: must not hold control characters".into());
    }
    if topic.starts_with(RESERVED_TOPIC_PREFIX) {
        return Err(format!(
            "topic: {RESERVED_TOPIC_PREFIX:?} starts the topics gpufleet itself sends"
        ));
    }
    let size = serde_json::to_vec(data).map_or(usize::MAX, |b| b.len());
    if size > MAX_DATA {
        return Err(format!("data: {size} bytes as JSON, more than {MAX_DATA}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn topics_and_data_are_checked_naming_the_field() {
        assert!(check("log_level", &json!("DEBUG")).is_ok());
        assert!(check("", &json!(1)).unwrap_err().starts_with("topic:"));
        assert!(check(&"t".repeat(129), &json!(1))
            .unwrap_err()
            .starts_with("topic:"));
        assert!(check("a\nb", &json!(1)).unwrap_err().starts_with("topic:"));
        assert!(check("gpufleet.gpus", &json!(1))
            .unwrap_err()
            .starts_with("topic:"));
        let big = json!("x".repeat(MAX_DATA));
        assert!(check("t", &big).unwrap_err().starts_with("data:"));
    }

    #[test]
    fn an_outbox_line_is_checked() {
        let ok = OutboxLine::parse(br#"{"to": "*", "topic": "t", "data": [1]}"#).unwrap();
        assert_eq!((ok.to.as_str(), ok.signal), ("*", false));
        for (bad, field) in [
            (&br#"{"to": "", "topic": "t"}"#[..], "to:"),
            (br#"{"to": "a", "topic": ""}"#, "topic:"),
            (br#"{"to": "a", "topic": "t", "x": 1}"#, "unknown field"),
            (br#"{"topic": "t"}"#, "missing field `to`"),
            (b"not json", "expected"),
        ] {
            let e = OutboxLine::parse(bad).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_send_request_refuses_unknown_fields() {
        let r: Result<SendRequest, _> =
            serde_json::from_value(json!({"job_id": "j", "topic": "t", "dat": 1}));
        assert!(r.unwrap_err().to_string().contains("dat"));
        let r: SendRequest = serde_json::from_value(json!({"job_id": "j", "topic": "t"})).unwrap();
        assert_eq!((r.task, r.data, r.signal), (None, json!(null), false));
    }
}
