//! Artifacts in the `GPUFLEET_ARTIFACTS` stream: each file is a run of
//! [`ArtifactChunk`] messages followed by one [`ArtifactMeta`], on the
//! subjects of `subjects::artifact` (owner, job, task, attempt and the
//! uploading worker in the subject, so that permissions can scope them).
//!
//! A chunk travels inside a MessagePack envelope rather than as raw bytes:
//! a message that someone can have the server re-deliver elsewhere (a
//! consumer's deliver subject is not checked against its creator's
//! permissions, nats-server#8274) must never read as a record of ours.

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// Bytes of a file per chunk message.
pub const CHUNK_SIZE: usize = 128 << 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactChunk {
    #[serde(with = "bin")]
    pub chunk: Vec<u8>,
}

/// Bytes as MessagePack `bin`, not as an array of numbers.
mod bin {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// The description stored after an artifact's last chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// Path relative to the task's output directory.
    pub name: String,
    pub size: ByteSize,
    pub sha256: String,
    /// How many chunk messages came before it.
    pub chunks: u64,
    /// The stream sequence of its first chunk: where a reader starts.
    #[serde(default)]
    pub first_seq: u64,
}
