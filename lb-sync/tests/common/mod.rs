//! Helpers shared by lb-sync's integration tests: stand-in gateways that say who they are, a
//! minimal HTTP GET, and polling with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A stand-in gateway: greets every connection with its name, then echoes lines.
pub struct EchoGateway {
    /// Its name (what a connection through nginx reads first).
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl EchoGateway {
    /// Listens on a free loopback port.
    pub async fn start(name: &str) -> EchoGateway {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo gateway");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let name_owned = name.to_owned();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = tokio::select! {
                    _ = token.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let name = name_owned.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    if sock
                        .write_all(format!("{name}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (r, mut w) = sock.split();
                    let mut lines = BufReader::new(r).lines();
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => break,
                            line = lines.next_line() => match line {
                                Ok(Some(l)) => {
                                    if w.write_all(format!("{name}:{l}\n").as_bytes()).await.is_err() {
                                        break;
                                    }
                                }
                                _ => break,
                            },
                        }
                    }
                });
            }
        });
        EchoGateway {
            name: name.to_owned(),
            addr,
            stop,
        }
    }

    /// Stops listening and closes its connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for EchoGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connection through nginx to some gateway.
pub struct Device {
    /// The gateway's name, or `None` when nginx had no server for it.
    pub gateway: Option<String>,
    lines: tokio::io::Lines<BufReader<TcpStream>>,
}

impl Device {
    /// Connects to `addr` and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> Device {
        let sock = TcpStream::connect(addr)
            .await
            .expect("connect through nginx");
        let mut lines = BufReader::new(sock).lines();
        let gateway = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        Device { gateway, lines }
    }

    /// Sends a line and returns the echo.
    pub async fn echo(&mut self, text: &str) -> Option<String> {
        self.lines
            .get_mut()
            .get_mut()
            .write_all(format!("{text}\n").as_bytes())
            .await
            .ok()?;
        tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
            .await
            .ok()?
            .ok()?
    }
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` on `addr`: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(addr).await.expect("connect ops port");
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send request");
    let mut raw = String::new();
    sock.read_to_string(&mut raw).await.expect("read response");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
