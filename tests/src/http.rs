//! A plain HTTP/1.1 request (one per connection) for the suites that read an HTTP endpoint (metrics,
//! Prometheus's API, the dashboard's JSON): enough for a local server that
//! closes the connection after its answer, with nothing to configure.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one request may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(20);

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The header lines, as sent.
    pub head: String,
    pub body: String,
}

impl Reply {
    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `method` on `url` (`http://host:port/path?query`) with extra header
/// lines; `Err` says what failed (connecting, a malformed answer).
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("connect {host}: {e}"))?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: {host}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send to {host}: {e}"))?;
        // Some servers (chromedriver) keep the connection open whatever
        // the request says: read what the header announces, not to the end.
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("read from {host}: {e}"))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if complete(&raw) {
                break;
            }
        }
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(REQUEST_DEADLINE, exchange)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {REQUEST_DEADLINE:?}"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: an answer without a header end: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: no status in {head:?}"))?;
    let mut reply = Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        reply.body = unchunk(body).ok_or_else(|| format!("{url}: a malformed chunked body"))?;
    }
    Ok(reply)
}

/// Whether `raw` holds a whole answer, by its `Content-Length` or its
/// last chunk; without either, the answer ends when the server closes.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if let Some(len) = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    }) {
        return body.len() >= len;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn unchunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// `GET url`.
pub async fn get(url: &str) -> Result<Reply, String> {
    request("GET", url, &[]).await
}

/// A free TCP port on loopback for a program that cannot be told to pick
/// one itself (it may be taken again before the program binds it, which
/// that program then reports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            super::unchunk("5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some("hello, world")
        );
        assert_eq!(super::unchunk("zz\r\n"), None);
    }
}
