//! The one codec: MessagePack with named fields (native) and JSON.
//!
//! A request's encoding comes from its `Content-Type` header, or, without
//! one, from its first byte (a MessagePack map, array or nil marker means
//! MessagePack, anything else JSON); the reply uses the same.
//! Decoding never panics on untrusted bytes, refuses trailing garbage, and
//! reports the path of the field that failed (`tasks[0].resources.gpus`).

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

/// Nesting deeper than this is refused, as serde_json does by default, so
/// that hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MsgPack,
}

/// A message that could not be decoded or encoded. `path` is empty when
/// the failure is not about one field (bad syntax, truncated input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", if path.is_empty() || path == "." { message.clone() } else { format!("{path}: {message}") })]
pub struct CodecError {
    pub path: String,
    pub message: String,
}

impl CodecError {
    fn whole(message: impl Into<String>) -> Self {
        CodecError {
            path: String::new(),
            message: message.into(),
        }
    }
}

impl Encoding {
    /// Chooses by header when it names a known type, else by sniffing.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Encoding {
        if let Some(ct) = content_type {
            let ct = ct.split(';').next().unwrap_or("").trim();
            if ct.eq_ignore_ascii_case(JSON) {
                return Encoding::Json;
            }
            if ct.eq_ignore_ascii_case(MSGPACK) || ct.eq_ignore_ascii_case("application/x-msgpack")
            {
                return Encoding::MsgPack;
            }
        }
        // A request is a map (or, wrongly, an array or nil); MessagePack
        // starts those with bytes no JSON text starts with. Anything else,
        // `null` and `"text"` included, is taken for JSON and answered so.
        // An empty request reads as `{}` and is answered in JSON, so that
        // `nats req gpufleet.api.workers.list ""` works.
        match body.first() {
            Some(0x80..=0x9f | 0xdc..=0xdf | 0xc0) => Encoding::MsgPack,
            _ => Encoding::Json,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::MsgPack => MSGPACK,
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Encoding::Json => {
                serde_json::to_vec(value).map_err(|e| CodecError::whole(e.to_string()))
            }
            Encoding::MsgPack => encode(value),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Result<T, CodecError> {
        match self {
            Encoding::Json => decode_json(body),
            Encoding::MsgPack => decode(body),
        }
    }
}

/// Encodes in the native encoding (MessagePack, named fields).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError::whole(e.to_string()))
}

/// Appends `value` in the native encoding to `buf`: for a message put
/// together from pieces encoded apart (with [`encode_map_header`] and
/// [`encode_array_header`]), such as a record that repeats one piece many
/// times and encodes it once.
pub fn encode_into<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> Result<(), CodecError> {
    rmp_serde::encode::write_named(buf, value).map_err(|e| CodecError::whole(e.to_string()))
}

/// Appends the header of a map of `len` entries (each then a key and a
/// value), as [`encode`] writes it for a struct of `len` fields.
pub fn encode_map_header(buf: &mut Vec<u8>, len: u32) {
    header(buf, len, 0x80, 0xde, 0xdf);
}

/// Appends the header of an array of `len` items.
pub fn encode_array_header(buf: &mut Vec<u8>, len: u32) {
    header(buf, len, 0x90, 0xdc, 0xdd);
}

/// A MessagePack map or array header: its fix form, or the 16- or 32-bit.
fn header(buf: &mut Vec<u8>, len: u32, fix: u8, m16: u8, m32: u8) {
    if len < 16 {
        buf.push(fix | len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        buf.push(m16);
        buf.extend_from_slice(&n.to_be_bytes());
    } else {
        buf.push(m32);
        buf.extend_from_slice(&len.to_be_bytes());
    }
}

/// Decodes the native encoding.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    // A reader (not the borrowing slice decoder) so that the position is
    // known afterwards; it reads lengths through `take`, so a forged length
    // cannot make it allocate more than the message holds.
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    de.set_max_depth(MAX_DEPTH);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    let rest = body.len() as u64 - de.position();
    if rest != 0 {
        return Err(CodecError::whole(format!(
            "{rest} unexpected bytes after the message"
        )));
    }
    Ok(value)
}

fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(path_error)?;
    de.end().map_err(|e| CodecError::whole(e.to_string()))?;
    Ok(value)
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> CodecError {
    CodecError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pieces_encoded_apart_make_what_encode_makes() {
        for n in [0usize, 1, 15, 16, 300, 65_535, 65_536] {
            let list: Vec<u8> = vec![7; n];
            let mut map = std::collections::BTreeMap::new();
            for i in 0..n.min(70_000) as u32 {
                map.insert(i, i % 3 == 0);
            }
            let mut pieces = Vec::new();
            encode_array_header(&mut pieces, n as u32);
            for x in &list {
                encode_into(&mut pieces, x).unwrap();
            }
            assert_eq!(pieces, encode(&list).unwrap(), "array of {n}");
            let mut pieces = Vec::new();
            encode_map_header(&mut pieces, map.len() as u32);
            for (k, v) in &map {
                encode_into(&mut pieces, k).unwrap();
                encode_into(&mut pieces, v).unwrap();
            }
            assert_eq!(pieces, encode(&map).unwrap(), "map of {n}");
        }
    }

    use super::*;
    use crate::event::{Event, EventBody, LogStream, TaskOutcome};
    use crate::ids::{JobId, TaskId};
    use crate::spec::JobSpec;
    use crate::status::TaskState;

    const SAMPLE: &str = r#"{
      "id": "sweep-1",
      "name": "sweep-lr",
      "priority": 0,
      "max_retries": 2,
      "gang": false,
      "min_tasks": null,
      "constraints": {"labels": {"zone": "a"}, "workers": ["optional", "names"]},
      "tasks": [
        {"name": "lr-0.1",
         "command": ["python3", "train.py", "--lr", "0.1"],
         "env": {"SEED": "1"},
         "resources": {"gpus": 1, "gpu_memory": "20GiB", "cpus": 2, "memory": "8GiB"},
         "timeout": "2h",
         "artifacts": ["out/*.pt"]}
      ]
    }"#;

    #[test]
    fn design_sample_parses_and_round_trips_both_ways() {
        let spec: JobSpec = Encoding::Json.decode(SAMPLE.as_bytes()).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.tasks[0].resources.gpu_memory.unwrap().0, 20 << 30);
        assert_eq!(spec.tasks[0].timeout.unwrap().0.as_secs(), 7200);
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = enc.encode(&spec).unwrap();
            assert_eq!(Encoding::detect(None, &bytes), enc);
            let back: JobSpec = enc.decode(&bytes).unwrap();
            assert_eq!(back, spec);
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let bad = SAMPLE.replace("\"gpu_memory\"", "\"gpu_memroy\"");
        let err = Encoding::Json
            .decode::<JobSpec>(bad.as_bytes())
            .unwrap_err();
        assert_eq!(err.path, "tasks[0].resources.gpu_memroy");
        assert!(err.message.contains("unknown field `gpu_memroy`"), "{err}");
        let bad = SAMPLE.replace("\"20GiB\"", "\"20 parsecs\"");
        let err = Encoding::Json
            .decode::<JobSpec>(bad.as_bytes())
            .unwrap_err();
        assert_eq!(err.path, "tasks[0].resources.gpu_memory");
        assert!(err.to_string().contains("parsecs"), "{err}");
    }

    #[test]
    fn msgpack_errors_name_the_field_too() {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        v["tasks"][0]["resources"]["gpus"] = serde_json::json!("two");
        let bytes = rmp_serde::to_vec_named(&v).unwrap();
        let err = decode::<JobSpec>(&bytes).unwrap_err();
        assert_eq!(err.path, "tasks[0].resources.gpus");
    }

    #[test]
    fn detection_prefers_the_header() {
        assert_eq!(
            Encoding::detect(Some("application/json"), b"\x81"),
            Encoding::Json
        );
        assert_eq!(
            Encoding::detect(Some("application/msgpack"), b"{"),
            Encoding::MsgPack
        );
        assert_eq!(Encoding::detect(Some("text/plain"), b" {"), Encoding::Json);
        assert_eq!(Encoding::detect(None, b""), Encoding::Json);
        assert_eq!(Encoding::detect(None, b"\x80"), Encoding::MsgPack);
        assert_eq!(Encoding::detect(None, b"\xc0"), Encoding::MsgPack);
        for json in [&b"null"[..], b" null", b"\"x\"", b"12", b"true", b"\n{}"] {
            assert_eq!(Encoding::detect(None, json), Encoding::Json, "{json:?}");
        }
    }

    #[test]
    fn empty_json_body_reads_as_empty_object() {
        let r: crate::api::WorkersRequest = Encoding::Json.decode(b"").unwrap();
        assert_eq!(r, crate::api::WorkersRequest::default());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let spec: JobSpec = Encoding::Json.decode(SAMPLE.as_bytes()).unwrap();
        let mut bytes = encode(&spec).unwrap();
        bytes.push(0xc0);
        assert!(decode::<JobSpec>(&bytes).is_err());
        assert!(Encoding::Json
            .decode::<JobSpec>(format!("{SAMPLE} x").as_bytes())
            .is_err());
    }

    #[test]
    fn events_round_trip() {
        let job = JobId::new("j").unwrap();
        let task = TaskId::for_index(&job, 0);
        let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        for body in [
            EventBody::State {
                state: TaskState::Running,
                reason: None,
                holder: Some(crate::WorkerId::new("w1").unwrap()),
            },
            EventBody::Log {
                stream: LogStream::Stderr,
                text: "hello\n".into(),
                dropped_bytes: 0,
            },
            EventBody::Progress {
                data: serde_json::json!({"step": 3, "loss": 0.5}),
            },
            EventBody::Result(TaskOutcome {
                state: TaskState::Succeeded,
                exit_code: Some(0),
                signal: None,
                result: Some(serde_json::json!({"acc": 0.9})),
                error: None,
                artifacts: vec![],
                started_at: Some(at),
                finished_at: at,
                usage: Some(crate::TaskUsage {
                    peak_rss: crate::ByteSize::mib(212),
                    cpu_seconds: 3.25,
                    gpu_memory_peak: Some(crate::ByteSize::gib(4)),
                    gpu_utilization_mean: Some(100.0),
                    gpu_simulated: true,
                    samples: 6,
                }),
            }),
        ] {
            let e = Event {
                job_id: job.clone(),
                task_id: task.clone(),
                attempt: 1,
                worker: None,
                lease_rev: Some(7),
                at,
                body,
                token: Some("t".into()),
            };
            for enc in [Encoding::Json, Encoding::MsgPack] {
                let back: Event = enc.decode(&enc.encode(&e).unwrap()).unwrap();
                assert_eq!(back, e);
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut bytes = vec![0x91u8; 100_000]; // arrays of one element, nested
        bytes.push(0xc0);
        assert!(decode::<serde_json::Value>(&bytes).is_err());
        let json = "[".repeat(100_000);
        assert!(Encoding::Json
            .decode::<serde_json::Value>(json.as_bytes())
            .is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode::<JobSpec>(&bytes);
                let _ = decode::<Event>(&bytes);
                let _ = Encoding::Json.decode::<JobSpec>(&bytes);
                let _ = decode::<crate::lease::Lease>(&bytes);
                let _ = decode::<crate::worker::WorkerAdvert>(&bytes);
            }

            #[test]
            fn truncated_messages_never_panic(cut in 0usize..2000) {
                let spec: JobSpec = Encoding::Json.decode(SAMPLE.as_bytes()).unwrap();
                for enc in [Encoding::Json, Encoding::MsgPack] {
                    let bytes = enc.encode(&spec).unwrap();
                    let cut = cut.min(bytes.len());
                    let r = enc.decode::<JobSpec>(&bytes[..cut]);
                    if cut < bytes.len() {
                        prop_assert!(r.is_err());
                    }
                }
            }

            #[test]
            fn mutated_messages_never_panic(pos in 0usize..2000, byte in any::<u8>()) {
                let spec: JobSpec = Encoding::Json.decode(SAMPLE.as_bytes()).unwrap();
                let mut bytes = encode(&spec).unwrap();
                let pos = pos % bytes.len();
                bytes[pos] = byte;
                let _ = decode::<JobSpec>(&bytes);
            }
        }
    }
}
