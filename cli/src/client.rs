//! A small client of the `gpufleet` API and event stream, in msgpack.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::Client;
use gpufleet_natsutil::events::{Replay, Until};
use gpufleet_natsutil::{KvEvent, KvOp};
use gpufleet_schema::api::{
    ErrorBody, GetRequest, JobRef, ListRequest, SubmitReply, WorkersRequest,
};
use gpufleet_schema::codec::{self, CONTENT_TYPE, MSGPACK};
use gpufleet_schema::{subjects, Event, JobId, JobSpec, JobState, JobStatus, WorkerAdvert};
use gpufleet_schema::{Lease, LeaseState};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The coordinator answered with an error code.
    #[error("{message} (error {code})")]
    Service { code: u16, message: String },
    #[error("no coordinator answers on {subject}: is `gpufleet-coordinator` running and connected to the same NATS? (`gpufleet up` starts a local fleet)")]
    NoCoordinator { subject: String },
    #[error("{0}")]
    Other(String),
}

#[derive(Clone)]
pub struct Api {
    pub client: Client,
}

impl Api {
    pub async fn connect(
        url: &str,
        auth: &gpufleet_natsutil::Auth,
        patience: Duration,
    ) -> anyhow::Result<Api> {
        use async_nats::ConnectErrorKind as Kind;
        let client = gpufleet_natsutil::connect(url, auth, "gpufleet-cli", patience)
            .await
            .map_err(|e| {
                let hint = match &e {
                    gpufleet_natsutil::ConnectError::Connect { source, .. } => {
                        match source.kind() {
                            Kind::Authentication | Kind::AuthorizationViolation => {
                                "the server wants credentials: give them in the URL \
                                 (nats://user:password@host), with --nats-creds FILE, or \
                                 with GPUFLEET_NATS_TOKEN"
                            }
                            Kind::Tls => {
                                "a TLS problem: for a private CA set SSL_CERT_FILE to its \
                                 certificate (see \"Operating notes\" in the README)"
                            }
                            _ => {
                                "is a fleet running there? `gpufleet up` starts a local one; \
                                 point at another with --nats-url or GPUFLEET_NATS_URL"
                            }
                        }
                    }
                    _ => return anyhow::Error::from(e),
                };
                anyhow::anyhow!("{e}\n  ({hint})")
            })?;
        Ok(Api { client })
    }

    async fn call<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        subject: &str,
        body: &Req,
    ) -> Result<Rep, ApiError> {
        let payload = codec::encode(body).map_err(|e| ApiError::Other(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE, MSGPACK);
        let reply = self
            .client
            .request_with_headers(subject.to_string(), headers, payload.into())
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders => ApiError::NoCoordinator {
                    subject: subject.into(),
                },
                _ => ApiError::Other(format!("{subject}: {e}")),
            })?;
        if let Some(code) = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
        {
            let code: u16 = code.as_str().parse().unwrap_or(500);
            let message = codec::decode::<ErrorBody>(&reply.payload)
                .map(|b| b.error)
                .or_else(|_| {
                    reply
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR))
                        .map(|v| v.to_string())
                        .ok_or(())
                })
                .unwrap_or_else(|_| "unknown error".into());
            return Err(ApiError::Service { code, message });
        }
        codec::decode(&reply.payload)
            .map_err(|e| ApiError::Other(format!("{subject}: bad reply: {e}")))
    }

    pub async fn submit(&self, spec: &JobSpec) -> Result<SubmitReply, ApiError> {
        self.call(subjects::JOBS_SUBMIT, spec).await
    }

    /// A job with every task, page by page.
    pub async fn get(&self, job: &JobId) -> Result<JobStatus, ApiError> {
        let mut status: JobStatus = self.get_page(job, 0).await?;
        while (status.tasks.len() as u32) < status.counts.total() {
            let page = self.get_page(job, status.tasks.len() as u32).await?;
            if page.tasks.is_empty() {
                break;
            }
            status.tasks.extend(page.tasks);
        }
        Ok(status)
    }

    async fn get_page(&self, job: &JobId, offset: u32) -> Result<JobStatus, ApiError> {
        let req = GetRequest {
            job_id: job.clone(),
            task_offset: (offset > 0).then_some(offset),
            task_limit: None,
        };
        self.call(subjects::JOBS_GET, &req).await
    }

    pub async fn list(
        &self,
        status: Option<JobState>,
        limit: Option<u32>,
    ) -> Result<Vec<JobStatus>, ApiError> {
        self.call(subjects::JOBS_LIST, &ListRequest { status, limit })
            .await
    }

    pub async fn cancel(&self, job: &JobId) -> Result<JobStatus, ApiError> {
        self.call(
            subjects::JOBS_CANCEL,
            &JobRef {
                job_id: job.clone(),
            },
        )
        .await
    }

    /// Every worker, page by page.
    pub async fn workers(&self) -> Result<Vec<WorkerAdvert>, ApiError> {
        let mut all: Vec<WorkerAdvert> = Vec::new();
        loop {
            let req = WorkersRequest {
                after: all.last().map(|w| w.name.clone()),
                limit: None,
            };
            let page: Vec<WorkerAdvert> = self.call(subjects::WORKERS_LIST, &req).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Every event on `filters` (subjects in the events stream) from the
    /// start of the stream: until what was stored when this is called, or
    /// then new ones as they come.
    pub async fn events(&self, filters: Vec<String>, until: Until) -> anyhow::Result<EventStream> {
        self.events_from(filters, 1, until).await
    }

    /// [`Api::events`] from stream sequence `from` on.
    pub async fn events_from(
        &self,
        filters: Vec<String>,
        from: u64,
        until: Until,
    ) -> anyhow::Result<EventStream> {
        let js = jetstream::new(self.client.clone());
        let replay = Replay::start(&js, subjects::EVENTS_STREAM, filters, from, until)
            .await
            .context("opening the events stream (has a coordinator ever run on this NATS?)")?;
        Ok(EventStream { replay })
    }
}

/// Which tasks hold each GPU (by uuid), from the live leases.
pub type Holders = std::collections::HashMap<gpufleet_schema::GpuUuid, Vec<String>>;

impl Api {
    /// Which tasks hold each GPU, from the live leases.
    pub async fn gpu_holders(&self) -> anyhow::Result<Holders> {
        let js = jetstream::new(self.client.clone());
        let kv = gpufleet_natsutil::RawKv::open(&js, subjects::LEASES_BUCKET).await?;
        let mut watch = kv.watch(">").await?;
        let mut out = Holders::new();
        while let Some(Ok(ev)) = watch.next().await {
            match ev {
                KvEvent::Synced => break,
                KvEvent::Change(c) if c.op == KvOp::Put => {
                    let Ok(l) = codec::decode::<Lease>(&c.value) else {
                        continue;
                    };
                    if matches!(
                        l.state,
                        LeaseState::Reserved | LeaseState::Running | LeaseState::Cancelling
                    ) {
                        for g in &l.grant.gpus {
                            out.entry(g.uuid.clone())
                                .or_default()
                                .push(l.task_id.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Api {
    /// The stream sequence of the newest event stored on `filter`, if any.
    pub async fn newest_event(&self, filter: &str) -> anyhow::Result<Option<u64>> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let js = jetstream::new(self.client.clone());
        let stream = js
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .context("opening the events stream")?;
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading the events stream: {e}")),
        }
    }
}

/// An ordered replay of stored events, then (live) new ones.
pub struct EventStream {
    replay: Replay,
}

/// One event with where it sits in the stream.
pub struct Delivered {
    pub event: Event,
    /// Events stored after this one that this subscription will still see.
    pub pending: u64,
}

impl EventStream {
    /// The next event; `None` once caught up.
    pub async fn next(&mut self) -> Option<Delivered> {
        loop {
            let r = match self.replay.next().await? {
                Ok(r) => r,
                Err(e) => {
                    // The replay resumes after the last event on the next call.
                    tracing::warn!(error = %e, "event stream hiccup");
                    continue;
                }
            };
            match codec::decode::<Event>(&r.message.payload) {
                Ok(event) => {
                    return Some(Delivered {
                        event,
                        pending: r.pending,
                    })
                }
                Err(e) => {
                    tracing::warn!(subject = %r.message.subject, error = %e, "skipping an unreadable event")
                }
            }
        }
    }

    /// Stream sequence of the last event handed out.
    pub fn last_seq(&self) -> u64 {
        self.replay.last_sequence()
    }

    /// The stream sequence of the newest event stored on our subjects now.
    /// Once a job has finished, nothing of it comes after this, so a
    /// follower that has seen it has seen every line.
    pub async fn stored_tail(&self) -> anyhow::Result<u64> {
        self.replay
            .stored_tail()
            .await
            .context("reading the events stream")
    }
}
