//! A small client of the `gpufleet` API and event stream, in msgpack.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer::push, consumer::DeliverPolicy};
use async_nats::Client;
use futures::StreamExt;
use gpufleet_schema::api::{
    ErrorBody, GetRequest, JobRef, ListRequest, SubmitReply, WorkersRequest,
};
use gpufleet_schema::codec::{self, CONTENT_TYPE, MSGPACK};
use gpufleet_schema::{
    subjects, Event, EventKind, JobId, JobSpec, JobState, JobStatus, WorkerAdvert,
};
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

    /// Every event of `job` on `filters` (subjects in the events stream)
    /// from the start of the stream, then new ones as they come.
    pub async fn events(&self, filters: Vec<String>) -> anyhow::Result<EventStream> {
        let js = jetstream::new(self.client.clone());
        let stream = js
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .context("opening the events stream (has a coordinator ever run on this NATS?)")?;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subjects: filters.clone(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let stored = consumer.cached_info().num_pending;
        Ok(EventStream {
            inner: consumer.messages().await?,
            stream,
            filters,
            stored,
            last_seq: 0,
        })
    }
}

/// The subjects of one job's events of one kind, across its tasks.
pub fn job_events_of_kind(job: &JobId, kind: EventKind) -> String {
    // `schema::subjects` has `events(job, task, kind)` and `job_events(job)`
    // but nothing for "every task"; a wildcard token is not a valid TaskId.
    format!("gpufleet.events.{job}.*.{}", kind.as_str())
}

/// An ordered replay of stored events followed by live ones.
pub struct EventStream {
    inner: push::Ordered,
    stream: jetstream::stream::Stream,
    filters: Vec<String>,
    /// Events stored when the subscription began.
    pub stored: u64,
    /// Stream sequence of the last event handed out.
    pub last_seq: u64,
}

/// One event with where it sits in the stream.
pub struct Delivered {
    pub event: Event,
    /// Events stored after this one that this subscription will still see.
    pub pending: u64,
}

impl EventStream {
    /// The next event.
    pub async fn next(&mut self) -> Option<Delivered> {
        loop {
            let m = match self.inner.next().await? {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream hiccup");
                    continue;
                }
            };
            let (pending, seq) = m
                .info()
                .map(|i| (i.pending, i.stream_sequence))
                .unwrap_or((0, self.last_seq));
            self.last_seq = seq;
            match codec::decode::<Event>(&m.payload) {
                Ok(event) => return Some(Delivered { event, pending }),
                Err(e) => {
                    tracing::warn!(subject = %m.subject, error = %e, "skipping an unreadable event")
                }
            }
        }
    }

    /// The stream sequence of the newest event stored on our subjects now.
    /// Once a job has finished, nothing of it comes after this, so a
    /// follower that has seen it has seen every line.
    pub async fn stored_tail(&self) -> anyhow::Result<u64> {
        let mut tail = 0;
        for f in &self.filters {
            match self.stream.get_last_raw_message_by_subject(f).await {
                Ok(m) => tail = tail.max(m.sequence),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(anyhow::anyhow!("reading the events stream: {e}")),
            }
        }
        Ok(tail)
    }
}
