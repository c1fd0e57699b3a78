//! Connecting to NATS, and refusing servers that lack per-message TTLs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, ServerAddr};

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
    #[error("{setting} {path}: {reason}")]
    Credentials {
        setting: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The TLS handshake failed while this program presented a client
    /// certificate: the usual cause is a certificate the server does not
    /// trust (another CA, expired, or no user mapped to it).
    #[error("cannot connect to NATS at {url}: the TLS handshake failed ({source}); check that the server trusts the client certificate {cert} (nats_tls_cert) and that nats_tls_ca holds the server's CA")]
    Tls {
        url: String,
        cert: String,
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
/// URL: a credentials file (JWT + NKey seed, as `nsc` writes), a bare NKey
/// seed (for servers that list users by public NKey, as `gpufleet auth`
/// writes them), a token, or a client certificate (mutual TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub creds: Option<PathBuf>,
    pub token: Option<String>,
    /// A file holding an NKey seed (`SU...`).
    pub nkey: Option<PathBuf>,
    /// The client certificate and its key (PEM), for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) the server's certificate must chain to, instead of the
    /// system's.
    pub tls_ca: Option<PathBuf>,
    /// Replies come to `<prefix>.<random>`: with roles on, a program may
    /// only subscribe to its own prefix (`schema::roles::inbox_prefix`), so
    /// nobody else reads its replies.
    pub inbox_prefix: Option<String>,
}

impl Auth {
    /// Checks that the files exist and hold what they should, so that a
    /// mistake is named at start, with its setting.
    pub fn check(&self) -> Result<(), ConnectError> {
        let bad = |setting: &'static str, path: &Path, reason: String| ConnectError::Credentials {
            setting,
            path: path.display().to_string(),
            reason,
        };
        if let Some(path) = &self.nkey {
            read_nkey_seed(path).map_err(|reason| bad("nats_nkey", path, reason))?;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConnectError::Credentials {
                    setting: "nats_tls_key",
                    path: String::new(),
                    reason: "missing: nats_tls_cert needs the key that goes with it".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConnectError::Credentials {
                    setting: "nats_tls_cert",
                    path: String::new(),
                    reason: "missing: nats_tls_key needs the certificate that goes with it".into(),
                })
            }
            _ => {}
        }
        for (setting, path) in [
            ("nats_tls_cert", &self.tls_cert),
            ("nats_tls_key", &self.tls_key),
            ("nats_tls_ca", &self.tls_ca),
        ] {
            if let Some(path) = path {
                let text =
                    std::fs::read_to_string(path).map_err(|e| bad(setting, path, e.to_string()))?;
                if !text.contains("-----BEGIN ") {
                    return Err(bad(setting, path, "not a PEM file".into()));
                }
            }
        }
        Ok(())
    }

    fn uses_tls(&self) -> bool {
        self.tls_cert.is_some() || self.tls_ca.is_some()
    }
}

/// Reads an NKey seed file (the seed alone, as `nk -gen user` writes it;
/// blank lines and `#` comments are allowed around it).
pub fn read_nkey_seed(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("the file is empty")?;
    nkeys::KeyPair::from_seed(seed).map_err(|e| format!("not an NKey seed ({e})"))?;
    Ok(seed.to_string())
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
    if let Some(path) = &auth.nkey {
        let seed = read_nkey_seed(path).map_err(|reason| ConnectError::Credentials {
            setting: "nats_nkey",
            path: path.display().to_string(),
            reason,
        })?;
        options = options.nkey(seed);
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert, &auth.tls_key) {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some(prefix) = &auth.inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    // The client does not take these from the URL by itself.
    if let Some(a) = addrs.iter().find(|a| a.has_user_pass()) {
        if let (Some(u), Some(p)) = (a.username(), a.password()) {
            options = options.user_and_password(u.to_string(), p.to_string());
        }
    }
    Ok(options)
}

fn connect_error(url: String, auth: &Auth, source: async_nats::ConnectError) -> ConnectError {
    // A server that refuses the client certificate closes the handshake;
    // the client sees a TLS error or a reset, which says nothing of why.
    let handshake = matches!(source.kind(), ConnectErrorKind::Tls | ConnectErrorKind::Io);
    match &auth.tls_cert {
        Some(cert) if handshake && auth.uses_tls() => ConnectError::Tls {
            url,
            cert: cert.display().to_string(),
            source,
        },
        _ => ConnectError::Connect { url, source },
    }
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
    auth.check()?;
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
                None => return Err(connect_error(shown, auth, source)),
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
