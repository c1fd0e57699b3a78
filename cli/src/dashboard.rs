//! `gpufleet dashboard`: a web page of the fleet and its jobs, served by
//! this process over the user's own NATS connection, so that it shows what
//! that user may see and cancels as that user.
//!
//! The page (`dashboard.html`, embedded in the binary: nothing to build or
//! install) talks to a small JSON API here: `GET /api/fleet` (workers, each
//! GPU with the tasks holding it), `GET /api/jobs?status=`, `GET
//! /api/jobs/{id}`, `POST /api/jobs/{id}/cancel`, and `GET
//! /api/jobs/{id}/events?from=start|tail`: the job's events as server-sent
//! events, read from the events stream, each with its stream sequence as
//! its id, so that a browser that reconnects resumes after the last one it
//! saw (`Last-Event-ID`).
//!
//! Whoever reaches the port acts with the user's credentials, so it
//! listens on loopback unless told otherwise. A web page the user visits
//! could still send requests there: on loopback every request must name
//! this server in its `Host` header (DNS rebinding), and a cancel must
//! carry a header that a cross-site form cannot send (CSRF).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use gpufleet_natsutil::events::Until;
use gpufleet_schema::{subjects, JobId, JobState};
use serde::Deserialize;

use crate::client::{Api, ApiError};

/// The page, with its script and styles.
const PAGE: &str = include_str!("dashboard.html");
/// The header a cancel must carry. Browsers send custom headers across
/// sites only after a CORS preflight, which this server never grants.
pub const ACTION_HEADER: &str = "x-gpufleet-action";
/// Jobs listed when the page names no limit.
const DEFAULT_JOBS: u32 = 200;

struct Dash {
    api: Api,
    /// The NATS URL, without secrets, for the page's header.
    nats: String,
}

/// Serves the dashboard on `listen` until `shutdown`; prints its URL.
pub async fn run(
    api: Api,
    nats_url: &str,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot listen there"))?;
    let bound = listener.local_addr()?;
    let dash = Arc::new(Dash {
        api,
        nats: gpufleet_natsutil::redact(nats_url),
    });
    let app = router(dash, bound);
    println!("http://{bound}/");
    eprintln!("dashboard on http://{bound}/ for {nats_url}; Ctrl-C stops it");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("the dashboard's server failed")
}

fn router(dash: Arc<Dash>, bound: SocketAddr) -> Router {
    let hosts = Arc::new(allowed_hosts(bound));
    Router::new()
        .route("/", get(page))
        .route("/api/fleet", get(fleet))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/events", get(events))
        .with_state(dash)
        .layer(middleware::from_fn_with_state(hosts, guard))
}

/// The `Host` values a request may carry; `None` accepts any (a dashboard
/// deliberately listening on a public address is reached by names we
/// cannot know).
fn allowed_hosts(bound: SocketAddr) -> Option<Vec<String>> {
    if !bound.ip().is_loopback() {
        return None;
    }
    let port = bound.port();
    Some(vec![
        bound.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ])
}

async fn guard(
    State(hosts): State<Arc<Option<Vec<String>>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(hosts) = hosts.as_ref() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Failure(
                StatusCode::FORBIDDEN,
                format!("the Host header {host:?} is not this dashboard's address"),
            )
            .into_response();
        }
    }
    if request.method() == axum::http::Method::POST
        && !request.headers().contains_key(ACTION_HEADER)
    {
        return Failure(
            StatusCode::FORBIDDEN,
            format!("a request that changes something must carry the {ACTION_HEADER} header"),
        )
        .into_response();
    }
    next.run(request).await
}

/// A request that failed: its status and why, sent as `{"error": ...}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        match e {
            ApiError::Service { code, message } => Failure(
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                message,
            ),
            e @ ApiError::NoCoordinator { .. } => {
                Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            e @ ApiError::TimedOut { .. } => Failure(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
            ApiError::Other(m) => Failure(StatusCode::BAD_GATEWAY, m),
        }
    }
}

type Answer = Result<Response, Failure>;

fn job_id(s: &str) -> Result<JobId, Failure> {
    JobId::new(s).map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("job id: {e}")))
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE))
}

async fn fleet(State(dash): State<Arc<Dash>>) -> Answer {
    let workers = dash.api.workers().await?;
    let holders = crate::show::gpu_holders(&workers);
    Ok(Json(serde_json::json!({
        "nats": dash.nats,
        "workers": crate::show::workers_json(&workers, &holders),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct JobsQuery {
    status: Option<String>,
    limit: Option<u32>,
}

async fn jobs(State(dash): State<Arc<Dash>>, Query(q): Query<JobsQuery>) -> Answer {
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<JobState>())
        .transpose()
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("status: {e}")))?;
    let limit = q.limit.unwrap_or(DEFAULT_JOBS);
    Ok(Json(dash.api.list(status, Some(limit)).await?).into_response())
}

async fn job(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    let id = job_id(&id)?;
    Ok(Json(dash.api.get(&id).await?).into_response())
}

async fn cancel(State(dash): State<Arc<Dash>>, Path(id): Path<String>) -> Answer {
    let id = job_id(&id)?;
    Ok(Json(dash.api.cancel(&id).await?).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    /// `start` (the default) or `tail`.
    from: Option<String>,
}

async fn events(
    State(dash): State<Arc<Dash>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Answer {
    let id = job_id(&id)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let tail = match (resume, q.from.as_deref()) {
        (Some(_), _) | (None, None | Some("start")) => false,
        (None, Some("tail")) => true,
        (None, Some(other)) => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("from: {other:?} is neither \"start\" nor \"tail\""),
            ))
        }
    };
    // Its events are under its owner's name.
    let status = dash.api.get(&id).await?;
    let filter = subjects::job_events(&status.owner, &id);
    let from = match resume {
        Some(seen) => seen + 1,
        // The newest stored event and what follows it.
        None if tail => match dash.api.newest_event(&filter).await {
            Ok(Some(seq)) => seq,
            Ok(None) => 1,
            Err(e) => return Err(Failure(StatusCode::BAD_GATEWAY, format!("{e:#}"))),
        },
        None => 1,
    };
    let mut stream = dash
        .api
        .events_from(filter, from, Until::Live)
        .await
        .map_err(|e| Failure(StatusCode::BAD_GATEWAY, format!("{e:#}")))?;
    // From the tail, the state events that name who holds each running
    // attempt are behind us: the status names them.
    stream.learn_holders(&status);
    Ok(Sse::new(sse(stream))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Each event as JSON, with its stream sequence as the SSE id.
fn sse(
    stream: crate::client::EventStream,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    futures::stream::unfold(stream, |mut stream| async move {
        let delivered = stream.next().await?;
        let data = serde_json::to_string(&delivered.event).unwrap_or_else(|_| "null".into());
        let event = SseEvent::default()
            .id(stream.last_seq().to_string())
            .data(data);
        Some((Ok(event), stream))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_dashboards_accept_their_own_names_only() {
        let hosts = allowed_hosts("127.0.0.1:8080".parse().unwrap()).unwrap();
        assert!(hosts.contains(&"localhost:8080".to_string()));
        assert!(hosts.contains(&"127.0.0.1:8080".to_string()));
        assert!(!hosts.iter().any(|h| h.contains("evil")));
        assert!(allowed_hosts("0.0.0.0:8080".parse().unwrap()).is_none());
    }
}
