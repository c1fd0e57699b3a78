//! The `gpufleet` API: decodes requests (JSON or msgpack), hands them to
//! the engine with their caller, and answers in the request's encoding.
//!
//! The caller is the user token of the request's subject
//! (`gpufleet.api.<user>.<endpoint>`), which a user's NATS permissions
//! allow only under its own name; it is read from the message's own
//! subject, never from the body, nor from the subscription (a JetStream
//! consumer can be made to deliver any message to any subscriber, with its
//! original subject: nats-server#8274).
//!
//! With roles off the API is the micro service `gpufleet` (`nats micro`),
//! on the per-user subjects and on the old ones without a user. With roles
//! on it is plain subscriptions on the per-user subjects, and a reply goes
//! out only to the caller's own inbox: the coordinator may write the
//! buckets, and a reply goes wherever the request's reply subject says.
//! (The micro service's discovery subjects answer anyone anywhere, so they
//! are off too.)
//!
//! Decoding happens here, off the engine's loop; a request that does not
//! decode is answered 400 at once, naming the field.

//!
//! **No queue group shared with other coordinators.** Each coordinator's
//! endpoints subscribe in a queue group of their own (with roles on, as
//! plain subscriptions, in none), so every serving
//! coordinator sees every request. Only the leader serves (a standby starts
//! its endpoints when it takes over), so a leader that froze or was cut off
//! never takes a share of the requests away from its successor: the
//! successor's answer is the first, and the only one. (With one shared
//! group, the server kept sending half the requests to a frozen leader
//! for minutes.)
//!
//! The endpoint tasks are owned by the runtime (see `Feeders`): one that
//! stops stops the coordinator. Each keeps the replies it waits for beside
//! it, so that a slow submit (waiting for its record to be stored) never
//! holds up the next request.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use async_nats::service::{Service, ServiceExt};
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use gpufleet_schema::api::{
    code, ErrorsRequest, GetRequest, JobRef, ListRequest, TaskRef, WorkersRequest,
    MAX_TASKS_PER_PAGE, MAX_WORKERS_PER_PAGE,
};
use gpufleet_schema::codec::CONTENT_TYPE;
use gpufleet_schema::subjects::{self, endpoint};
use gpufleet_schema::{roles, Encoding, JobSpec, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{encode_reply, ApiCall, Caller, Input, Reply};

/// How many jobs `jobs.list` returns when the request names no limit.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// The longest error message a reply carries: a message quotes what the
/// client sent (a field name, say), which may be anything.
const MAX_ERROR_BYTES: usize = 2048;

/// Room kept in every reply for its headers and framing.
const REPLY_OVERHEAD: usize = 1024;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Submit,
    Get,
    List,
    Cancel,
    Delete,
    Workers,
    Errors,
    Send,
    Retry,
}

/// Each endpoint: its name in the micro service, the same for the old
/// subject without a user, its subject's tail, and its kind.
const ENDPOINTS: [(&str, &str, &str, Kind); 9] = [
    (
        "jobs-submit",
        "jobs-submit-any",
        endpoint::JOBS_SUBMIT,
        Kind::Submit,
    ),
    ("jobs-get", "jobs-get-any", endpoint::JOBS_GET, Kind::Get),
    (
        "jobs-list",
        "jobs-list-any",
        endpoint::JOBS_LIST,
        Kind::List,
    ),
    (
        "jobs-cancel",
        "jobs-cancel-any",
        endpoint::JOBS_CANCEL,
        Kind::Cancel,
    ),
    (
        "jobs-delete",
        "jobs-delete-any",
        endpoint::JOBS_DELETE,
        Kind::Delete,
    ),
    (
        "workers-list",
        "workers-list-any",
        endpoint::WORKERS_LIST,
        Kind::Workers,
    ),
    (
        "jobs-errors",
        "jobs-errors-any",
        endpoint::JOBS_ERRORS,
        Kind::Errors,
    ),
    (
        "jobs-send",
        "jobs-send-any",
        endpoint::JOBS_SEND,
        Kind::Send,
    ),
    (
        "jobs-retry",
        "jobs-retry-any",
        endpoint::JOBS_RETRY,
        Kind::Retry,
    ),
];

/// Who may call, and as whom.
#[derive(Clone)]
pub struct Access {
    pub roles: bool,
    pub admins: HashSet<UserId>,
}

impl Access {
    /// The caller of a request on `subject` to `endpoint`; `None` for one
    /// nobody may make (the old subjects while roles are on, a subject of
    /// another endpoint).
    fn caller(&self, subject: &str, endpoint: &str) -> Option<Caller> {
        match subjects::api_user(subject, endpoint) {
            Some(user) => Some(Caller {
                admin: !self.roles || self.admins.contains(&user),
                user,
            }),
            None if !self.roles && subject == subjects::api_for(None, endpoint) => {
                Some(Caller::everyone())
            }
            None => None,
        }
    }

    /// Whether a reply to `reply` may go out: with roles on, only to the
    /// caller's own inbox.
    fn may_reply(&self, caller: &Caller, reply: &str) -> bool {
        !self.roles || roles::in_inbox_of(caller.user.as_str(), reply)
    }
}

/// The API while it serves: the micro service, or (with roles) plain
/// subscriptions, whose tasks the caller owns.
pub enum Api {
    Service(Box<Service>),
    Plain,
}

impl Api {
    pub async fn stop(self) {
        if let Api::Service(s) = self {
            let _ = s.stop().await;
        }
    }
}

/// Where one endpoint's requests come from.
enum Source {
    Service(Box<async_nats::service::endpoint::Endpoint>),
    Plain(async_nats::Subscriber),
}

impl Source {
    async fn next(&mut self) -> Option<Incoming> {
        match self {
            Source::Service(e) => e.next().await.map(Incoming::Service),
            Source::Plain(s) => s.next().await.map(Incoming::Plain),
        }
    }
}

/// One request as it came, and how to answer it.
enum Incoming {
    Service(async_nats::service::Request),
    Plain(Message),
}

impl Incoming {
    fn message(&self) -> &Message {
        match self {
            Incoming::Service(r) => &r.message,
            Incoming::Plain(m) => m,
        }
    }

    async fn respond(
        self,
        client: &async_nats::Client,
        body: Vec<u8>,
        headers: HeaderMap,
    ) -> Result<(), String> {
        match self {
            // Through the service, so that its statistics count it.
            Incoming::Service(r) => r
                .respond_with_headers(Ok(body.into()), headers)
                .await
                .map_err(|e| e.to_string()),
            Incoming::Plain(m) => {
                let Some(reply) = m.reply else {
                    return Ok(());
                };
                client
                    .publish_with_headers(reply, headers, Bytes::from(body))
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// An endpoint's task, with its name.
pub type EndpointTask = (&'static str, Pin<Box<dyn Future<Output = ()> + Send>>);

/// Starts the API of coordinator `instance`; returns it with the endpoint
/// tasks (for the caller to own), which feed `engine`. `metrics_addr`,
/// where the coordinator serves Prometheus metrics, is in the service's
/// metadata (`nats micro info gpufleet`), for whoever wants to scrape it.
pub async fn start(
    client: async_nats::Client,
    engine: mpsc::Sender<Input>,
    metrics: crate::metrics::Metrics,
    access: Access,
    instance: &str,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(Api, Vec<EndpointTask>), async_nats::Error> {
    let max_payload = client.server_info().max_payload;
    let mut tasks: Vec<EndpointTask> = Vec::new();
    let mut task = |name: &'static str,
                    counted_as: &'static str,
                    source: Source,
                    endpoint: &'static str,
                    kind: Kind| {
        let server = Server {
            client: client.clone(),
            engine: engine.clone(),
            access: access.clone(),
            max_payload,
            metrics: metrics.clone(),
            name: counted_as,
        };
        tasks.push((name, Box::pin(server.serve(source, endpoint, kind))));
    };
    if access.roles {
        for (name, _, endpoint, kind) in ENDPOINTS {
            let sub = client.subscribe(subjects::api_any_user(endpoint)).await?;
            task(name, name, Source::Plain(sub), endpoint, kind);
        }
        return Ok((Api::Plain, tasks));
    }
    let stats = metrics.clone();
    let metadata = metrics_addr
        .map(|a| std::collections::HashMap::from([("metrics_addr".to_string(), a.to_string())]))
        .unwrap_or_default();
    let service = client
        .service_builder()
        .description("gpufleet job API: submit, get, list, cancel, retry and delete jobs (cancel and retry also one task), list and reset their errors, send messages to their running tasks; list workers")
        .metadata(metadata)
        // A group of its own: see the module's header.
        .queue_group(format!("gpufleet-{instance}"))
        .stats_handler(move |endpoint, _| {
            // The coordinator's own figures ride on one endpoint's stats.
            if endpoint == "jobs-submit" {
                stats.snapshot()
            } else {
                serde_json::Value::Null
            }
        })
        .start(subjects::SERVICE_NAME, gpufleet_schema::VERSION)
        .await?;
    for (name, any_name, endpoint, kind) in ENDPOINTS {
        let counted_as = name;
        for (name, subject) in [
            (name, subjects::api_any_user(endpoint)),
            (any_name, subjects::api_for(None, endpoint)),
        ] {
            let ep = service.endpoint_builder().name(name).add(subject).await?;
            task(
                name,
                counted_as,
                Source::Service(Box::new(ep)),
                endpoint,
                kind,
            );
        }
    }
    Ok((Api::Service(Box::new(service)), tasks))
}

/// What serving an endpoint needs.
struct Server {
    client: async_nats::Client,
    engine: mpsc::Sender<Input>,
    access: Access,
    max_payload: usize,
    metrics: crate::metrics::Metrics,
    /// The endpoint's name in the metrics (the same for both subjects).
    name: &'static str,
}

impl Server {
    /// Serves one endpoint until its subscription or the engine ends.
    async fn serve(self, mut source: Source, endpoint: &'static str, kind: Kind) {
        let requests = self.metrics.api_requests(self.name);
        let mut waiting = FuturesUnordered::new();
        loop {
            tokio::select! {
                request = source.next() => {
                    let Some(request) = request else { break };
                    let Some((enc, rx)) = self.take(&request, endpoint, kind).await else {
                        if self.engine.is_closed() {
                            break;
                        }
                        continue;
                    };
                    requests.inc();
                    let (client, max_payload) = (self.client.clone(), self.max_payload);
                    let (metrics, name) = (self.metrics.clone(), self.name);
                    waiting.push(async move {
                        let reply = rx.await.unwrap_or_else(|_| {
                            Reply::error(code::UNAVAILABLE, "the coordinator is shutting down")
                        });
                        if let Some(code) = respond(&client, request, enc, &reply, max_payload).await {
                            metrics.api_error(name, code);
                        }
                    });
                }
                Some(()) = waiting.next(), if !waiting.is_empty() => {}
            }
        }
        // Answer what was asked before the end.
        while waiting.next().await.is_some() {}
    }

    /// Checks, decodes and hands one request to the engine; `None` for a
    /// request that gets no answer (no reply subject, a subject or reply
    /// nobody may use) or when the engine has gone.
    async fn take(
        &self,
        request: &Incoming,
        endpoint: &str,
        kind: Kind,
    ) -> Option<(Encoding, oneshot::Receiver<Reply>)> {
        let message = request.message();
        let reply_to = message.reply.as_ref()?;
        let Some(caller) = self.access.caller(message.subject.as_str(), endpoint) else {
            tracing::warn!(subject = %message.subject, "ignored a request on a subject nobody may use");
            return None;
        };
        if !self.access.may_reply(&caller, reply_to.as_str()) {
            tracing::warn!(user = %caller.user, reply = %reply_to, "ignored a request whose reply would leave its caller's inbox");
            return None;
        }
        let content_type = message
            .headers
            .as_ref()
            .and_then(|h| h.get(CONTENT_TYPE))
            .map(|v| v.as_str().to_string());
        let body = message.payload.clone();
        let enc = Encoding::detect(content_type.as_deref(), &body);
        let (tx, rx) = oneshot::channel();
        match decode(kind, enc, &body) {
            Ok(call) => {
                if self
                    .engine
                    .send(Input::Api(call, caller, tx))
                    .await
                    .is_err()
                {
                    return None;
                }
            }
            Err(message) => {
                let _ = tx.send(Reply::error(code::BAD_REQUEST, message));
            }
        }
        Some((enc, rx))
    }
}

/// A message cut to [`MAX_ERROR_BYTES`], each long word in it (a huge
/// field name quoted) cut first.
fn bounded(message: String) -> String {
    if message.len() <= MAX_ERROR_BYTES {
        return message;
    }
    let message = gpufleet_schema::text::cut_long_words(&message, 128);
    gpufleet_schema::text::cut(&message, MAX_ERROR_BYTES)
}

/// Decodes a request for endpoint `kind`; an error names the field.
pub(crate) fn decode(kind: Kind, enc: Encoding, body: &[u8]) -> Result<ApiCall, String> {
    let bad = |e: gpufleet_schema::CodecError| bounded(e.to_string());
    Ok(match kind {
        Kind::Submit => ApiCall::Submit(Box::new(enc.decode::<JobSpec>(body).map_err(bad)?)),
        Kind::Get => {
            let r: GetRequest = enc.decode(body).map_err(bad)?;
            ApiCall::Get {
                job: r.job_id,
                offset: r.task_offset.unwrap_or(0) as usize,
                limit: r
                    .task_limit
                    .unwrap_or(MAX_TASKS_PER_PAGE)
                    .min(MAX_TASKS_PER_PAGE) as usize,
            }
        }
        Kind::Cancel => {
            let r: TaskRef = enc.decode(body).map_err(bad)?;
            match r.task {
                Some(task) => ApiCall::CancelTask {
                    job: r.job_id,
                    task,
                },
                None => ApiCall::Cancel(r.job_id),
            }
        }
        Kind::Retry => {
            let r: TaskRef = enc.decode(body).map_err(bad)?;
            ApiCall::Retry {
                job: r.job_id,
                task: r.task,
            }
        }
        Kind::Delete => ApiCall::Delete(enc.decode::<JobRef>(body).map_err(bad)?.job_id),
        Kind::Send => {
            let r: gpufleet_schema::message::SendRequest = enc.decode(body).map_err(bad)?;
            gpufleet_schema::message::check(&r.topic, &r.data).map_err(bounded)?;
            ApiCall::Send(Box::new(r))
        }
        Kind::Errors => {
            let r: ErrorsRequest = enc.decode(body).map_err(bad)?;
            ApiCall::Errors {
                job: r.job_id,
                reset: r.reset,
            }
        }
        Kind::List => {
            let r: ListRequest = enc.decode(body).map_err(bad)?;
            ApiCall::List {
                status: r.status,
                limit: r.limit.map_or(DEFAULT_LIST_LIMIT, |l| l as usize),
            }
        }
        Kind::Workers => {
            let r: WorkersRequest = enc.decode(body).map_err(bad)?;
            ApiCall::Workers {
                after: r.after,
                limit: r
                    .limit
                    .unwrap_or(MAX_WORKERS_PER_PAGE)
                    .min(MAX_WORKERS_PER_PAGE) as usize,
            }
        }
    })
}

/// A short phrase for an error code: what the `Nats-Service-Error` header
/// says. The message itself is in the body, once.
fn phrase(code: u16) -> &'static str {
    match code {
        code::BAD_REQUEST => "bad request",
        code::NOT_FOUND => "not found",
        code::CONFLICT => "conflict",
        code::PAYLOAD_TOO_LARGE => "too large",
        code::UNAVAILABLE => "unavailable",
        _ => "internal error",
    }
}

/// The reply to send: headers and body, never larger than `max_payload`
/// together.
pub(crate) fn reply_message(
    reply: &Reply,
    enc: Encoding,
    max_payload: usize,
) -> (HeaderMap, Vec<u8>) {
    let (mut error, mut body) = encode_reply(reply, enc);
    let headers = |error: Option<u16>| {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, enc.content_type());
        if let Some(code) = error {
            h.insert(async_nats::service::NATS_SERVICE_ERROR, phrase(code));
            h.insert(
                async_nats::service::NATS_SERVICE_ERROR_CODE,
                code.to_string().as_str(),
            );
        }
        h
    };
    if error.is_some() && body.len() > MAX_ERROR_BYTES + 64 {
        // An error quoting something huge: say it shorter.
        let message = match reply {
            Reply::Error { message, .. } => bounded(message.clone()),
            _ => "the error message was too long to send".into(),
        };
        let code = error.unwrap_or(code::INTERNAL);
        (error, body) = encode_reply(&Reply::error(code, message), enc);
    }
    // A reply that cannot be sent must still answer: say why, and how to
    // ask for less.
    if body.len() + REPLY_OVERHEAD > max_payload {
        let message = format!(
            "the reply is {} bytes, more than the server's max_payload of {max_payload}; ask for fewer tasks or workers per page (task_limit, limit)",
            body.len()
        );
        (error, body) = encode_reply(&Reply::error(code::INTERNAL, message), enc);
    }
    (headers(error), body)
}

/// Sends the reply; returns its error code, if it is an error.
async fn respond(
    client: &async_nats::Client,
    request: Incoming,
    enc: Encoding,
    reply: &Reply,
    max_payload: usize,
) -> Option<u16> {
    let (headers, body) = reply_message(reply, enc, max_payload);
    let error = headers
        .get(async_nats::service::NATS_SERVICE_ERROR_CODE)
        .and_then(|v| v.as_str().parse().ok());
    // Errors go out as a normal reply carrying the error headers, so that
    // the body can hold `{"error": ...}` (the library's error reply is empty).
    if let Err(e) = request.respond(client, body, headers).await {
        tracing::warn!(error = %e, "could not send an API reply");
    }
    error
}

#[cfg(test)]
mod fuzz {
    //! Random and mutated requests at every endpoint's decoder, and what
    //! decodes at the engine (which validates): nothing panics, every
    //! request is answered with an error or what the endpoint returns, and
    //! every answer fits one message.

    use super::*;
    use crate::engine::{Engine, Feed, Now};
    use crate::CoordinatorConfig;
    use proptest::prelude::*;

    const MAX_PAYLOAD: usize = 1 << 20;

    const VALID: [(Kind, &str); 8] = [
        (
            Kind::Submit,
            r#"{"id": "j-1", "name": "n", "priority": 3, "max_retries": 1, "gang": true, "min_tasks": 1,
               "constraints": {"labels": {"zone": "a"}, "workers": ["w1"]},
               "tasks": [{"name": "t", "command": ["python3", "-c", "print(1)"], "env": {"A": "1"},
                          "resources": {"gpus": 1, "gpu_memory": "1GiB", "cpus": 0.5, "memory": "1GiB"},
                          "timeout": "1h", "artifacts": ["out/*"]}]}"#,
        ),
        (
            Kind::Get,
            r#"{"job_id": "j-1", "task_offset": 0, "task_limit": 10}"#,
        ),
        (Kind::List, r#"{"status": "RUNNING", "limit": 5}"#),
        (Kind::Cancel, r#"{"job_id": "j-1"}"#),
        (Kind::Cancel, r#"{"job_id": "j-1", "task": "t"}"#),
        (Kind::Retry, r#"{"job_id": "j-1", "task": "t"}"#),
        (Kind::Delete, r#"{"job_id": "j-1"}"#),
        (Kind::Workers, r#"{"after": "w0", "limit": 2}"#),
    ];

    fn engine() -> Engine {
        let now = Now {
            mono: std::time::Instant::now(),
            wall: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        };
        let mut e = Engine::new(CoordinatorConfig::default(), now, 7);
        for f in [Feed::Workers, Feed::Leases, Feed::Events] {
            e.handle(Input::Synced(f), now);
        }
        e
    }

    /// Sends one request body through decoding and the engine; checks the
    /// answer.
    fn answer(e: &mut Engine, kind: Kind, body: &[u8]) -> Result<(), TestCaseError> {
        let enc = Encoding::detect(None, body);
        let (tx, mut rx) = oneshot::channel();
        match decode(kind, enc, body) {
            Ok(call) => {
                let now = Now {
                    mono: std::time::Instant::now(),
                    wall: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
                };
                e.handle(Input::Api(call, Caller::everyone(), tx), now);
                e.schedule_if_needed(now);
            }
            Err(message) => {
                let _ = tx.send(Reply::error(code::BAD_REQUEST, message));
            }
        }
        let fx = e.take_effects();
        // A job the engine does not hold is read from the bucket: that is
        // an answer to come, from the runtime.
        if !fx.fetches.is_empty() {
            return Ok(());
        }
        for (tx, reply, _) in fx.replies {
            let _ = tx.send(reply);
        }
        let reply = rx
            .try_recv()
            .map_err(|_| TestCaseError::fail("no answer"))?;
        let fits = |reply: &Reply| {
            let (headers, body) = reply_message(reply, enc, MAX_PAYLOAD);
            let header_bytes: usize = [
                CONTENT_TYPE,
                async_nats::service::NATS_SERVICE_ERROR,
                async_nats::service::NATS_SERVICE_ERROR_CODE,
            ]
            .iter()
            .map(|k| k.len() + headers.get(*k).map_or(0, |v| v.as_str().len()))
            .sum();
            body.len() + header_bytes < MAX_PAYLOAD
        };
        prop_assert!(fits(&reply), "an answer too large to send");
        match (kind, &reply) {
            (_, Reply::Error { code, .. }) => prop_assert!(*code >= 400),
            (Kind::Submit, Reply::Submit(_))
            | (Kind::Get | Kind::Cancel | Kind::Delete | Kind::Retry, Reply::Job(_))
            | (Kind::List, Reply::Jobs(_))
            | (Kind::Workers, Reply::Workers(_)) => {}
            (kind, reply) => prop_assert!(false, "{kind:?} answered {reply:?}"),
        }
        Ok(())
    }

    fn kinds() -> impl Strategy<Value = usize> {
        0..VALID.len()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        #[test]
        fn random_bytes_are_answered(k in kinds(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            answer(&mut engine(), VALID[k].0, &body)?;
        }

        #[test]
        fn mutated_json_is_answered(k in kinds(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut body = VALID[k].1.as_bytes().to_vec();
            for (pos, byte) in edits {
                let pos = pos % body.len();
                body[pos] = byte;
            }
            answer(&mut engine(), VALID[k].0, &body)?;
        }

        #[test]
        fn mutated_msgpack_is_answered(k in kinds(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let value: serde_json::Value = serde_json::from_str(VALID[k].1).unwrap();
            let mut body = gpufleet_schema::codec::encode(&value).unwrap();
            for (pos, byte) in edits {
                let pos = pos % body.len();
                body[pos] = byte;
            }
            answer(&mut engine(), VALID[k].0, &body)?;
        }

        #[test]
        fn odd_values_in_valid_shapes_are_answered(
            k in kinds(),
            text in "\\PC{0,40}",
            n in any::<i64>(),
            f in any::<f64>(),
        ) {
            let mut value: serde_json::Value = serde_json::from_str(VALID[k].1).unwrap();
            fn walk(v: &mut serde_json::Value, text: &str, n: i64, f: f64, depth: usize) {
                match v {
                    serde_json::Value::String(s) => *s = text.to_string(),
                    serde_json::Value::Number(x) => {
                        *x = if depth.is_multiple_of(2) { n.into() } else {
                            serde_json::Number::from_f64(f).unwrap_or_else(|| n.into())
                        }
                    }
                    serde_json::Value::Array(a) => a.iter_mut().for_each(|v| walk(v, text, n, f, depth + 1)),
                    serde_json::Value::Object(o) => o.values_mut().for_each(|v| walk(v, text, n, f, depth + 1)),
                    _ => {}
                }
            }
            walk(&mut value, &text, n, f, 0);
            answer(&mut engine(), VALID[k].0, &serde_json::to_vec(&value).unwrap())?;
            answer(&mut engine(), VALID[k].0, &gpufleet_schema::codec::encode(&value).unwrap())?;
        }
    }

    #[test]
    fn a_huge_field_name_is_answered_briefly() {
        for (kind, valid) in VALID {
            let name = "x".repeat(300_000);
            let body = valid.replacen('{', &format!("{{\"{name}\": 1, "), 1);
            let mut e = engine();
            answer(&mut e, kind, body.as_bytes()).unwrap();
            let (_, reply_body) = reply_message(
                &Reply::error(
                    code::BAD_REQUEST,
                    decode(kind, Encoding::Json, body.as_bytes()).unwrap_err(),
                ),
                Encoding::Json,
                MAX_PAYLOAD,
            );
            assert!(
                reply_body.len() < 4096,
                "{kind:?}: {} bytes",
                reply_body.len()
            );
        }
    }

    #[test]
    fn null_and_other_json_scalars_are_answered_in_json() {
        for body in [&b"null"[..], b"\"x\"", b"12", b"[]"] {
            let enc = Encoding::detect(None, body);
            assert_eq!(enc, Encoding::Json, "{body:?}");
            let err = decode(Kind::Submit, enc, body).unwrap_err();
            let (headers, reply) =
                reply_message(&Reply::error(code::BAD_REQUEST, err), enc, MAX_PAYLOAD);
            assert_eq!(
                headers.get(CONTENT_TYPE).unwrap().as_str(),
                "application/json"
            );
            assert!(serde_json::from_slice::<serde_json::Value>(&reply).is_ok());
        }
    }

    #[test]
    fn an_error_says_its_message_once() {
        let body = br#"{"tasks": [{"command": ["true"], "gpu_memroy": 1}]}"#;
        let err = decode(Kind::Submit, Encoding::Json, body).unwrap_err();
        let (headers, reply) = reply_message(
            &Reply::error(code::BAD_REQUEST, err),
            Encoding::Json,
            MAX_PAYLOAD,
        );
        let header = headers
            .get(async_nats::service::NATS_SERVICE_ERROR)
            .unwrap()
            .as_str()
            .to_string();
        assert_eq!(header, "bad request");
        let text = String::from_utf8(reply).unwrap();
        assert!(text.contains("gpu_memroy"), "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(roles: bool) -> Access {
        Access {
            roles,
            admins: [UserId::new("root").unwrap()].into_iter().collect(),
        }
    }

    #[test]
    fn the_caller_is_the_subjects_user() {
        let on = access(true);
        let alice = on
            .caller("gpufleet.api.alice.jobs.get", endpoint::JOBS_GET)
            .unwrap();
        assert_eq!((alice.user.as_str(), alice.admin), ("alice", false));
        assert!(
            on.caller("gpufleet.api.root.jobs.get", endpoint::JOBS_GET)
                .unwrap()
                .admin
        );
        // A message delivered here with another subject, and the old
        // subjects, name nobody.
        assert!(on
            .caller("gpufleet.events.alice.j.t.state._c", endpoint::JOBS_GET)
            .is_none());
        assert!(on.caller(subjects::JOBS_GET, endpoint::JOBS_GET).is_none());
        let off = access(false);
        assert_eq!(
            off.caller(subjects::JOBS_GET, endpoint::JOBS_GET),
            Some(Caller::everyone())
        );
        assert!(
            off.caller("gpufleet.api.alice.jobs.get", endpoint::JOBS_GET)
                .unwrap()
                .admin
        );
    }

    #[test]
    fn replies_go_to_the_callers_inbox_only() {
        let on = access(true);
        let alice = on
            .caller("gpufleet.api.alice.jobs.get", endpoint::JOBS_GET)
            .unwrap();
        assert!(on.may_reply(&alice, "_INBOX.alice.abc.1"));
        for bad in [
            "_INBOX.bob.abc",
            "_INBOX.alicex.abc",
            "_INBOX.alice",
            "$KV.gpufleet-jobs.j1",
            "$JS.API.STREAM.PURGE.KV_gpufleet-jobs",
        ] {
            assert!(!on.may_reply(&alice, bad), "{bad}");
        }
        assert!(access(false).may_reply(&alice, "anything"));
    }
}
