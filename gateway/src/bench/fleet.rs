//! Simulated devices in one process: the load generator's workhorse.
//!
//! A [`Fleet`] opens device connections (devgate protocol v1 or MQTT 3.1.1 for the peer) from
//! one source address, logs them in, keeps them alive, reconnects them when the server goes
//! away, records downlink latency from the timestamp the publisher put in each payload, and on
//! command makes a subset of its devices send uplink as fast as the server takes it.
//!
//! The orchestrator drives fleets with [`Command`]s and gets [`Reply`]s: in-process for smoke
//! tests, or over a child process's stdin/stdout (one JSON line each way) so the load spreads
//! over several processes, each under the per-process open-file cap and on its own source
//! address.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

use crate::auth::device_token;
use crate::bench::hist::{Histogram, Sparse};
use crate::bench::mqtt;
use crate::bus::tls::TlsFiles;
use crate::client::DeviceTls;
use crate::codec::{Frame, FrameCodec, Hello, Welcome};
use crate::common::{Secret, unix_ns};

/// Which server the devices talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// devgate protocol v1.
    Devgate,
    /// MQTT 3.1.1: each device subscribes to `device/<id>/down`.
    Mqtt,
}

/// How one fleet connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetConfig {
    /// Protocol spoken.
    pub protocol: Protocol,
    /// Server address.
    pub addr: SocketAddr,
    /// Source address to bind before connecting (spreads ports over several loopback IPs).
    pub source_ip: Option<IpAddr>,
    /// Device ids are this prefix followed by a number.
    pub id_prefix: String,
    /// Number of the first device.
    pub first: usize,
    /// Fleet secret for devgate tokens (`None`: the gateway runs without auth).
    pub auth_secret: Option<Secret>,
    /// Logins in flight at once.
    pub connect_concurrency: usize,
    /// PING (devgate) / PINGREQ (MQTT) period.
    pub ping_s: u64,
    /// TLS to the address (a balancer that terminates it); `None`: plaintext.
    #[serde(default)]
    pub tls: Option<FleetTls>,
}

/// TLS settings of a fleet: what each device trusts and checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetTls {
    /// PEM CA bundle that signs the balancer's certificate.
    pub ca: PathBuf,
    /// Name to check the certificate against.
    pub server_name: String,
    /// Resume TLS sessions from the fleet's shared cache (a device reconnecting with a
    /// ticket); `false`: every login is a full handshake.
    #[serde(default)]
    pub resume: bool,
}

/// What the orchestrator asks of a fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Connect `n` more devices (fresh ids) and answer when every login finished or failed.
    Connect {
        /// How many.
        n: usize,
    },
    /// Close every connection and forget the devices.
    Disconnect,
    /// Answer once every device is connected again (after a server restart), or at the timeout.
    WaitAll {
        /// Give up after this long.
        timeout_ms: u64,
    },
    /// Current counters.
    Counters,
    /// Counters plus the downlink latency histogram; `reset` empties the histogram.
    Stats {
        /// Empty the histogram after reading it.
        reset: bool,
    },
    /// The first `devices` devices send UP as fast as the server takes it for `duration_ms`.
    Uplink {
        /// How many devices send.
        devices: usize,
        /// For how long.
        duration_ms: u64,
        /// Ask for acknowledgements (devgate `seq != 0`, MQTT QoS 1).
        acked: bool,
        /// Payload size (at least 8: the timestamp).
        payload_len: usize,
        /// Unacknowledged messages per device when `acked`.
        window: usize,
    },
    /// Stop the worker process.
    Quit,
}

/// Monotonic counters of a fleet.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Devices connected right now.
    pub connected: usize,
    /// Successful logins (first connections and reconnects).
    pub logins: u64,
    /// Reconnects after the server went away.
    pub reconnects: u64,
    /// Downlink messages received.
    pub downs: u64,
    /// UP / PUBLISH messages sent.
    pub ups_sent: u64,
    /// Acknowledgements received for them.
    pub up_acks: u64,
}

impl Counters {
    /// Sums counters of several fleets.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Counters>) -> Counters {
        all.into_iter().fold(Counters::default(), |a, b| Counters {
            connected: a.connected + b.connected,
            logins: a.logins + b.logins,
            reconnects: a.reconnects + b.reconnects,
            downs: a.downs + b.downs,
            ups_sent: a.ups_sent + b.ups_sent,
            up_acks: a.up_acks + b.up_acks,
        })
    }
}

/// What a fleet answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `Connect` finished.
    Connected {
        /// Logins that succeeded.
        ok: usize,
        /// Devices that could not log in (after retries).
        failed: usize,
        /// Wall time of the whole batch.
        elapsed_ms: f64,
        /// The first failure, for the report.
        first_error: Option<String>,
    },
    /// `Disconnect` finished.
    Disconnected,
    /// `WaitAll` finished.
    AllConnected {
        /// Connected at the end.
        connected: usize,
        /// Devices this fleet holds.
        target: usize,
        /// Time waited.
        elapsed_ms: f64,
    },
    /// `Counters`.
    Counters(Counters),
    /// `Stats`.
    Stats {
        /// Counters.
        counters: Counters,
        /// Downlink latency (payload timestamp to receipt), nanoseconds.
        latency: Sparse,
    },
    /// `Uplink` finished.
    UplinkDone(Counters),
    /// `Quit`.
    Bye,
    /// The command could not be carried out.
    Error {
        /// Why.
        message: String,
    },
}

/// Uplink instructions broadcast to the device tasks.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    until: Option<Instant>,
    devices: usize,
    acked: bool,
    payload_len: usize,
    window: usize,
}

impl Mode {
    fn sending(&self, index: usize) -> bool {
        index < self.devices && self.until.is_some_and(|u| Instant::now() < u)
    }
}

#[derive(Default)]
struct Stats {
    connected: AtomicUsize,
    logins: AtomicU64,
    reconnects: AtomicU64,
    downs: AtomicU64,
    ups_sent: AtomicU64,
    up_acks: AtomicU64,
    latency: Histogram,
}

impl Stats {
    fn counters(&self) -> Counters {
        Counters {
            connected: self.connected.load(Ordering::Relaxed),
            logins: self.logins.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            downs: self.downs.load(Ordering::Relaxed),
            ups_sent: self.ups_sent.load(Ordering::Relaxed),
            up_acks: self.up_acks.load(Ordering::Relaxed),
        }
    }

    /// A received payload whose first 8 bytes are the publisher's wall-clock nanoseconds.
    fn down(&self, payload: &[u8]) {
        self.downs.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = stamp(payload) {
            self.latency.record(unix_ns().saturating_sub(sent));
        }
    }
}

/// Reads the send timestamp from the front of a payload.
pub fn stamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

/// A payload of `len` bytes (at least 8) starting with the current wall-clock nanoseconds.
pub fn stamped(len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(8));
    b.put_u64(unix_ns());
    b.resize(len.max(8), 0);
    b.freeze()
}

/// Devices of one process.
pub struct Fleet {
    config: FleetConfig,
    stats: Arc<Stats>,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
    next_id: usize,
    alive: usize,
    connect_limit: Arc<Semaphore>,
    /// The TLS client built once from `config.tls`, or why it could not be.
    tls: Result<Option<Arc<DeviceTls>>, String>,
}

/// Why a device's connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("server closed the connection")]
    Closed,
}

impl From<crate::codec::CodecError> for LinkError {
    fn from(e: crate::codec::CodecError) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

impl From<mqtt::MqttError> for LinkError {
    fn from(e: mqtt::MqttError) -> Self {
        LinkError::Protocol(e.to_string())
    }
}

impl Fleet {
    /// An empty fleet.
    pub fn new(config: FleetConfig) -> Self {
        let connect_limit = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
        let tls = config
            .tls
            .as_ref()
            .map(|t| {
                let files = TlsFiles {
                    ca: Some(t.ca.clone()),
                    client: None,
                };
                DeviceTls::new(&files, &t.server_name).map(|tls| {
                    Arc::new(if t.resume {
                        tls
                    } else {
                        tls.without_resumption()
                    })
                })
            })
            .transpose()
            .map_err(|e| e.to_string());
        Fleet {
            tls,
            next_id: config.first,
            config,
            stats: Arc::new(Stats::default()),
            mode: watch::channel(Mode::default()).0,
            stop: CancellationToken::new(),
            alive: 0,
            connect_limit,
        }
    }

    /// Carries out one command.
    pub async fn handle(&mut self, command: Command) -> Reply {
        match command {
            Command::Connect { n } => self.connect(n).await,
            Command::Disconnect => {
                self.stop.cancel();
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.stats.connected.load(Ordering::Relaxed) > 0 && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                self.stop = CancellationToken::new();
                self.alive = 0;
                Reply::Disconnected
            }
            Command::WaitAll { timeout_ms } => {
                let start = Instant::now();
                let deadline = start + Duration::from_millis(timeout_ms);
                loop {
                    let connected = self.stats.connected.load(Ordering::Relaxed);
                    if connected >= self.alive || Instant::now() >= deadline {
                        return Reply::AllConnected {
                            connected,
                            target: self.alive,
                            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Command::Counters => Reply::Counters(self.stats.counters()),
            Command::Stats { reset } => Reply::Stats {
                counters: self.stats.counters(),
                latency: self.stats.latency.snapshot(reset),
            },
            Command::Uplink {
                devices,
                duration_ms,
                acked,
                payload_len,
                window,
            } => {
                let duration = Duration::from_millis(duration_ms);
                self.mode.send_replace(Mode {
                    until: Some(Instant::now() + duration),
                    devices,
                    acked,
                    payload_len: payload_len.max(8),
                    window: window.max(1),
                });
                tokio::time::sleep(duration).await;
                self.mode.send_replace(Mode::default());
                Reply::UplinkDone(self.stats.counters())
            }
            Command::Quit => {
                self.stop.cancel();
                Reply::Bye
            }
        }
    }

    async fn connect(&mut self, n: usize) -> Reply {
        let start = Instant::now();
        let tls = match &self.tls {
            Ok(tls) => tls.clone(),
            Err(e) => {
                return Reply::Connected {
                    ok: 0,
                    failed: n,
                    elapsed_ms: 0.0,
                    first_error: Some(format!("TLS settings: {e}")),
                };
            }
        };
        let mut firsts = Vec::with_capacity(n);
        for _ in 0..n {
            let id = format!("{}{}", self.config.id_prefix, self.next_id);
            let index = self.alive + firsts.len();
            self.next_id += 1;
            let (tx, rx) = oneshot::channel();
            firsts.push(rx);
            let device = Device {
                token: self
                    .config
                    .auth_secret
                    .as_ref()
                    .map(|s| device_token(s, &id))
                    .unwrap_or_default(),
                id,
                index,
                config: self.config.clone(),
                tls: tls.clone(),
                stats: self.stats.clone(),
                mode: self.mode.subscribe(),
                stop: self.stop.clone(),
            };
            tokio::spawn(device.run(tx, self.connect_limit.clone()));
        }
        let (mut ok, mut failed, mut first_error) = (0, 0, None);
        for rx in firsts {
            match rx.await {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                Err(_) => failed += 1,
            }
        }
        self.alive += ok;
        Reply::Connected {
            ok,
            failed,
            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
            first_error,
        }
    }
}

/// One simulated device.
struct Device {
    id: String,
    token: String,
    index: usize,
    config: FleetConfig,
    tls: Option<Arc<DeviceTls>>,
    stats: Arc<Stats>,
    mode: watch::Receiver<Mode>,
    stop: CancellationToken,
}

/// Socket send buffer of a simulated device (Linux doubles it for bookkeeping).
///
/// An unacknowledged uplink flood writes as fast as the kernel accepts. With the default
/// autotuned buffer (up to `tcp_wmem` max, 4 MiB) 100 flooding devices parked ~280 MB of UP
/// frames in their sockets: the server was still reading them 20 s after the run ended, loading
/// the next phase, and a device's own ACKs and PINGs queued behind them (one TCP stream), so
/// `ack=device` requests through bridge-api timed out. A real device has a small buffer; this
/// one still holds hundreds of frames, enough to keep any server saturated.
const DEVICE_SEND_BUFFER: u32 = 32 * 1024;

/// First-login attempts before a device counts as failed.
const FIRST_LOGIN_ATTEMPTS: u32 = 5;

impl Device {
    async fn run(mut self, first: oneshot::Sender<Result<(), String>>, limit: Arc<Semaphore>) {
        let mut first = Some((first, limit.acquire_owned().await.ok()));
        let mut attempts = 0;
        loop {
            let login = tokio::select! {
                r = self.login() => r,
                () = self.stop.cancelled() => return,
            };
            match login {
                Ok(link) => {
                    match first.take() {
                        Some((tx, permit)) => {
                            drop(permit);
                            let _ = tx.send(Ok(()));
                        }
                        None => {
                            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.stats.logins.fetch_add(1, Ordering::Relaxed);
                    self.stats.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = self.session(link).await;
                    self.stats.connected.fetch_sub(1, Ordering::Relaxed);
                    attempts = 0;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts >= FIRST_LOGIN_ATTEMPTS
                        && let Some((tx, _)) = first.take()
                    {
                        let _ = tx.send(Err(format!("{}: {e}", self.id)));
                        return;
                    }
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            // Reconnect quickly but spread out, like a well-behaved device fleet.
            let backoff = Duration::from_millis(
                rand::random_range(20..=100) * u64::from(attempts.clamp(1, 10)),
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    async fn open(&self) -> std::io::Result<TcpStream> {
        let socket = match self.config.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.config.source_ip {
            bind_source(&socket, ip)?;
        }
        socket.set_send_buffer_size(DEVICE_SEND_BUFFER)?;
        let stream = socket.connect(self.config.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn login(&self) -> Result<Link, LinkError> {
        let stream = self.open().await?;
        let (rd, wr): (
            Box<dyn AsyncRead + Unpin + Send>,
            Box<dyn AsyncWrite + Unpin + Send>,
        ) = match &self.tls {
            None => {
                let (rd, wr) = stream.into_split();
                (Box::new(rd), Box::new(wr))
            }
            Some(tls) => {
                let io = tls
                    .wrap(stream)
                    .await
                    .map_err(|e| LinkError::Protocol(e.to_string()))?;
                let (rd, wr) = tokio::io::split(io);
                (Box::new(rd), Box::new(wr))
            }
        };
        let mut link = Link {
            rd,
            wr,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        };
        let login = async {
            match self.config.protocol {
                Protocol::Devgate => {
                    let hello = Hello {
                        device_id: self.id.clone(),
                        token: self.token.clone(),
                        metadata: Default::default(),
                    };
                    FrameCodec::default()
                        .encode(Frame::json(Frame::Hello, &hello), &mut link.wbuf)?;
                    link.flush().await?;
                    match link.read_frame().await? {
                        Frame::Welcome(body) => {
                            let _: Welcome = serde_json::from_slice(&body)
                                .map_err(|e| LinkError::Protocol(e.to_string()))?;
                            Ok(())
                        }
                        other => Err(LinkError::Protocol(format!(
                            "expected WELCOME, got {} {}",
                            other.name(),
                            String::from_utf8_lossy(match &other {
                                Frame::Error(b) | Frame::GoAway(b) => b,
                                _ => &[][..],
                            })
                        ))),
                    }
                }
                Protocol::Mqtt => {
                    mqtt::connect(
                        &mut link.wbuf,
                        &self.id,
                        (self.config.ping_s * 2).min(65_535) as u16,
                    );
                    mqtt::subscribe(&mut link.wbuf, 1, &format!("device/{}/down", self.id), 0);
                    link.flush().await?;
                    match link.read_packet().await? {
                        mqtt::Packet::ConnAck(0) => {}
                        mqtt::Packet::ConnAck(code) => {
                            return Err(mqtt::MqttError::Refused(code).into());
                        }
                        other => {
                            return Err(LinkError::Protocol(format!(
                                "expected CONNACK, got {other:?}"
                            )));
                        }
                    }
                    match link.read_packet().await? {
                        mqtt::Packet::SubAck(_) => Ok(()),
                        other => Err(LinkError::Protocol(format!(
                            "expected SUBACK, got {other:?}"
                        ))),
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), login)
            .await
            .map_err(|_| LinkError::Protocol("login timed out".into()))??;
        Ok(link)
    }

    /// Runs a logged-in connection until it ends or the fleet stops.
    async fn session(&mut self, mut link: Link) -> Result<(), LinkError> {
        let period = Duration::from_secs(self.config.ping_s.max(1));
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        let mut mode = *self.mode.borrow_and_update();
        let mut inflight = 0usize;
        let mut seq = 0u32;
        let topic_up = format!("device/{}/up", self.id).into_bytes();
        let mut codec = FrameCodec::default();
        loop {
            let sending = mode.sending(self.index) && (!mode.acked || inflight < mode.window);
            if link.rbuf.capacity() - link.rbuf.len() < 1024 {
                link.rbuf.reserve(8192);
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return Ok(()),
                r = link.rd.read_buf(&mut link.rbuf) => {
                    if r? == 0 {
                        return Err(LinkError::Closed);
                    }
                    match self.config.protocol {
                        Protocol::Devgate => {
                            while let Some(frame) = codec.decode(&mut link.rbuf)? {
                                match frame {
                                    Frame::Down { seq, payload } => {
                                        self.stats.down(&payload);
                                        if seq != 0 {
                                            codec.encode(Frame::Ack(seq), &mut link.wbuf)?;
                                        }
                                    }
                                    Frame::Ack(_) => {
                                        inflight = inflight.saturating_sub(1);
                                        self.stats.up_acks.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Frame::Pong(_) => {}
                                    other => return Err(LinkError::Protocol(format!("{} from the gateway", other.name()))),
                                }
                            }
                        }
                        Protocol::Mqtt => {
                            while let Some(packet) = mqtt::decode(&mut link.rbuf)? {
                                match packet {
                                    mqtt::Packet::Publish { payload, pid, .. } => {
                                        self.stats.down(&payload);
                                        if let Some(pid) = pid {
                                            mqtt::puback(&mut link.wbuf, pid);
                                        }
                                    }
                                    mqtt::Packet::PubAck(_) => {
                                        inflight = inflight.saturating_sub(1);
                                        self.stats.up_acks.fetch_add(1, Ordering::Relaxed);
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ = ping.tick() => match self.config.protocol {
                    Protocol::Devgate => codec.encode(Frame::Ping(Bytes::new()), &mut link.wbuf)?,
                    Protocol::Mqtt => mqtt::pingreq(&mut link.wbuf),
                },
                changed = self.mode.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    mode = *self.mode.borrow_and_update();
                }
                () = std::future::ready(()), if sending => {
                    // A batch per turn: big writes keep the generator off the critical path.
                    let room = if mode.acked { mode.window - inflight } else { 64 };
                    for _ in 0..room.min(64) {
                        let payload = stamped(mode.payload_len);
                        let ack_id = if mode.acked {
                            seq = seq.wrapping_add(1).max(1);
                            inflight += 1;
                            Some(seq)
                        } else {
                            None
                        };
                        match self.config.protocol {
                            Protocol::Devgate => codec.encode(
                                Frame::Up { seq: ack_id.unwrap_or(0), payload },
                                &mut link.wbuf,
                            )?,
                            Protocol::Mqtt => mqtt::publish(
                                &mut link.wbuf,
                                &topic_up,
                                ack_id.map(|s| (s % 65_535 + 1) as u16),
                                &payload,
                            ),
                        }
                    }
                    self.stats.ups_sent.fetch_add(room.min(64) as u64, Ordering::Relaxed);
                }
            }
            link.flush().await?;
        }
    }
}

/// A device connection's halves (plain TCP or TLS) and buffers.
struct Link {
    rd: Box<dyn AsyncRead + Unpin + Send>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Link {
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.wr.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            // Over TLS, `write_all` can leave records in the TLS layer when the socket is
            // full; they would wait there for the next write (a ping, 15 s later), so a run's
            // last messages would seem lost. A no-op for plain TCP.
            self.wr.flush().await?;
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), LinkError> {
        self.rbuf.reserve(4096);
        if self.rd.read_buf(&mut self.rbuf).await? == 0 {
            return Err(LinkError::Closed);
        }
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<Frame, LinkError> {
        let mut codec = FrameCodec::default();
        loop {
            if let Some(frame) = codec.decode(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    async fn read_packet(&mut self) -> Result<mqtt::Packet, LinkError> {
        loop {
            if let Some(packet) = mqtt::decode(&mut self.rbuf)? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }
}

/// Binds `socket` to a source address with the port left to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`): a port bound at `bind` time must be free for *every*
/// destination, so one source address would run out after ~28k sockets; chosen at connect time
/// it only has to be unique per 4-tuple.
pub fn bind_source(socket: &TcpSocket, ip: std::net::IpAddr) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)?;
    socket.bind(SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn source_binding_leaves_the_port_to_connect() {
        let socket = TcpSocket::new_v4().expect("socket");
        bind_source(&socket, "127.0.0.1".parse().expect("ip")).expect("bind");
        let set =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .expect("getsockopt");
        assert!(set, "IP_BIND_ADDRESS_NO_PORT is on");
        let port = socket.local_addr().expect("addr").port();
        assert_eq!(port, 0, "no port reserved at bind time");
    }
}
