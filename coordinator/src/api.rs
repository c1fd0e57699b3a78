//! The `gpufleet` micro service: decodes requests (JSON or msgpack), hands
//! them to the engine, and answers in the request's encoding.
//!
//! Decoding happens here, off the engine's loop; a request that does not
//! decode is answered 400 at once, naming the field.

use async_nats::service::{Service, ServiceExt};
use async_nats::HeaderMap;
use futures::StreamExt;
use gpufleet_schema::api::{
    code, ErrorBody, GetRequest, JobRef, ListRequest, WorkersRequest, MAX_TASKS_PER_PAGE,
    MAX_WORKERS_PER_PAGE,
};
use gpufleet_schema::codec::CONTENT_TYPE;
use gpufleet_schema::{subjects, Encoding, JobSpec};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{encode_reply, ApiCall, Input, Reply};

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
    ("jobs-submit", subjects::JOBS_SUBMIT, Kind::Submit),
    ("jobs-get", subjects::JOBS_GET, Kind::Get),
    ("jobs-list", subjects::JOBS_LIST, Kind::List),
    ("jobs-cancel", subjects::JOBS_CANCEL, Kind::Cancel),
    ("workers-list", subjects::WORKERS_LIST, Kind::Workers),
];

/// Starts the service; its endpoints feed `engine`.
/// Starts the service; its endpoints feed `engine`. `metrics_addr`, where
/// the coordinator serves Prometheus metrics, is in the service's metadata
/// (`nats micro info gpufleet`), for whoever wants to scrape it.
pub async fn start(
    client: async_nats::Client,
    engine: mpsc::Sender<Input>,
    metrics: crate::metrics::Metrics,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<Service, async_nats::Error> {
    let stats = metrics.clone();
    let metadata = metrics_addr
        .map(|a| std::collections::HashMap::from([("metrics_addr".to_string(), a.to_string())]))
        .unwrap_or_default();
    let service = client
        .service_builder()
        .description("gpufleet job API: submit, get, list and cancel jobs; list workers")
        .metadata(metadata)
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
    let max_payload = client.server_info().max_payload;
    for (name, subject, kind) in ENDPOINTS {
        let mut endpoint = service.endpoint_builder().name(name).add(subject).await?;
        let engine = engine.clone();
        let metrics = metrics.clone();
        let requests = metrics.api_requests(name);
        tokio::spawn(async move {
            while let Some(request) = endpoint.next().await {
                if request.message.reply.is_none() {
                    continue;
                }
                requests.inc();
                let content_type = request
                    .message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(CONTENT_TYPE))
                    .map(|v| v.as_str().to_string());
                let body = request.message.payload.clone();
                let enc = Encoding::detect(content_type.as_deref(), &body);
                let (tx, rx) = oneshot::channel();
                match decode(kind, enc, &body) {
                    Ok(call) => {
                        if engine.send(Input::Api(call, tx)).await.is_err() {
                            break;
                        }
                    }
                    Err(message) => {
                        let _ = tx.send(Reply::error(code::BAD_REQUEST, message));
                    }
                }
                // Each reply waits on its own, so a slow submit (waiting for
                // its record to be written) never holds up the next request.
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let reply = rx.await.unwrap_or_else(|_| {
                        Reply::error(code::UNAVAILABLE, "the coordinator is shutting down")
                    });
                    if let Some(code) = respond(request, enc, &reply, max_payload).await {
                        metrics.api_error(name, code);
                    }
                });
            }
        });
    }
    Ok(service)
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

/// Sends the reply; returns its error code, if it is an error.
async fn respond(
    request: async_nats::service::Request,
    enc: Encoding,
    reply: &Reply,
    max_payload: usize,
) -> Option<u16> {
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
    if let Err(e) = request.respond_with_headers(Ok(body.into()), headers).await {
        tracing::warn!(error = %e, "could not send an API reply");
    }
    error
}
