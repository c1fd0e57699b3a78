//! A TCP proxy a test puts between a program and its server, to cut the
//! program off and let it back in without touching either process.
//!
//! Three modes:
//! - [`Mode::Open`]: bytes flow both ways; new connections are made.
//! - [`Mode::Partitioned`]: what a network partition looks like to both
//!   ends. Connections stay open but nothing moves: what was read from one
//!   side waits, and the other side is read no further. A new connection is
//!   accepted (the kernel does that) but never reaches the server, so the
//!   client's handshake times out. [`Proxy::restore`] lets what waited go
//!   through, as TCP would after a short partition.
//! - [`Mode::Closed`]: every connection is closed at once and new ones are
//!   closed as soon as they come: a server that went away.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Open,
    Partitioned,
    Closed,
}

/// A running proxy; it stops (closing every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// The accept loop and every connection's pumps.
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    /// A proxy on a free 127.0.0.1 port to `upstream`, open.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Open);
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let accept = accept_loop(listener, upstream, mode.clone(), tasks.clone());
        lock(&tasks).spawn(accept);
        Ok(Proxy { addr, mode, tasks })
    }

    /// A proxy to the NATS server at `nats_url` (`nats://host:port`).
    pub async fn to_nats(nats_url: &str) -> std::io::Result<Proxy> {
        let hostport = nats_url.trim_start_matches("nats://");
        let upstream = tokio::net::lookup_host(hostport)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{nats_url} resolves to nothing")))?;
        Proxy::start(upstream).await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The URL a NATS client of the proxied server connects to.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Nothing moves any more; connections stay open.
    pub fn partition(&self) {
        self.mode.send_replace(Mode::Partitioned);
    }

    /// Every connection is closed; new ones are refused.
    pub fn close(&self) {
        self.mode.send_replace(Mode::Closed);
    }

    /// Bytes flow again (those held back by a partition first).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        lock(&self.tasks).abort_all();
    }
}

fn lock(tasks: &Mutex<JoinSet<()>>) -> std::sync::MutexGuard<'_, JoinSet<()>> {
    tasks.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    tasks: Arc<Mutex<JoinSet<()>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mode = mode.subscribe();
        let mut tasks = lock(&tasks);
        // Forget the connections that ended.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(connection(client, upstream, mode));
    }
}

/// Waits until the mode is not `Partitioned`; false once it is `Closed`.
async fn wait_open(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Partitioned).await {
        Ok(m) => *m == Mode::Open,
        Err(_) => false,
    }
}

async fn wait_closed(mode: &mut watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Closed).await;
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    // A partition holds a new connection before it reaches the server.
    if !wait_open(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut closed = mode.clone();
    tokio::select! {
        _ = pump(cr, sw, mode.clone()) => {}
        _ = pump(sr, cw, mode) => {}
        _ = wait_closed(&mut closed) => {}
    }
    // Both halves of both sockets are dropped here: the connection closes.
}

/// Copies `from` to `to` while the mode allows; returns when either side
/// ends or the mode becomes `Closed`.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if !wait_open(&mut mode).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read just as a partition began: it waits for the partition to end.
        if !wait_open(&mut mode).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        got
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_partition_holds_bytes_back_until_restored_and_a_close_ends_connections() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await, b"one");

        proxy.partition();
        s.write_all(b"two").await.unwrap();
        let mut got = [0u8; 3];
        let held = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got));
        assert!(held.await.is_err(), "bytes crossed a partition");
        // A connection made during the partition does not reach the server.
        let mut late = TcpStream::connect(proxy.addr).await.unwrap();
        late.write_all(b"late").await.unwrap();

        proxy.restore();
        tokio::time::timeout(T, s.read_exact(&mut got))
            .await
            .expect("held bytes arrive once restored")
            .unwrap();
        assert_eq!(&got, b"two");
        let mut got = [0u8; 4];
        tokio::time::timeout(T, late.read_exact(&mut got))
            .await
            .expect("the held connection goes through once restored")
            .unwrap();
        assert_eq!(&got, b"late");

        proxy.close();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(T, s.read_to_end(&mut rest))
            .await
            .expect("a close ends the connection");
        assert!(n.is_err() || rest.is_empty(), "{n:?} {rest:?}");
        let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
        let n = tokio::time::timeout(T, refused.read(&mut [0u8; 8]))
            .await
            .expect("a new connection is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        proxy.restore();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"again").await, b"again");
    }
}
