//! Helpers shared by lb-sync's integration tests: stand-in gateways that say who they are, a
//! minimal HTTP GET, polling with a deadline, and the file-sink configuration for a test nginx.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use devgate_lb_sync::config::{Config, SinkKind};
use devgate_tests::nginx::Nginx;
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

/// lb-sync writing `nginx`'s include, validating and reloading it with nginx's own commands,
/// with short pacing for tests; devices in plaintext unless a test sets TLS.
pub fn file_config(nginx: &Nginx) -> Config {
    Config {
        sink: SinkKind::File,
        listen: nginx.addr(),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        output: Some(nginx.upstream_path()),
        validate_cmd: nginx.validate_cmd(),
        reload_cmd: nginx.reload_cmd(),
        debounce_ms: 50,
        min_reload_interval_ms: 200,
        insecure_plaintext: true,
        ..Config::default()
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

/// What a fake gateway announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ready: true, draining: false` every heartbeat.
    Ready,
    /// `draining: true` every heartbeat (a gateway shutting down).
    Draining,
    /// Nothing: the instance died without a word.
    Silent,
}

/// Publishes a gateway's `Announce` heartbeat on NATS, as the real gateway does.
pub struct Announcer {
    mode: tokio::sync::watch::Sender<Mode>,
}

impl Announcer {
    /// Announces `instance` at `addr` every `heartbeat_ms`.
    pub fn start(
        client: async_nats::Client,
        instance: &str,
        addr: SocketAddr,
        heartbeat_ms: u64,
    ) -> Announcer {
        let (mode, mut rx) = tokio::sync::watch::channel(Mode::Ready);
        let instance = instance.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(heartbeat_ms));
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                }
                let m = *rx.borrow_and_update();
                if m == Mode::Silent {
                    continue;
                }
                let a = devgate_gateway::contract::Announce {
                    instance: instance.clone(),
                    advertise_addr: addr.to_string(),
                    ready: m == Mode::Ready,
                    draining: m == Mode::Draining,
                    sessions: 0,
                    heartbeat_ms,
                    started_ms: 1,
                    stopped: false,
                    seq: 0,
                    conn: 0,
                    conn_seq: 0,
                };
                let body = serde_json::to_vec(&a).expect("announce serializes");
                let _ = client
                    .publish(devgate_gateway::contract::subjects::ANNOUNCE, body.into())
                    .await;
            }
        });
        Announcer { mode }
    }

    /// Changes what is announced from now on.
    pub fn set(&self, mode: Mode) {
        let _ = self.mode.send(mode);
    }
}

/// A NATS client that retries every 50 ms, so fake gateways come back as soon as NATS does.
pub async fn eager_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(url)
        .await
        .expect("nats client")
}

/// The text of the file nginx includes.
pub fn upstream(nginx: &devgate_tests::nginx::Nginx) -> String {
    std::fs::read_to_string(nginx.upstream_path()).unwrap_or_default()
}

/// Whether `text` has `addr` as an upstream server.
pub fn has_server(text: &str, addr: SocketAddr) -> bool {
    text.contains(&format!("server {addr} "))
}

/// Opens `n` connections through nginx at once and returns the gateway names they reached.
pub async fn spread(addr: SocketAddr, n: usize) -> Vec<Option<String>> {
    let mut devices = Vec::new();
    for _ in 0..n {
        devices.push(Device::connect(addr).await);
    }
    devices.into_iter().map(|d| d.gateway).collect()
}

/// A counter's value from lb-sync's `/metrics`.
pub async fn metric(ops: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(ops, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until lb-sync has run at least `min` reloads and nginx has logged as many, and
/// returns that number (nginx -s reload only signals; the master reconfigures a moment later).
pub async fn settled_reloads(
    ops: SocketAddr,
    nginx: &devgate_tests::nginx::Nginx,
    min: usize,
) -> usize {
    wait_for(
        Duration::from_secs(10),
        "nginx to catch up with lb-sync's reloads",
        || async {
            let ran = metric(ops, "devgate_lb_sync_reloads_total").await? as usize;
            (ran >= min && nginx.reloads() == ran).then_some(ran)
        },
    )
    .await
}
