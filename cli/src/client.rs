//! A small client of the `gpufleet` API and event stream, in msgpack.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, consumer::DeliverPolicy};
use async_nats::Client;
use futures::StreamExt;
use gpufleet_schema::api::{
    ErrorBody, GetRequest, JobRef, ListRequest, SubmitReply, WorkersRequest,
};
use gpufleet_schema::codec::{self, CONTENT_TYPE, MSGPACK};
use gpufleet_schema::{subjects, Event, JobId, JobSpec, JobState, JobStatus, WorkerAdvert};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The coordinator answered with an error code.
    #[error("{message} (error {code})")]
    Service { code: u16, message: String },
    #[error("no coordinator answers on {subject}: is `gpufleet-coordinator` running and connected to the same NATS?")]
    NoCoordinator { subject: String },
    #[error("{0}")]
    Other(String),
}

#[derive(Clone)]
pub struct Api {
    pub client: Client,
}

impl Api {
    pub async fn connect(url: &str) -> anyhow::Result<Api> {
        let client =
            gpufleet_natsutil::connect(url, "gpufleet-cli", Duration::from_secs(5)).await?;
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

    /// Every event of `job` matching `kinds` from the start of the stream,
    /// then new ones as they come. `pending` is how many were stored when
    /// the subscription began.
    pub async fn job_events(
        &self,
        job: &JobId,
        kinds: &[&str],
    ) -> anyhow::Result<(u64, EventStream)> {
        let js = jetstream::new(self.client.clone());
        let stream = js.get_stream(subjects::EVENTS_STREAM).await?;
        let filters: Vec<String> = kinds
            .iter()
            .map(|k| format!("gpufleet.events.{job}.*.{k}"))
            .collect();
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subjects: filters,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let pending = consumer.cached_info().num_pending;
        Ok((
            pending,
            EventStream {
                inner: consumer.messages().await?,
            },
        ))
    }
}

pub struct EventStream {
    inner: push::Ordered,
}

impl EventStream {
    /// The next event, with how many stored events remain after it.
    pub async fn next(&mut self) -> Option<(Event, u64)> {
        loop {
            let m = match self.inner.next().await? {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream hiccup");
                    continue;
                }
            };
            let pending = m.info().map(|i| i.pending).unwrap_or(0);
            match codec::decode::<Event>(&m.payload) {
                Ok(e) => return Some((e, pending)),
                Err(e) => {
                    tracing::warn!(subject = %m.subject, error = %e, "skipping an unreadable event")
                }
            }
        }
    }
}
