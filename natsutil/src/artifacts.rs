//! Artifacts in the `GPUFLEET_ARTIFACTS` stream: a worker uploads a file as
//! chunk messages and then a description ([`ArtifactMeta`]); a reader lists
//! the descriptions of a job and downloads a file's chunks, checking its
//! size and sha256.
//!
//! Why a stream and not an object store: an object store's chunk subjects
//! are random, so NATS permissions cannot say "this worker's uploads" or
//! "this user's files"; these subjects carry the owner, the job, the task,
//! the attempt and the uploading worker (see `schema::subjects::artifact`).

use async_nats::jetstream;
use bytes::Bytes;
use gpufleet_schema::artifact::{ArtifactChunk, ArtifactMeta, CHUNK_SIZE};
use gpufleet_schema::subjects::{self, ArtifactPart, ArtifactSubject};
use gpufleet_schema::{codec, ByteSize, JobId, TaskId, UserId, WorkerId};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::events::{self, Replay, Until};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactsError {
    #[error("artifact {name}: {message}")]
    Upload { name: String, message: String },
    #[error("artifact {name}: {message}")]
    Download { name: String, message: String },
    #[error(transparent)]
    Events(#[from] events::EventsError),
}

/// Whose an upload is: the attempt it belongs to and the worker holding it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub owner: UserId,
    pub job: JobId,
    pub task: TaskId,
    pub attempt: u32,
    pub worker: WorkerId,
    /// The attempt's token, for message ids nobody else can forge.
    pub token: String,
}

/// Chunks published and not yet acknowledged, per upload.
const IN_FLIGHT: usize = 16;

/// Uploads `reader` as the artifact `name` of `at`; returns its
/// description once the stream has stored every chunk and it.
pub async fn upload(
    js: &jetstream::Context,
    at: &Attempt,
    name: &str,
    mut reader: impl AsyncRead + Unpin,
) -> Result<ArtifactMeta, ArtifactsError> {
    let fail = |message: String| ArtifactsError::Upload {
        name: name.to_string(),
        message,
    };
    if name.len() > subjects::MAX_ARTIFACT_PATH {
        return Err(fail(format!(
            "the path is longer than {} bytes",
            subjects::MAX_ARTIFACT_PATH
        )));
    }
    let subject = |part| {
        subjects::artifact(
            &at.owner, &at.job, &at.task, at.attempt, &at.worker, name, part,
        )
    };
    let data = subject(ArtifactPart::Data);
    let mut hasher = Sha256::new();
    let (mut size, mut chunks) = (0u64, 0u64);
    let mut acks = std::collections::VecDeque::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut first_seq = None;
    loop {
        let n = read_full(&mut reader, &mut buf)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        let body = codec::encode(&ArtifactChunk {
            chunk: buf[..n].to_vec(),
        })
        .map_err(|e| fail(e.to_string()))?;
        let id = subjects::artifact_msg_id(&at.task, at.attempt, &at.token, name, chunks);
        acks.push_back(events::send(js, data.clone(), Bytes::from(body), Some(&id)).await?);
        chunks += 1;
        while acks.len() >= IN_FLIGHT {
            let ack = acks.pop_front().expect("not empty");
            let seq = ack.await.map_err(|e| fail(e.to_string()))?.sequence;
            first_seq.get_or_insert(seq);
        }
    }
    while let Some(ack) = acks.pop_front() {
        let seq = ack.await.map_err(|e| fail(e.to_string()))?.sequence;
        first_seq.get_or_insert(seq);
    }
    let meta = ArtifactMeta {
        name: name.to_string(),
        size: ByteSize(size),
        sha256: hex(&hasher.finalize()),
        chunks,
        first_seq: first_seq.unwrap_or(0),
    };
    let body = codec::encode(&meta).map_err(|e| fail(e.to_string()))?;
    let id = subjects::artifact_msg_id(&at.task, at.attempt, &at.token, name, u64::MAX);
    events::publish(
        js,
        subject(ArtifactPart::Meta),
        Bytes::from(body),
        Some(&id),
    )
    .await?;
    Ok(meta)
}

/// Reads until `buf` is full or the reader ends; returns how much it read.
async fn read_full(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// One stored artifact: where it is and what it says of itself.
#[derive(Debug, Clone)]
pub struct Stored {
    pub at: ArtifactSubject,
    pub meta: ArtifactMeta,
}

/// Every artifact of `owner`'s job `job` whose description is stored, in
/// stream order, from whichever worker uploaded it: the caller keeps those
/// of the worker that held each attempt.
pub async fn list(
    js: &jetstream::Context,
    owner: &UserId,
    job: &JobId,
) -> Result<Vec<Stored>, ArtifactsError> {
    let filters = vec![subjects::job_artifact_metas(owner, job)];
    let mut replay =
        Replay::start(js, subjects::ARTIFACTS_STREAM, filters, 1, Until::CaughtUp).await?;
    let mut out = Vec::new();
    while let Some(r) = replay.next().await {
        let r = r?;
        let Some(at) = subjects::parse_artifact_subject(r.message.subject.as_str()) else {
            continue;
        };
        // A description whose body names another file than its subject was
        // not written by the uploader.
        match codec::decode::<ArtifactMeta>(&r.message.payload) {
            Ok(meta) if meta.name == at.path && at.owner == *owner && at.job == *job => {
                out.push(Stored { at, meta })
            }
            _ => continue,
        }
    }
    Ok(out)
}

/// Writes the file `stored` describes to `out`; checks that it is whole:
/// as many chunks, as many bytes and the same sha256 as described.
pub async fn download(
    js: &jetstream::Context,
    stored: &Stored,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<u64, ArtifactsError> {
    let at = &stored.at;
    let meta = &stored.meta;
    let fail = |message: String| ArtifactsError::Download {
        name: meta.name.clone(),
        message,
    };
    let data = subjects::artifact(
        &at.owner,
        &at.job,
        &at.task,
        at.attempt,
        &at.worker,
        &at.path,
        ArtifactPart::Data,
    );
    let mut hasher = Sha256::new();
    let (mut size, mut chunks) = (0u64, 0u64);
    if meta.chunks > 0 {
        let mut replay = Replay::start(
            js,
            subjects::ARTIFACTS_STREAM,
            vec![data],
            meta.first_seq.max(1),
            Until::CaughtUp,
        )
        .await?;
        while chunks < meta.chunks {
            let Some(r) = replay.next().await else {
                return Err(fail(format!(
                    "only {chunks} of its {} chunks are stored (it expired, or its upload failed)",
                    meta.chunks
                )));
            };
            let r = r?;
            let chunk: ArtifactChunk = codec::decode(&r.message.payload)
                .map_err(|e| fail(format!("chunk {chunks}: {e}")))?;
            hasher.update(&chunk.chunk);
            size += chunk.chunk.len() as u64;
            out.write_all(&chunk.chunk)
                .await
                .map_err(|e| fail(e.to_string()))?;
            chunks += 1;
        }
    }
    out.flush().await.map_err(|e| fail(e.to_string()))?;
    let sha256 = hex(&hasher.finalize());
    if size != meta.size.0 || sha256 != meta.sha256 {
        return Err(fail(format!(
            "what is stored ({} bytes, sha256 {sha256}) is not what was uploaded ({} bytes, sha256 {})",
            size, meta.size.0, meta.sha256
        )));
    }
    Ok(size)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
