//! Turning a task's output into [`Output`] batches without ever making the
//! task wait.
//!
//! Pipe readers and the progress tailer feed one hub task. The hub cuts each
//! stream into batches, hands them to the caller's channel with
//! `try_reserve`, and keeps what does not fit in a queue bounded by
//! `max_pending_log_bytes` (plus the one batch in hand). Anything past that
//! bound, or past `max_log_bytes` in total, is dropped and counted; the count
//! rides on the stream's next batch. Progress and the worker's own notices
//! count toward `max_log_bytes` too: once it is reached, progress is
//! dropped (one notice says so) and the progress file is read no further.
//! The hub itself never awaits the caller until the very end, so the
//! readers always drain the pipes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gpufleet_schema::LogStream;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Limits, Output};

/// How much one pipe read takes at most.
const READ_CHUNK: usize = 64 * 1024;
/// How much of stderr is kept to look for out-of-memory messages.
pub(super) const STDERR_TAIL: usize = 64 * 1024;

/// What the producers tell the hub.
pub(super) enum HubMsg {
    Bytes(LogStream, Vec<u8>),
    Eof(LogStream),
    /// A progress value and the size of the line it came from.
    Progress(serde_json::Value, usize),
    /// A line of our own for the task's stderr stream.
    Notice(String),
    /// A message from the task's outbox, and the size of its line.
    Message(gpufleet_schema::message::OutboxLine, usize),
}

fn slot(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

const STREAMS: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

#[derive(Default)]
struct StreamBuf {
    buf: Vec<u8>,
    /// When the oldest byte in `buf` arrived.
    since: Option<Instant>,
    /// Bytes dropped since the last batch that went out on this stream.
    unreported: u64,
}

struct Pending {
    item: Output,
    /// What it costs in memory.
    size: usize,
    /// Task output bytes it carries, counted as dropped if it never leaves.
    log_bytes: u64,
}

/// Batching and dropping, without any waiting: every method returns at once.
pub(super) struct Hub {
    out: mpsc::Sender<Output>,
    closed: bool,
    batch_bytes: usize,
    interval: Duration,
    max_log: u64,
    max_pending: usize,
    streams: [StreamBuf; 2],
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    shipped: u64,
    dropped: u64,
    /// Set once `max_log_bytes` is reached, for the progress reader.
    capped: Arc<AtomicBool>,
    /// Progress updates dropped at the cap.
    progress_dropped: u64,
}

impl Hub {
    pub(super) fn new(out: mpsc::Sender<Output>, limits: &Limits, capped: Arc<AtomicBool>) -> Hub {
        Hub {
            out,
            closed: false,
            batch_bytes: limits.log_batch_bytes.max(1),
            interval: limits.log_batch_interval,
            max_log: limits.max_log_bytes,
            max_pending: limits.max_pending_log_bytes,
            streams: Default::default(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            shipped: 0,
            dropped: 0,
            capped,
            progress_dropped: 0,
        }
    }

    /// Task output bytes that did not reach the caller so far.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(super) fn handle(&mut self, msg: HubMsg, now: Instant) {
        match msg {
            HubMsg::Bytes(stream, bytes) => self.push(stream, &bytes, now),
            HubMsg::Eof(stream) => self.finish(stream),
            HubMsg::Progress(value, size) => self.extra(Output::Progress(value), size),
            HubMsg::Message(line, size) => self.extra(Output::Message(line), size),
            HubMsg::Notice(text) => {
                let size = text.len();
                if self.over_cap(size) {
                    return;
                }
                let item = Output::Log {
                    stream: LogStream::Stderr,
                    text,
                    dropped_bytes: 0,
                };
                self.enqueue_extra(item, size);
            }
        }
    }

    /// Progress or a message, counted toward `max_log_bytes` as output is.
    fn extra(&mut self, item: Output, size: usize) {
        if self.over_cap(size) {
            self.drop_progress();
        } else {
            self.enqueue_extra(item, size);
        }
    }

    /// Whether `size` more bytes would pass `max_log_bytes`; marks the cap
    /// reached if so.
    fn over_cap(&mut self, size: usize) -> bool {
        let over = self.shipped.saturating_add(size as u64) > self.max_log;
        if over || self.shipped >= self.max_log {
            self.capped.store(true, Ordering::Relaxed);
        }
        over
    }

    /// Drops a progress update at the cap; the first one says so.
    fn drop_progress(&mut self) {
        self.progress_dropped += 1;
        if self.progress_dropped == 1 {
            let text = format!(
                "[gpufleet] this task reached max_log_size ({} bytes of output and progress): further progress and messages are dropped\n",
                self.max_log
            );
            let size = text.len();
            let item = Output::Log {
                stream: LogStream::Stderr,
                text,
                dropped_bytes: 0,
            };
            // Past the cap by one line, once, so that the reason is known.
            self.enqueue_extra(item, size);
        }
    }

    pub(super) fn push(&mut self, stream: LogStream, bytes: &[u8], now: Instant) {
        let s = slot(stream);
        if (self.closed || self.shipped >= self.max_log) && self.streams[s].buf.is_empty() {
            // Nothing more can go out: skip the copying.
            self.count_drop(s, bytes.len() as u64);
            return;
        }
        let sb = &mut self.streams[s];
        sb.buf.extend_from_slice(bytes);
        sb.since.get_or_insert(now);
        while self.streams[s].buf.len() >= self.batch_bytes {
            let buf = &self.streams[s].buf;
            let cut = match buf[..self.batch_bytes].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => utf8_floor(buf, self.batch_bytes),
            };
            self.cut(s, cut, now);
        }
        self.flush();
    }

    /// Sends out batches that have waited `log_batch_interval`.
    pub(super) fn tick(&mut self, now: Instant) {
        for s in 0..2 {
            let due = self.streams[s]
                .since
                .is_some_and(|t| now >= t + self.interval);
            if !due {
                continue;
            }
            let buf = &self.streams[s].buf;
            let cut = match buf.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => utf8_floor(buf, buf.len()),
            };
            self.cut(s, cut, now);
        }
        self.flush();
    }

    /// When the oldest unsent batch is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.streams
            .iter()
            .filter_map(|s| s.since)
            .min()
            .map(|t| t + self.interval)
    }

    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends everything left of a stream that has ended; an incomplete
    /// character at the very end becomes U+FFFD.
    pub(super) fn finish(&mut self, stream: LogStream) {
        let s = slot(stream);
        let rest = std::mem::take(&mut self.streams[s].buf);
        self.streams[s].since = None;
        self.emit(s, rest);
        self.flush();
    }

    /// Ends every stream and queues, for each stream that lost output since
    /// its last batch, an empty batch that reports the count.
    pub(super) fn finish_all(&mut self) {
        for stream in STREAMS {
            self.finish(stream);
        }
        for stream in STREAMS {
            let s = slot(stream);
            let n = std::mem::take(&mut self.streams[s].unreported);
            if n > 0 && !self.closed {
                self.pending.push_back(Pending {
                    item: Output::Log {
                        stream,
                        text: String::new(),
                        dropped_bytes: n,
                    },
                    size: 0,
                    log_bytes: 0,
                });
            }
        }
        self.flush();
    }

    /// Takes the oldest queued item for a send that may wait.
    fn pop_front(&mut self) -> Option<Pending> {
        let p = self.pending.pop_front()?;
        self.pending_bytes = self.pending_bytes.saturating_sub(p.size);
        Some(p)
    }

    /// Gives up on everything still queued.
    fn close(&mut self) {
        self.closed = true;
        while let Some(p) = self.pop_front() {
            self.dropped += p.log_bytes;
        }
    }

    fn count_drop(&mut self, s: usize, n: u64) {
        self.streams[s].unreported += n;
        self.dropped += n;
    }

    /// Splits the first `cut` bytes off stream `s` and emits them.
    fn cut(&mut self, s: usize, cut: usize, now: Instant) {
        let sb = &mut self.streams[s];
        let rest = sb.buf.split_off(cut.min(sb.buf.len()));
        let head = std::mem::replace(&mut sb.buf, rest);
        sb.since = if sb.buf.is_empty() { None } else { Some(now) };
        self.emit(s, head);
    }

    fn emit(&mut self, s: usize, mut bytes: Vec<u8>) {
        let allowance = self.max_log.saturating_sub(self.shipped);
        let mut over = 0;
        if bytes.len() as u64 > allowance {
            let keep = utf8_floor(&bytes, allowance as usize);
            over = (bytes.len() - keep) as u64;
            bytes.truncate(keep);
        }
        self.enqueue_log(s, bytes);
        // Counted after the kept part, so that it is reported on the batch
        // that follows the loss rather than on the one before it.
        self.count_drop(s, over);
    }

    fn enqueue_log(&mut self, s: usize, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        // Make room first: the caller may have caught up.
        self.flush();
        let n = bytes.len();
        let full = !self.pending.is_empty() && self.pending_bytes + n > self.max_pending;
        if self.closed || full {
            self.count_drop(s, n as u64);
            return;
        }
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        self.shipped += n as u64;
        if self.shipped >= self.max_log {
            self.capped.store(true, Ordering::Relaxed);
        }
        let dropped_bytes = std::mem::take(&mut self.streams[s].unreported);
        self.pending_bytes += text.len();
        self.pending.push_back(Pending {
            size: text.len(),
            item: Output::Log {
                stream: STREAMS[s],
                text,
                dropped_bytes,
            },
            log_bytes: n as u64,
        });
    }

    /// Queues something that is not task output (progress, our notices):
    /// bounded like output, but never counted as dropped output.
    fn enqueue_extra(&mut self, item: Output, size: usize) {
        self.flush();
        if self.closed || (!self.pending.is_empty() && self.pending_bytes + size > self.max_pending)
        {
            tracing::debug!("caller is behind; dropping a progress update or notice");
            return;
        }
        self.shipped = self.shipped.saturating_add(size as u64);
        if self.shipped >= self.max_log {
            self.capped.store(true, Ordering::Relaxed);
        }
        self.pending_bytes += size;
        self.pending.push_back(Pending {
            item,
            size,
            log_bytes: 0,
        });
        self.flush();
    }

    /// Hands the caller as much of the queue as its channel takes now.
    fn flush(&mut self) {
        let mut gone = false;
        while !self.pending.is_empty() {
            match self.out.try_reserve() {
                Ok(permit) => {
                    if let Some(p) = self.pending.pop_front() {
                        self.pending_bytes = self.pending_bytes.saturating_sub(p.size);
                        permit.send(p.item);
                    }
                }
                Err(TrySendError::Full(())) => break,
                Err(TrySendError::Closed(())) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            self.close();
        }
    }
}

/// The largest cut `<= at` that does not split a UTF-8 character, unless
/// that would leave nothing (a lone broken character still has to go).
fn utf8_floor(bytes: &[u8], at: usize) -> usize {
    let at = at.min(bytes.len());
    // Walk back over at most three continuation bytes to the lead byte.
    let mut start = at;
    while start > 0 && at - start < 4 {
        start -= 1;
        let b = bytes[start];
        if b & 0xC0 != 0x80 {
            let len = match b {
                0x00..=0x7F => 1,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if start + len > at && start > 0 {
                start
            } else {
                at
            };
        }
    }
    at
}

/// Runs the hub until every producer is gone, then gives the caller up to
/// `final_flush` to take what is left. Returns the output bytes dropped.
pub(super) async fn run_hub(
    mut rx: mpsc::Receiver<HubMsg>,
    mut hub: Hub,
    final_flush: Duration,
) -> u64 {
    // Its own handle, so that waiting for room does not borrow the hub.
    let out = hub.out.clone();
    loop {
        let deadline = hub.next_deadline();
        let waiting = hub.has_pending() && !hub.closed;
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => hub.handle(msg, Instant::now()),
                None => break,
            },
            permit = out.reserve(), if waiting => match permit {
                Ok(permit) => {
                    if let Some(p) = hub.pop_front() {
                        permit.send(p.item);
                    }
                    hub.flush();
                }
                Err(_) => hub.close(),
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                hub.tick(Instant::now());
            }
        }
    }
    hub.finish_all();
    let until = Instant::now() + final_flush;
    while let Some(p) = hub.pop_front() {
        match tokio::time::timeout_at(until, out.reserve()).await {
            Ok(Ok(permit)) => permit.send(p.item),
            _ => {
                hub.dropped += p.log_bytes;
                hub.close();
            }
        }
    }
    hub.dropped()
}

/// Reads a pipe to its end (or until `cancel`) in raw chunks. Keeps the last
/// `keep_tail` bytes seen and returns them.
pub(super) async fn read_pipe<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: LogStream,
    hub: mpsc::Sender<HubMsg>,
    cancel: CancellationToken,
    keep_tail: usize,
) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut hub_alive = true;
    loop {
        let n = tokio::select! {
            r = pipe.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(?stream, error = %e, "task pipe read failed; treating as closed");
                    break;
                }
            },
            _ = cancel.cancelled() => break,
        };
        let chunk = &buf[..n];
        if keep_tail > 0 {
            tail.extend_from_slice(chunk);
            if tail.len() > 2 * keep_tail {
                tail.drain(..tail.len() - keep_tail);
            }
        }
        // Without a hub the output is lost, but the pipe must still be
        // drained or the task would block on it.
        if hub_alive
            && hub
                .send(HubMsg::Bytes(stream, chunk.to_vec()))
                .await
                .is_err()
        {
            hub_alive = false;
        }
    }
    if hub_alive {
        let _ = hub.send(HubMsg::Eof(stream)).await;
    }
    if tail.len() > keep_tail {
        tail.drain(..tail.len() - keep_tail);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(batch: usize, max_log: u64, max_pending: usize) -> Limits {
        Limits {
            log_batch_bytes: batch,
            max_log_bytes: max_log,
            max_pending_log_bytes: max_pending,
            log_batch_interval: Duration::from_millis(100),
            ..Limits::default()
        }
    }

    fn logs(rx: &mut mpsc::Receiver<Output>) -> Vec<(LogStream, String, u64)> {
        let mut v = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Output::Log {
                stream,
                text,
                dropped_bytes,
            } = o
            {
                v.push((stream, text, dropped_bytes));
            }
        }
        v
    }

    #[test]
    fn utf8_floor_never_splits_a_character() {
        let s = "aé€😀".as_bytes(); // 1 + 2 + 3 + 4 bytes
        let cuts: Vec<usize> = (0..=s.len()).map(|i| utf8_floor(s, i)).collect();
        assert_eq!(cuts, vec![0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10]);
        // A lone broken character is not held back forever.
        assert_eq!(utf8_floor(&[0xE2, 0x82], 2), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_cut_at_newlines_and_keep_characters_whole() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut hub = Hub::new(tx, &limits(8, u64::MAX, 1 << 20), Default::default());
        let now = Instant::now();
        // "€" arrives split across two reads, and the batch size falls
        // inside it.
        let bytes = "ab\ncdefgh€x".as_bytes();
        hub.push(LogStream::Stdout, &bytes[..10], now);
        hub.push(LogStream::Stdout, &bytes[10..], now);
        hub.finish(LogStream::Stdout);
        let got = logs(&mut rx);
        let texts: Vec<&str> = got.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(texts, vec!["ab\n", "cdefgh", "€x"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_line_goes_out_after_the_interval() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut hub = Hub::new(tx, &limits(1024, u64::MAX, 1 << 20), Default::default());
        let t0 = Instant::now();
        hub.push(LogStream::Stderr, b"one\ntw", t0);
        assert_eq!(hub.next_deadline(), Some(t0 + Duration::from_millis(100)));
        hub.tick(t0 + Duration::from_millis(50));
        assert!(logs(&mut rx).is_empty());
        let t1 = t0 + Duration::from_millis(100);
        hub.tick(t1);
        assert_eq!(logs(&mut rx), vec![(LogStream::Stderr, "one\n".into(), 0)]);
        // The rest waits one more interval for its newline, then goes anyway.
        hub.tick(t1 + Duration::from_millis(100));
        assert_eq!(logs(&mut rx), vec![(LogStream::Stderr, "tw".into(), 0)]);
        assert_eq!(hub.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_caller_loses_output_and_is_told_how_much() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut hub = Hub::new(tx, &limits(4, u64::MAX, 8), Default::default());
        let now = Instant::now();
        // 1 batch in the channel, 8 bytes queued, then drops.
        hub.push(LogStream::Stdout, b"aaa\nbbb\nccc\nddd\neee\n", now);
        assert_eq!(hub.dropped(), 8);
        let first = logs(&mut rx);
        assert_eq!(first, vec![(LogStream::Stdout, "aaa\n".into(), 0)]);
        hub.push(LogStream::Stdout, b"fff\n", now);
        hub.finish_all();
        let mut all = Vec::new();
        while hub.has_pending() {
            all.extend(logs(&mut rx));
            hub.flush();
        }
        all.extend(logs(&mut rx));
        assert_eq!(
            all,
            vec![
                (LogStream::Stdout, "bbb\n".into(), 0),
                (LogStream::Stdout, "ccc\n".into(), 0),
                (LogStream::Stdout, "fff\n".into(), 8),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn output_past_the_total_limit_is_counted_in_a_last_batch() {
        let (tx, mut rx) = mpsc::channel(100);
        let mut hub = Hub::new(tx, &limits(4, 6, 1 << 20), Default::default());
        let now = Instant::now();
        hub.push(LogStream::Stdout, b"abc\ndef\nghi\n", now);
        hub.push(LogStream::Stdout, b"more", now);
        hub.finish_all();
        assert_eq!(
            logs(&mut rx),
            vec![
                (LogStream::Stdout, "abc\n".into(), 0),
                (LogStream::Stdout, "de".into(), 0),
                (LogStream::Stdout, String::new(), 10),
            ]
        );
        assert_eq!(hub.dropped(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_counts_toward_the_total_limit_with_output() {
        let (tx, mut rx) = mpsc::channel(100);
        let capped = Arc::new(AtomicBool::new(false));
        let mut hub = Hub::new(tx, &limits(1024, 30, 1 << 20), capped.clone());
        let now = Instant::now();
        hub.push(LogStream::Stdout, b"0123456789\n", now);
        hub.finish(LogStream::Stdout);
        for i in 0..5 {
            // 10 bytes each: after the 11 bytes of output, one fits.
            hub.handle(HubMsg::Progress(serde_json::json!({ "i": i }), 10), now);
        }
        let got: Vec<Output> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[1], Output::Progress(v) if v["i"] == 0));
        let Output::Log { text, .. } = &got[2] else {
            panic!("{got:?}");
        };
        assert!(text.contains("reached max_log_size (30 bytes"), "{text}");
        assert!(capped.load(Ordering::Relaxed));
        // Output past the cap is dropped and counted as before.
        hub.push(LogStream::Stdout, b"more\n", now);
        hub.finish_all();
        assert_eq!(hub.dropped(), 5);
    }
}
