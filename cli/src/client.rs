//! A small client of the `gpufleet` API and event stream, in msgpack.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::Client;
use gpufleet_natsutil::events::{Replay, Until};
use gpufleet_natsutil::Backoff;
use gpufleet_schema::api::code;
use gpufleet_schema::api::{
    ErrorBody, ErrorsReply, ErrorsRequest, GetRequest, JobRef, ListRequest, SubmitReply, TaskRef,
    WorkersRequest,
};
use gpufleet_schema::codec::{self, CONTENT_TYPE, MSGPACK};
use gpufleet_schema::subjects::{self, endpoint, Sender};
use gpufleet_schema::{
    Event, EventBody, JobId, JobSpec, JobState, JobStatus, TaskId, UserId, WorkerAdvert, WorkerId,
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
    #[error("no answer on {subject} within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    #[error("{0}")]
    Other(String),
}

impl ApiError {
    /// Whether asking again may help: nobody answered (a coordinator
    /// taking over), or the coordinator said it is not ready.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::NoCoordinator { .. }
                | ApiError::TimedOut { .. }
                | ApiError::Service {
                    code: code::UNAVAILABLE,
                    ..
                }
        )
    }
}

#[derive(Clone)]
pub struct Api {
    pub client: Client,
    /// Who it calls as (`gpufleet.api.<user>.…`); `None` on a fleet
    /// without roles.
    pub user: Option<UserId>,
    /// How long one request may wait for its answer.
    pub request_timeout: Duration,
}

impl Api {
    pub async fn connect(
        url: &str,
        auth: &gpufleet_natsutil::Auth,
        user: Option<UserId>,
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
                                 (nats://user:password@host), with --nats-creds FILE, \
                                 GPUFLEET_NATS_TOKEN or GPUFLEET_NATS_NKEY (the files \
                                 `gpufleet auth` writes)"
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
        Ok(Api {
            client,
            user,
            request_timeout: Duration::from_secs(10),
        })
    }

    fn subject(&self, endpoint: &str) -> String {
        subjects::api_for(self.user.as_ref(), endpoint)
    }

    async fn call<Req: Serialize, Rep: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &Req,
    ) -> Result<Rep, ApiError> {
        let subject = &self.subject(endpoint);
        let payload = codec::encode(body).map_err(|e| ApiError::Other(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE, MSGPACK);
        let timeout = self.request_timeout;
        let request =
            self.client
                .request_with_headers(subject.to_string(), headers, payload.into());
        let reply = tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| ApiError::TimedOut {
                subject: subject.into(),
                timeout,
            })?
            .map_err(|e| match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders => ApiError::NoCoordinator {
                    subject: subject.into(),
                },
                async_nats::client::RequestErrorKind::TimedOut => ApiError::TimedOut {
                    subject: subject.into(),
                    timeout,
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

    /// Submits `spec`, choosing its id first if it has none, and tries
    /// again (the same id, the same spec) while no coordinator answers or
    /// one says it is not ready, for up to `patience`. A try that reached
    /// a coordinator whose answer was lost, then a retry, make one job: the
    /// retry is answered with the job the first made (`created: false`).
    pub async fn submit(
        &self,
        spec: &JobSpec,
        patience: Duration,
    ) -> Result<SubmitReply, ApiError> {
        let mut spec = spec.clone();
        let id = spec.id.get_or_insert_with(JobId::generate).clone();
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match self.call(endpoint::JOBS_SUBMIT, &spec).await {
                Err(e) if e.is_transient() => {
                    if !backoff.wait_before(deadline).await {
                        return Err(e);
                    }
                    eprintln!("submitting job {id}: {e}; trying again");
                }
                done => return done,
            }
        }
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
        self.call(endpoint::JOBS_GET, &req).await
    }

    pub async fn list(
        &self,
        status: Option<JobState>,
        limit: Option<u32>,
    ) -> Result<Vec<JobStatus>, ApiError> {
        self.call(endpoint::JOBS_LIST, &ListRequest { status, limit })
            .await
    }

    /// Deletes a finished job's record and events.
    pub async fn delete(&self, job: &JobId) -> Result<JobStatus, ApiError> {
        self.call(
            endpoint::JOBS_DELETE,
            &JobRef {
                job_id: job.clone(),
            },
        )
        .await
    }

    /// Sends a message to a job's running tasks (one, with `task`).
    pub async fn send(
        &self,
        req: &gpufleet_schema::message::SendRequest,
    ) -> Result<gpufleet_schema::message::SendReply, ApiError> {
        self.call(endpoint::JOBS_SEND, req).await
    }

    /// A job's errors; `reset` clears them (the reply lists what they were).
    pub async fn errors(&self, job: &JobId, reset: bool) -> Result<ErrorsReply, ApiError> {
        let req = ErrorsRequest {
            job_id: job.clone(),
            reset,
        };
        self.call(endpoint::JOBS_ERRORS, &req).await
    }

    pub async fn cancel(&self, job: &JobId) -> Result<JobStatus, ApiError> {
        self.cancel_task(job, None).await
    }

    /// Cancels a job, or with `task` (an id or name) that one task.
    pub async fn cancel_task(
        &self,
        job: &JobId,
        task: Option<String>,
    ) -> Result<JobStatus, ApiError> {
        let req = TaskRef {
            job_id: job.clone(),
            task,
        };
        self.call(endpoint::JOBS_CANCEL, &req).await
    }

    /// Runs a job's tasks that ended without succeeding again (with
    /// `task`, that one), reopening the job if it had finished.
    pub async fn retry(&self, job: &JobId, task: Option<String>) -> Result<JobStatus, ApiError> {
        let req = TaskRef {
            job_id: job.clone(),
            task,
        };
        self.call(endpoint::JOBS_RETRY, &req).await
    }

    /// Every worker, page by page.
    pub async fn workers(&self) -> Result<Vec<WorkerAdvert>, ApiError> {
        let mut all: Vec<WorkerAdvert> = Vec::new();
        loop {
            let req = WorkersRequest {
                after: all.last().map(|w| w.name.clone()),
                limit: None,
            };
            let page: Vec<WorkerAdvert> = self.call(endpoint::WORKERS_LIST, &req).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Every event on `filter` (one subject pattern in the events stream:
    /// a least-privilege user may create consumers with one filter only)
    /// from the start of the stream: until what was stored when this is
    /// called, or then new ones as they come.
    pub async fn events(&self, filter: String, until: Until) -> anyhow::Result<EventStream> {
        self.events_from(filter, 1, until).await
    }

    /// [`Api::events`] from stream sequence `from` on.
    pub async fn events_from(
        &self,
        filter: String,
        from: u64,
        until: Until,
    ) -> anyhow::Result<EventStream> {
        let js = jetstream::new(self.client.clone());
        // Only a coordinator creates the stores: wait a while for one, as
        // workers do (by trying again: a user may not read stream info).
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let mut said = false;
        let replay = loop {
            match Replay::start(
                &js,
                subjects::EVENTS_STREAM,
                vec![filter.clone()],
                from,
                until,
            )
            .await
            {
                Ok(r) => break r,
                Err(e) => {
                    if !said {
                        said = true;
                        eprintln!("waiting for the coordinator to create the stores");
                    }
                    if !backoff.wait_before(deadline).await {
                        return Err(anyhow::Error::from(e).context(
                            "opening the events stream (has a coordinator ever run on this NATS?)",
                        ));
                    }
                }
            }
        };
        Ok(EventStream {
            replay,
            holders: HoldersOf::default(),
        })
    }
}

impl Api {
    /// The stream sequence of the newest event stored on `filter`, if any.
    /// Read through a consumer on that filter, which a user may create for
    /// its own jobs (a direct get it may not: see `schema::roles`).
    pub async fn newest_event(&self, filter: &str) -> anyhow::Result<Option<u64>> {
        let js = jetstream::new(self.client.clone());
        let stream = js
            .get_stream_no_info(subjects::EVENTS_STREAM)
            .await
            .context("opening the events stream")?;
        let last = gpufleet_natsutil::events::last_on(
            &js,
            &stream,
            subjects::EVENTS_STREAM,
            &[filter.to_string()],
        )
        .await
        .context("reading the events stream")?;
        Ok((last > 0).then_some(last))
    }
}

/// Who holds each attempt, from the coordinator's state events: the one
/// sender whose output, progress and results count for it; and which
/// attempts the coordinator has ended, whose results come too late.
#[derive(Default)]
pub struct HoldersOf {
    holders: std::collections::HashMap<(TaskId, u32), WorkerId>,
    ended: std::collections::HashSet<(TaskId, u32)>,
}

impl HoldersOf {
    /// Whether `event`, which came from `sender`, counts; learns the
    /// holder from the coordinator's events on the way. Events of an
    /// attempt come after the state event that reserved it, so its holder
    /// is known by then. A result of an attempt the coordinator has ended
    /// (LOST, say) does not count: the coordinator did not take it.
    pub fn admit(&mut self, event: &Event, sender: &Sender) -> bool {
        let key = (event.task_id.clone(), event.attempt);
        match sender {
            Sender::Coordinator => {
                if let EventBody::State { state, holder, .. } = &event.body {
                    if let Some(w) = holder {
                        self.holders.insert(key.clone(), w.clone());
                    }
                    if state.is_end() {
                        self.ended.insert(key);
                    }
                }
                true
            }
            Sender::Worker(w) => {
                self.holders.get(&key) == Some(w)
                    && !(matches!(event.body, EventBody::Result(_)) && self.ended.contains(&key))
            }
        }
    }

    /// Takes the holders a job's status names (the current attempt of each
    /// task), for a replay that starts after their state events.
    pub fn learn(&mut self, status: &JobStatus) {
        for t in &status.tasks {
            if let Some(w) = &t.worker {
                self.holders
                    .insert((t.task_id.clone(), t.attempt), w.clone());
            }
        }
    }

    pub fn holder(&self, task: &TaskId, attempt: u32) -> Option<&WorkerId> {
        self.holders.get(&(task.clone(), attempt))
    }
}

/// An ordered replay of stored events, then (live) new ones; only events
/// whose body agrees with their subject and that their attempt's holder
/// (or the coordinator) sent.
pub struct EventStream {
    replay: Replay,
    holders: HoldersOf,
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
            let Some(subject) = subjects::parse_event_subject(r.message.subject.as_str()) else {
                continue;
            };
            match codec::decode::<Event>(&r.message.payload) {
                Ok(event)
                    if event.matches_subject(&subject)
                        && self.holders.admit(&event, &subject.sender) =>
                {
                    return Some(Delivered {
                        event,
                        pending: r.pending,
                    })
                }
                Ok(_) => {
                    tracing::warn!(subject = %r.message.subject, "skipping an event its attempt's holder did not send")
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

    /// See [`HoldersOf::learn`].
    pub fn learn_holders(&mut self, status: &JobStatus) {
        self.holders.learn(status);
    }

    /// Who held each attempt, as far as the events seen so far say.
    pub fn holders(&self) -> &HoldersOf {
        &self.holders
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gpufleet_schema::{LogStream, TaskOutcome, TaskState};

    /// An event of attempt `attempt` of task 0 of job `j`.
    pub(crate) fn event_of(attempt: u32, body: EventBody) -> Event {
        let job = JobId::new("j").unwrap();
        Event {
            task_id: TaskId::for_index(&job, 0),
            job_id: job,
            attempt,
            worker: None,
            lease_rev: None,
            at: time::OffsetDateTime::UNIX_EPOCH,
            body,
            token: None,
        }
    }

    fn event(body: EventBody) -> Event {
        event_of(1, body)
    }

    fn state(state: TaskState, holder: Option<&str>) -> Event {
        event(EventBody::State {
            state,
            reason: None,
            holder: holder.map(|h| WorkerId::new(h).unwrap()),
        })
    }

    /// A SUCCEEDED result of attempt `attempt`.
    pub(crate) fn succeeded(attempt: u32) -> Event {
        event_of(
            attempt,
            EventBody::Result(TaskOutcome {
                state: TaskState::Succeeded,
                exit_code: Some(0),
                signal: None,
                result: None,
                error: None,
                artifacts: vec![],
                started_at: None,
                finished_at: time::OffsetDateTime::UNIX_EPOCH,
                usage: None,
            }),
        )
    }

    fn result() -> Event {
        succeeded(1)
    }

    fn from(w: &str) -> Sender {
        Sender::Worker(WorkerId::new(w).unwrap())
    }

    #[test]
    fn only_the_holders_result_of_an_attempt_not_yet_ended_counts() {
        let mut h = HoldersOf::default();
        assert!(h.admit(
            &state(TaskState::Reserved, Some("w1")),
            &Sender::Coordinator
        ));
        assert!(!h.admit(&result(), &from("w2")), "not the holder");
        assert!(h.admit(&result(), &from("w1")));
        // The coordinator ended the attempt (its lease lapsed): a result
        // after that was not taken, and does not count; output still does.
        assert!(h.admit(&state(TaskState::Lost, None), &Sender::Coordinator));
        assert!(!h.admit(&result(), &from("w1")));
        let log = event(EventBody::Log {
            stream: LogStream::Stdout,
            text: "late\n".into(),
            dropped_bytes: 0,
        });
        assert!(h.admit(&log, &from("w1")));
    }
}
