//! A two-phase task's control file (`GPUFLEET_CONTROL`), one line each:
//! the task appends `ready` (or `{"ready": true}`) once it has loaded; the
//! worker appends `{"gpus": [...], "cuda_visible_devices": "..."}` once the
//! coordinator has granted its GPUs, and sends the same to its inbox.
//!
//! The file lives in the attempt's `meta/`, which the task owns: it is read
//! and written only through the no-link checks of
//! [`crate::supervisor::open_task_file_with`], and only its first
//! [`MAX_CONTROL_BYTES`] are ever read, so a task writing garbage (or
//! `ready` a million times) costs the worker one bounded read per poll and
//! is reported ready once.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use gpufleet_schema::GpuGrant;
use serde_json::json;

/// The most of a control file the worker reads: a ready line must come
/// within it.
pub const MAX_CONTROL_BYTES: u64 = 64 << 10;

/// Whether `line` says the task has loaded: `ready`, or a JSON object
/// whose `ready` is `true`.
pub fn is_ready_line(line: &[u8]) -> bool {
    let line = line.trim_ascii();
    line == b"ready"
        || serde_json::from_slice::<serde_json::Value>(line)
            .is_ok_and(|v| v.get("ready") == Some(&serde_json::Value::Bool(true)))
}

/// Follows a control file for its ready line.
#[derive(Debug, Default)]
pub struct ReadyWatch {
    /// Bytes read so far.
    offset: u64,
    /// The part of a line not yet ended.
    partial: Vec<u8>,
    ready: bool,
    /// The bound was reached without a ready line.
    given_up: bool,
}

impl ReadyWatch {
    /// Takes what was read past [`ReadyWatch::offset`]; true once a ready
    /// line has been seen.
    pub fn take(&mut self, bytes: &[u8]) -> bool {
        if self.ready || self.given_up {
            return self.ready;
        }
        let room = MAX_CONTROL_BYTES.saturating_sub(self.offset) as usize;
        let bytes = &bytes[..bytes.len().min(room)];
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if is_ready_line(&line) {
                self.ready = true;
                self.partial = Vec::new();
                return true;
            }
        }
        if self.offset >= MAX_CONTROL_BYTES {
            self.given_up = true;
            self.partial = Vec::new();
        }
        false
    }

    /// Where the next read starts; `None` once there is nothing more to
    /// read (ready, or the bound reached).
    pub fn offset(&self) -> Option<u64> {
        (!self.ready && !self.given_up).then_some(self.offset)
    }

    pub fn given_up(&self) -> bool {
        self.given_up
    }
}

/// Reads what the control file at `path` holds from `offset`, at most up
/// to [`MAX_CONTROL_BYTES`]; nothing if it does not exist yet. Blocking.
pub fn read_from(path: &Path, offset: u64) -> io::Result<Vec<u8>> {
    let mut file = match crate::supervisor::open_task_file(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    file.take(MAX_CONTROL_BYTES.saturating_sub(offset))
        .read_to_end(&mut out)?;
    Ok(out)
}

/// What the task is told of its GPUs: their indices and UUIDs, and the
/// `CUDA_VISIBLE_DEVICES` value to set before CUDA starts.
pub fn gpus_message(gpus: &[GpuGrant]) -> serde_json::Value {
    let visible: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
    json!({
        "gpus": gpus
            .iter()
            .map(|g| json!({"index": g.index, "uuid": g.uuid}))
            .collect::<Vec<_>>(),
        "cuda_visible_devices": visible.join(","),
    })
}

/// [`gpus_message`] as a control-file line.
pub fn gpus_line(gpus: &[GpuGrant]) -> Vec<u8> {
    let mut l = gpus_message(gpus).to_string().into_bytes();
    l.push(b'\n');
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::ByteSize;

    #[test]
    fn ready_is_a_bare_word_or_a_json_flag() {
        for yes in [
            &b"ready\n"[..],
            b"  ready \r\n",
            br#"{"ready": true}"#,
            br#"{"ready":true,"x":1}"#,
        ] {
            assert!(is_ready_line(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"readyy"[..],
            b"not ready",
            br#"{"ready": false}"#,
            br#"{"ready": "true"}"#,
            br#"["ready"]"#,
            b"\xff\xfe",
            br#"{"gpus": [], "cuda_visible_devices": ""}"#,
        ] {
            assert!(!is_ready_line(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn a_ready_line_counts_once_it_is_whole_and_once_only() {
        let mut w = ReadyWatch::default();
        assert!(!w.take(b"loading 10%\nrea"));
        assert_eq!(w.offset(), Some(15));
        assert!(!w.take(b"dy"), "not before its line ends");
        assert!(w.take(b"\nready\nready\n"));
        assert_eq!(w.offset(), None, "nothing more is read");
        assert!(w.take(b"garbage"));
    }

    #[test]
    fn garbage_past_the_bound_is_never_read() {
        let mut w = ReadyWatch::default();
        let junk = vec![b'x'; 40 << 10];
        assert!(!w.take(&junk));
        assert!(!w.take(&junk));
        assert!(w.given_up());
        assert_eq!(w.offset(), None);
        assert!(!w.take(b"\nready\n"), "too late: past the bound");
    }

    #[test]
    fn the_file_is_read_from_where_it_was_left_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.jsonl");
        assert_eq!(read_from(&path, 0).unwrap(), b"");
        std::fs::write(&path, "abc\nready\n").unwrap();
        assert_eq!(read_from(&path, 4).unwrap(), b"ready\n");
        std::fs::remove_file(&path).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "ready\n").unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert!(read_from(&path, 0).is_err());
    }

    #[test]
    fn the_gpus_line_names_indices_and_uuids() {
        let gpus = [
            GpuGrant {
                index: 2,
                uuid: "GPU-a".into(),
                memory: ByteSize::gib(1),
            },
            GpuGrant {
                index: 5,
                uuid: "GPU-b".into(),
                memory: ByteSize::gib(1),
            },
        ];
        let v: serde_json::Value = serde_json::from_slice(&gpus_line(&gpus)).unwrap();
        assert_eq!(v["cuda_visible_devices"], "2,5");
        assert_eq!(v["gpus"][1]["uuid"], "GPU-b");
        assert_eq!(v["gpus"][0]["index"], 2);
    }
}
