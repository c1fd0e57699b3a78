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

use std::collections::HashSet;

use async_nats::service::{Service, ServiceExt};
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use gpufleet_schema::api::{
    code, ErrorBody, GetRequest, JobRef, ListRequest, WorkersRequest, MAX_TASKS_PER_PAGE,
    MAX_WORKERS_PER_PAGE,
};
use gpufleet_schema::codec::CONTENT_TYPE;
use gpufleet_schema::subjects::{self, endpoint};
use gpufleet_schema::{roles, Encoding, JobSpec, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{encode_reply, ApiCall, Caller, Input, Reply};

/// How many jobs `jobs.list` returns when the request names no limit.
pub const DEFAULT_LIST_LIMIT: usize = 100;

#[derive(Clone, Copy)]
enum Kind {
    Submit,
    Get,
    List,
    Cancel,
    Workers,
}

const ENDPOINTS: [(&str, &str, Kind); 5] = [
    ("jobs-submit", endpoint::JOBS_SUBMIT, Kind::Submit),
    ("jobs-get", endpoint::JOBS_GET, Kind::Get),
    ("jobs-list", endpoint::JOBS_LIST, Kind::List),
    ("jobs-cancel", endpoint::JOBS_CANCEL, Kind::Cancel),
    ("workers-list", endpoint::WORKERS_LIST, Kind::Workers),
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
        !self.roles
            || reply
                .strip_prefix(roles::inbox_prefix(caller.user.as_str()).as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

/// The API while it serves: the micro service, or plain subscriptions.
pub enum Api {
    Service(Box<Service>),
    Plain(Vec<tokio::task::JoinHandle<()>>),
}

impl Api {
    pub async fn stop(self) {
        match self {
            Api::Service(s) => {
                let _ = s.stop().await;
            }
            Api::Plain(tasks) => tasks.into_iter().for_each(|t| t.abort()),
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

/// Starts the API; its requests feed `engine`.
pub async fn start(
    client: async_nats::Client,
    engine: mpsc::Sender<Input>,
    metrics: crate::metrics::Metrics,
    access: Access,
) -> Result<Api, async_nats::Error> {
    let max_payload = client.server_info().max_payload;
    let (tx, rx) = mpsc::channel::<(Incoming, Kind, &'static str)>(1024);
    tokio::spawn(serve(
        client.clone(),
        rx,
        engine,
        access.clone(),
        max_payload,
    ));
    if access.roles {
        let mut tasks = Vec::new();
        for (_, endpoint, kind) in ENDPOINTS {
            let mut sub = client.subscribe(subjects::api_any_user(endpoint)).await?;
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    if tx.send((Incoming::Plain(m), kind, endpoint)).await.is_err() {
                        return;
                    }
                }
            }));
        }
        return Ok(Api::Plain(tasks));
    }
    let service = client
        .service_builder()
        .description("gpufleet job API: submit, get, list and cancel jobs; list workers")
        .stats_handler(move |endpoint, _| {
            // The coordinator's own figures ride on one endpoint's stats.
            if endpoint == "jobs-submit" {
                metrics.snapshot()
            } else {
                serde_json::Value::Null
            }
        })
        .start(subjects::SERVICE_NAME, gpufleet_schema::VERSION)
        .await?;
    for (name, endpoint, kind) in ENDPOINTS {
        for (name, subject) in [
            (name.to_string(), subjects::api_any_user(endpoint)),
            (format!("{name}-any"), subjects::api_for(None, endpoint)),
        ] {
            let mut ep = service.endpoint_builder().name(name).add(subject).await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(r) = ep.next().await {
                    if tx
                        .send((Incoming::Service(r), kind, endpoint))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
    Ok(Api::Service(Box::new(service)))
}

async fn serve(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<(Incoming, Kind, &'static str)>,
    engine: mpsc::Sender<Input>,
    access: Access,
    max_payload: usize,
) {
    while let Some((request, kind, endpoint)) = rx.recv().await {
        let message = request.message();
        let Some(reply_to) = message.reply.as_ref() else {
            continue;
        };
        let Some(caller) = access.caller(message.subject.as_str(), endpoint) else {
            tracing::warn!(subject = %message.subject, "ignored a request on a subject nobody may use");
            continue;
        };
        if !access.may_reply(&caller, reply_to.as_str()) {
            tracing::warn!(user = %caller.user, reply = %reply_to, "ignored a request whose reply would leave its caller's inbox");
            continue;
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
                if engine.send(Input::Api(call, caller, tx)).await.is_err() {
                    return;
                }
            }
            Err(message) => {
                let _ = tx.send(Reply::error(code::BAD_REQUEST, message));
            }
        }
        // Each reply waits on its own, so a slow submit (waiting for its
        // record to be written) never holds up the next request.
        let client = client.clone();
        tokio::spawn(async move {
            let reply = rx.await.unwrap_or_else(|_| {
                Reply::error(code::UNAVAILABLE, "the coordinator is shutting down")
            });
            respond(&client, request, enc, &reply, max_payload).await;
        });
    }
}

fn decode(kind: Kind, enc: Encoding, body: &[u8]) -> Result<ApiCall, String> {
    let bad = |e: gpufleet_schema::CodecError| e.to_string();
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
        Kind::Cancel => ApiCall::Cancel(enc.decode::<JobRef>(body).map_err(bad)?.job_id),
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

async fn respond(
    client: &async_nats::Client,
    request: Incoming,
    enc: Encoding,
    reply: &Reply,
    max_payload: usize,
) {
    let (mut error, mut body) = encode_reply(reply, enc);
    // A reply that cannot be sent must still answer: say why, and how to
    // ask for less.
    if body.len() + 512 > max_payload {
        let message = format!(
            "the reply is {} bytes, more than the server's max_payload of {max_payload}; ask for fewer tasks or workers per page (task_limit, limit)",
            body.len()
        );
        let (e, b) = encode_reply(&Reply::error(code::INTERNAL, message), enc);
        error = e;
        body = b;
    }
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, enc.content_type());
    if let Some(code) = error {
        let message = match reply {
            Reply::Error { message, .. } => message.clone(),
            _ => enc
                .decode::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_default(),
        };
        // Header values are one line.
        let message = message.replace(['\r', '\n'], " ");
        headers.insert(async_nats::service::NATS_SERVICE_ERROR, message.as_str());
        headers.insert(
            async_nats::service::NATS_SERVICE_ERROR_CODE,
            code.to_string().as_str(),
        );
    }
    // Errors go out as a normal reply carrying the error headers, so that
    // the body can hold `{"error": ...}` (the library's error reply is empty).
    if let Err(e) = request.respond(client, body, headers).await {
        tracing::warn!(error = %e, "could not send an API reply");
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
