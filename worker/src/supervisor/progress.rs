//! Following the files a task appends JSON lines to: `GPUFLEET_EVENTS`
//! (progress, one JSON value per line) and `GPUFLEET_OUTBOX` (messages to
//! other tasks of its job, each checked, and at most
//! [`OUTBOX_RATE`] a second after a burst of [`OUTBOX_BURST`]: a task that
//! floods its outbox gets its excess dropped, with a notice on its stderr).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gpufleet_schema::message::OutboxLine;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::HubMsg;

/// The most read from the file in one poll, so that a task writing
/// progress in a tight loop cannot make us hold much at once.
const MAX_READ_PER_POLL: u64 = 4 << 20;
/// A longer line is not progress; it is skipped up to its newline. Well
/// under NATS's default 1 MiB `max_payload`, so that a progress event
/// always fits in one message.
const MAX_LINE: usize = 256 << 10;
/// How much of a bad line the notice quotes.
const QUOTE_CHARS: usize = 200;
/// Messages a task may send per second from its outbox, on average...
pub const OUTBOX_RATE: f64 = 100.0;
/// ... and at once.
pub const OUTBOX_BURST: f64 = 200.0;

/// What was appended to `path` after `offset`, at most
/// `MAX_READ_PER_POLL` bytes; true if the file was truncated or replaced,
/// so the bytes are from its start. Blocking.
fn read_appended(path: &Path, offset: u64) -> std::io::Result<(bool, Vec<u8>)> {
    // Not through a link, not a FIFO or device (which would block or
    // never end).
    let mut file = match super::open_task_file(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((false, Vec::new())),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let restarted = len < offset;
    let from = if restarted { 0 } else { offset };
    if len == from {
        return Ok((restarted, Vec::new()));
    }
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(MAX_READ_PER_POLL).read_to_end(&mut bytes)?;
    Ok((restarted, bytes))
}

pub(super) struct EventsTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Inside a line that was too long; drop bytes until its newline.
    skipping: bool,
    /// For an outbox: its rate limit.
    outbox: Option<Bucket>,
}

/// A token bucket: what may still be sent now, when that was counted, and
/// how many were dropped since the last notice.
struct Bucket {
    tokens: f64,
    at: Instant,
    dropped: u64,
}

impl EventsTail {
    /// The progress file.
    pub(super) fn new(path: PathBuf) -> EventsTail {
        EventsTail {
            path,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            outbox: None,
        }
    }

    /// The outbox file.
    pub(super) fn outbox(path: PathBuf) -> EventsTail {
        EventsTail {
            outbox: Some(Bucket {
                tokens: OUTBOX_BURST,
                at: Instant::now(),
                dropped: 0,
            }),
            ..EventsTail::new(path)
        }
    }

    /// One complete line's message, if it is one.
    fn line(&mut self, line: &[u8], msgs: &mut Vec<HubMsg>) {
        let Some(bucket) = &mut self.outbox else {
            return line_message(line, msgs);
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return;
        }
        let now = Instant::now();
        let refill = now.duration_since(bucket.at).as_secs_f64() * OUTBOX_RATE;
        bucket.tokens = (bucket.tokens + refill).min(OUTBOX_BURST);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            bucket.dropped += 1;
            return;
        }
        bucket.tokens -= 1.0;
        match OutboxLine::parse(line) {
            Ok(m) => msgs.push(HubMsg::Message(m, line.len())),
            Err(e) => msgs.push(HubMsg::Notice(format!(
                "[gpufleet] ignored an outbox line: {}\n",
                quote(e.as_bytes())
            ))),
        }
    }

    /// Reads what was appended since the last poll and returns the messages
    /// for its complete lines; at the end (`last`), a final line without its
    /// newline counts too.
    #[cfg(test)]
    pub(super) async fn poll(&mut self, last: bool) -> Vec<HubMsg> {
        poll_all(std::slice::from_mut(self), last).await
    }

    /// Takes what one read found; true if there may be more to read now.
    fn apply(&mut self, got: std::io::Result<(bool, Vec<u8>)>, msgs: &mut Vec<HubMsg>) -> bool {
        let bytes = match got {
            Ok((restarted, bytes)) => {
                if restarted {
                    self.offset = 0;
                    self.partial.clear();
                    self.skipping = false;
                }
                self.offset += bytes.len() as u64;
                bytes
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot read a task's file");
                Vec::new()
            }
        };
        let more = bytes.len() as u64 == MAX_READ_PER_POLL;
        self.take_lines(&bytes, msgs);
        more
    }

    /// After a poll: the last line without its newline (at the end), and
    /// how many outbox messages were dropped.
    fn close_poll(&mut self, last: bool, msgs: &mut Vec<HubMsg>) {
        if last && !self.partial.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, msgs);
        }
        if let Some(b) = self.outbox.as_mut().filter(|b| b.dropped > 0) {
            msgs.push(HubMsg::Notice(format!(
                "[gpufleet] dropped {} outbox messages: more than {OUTBOX_RATE} a second\n",
                std::mem::take(&mut b.dropped)
            )));
        }
    }

    fn take_lines(&mut self, bytes: &[u8], msgs: &mut Vec<HubMsg>) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = (&rest[..i], &rest[i + 1..]);
            rest = tail;
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.is_empty() {
                self.line(head, msgs);
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                self.line(&line, msgs);
            }
        }
        if self.skipping {
            return;
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            self.partial = Vec::new();
            self.skipping = true;
            let what = if self.outbox.is_some() {
                "an outbox"
            } else {
                "a progress"
            };
            msgs.push(HubMsg::Notice(format!(
                "[gpufleet] ignored {what} line longer than {MAX_LINE} bytes\n"
            )));
        }
    }
}

fn line_message(line: &[u8], msgs: &mut Vec<HubMsg>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return;
    }
    if line.len() > MAX_LINE {
        msgs.push(HubMsg::Notice(format!(
            "[gpufleet] ignored a progress line longer than {MAX_LINE} bytes\n"
        )));
        return;
    }
    match serde_json::from_slice(line) {
        Ok(value) => msgs.push(HubMsg::Progress(value, line.len())),
        Err(_) => msgs.push(HubMsg::Notice(format!(
            "[gpufleet] ignored progress line that is not JSON: {}\n",
            quote(line)
        ))),
    }
}

/// The start of `text`, for a notice.
fn quote(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let mut quoted: String = text.chars().take(QUOTE_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push_str("...");
    }
    quoted
}

/// Reads what was appended to each of `tails` since the last poll, in one
/// trip to the blocking pool for all of them (a worker running hundreds of
/// tasks polls each one's files ten times a second), and returns the
/// messages of their complete lines; at the end (`last`), everything, and
/// a final line without its newline too.
pub(super) async fn poll_all(tails: &mut [EventsTail], last: bool) -> Vec<HubMsg> {
    let mut msgs = Vec::new();
    loop {
        let wanted: Vec<(PathBuf, u64)> =
            tails.iter().map(|t| (t.path.clone(), t.offset)).collect();
        let n = wanted.len();
        let got = tokio::task::spawn_blocking(move || {
            wanted
                .iter()
                .map(|(path, offset)| read_appended(path, *offset))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(std::io::Error::other(e.to_string())))
                .collect()
        });
        let mut more = false;
        for (tail, got) in tails.iter_mut().zip(got) {
            more |= tail.apply(got, &mut msgs);
        }
        // At the end read everything; otherwise the next poll goes on.
        if !(last && more) {
            break;
        }
    }
    for tail in tails.iter_mut() {
        tail.close_poll(last, &mut msgs);
    }
    msgs
}

/// Polls every `every` until `done`, then once more for the rest; stops
/// reading once `capped` (the task's output and progress reached their
/// limit, so what it writes now would be dropped anyway).
pub(super) async fn follow(
    mut tails: Vec<EventsTail>,
    every: Duration,
    hub: mpsc::Sender<HubMsg>,
    done: CancellationToken,
    capped: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = done.cancelled() => true,
        };
        if capped.load(Ordering::Relaxed) {
            return;
        }
        for msg in poll_all(&mut tails, last).await {
            if hub.send(msg).await.is_err() {
                return;
            }
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn describe(msgs: Vec<HubMsg>) -> Vec<String> {
        msgs.into_iter()
            .map(|m| match m {
                HubMsg::Progress(v, _) => v.to_string(),
                HubMsg::Notice(t) => t,
                _ => "other".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn lines_are_taken_whole_and_the_last_one_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut tail = EventsTail::new(path.clone());
        assert!(tail.poll(false).await.is_empty(), "no file yet");

        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"{\"a\":1}\n\n{\"b\":").unwrap();
        assert_eq!(describe(tail.poll(false).await), vec!["{\"a\":1}"]);
        f.write_all(b"2}\r\nnope\n{\"c\":3}").unwrap();
        let got = describe(tail.poll(false).await);
        assert_eq!(got[0], "{\"b\":2}");
        assert_eq!(
            got[1],
            "[gpufleet] ignored progress line that is not JSON: nope\n"
        );
        assert_eq!(got.len(), 2);
        assert_eq!(describe(tail.poll(true).await), vec!["{\"c\":3}"]);
    }

    #[tokio::test]
    async fn a_line_too_long_is_skipped_whether_it_comes_whole_or_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut tail = EventsTail::new(path.clone());
        let long = format!("\"{}\"\n", "x".repeat(MAX_LINE));
        let mut f = std::fs::File::create(&path).unwrap();
        // Whole, in one read.
        f.write_all(format!("{long}{{\"a\":1}}\n").as_bytes())
            .unwrap();
        let got = describe(tail.poll(false).await);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("longer than"), "{}", got[0]);
        assert_eq!(got[1], "{\"a\":1}");
        // In parts, over several reads.
        f.write_all(&long.as_bytes()[..MAX_LINE / 2]).unwrap();
        assert!(tail.poll(false).await.is_empty());
        f.write_all(&long.as_bytes()[MAX_LINE / 2..]).unwrap();
        f.write_all(b"{\"b\":2}\n").unwrap();
        let got = describe(tail.poll(false).await);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].contains("longer than"), "{}", got[0]);
        assert_eq!(got[1], "{\"b\":2}");
    }

    #[tokio::test]
    async fn an_outbox_takes_checked_messages_and_drops_a_flood_past_its_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut tail = EventsTail::outbox(path.clone());
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"{\"to\": \"b\", \"topic\": \"t\", \"data\": 1}\n\x00\xff garbage\n{\"to\": \"\", \"topic\": \"t\"}\n")
            .unwrap();
        let got = tail.poll(false).await;
        assert!(matches!(&got[0], HubMsg::Message(m, _) if m.to == "b" && m.data == 1));
        assert!(matches!(&got[1], HubMsg::Notice(t) if t.contains("ignored an outbox line")));
        assert!(matches!(&got[2], HubMsg::Notice(t) if t.contains("to:")));
        assert_eq!(got.len(), 3);
        // A flood: the burst goes, the rest is dropped, each drop said.
        let line = b"{\"to\": \"*\", \"topic\": \"t\"}\n";
        for _ in 0..1000 {
            f.write_all(line).unwrap();
        }
        let got = tail.poll(false).await;
        let sent = got
            .iter()
            .filter(|m| matches!(m, HubMsg::Message(..)))
            .count();
        let notices: Vec<&String> = got
            .iter()
            .filter_map(|m| match m {
                HubMsg::Notice(t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(notices.len(), 1, "one notice per read: {notices:?}");
        let dropped = 1000 - sent;
        assert!(
            notices[0].contains(&format!("dropped {dropped} outbox")),
            "{notices:?}"
        );
        assert!(
            (OUTBOX_BURST as usize - 3..OUTBOX_BURST as usize + 20).contains(&sent),
            "{sent} sent"
        );
    }

    #[test]
    fn a_bad_line_is_quoted_shortly() {
        let mut msgs = Vec::new();
        line_message("é".repeat(500).as_bytes(), &mut msgs);
        let got = describe(msgs);
        assert_eq!(got.len(), 1);
        assert!(got[0].ends_with(&format!("{}...\n", "é".repeat(200))));
    }
}
