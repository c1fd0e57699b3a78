//! Prometheus metrics over HTTP, the same for the coordinator and the
//! worker: each builds a `prometheus_client` registry of its own metrics,
//! and [`serve`] answers `GET /metrics` with it in the OpenMetrics text
//! format, on the address of the `metrics_addr` setting.
//!
//! Most metrics are counters and histograms updated where things happen.
//! Figures that are a view of state (jobs by status, the queue) are cheaper
//! to compute when someone asks than to keep up to date on every change: a
//! [`Refresh`] hook runs before each scrape to set them.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The coordinator's default metrics port: the one OpenTelemetry's
/// Prometheus exporters use. The worker's is the next, so that one of each
/// fits on a machine as they are (`gpufleet up` gives its N-th worker the
/// coordinator's port plus N).
pub const COORDINATOR_PORT: u16 = 9464;
pub const WORKER_PORT: u16 = 9465;

/// How long a scrape waits for its [`Refresh`]; past it, the figures from
/// the previous refresh are served, so that a busy program still answers.
pub const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// Where metrics are served: the `metrics_addr` setting. `"off"` (or an
/// empty string) serves none; port 0 takes any free port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MetricsAddr {
    Off,
    Listen(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics_addr: {0:?} is neither an address such as 127.0.0.1:9464 nor \"off\"")]
pub struct BadMetricsAddr(pub String);

impl FromStr for MetricsAddr {
    type Err = BadMetricsAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("off") {
            return Ok(MetricsAddr::Off);
        }
        t.parse()
            .map(MetricsAddr::Listen)
            .map_err(|_| BadMetricsAddr(s.to_string()))
    }
}

impl TryFrom<String> for MetricsAddr {
    type Error = BadMetricsAddr;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MetricsAddr> for String {
    fn from(a: MetricsAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Off => f.write_str("off"),
            MetricsAddr::Listen(a) => write!(f, "{a}"),
        }
    }
}

/// Runs before each scrape to bring state-derived figures up to date.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr} (set metrics_addr to another address, or \"off\"): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The metrics endpoint while it runs; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Exporter {
    registry: Registry,
    refresh: Option<Refresh>,
}

/// Serves `registry` on `GET /metrics` at `addr`; `None` when it is off.
pub async fn serve(
    addr: MetricsAddr,
    registry: Registry,
    refresh: Option<Refresh>,
) -> Result<Option<MetricsServer>, MetricsError> {
    let MetricsAddr::Listen(want) = addr else {
        return Ok(None);
    };
    let bind = |source| MetricsError::Bind { addr: want, source };
    let listener = tokio::net::TcpListener::bind(want).await.map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    let exporter = Arc::new(Exporter { registry, refresh });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(exporter);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(Some(MetricsServer { addr: bound, task }))
}

/// [`serve`] for a program whose metrics are not worth stopping for: a
/// port in use is a warning, and the program runs on without them.
pub async fn serve_or_warn(
    addr: MetricsAddr,
    registry: Registry,
    refresh: Option<Refresh>,
) -> Option<MetricsServer> {
    match serve(addr, registry, refresh).await {
        Ok(Some(s)) => {
            tracing::info!(addr = %s.addr(), "serving Prometheus metrics on /metrics");
            Some(s)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "metrics are not served");
            None
        }
    }
}

async fn scrape(
    axum::extract::State(exporter): axum::extract::State<Arc<Exporter>>,
) -> axum::response::Response {
    if let Some(refresh) = &exporter.refresh {
        if tokio::time::timeout(REFRESH_WAIT, refresh()).await.is_err() {
            tracing::debug!("metrics refresh took too long; serving the previous figures");
        }
    }
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &exporter.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
            .into_response(),
    }
}

/// Histogram buckets for latencies from 100 µs to about 100 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 21)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn addresses_parse_and_bad_ones_name_the_setting() {
        assert_eq!("off".parse(), Ok(MetricsAddr::Off));
        assert_eq!("".parse(), Ok(MetricsAddr::Off));
        assert_eq!(
            "127.0.0.1:9464".parse(),
            Ok(MetricsAddr::Listen("127.0.0.1:9464".parse().unwrap()))
        );
        let err = "localhost".parse::<MetricsAddr>().unwrap_err().to_string();
        assert!(
            err.contains("metrics_addr") && err.contains("localhost"),
            "{err}"
        );
        assert_eq!(MetricsAddr::Off.to_string(), "off");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_scrape_runs_the_refresh_and_answers_in_openmetrics() {
        let mut registry = Registry::with_prefix("t");
        let hits = Counter::<u64>::default();
        registry.register("scrapes", "scrapes seen", hits.clone());
        let refresh: Refresh = {
            let hits = hits.clone();
            Arc::new(move || {
                let hits = hits.clone();
                Box::pin(async move {
                    hits.inc();
                })
            })
        };
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Some(refresh.clone()),
        )
        .await
        .unwrap()
        .unwrap();
        let reply = get(server.addr(), "/metrics").await;
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        assert!(reply.contains(OPENMETRICS), "{reply}");
        assert!(reply.contains("t_scrapes_total 1\n"), "{reply}");
        assert!(reply.trim_end().ends_with("# EOF"), "{reply}");
        // A taken port is an error that names the setting.
        let taken = server.addr();
        let err = serve(MetricsAddr::Listen(taken), Registry::default(), None)
            .await
            .err()
            .expect("a second bind to the same port");
        assert!(err.to_string().contains("metrics_addr"), "{err}");
        assert!(serve(MetricsAddr::Off, Registry::default(), None)
            .await
            .unwrap()
            .is_none());
    }
}
