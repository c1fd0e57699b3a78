//! Connecting to NATS, and refusing servers that lack per-message TTLs.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};

use crate::retry::Backoff;

/// Oldest server with per-key TTLs and limit markers (ADR-43).
pub const MIN_SERVER: (u64, u64) = (2, 11);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid NATS url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("nats-server {found} at {url} is too old: gpufleet needs {}.{} or newer (per-message TTLs); see scripts/nats-server.sh", MIN_SERVER.0, MIN_SERVER.1)]
    ServerTooOld { url: String, found: String },
    #[error("nats-server at {url} has JetStream disabled: start it with -js")]
    NoJetStream { url: String },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Parses `nats://a:4222,nats://b:4222` into server addresses.
pub fn parse_urls(url: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs: Result<Vec<ServerAddr>, _> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|e| ConnectError::BadUrl {
                url: redact(url),
                reason: e.to_string(),
            })
        })
        .collect();
    let addrs = addrs?;
    if addrs.is_empty() {
        return Err(ConnectError::BadUrl {
            url: url.to_string(),
            reason: "no server given".into(),
        });
    }
    Ok(addrs)
}

/// Checks a server version string such as "2.11.3" or "v2.12.0-RC.1".
pub fn check_server_version(url: &str, version: &str) -> Result<(), ConnectError> {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u64>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_SERVER => Ok(()),
        _ => Err(ConnectError::ServerTooOld {
            url: url.to_string(),
            found: version.to_string(),
        }),
    }
}

/// How a program proves who it is to NATS, beside `user:password@` in the
/// URL: a credentials file (JWT + NKey seed, as `nsc` writes) or a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub creds: Option<std::path::PathBuf>,
    pub token: Option<String>,
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &u[scheme + 3..at];
                let user = userinfo.split(':').next().unwrap_or("");
                let masked = if userinfo.contains(':') {
                    format!("{user}:***")
                } else {
                    "***".to_string()
                };
                format!("{}{masked}{}", &u[..scheme + 3], &u[at..])
            }
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn options(
    name: &str,
    auth: &Auth,
    addrs: &[ServerAddr],
    url: &str,
) -> Result<ConnectOptions, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // Replies from a busy coordinator may take a while under load.
        .request_timeout(Some(Duration::from_secs(30)));
    if let Some(path) = &auth.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError::BadUrl {
                url: redact(url),
                reason: format!("credentials file {}: {e}", path.display()),
            })?;
    }
    if let Some(token) = &auth.token {
        options = options.token(token.clone());
    }
    // The client does not take these from the URL by itself.
    if let Some(a) = addrs.iter().find(|a| a.has_user_pass()) {
        if let (Some(u), Some(p)) = (a.username(), a.password()) {
            options = options.user_and_password(u.to_string(), p.to_string());
        }
    }
    Ok(options)
}

/// Connects as `name`, retrying until `patience` runs out (a fleet's
/// programs may start before its server), then checks the server version.
/// Once connected, the client reconnects on its own forever.
pub async fn connect(
    url: &str,
    auth: &Auth,
    name: &str,
    patience: Duration,
) -> Result<Client, ConnectError> {
    let addrs = parse_urls(url)?;
    let shown = redact(url);
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let client = loop {
        match options(name, auth, &addrs, url)
            .await?
            .connect(addrs.clone())
            .await
        {
            Ok(c) => break c,
            Err(source) => match backoff.next_before(deadline) {
                Some(delay) => {
                    tracing::warn!(url = %shown, error = %source, "NATS not reachable yet, retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(ConnectError::Connect { url: shown, source }),
            },
        }
    };
    let info = client.server_info();
    check_server_version(&shown, &info.version)?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["2.11.0", "v2.12.3", "2.15.1-RC.2", "3.0.0"] {
            assert!(check_server_version("u", ok).is_ok(), "{ok}");
        }
        for old in ["2.10.26", "2.9.0", "v1.4.1", "", "garbage"] {
            let err = check_server_version("u", old).unwrap_err().to_string();
            assert!(err.contains("too old") && err.contains("2.11"), "{err}");
        }
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("nats://alice:s3cret@h:4222,nats://h2:4222"),
            "nats://alice:***@h:4222,nats://h2:4222"
        );
        assert_eq!(redact("tls://tok@h:1"), "tls://***@h:1");
        assert_eq!(redact("nats://h:1"), "nats://h:1");
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            parse_urls("nats://127.0.0.1:1,nats://127.0.0.1:2")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_urls("").is_err());
        assert!(parse_urls("nats://host:notaport").is_err());
    }
}
