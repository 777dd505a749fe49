//! The gateway process: binds its listeners, accepts devices, and shuts down by draining.
//!
//! Shutdown is a tree of cancellation tokens. `shutdown` (SIGTERM) starts the drain: stop
//! accepting, turn unready, tell each device `GOAWAY draining` at a random moment within the
//! drain window so reconnects spread out. `hard_stop` fires when the window (plus a grace
//! period) is over and ends whatever is left.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::DeviceAuth;
use crate::bus::{Bus, BusError};
use crate::codec::{ErrorBody, ErrorCode, Frame, FrameCodec};
use crate::common::{ReadinessProbe, ops_router, serve_http, unix_ms};
use crate::config::Config;
use crate::control;
use crate::denylist::{Denylist, DenylistError};
use crate::log_budget::LogBudget;
use crate::login_limit::LoginLimit;
use crate::metrics::Metrics;
use crate::reclaim;
use crate::registry::{Registry, SessionCommand};
use crate::session;

/// Extra time after the drain window before remaining sessions are cut.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the gateway could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// NATS options are unusable.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A background task panicked.
    #[error("gateway task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The denylist could not be loaded: starting without it would re-admit revoked devices.
    #[error(transparent)]
    Denylist(#[from] DenylistError),
    /// The device TLS files could not be loaded: starting in plaintext instead would expose
    /// every device's token.
    #[error(transparent)]
    DeviceTls(#[from] crate::device_tls::DeviceTlsError),
}

/// State every task of one gateway instance shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) instance: String,
    pub(crate) advertise_addr: String,
    pub(crate) started_ms: u64,
    pub(crate) auth: DeviceAuth,
    pub(crate) codec: FrameCodec,
    pub(crate) bus: Bus,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    /// Device ids refused at login (`denied_devices_file`).
    pub(crate) denylist: Denylist,
    /// TLS the gateway terminates itself (`device_tls_*`); `None`: devices speak plaintext
    /// here (TLS, if any, ends at nginx).
    pub(crate) device_tls: Option<crate::device_tls::DeviceTls>,
    /// Logins per device id in the current window (`max_logins_per_id`).
    pub(crate) login_limit: LoginLimit,
    /// Caps the log lines of refused connections, which an unauthenticated peer can cause at
    /// will: the `errors` metric counts every one, the log shows a sample.
    pub(crate) refusal_logs: LogBudget,
    /// Connections in their handshake (see [`HandshakeSlot`]).
    handshakes: AtomicUsize,
    /// Cancelled when draining starts.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain window is over.
    pub(crate) hard_stop: CancellationToken,
}

impl Shared {
    /// Ready for new devices: NATS is up and we are not draining.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        if self.draining.is_cancelled() {
            Err("draining".into())
        } else if !self.bus.is_connected() {
            Err("NATS not connected".into())
        } else {
            Ok(())
        }
    }
}

/// One of the `max_handshakes` places for a connection that has not logged in yet; freed when
/// dropped (at the end of the HELLO phase, however it ends). Only the accept loop takes slots.
pub(crate) struct HandshakeSlot(Arc<Shared>);

impl HandshakeSlot {
    /// A slot, or `None` when all are taken.
    fn try_acquire(shared: &Arc<Shared>) -> Option<HandshakeSlot> {
        let max = shared.config.max_handshakes;
        shared
            .handshakes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared.metrics.handshakes.inc();
        Some(HandshakeSlot(shared.clone()))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.handshakes.dec();
    }
}

/// A running gateway instance.
pub struct Gateway {
    device_addr: SocketAddr,
    http_addr: SocketAddr,
    instance: String,
    connected: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), GatewayError>>,
}

impl Gateway {
    /// Binds the device and HTTP listeners, connects to NATS (in the background if it is down)
    /// and starts serving. The instance drains and stops when [`Gateway::shutdown`] is called
    /// or `parent` is cancelled.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        Self::start_with(config, CancellationToken::new()).await
    }

    /// Like [`Gateway::start`], stopping when `parent` is cancelled.
    pub async fn start_with(
        config: Config,
        parent: CancellationToken,
    ) -> Result<Gateway, GatewayError> {
        let listener = bind_devices(config.listen, config.listen_backlog).map_err(|source| {
            GatewayError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let http = TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: config.http_listen,
                source,
            })?;
        let device_addr = local_addr(&listener, config.listen);
        let http_addr = local_addr(&http, config.http_listen);
        let instance = config.instance_id();
        let shutdown = parent.child_token();
        let (shared, metrics_registry, denylist_file) =
            build(config, &instance, device_addr).await?;
        let connected = shared.bus.connected_watch();
        let task = tokio::spawn(serve(
            shared,
            metrics_registry,
            denylist_file,
            listener,
            http,
            shutdown.clone(),
        ));
        Ok(Gateway {
            device_addr,
            http_addr,
            instance,
            connected,
            shutdown,
            task,
        })
    }

    /// Where devices connect.
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Waits until the NATS connection is up (the gateway accepts logins only then).
    pub async fn wait_connected(&self) {
        let mut connected = self.connected.clone();
        let _ = connected.wait_for(|up| *up).await;
    }

    /// Waits until the NATS connection is down: tests of outages start from there.
    pub async fn wait_disconnected(&self) {
        let mut connected = self.connected.clone();
        let _ = connected.wait_for(|up| !*up).await;
    }

    /// Drains (GOAWAY to every device over the drain window) and waits until stopped.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// Waits until the gateway stops (after its shutdown token is cancelled).
    pub async fn wait(self) -> Result<(), GatewayError> {
        self.task.await?
    }
}

/// The device listener, with an explicit accept queue (std's default of 128 overflows during
/// reconnect storms).
fn bind_devices(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Runs a gateway until `shutdown` is cancelled: the library entry point `main` calls.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    Gateway::start_with(config, shutdown).await?.wait().await
}

/// The denylist file and the content loaded at start, which its watcher compares against.
type DenylistFile = Option<(PathBuf, Vec<u8>)>;

async fn build(
    config: Config,
    instance: &str,
    device_addr: SocketAddr,
) -> Result<(Arc<Shared>, MetricsRegistry, DenylistFile), GatewayError> {
    let mut registry = MetricsRegistry::default();
    let metrics = Metrics::new(&mut registry);
    let denylist = Denylist::default();
    let denylist_file = match &config.denied_devices_file {
        Some(path) => {
            let (ids, loaded) = crate::denylist::load(path)?;
            metrics.denied_devices.set(ids.len() as i64);
            tracing::info!(instance = %instance, path = %path.display(), denied = ids.len(), "device denylist loaded");
            denylist.replace(ids);
            Some((path.clone(), loaded))
        }
        None => None,
    };
    let device_tls = match config.device_tls_files() {
        Some(files) => {
            let tls = crate::device_tls::DeviceTls::load(files)?;
            metrics
                .tls_certificate_expiry
                .set(i64::try_from(tls.not_after()).unwrap_or(i64::MAX));
            tracing::info!(
                instance = %instance,
                binds_ids = tls.binds_ids(),
                "device TLS terminated by the gateway{}",
                if tls.binds_ids() {
                    "; client certificates must name the device id"
                } else {
                    ""
                }
            );
            Some(tls)
        }
        None => None,
    };
    let hard_stop = CancellationToken::new();
    let bus = Bus::connect(&config, instance, metrics.clone(), hard_stop.clone()).await?;
    let auth = config.device_auth();
    match &auth {
        DeviceAuth::Insecure => tracing::warn!(
            instance = %instance,
            "INSECURE: device authentication is OFF (--insecure-no-auth); any client can log in as any device"
        ),
        DeviceAuth::Hmac {
            previous: Some(_), ..
        } => tracing::warn!(
            instance = %instance,
            "fleet-secret rotation: tokens of the previous secret are still accepted; remove \
             --auth-secret-previous once devgate_gateway_logins_previous_secret_total stops rising"
        ),
        DeviceAuth::Hmac { previous: None, .. } => {}
        DeviceAuth::Certificate => tracing::info!(
            instance = %instance,
            "devices authenticate with a client certificate naming their id (--device-auth \
             certificate); HELLO tokens are ignored"
        ),
    }
    if config.proxy_protocol && config.proxy_trusted_cidrs.is_empty() {
        tracing::warn!(
            instance = %instance,
            "--proxy-protocol trusts a PROXY header from ANY peer: a client that reaches the device \
             port directly can forge its address. Set --proxy-trusted-cidrs to the balancer's \
             addresses (e.g. the pod CIDR)"
        );
    }
    let shared = Arc::new(Shared {
        handshakes: AtomicUsize::new(0),
        advertise_addr: config.advertise_addr(device_addr),
        codec: FrameCodec::new(config.max_frame_len),
        started_ms: unix_ms(),
        instance: instance.to_owned(),
        auth,
        bus,
        registry: Registry::default(),
        metrics,
        denylist,
        device_tls,
        refusal_logs: LogBudget::new(REFUSAL_LOGS_PER_SECOND),
        login_limit: LoginLimit::new(config.max_logins_per_id, config.login_window_s),
        draining: CancellationToken::new(),
        hard_stop,
        config,
    });
    Ok((shared, registry, denylist_file))
}

/// Refused connections logged per second at most (the rest are counted, and the count is
/// logged with the next line): enough to diagnose a misconfigured device, too few for a flood
/// of bad logins to drown the log.
const REFUSAL_LOGS_PER_SECOND: u32 = 20;

async fn serve(
    shared: Arc<Shared>,
    metrics_registry: MetricsRegistry,
    denylist_file: DenylistFile,
    listener: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let probe = shared.clone();
    let ready: ReadinessProbe = Arc::new(move || probe.readiness());
    // Health endpoints stay up while draining (readiness says "draining"), until the very end.
    let http_task = tokio::spawn(serve_http(
        http,
        ops_router(Arc::new(metrics_registry), ready),
        shared.hard_stop.clone(),
    ));
    let control_task = control::spawn(shared.clone());
    let heal = Arc::new(tokio::sync::Notify::new());
    let reclaim_task = reclaim::spawn(shared.clone(), heal.clone());
    let peers_task = crate::peers::spawn(shared.clone(), heal);
    let denylist_task =
        denylist_file.map(|(path, loaded)| crate::denylist::spawn(shared.clone(), path, loaded));
    let device_tls_task = crate::device_tls::spawn(shared.clone());
    tracing::info!(
        instance = %shared.instance,
        advertise_addr = %shared.advertise_addr,
        max_frame_len = shared.codec.max_frame_len(),
        "gateway accepting devices"
    );

    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= shared.config.max_connections {
                        shared.metrics.error(ErrorCode::Overloaded);
                        if shared.device_tls.is_none() {
                            tokio::spawn(refuse_overloaded(stream));
                        }
                        // With TLS the ERROR would cost a handshake, exactly when the gateway
                        // is full: the connection is just closed (dropped).
                        continue;
                    }
                    let Some(slot) = HandshakeSlot::try_acquire(&shared) else {
                        refuse_handshakes_full(&shared, &stream, peer);
                        continue;
                    };
                    let shared = shared.clone();
                    connections.spawn(async move {
                        shared.metrics.connections.inc();
                        session::serve(shared.clone(), stream, peer, slot).await;
                        shared.metrics.connections.dec();
                    });
                }
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning, existing sessions go on.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    drain(&shared, &connections).await;
    let _ = control_task.await;
    let _ = reclaim_task.await;
    let _ = peers_task.await;
    for task in [denylist_task, device_tls_task].into_iter().flatten() {
        let _ = task.await;
    }
    let _ = http_task.await;
    // Last replies and presence events out before the connection closes.
    let _ = shared.bus.link().flush(Duration::from_secs(2)).await;
    shared.bus.link().close();
    tracing::info!(instance = %shared.instance, "gateway stopped");
    Ok(())
}

/// Spreads `GOAWAY draining` over the drain window, then cuts what is left.
async fn drain(shared: &Arc<Shared>, connections: &TaskTracker) {
    shared.draining.cancel();
    let window = Duration::from_millis(shared.config.drain_window_ms);
    let mut targets: Vec<(Duration, _)> = shared
        .registry
        .take_all_commands()
        .into_iter()
        .map(|c| (window.mul_f64(rand::random::<f64>()), c))
        .collect();
    targets.sort_by_key(|(d, _)| *d);
    tracing::info!(
        instance = %shared.instance,
        sessions = targets.len(),
        window_ms = shared.config.drain_window_ms,
        "draining: devices get GOAWAY spread over the window"
    );
    let jitter = shared.config.drain_reconnect_jitter_ms;
    let start = tokio::time::Instant::now();
    let schedule = tokio::spawn(async move {
        for (delay, commands) in targets {
            tokio::time::sleep_until(start + delay).await;
            // An error means the session already ended.
            let _ = commands.send(SessionCommand::Drain {
                reconnect_after_ms: rand::random_range(0..=jitter),
            });
        }
    });
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(window + DRAIN_GRACE) => {
            tracing::warn!(remaining = connections.len(), "drain window over; closing remaining sessions");
        }
    }
    shared.hard_stop.cancel();
    schedule.abort();
    connections.wait().await;
}

/// Policy when `max_handshakes` connections are still in their handshake: the new one is
/// refused at once, with `ERROR overloaded` written only if the socket takes it immediately
/// (it always has room on a fresh connection), and closed when `stream` is dropped. No task,
/// no timer, no buffer: a flood of silent connections costs the gateway nothing beyond the
/// slots it already holds, and the device retries later like after any `overloaded`. With
/// device TLS the connection is only closed: a plaintext ERROR means nothing to a TLS client.
fn refuse_handshakes_full(shared: &Shared, stream: &tokio::net::TcpStream, peer: SocketAddr) {
    shared.metrics.error(ErrorCode::Overloaded);
    shared.metrics.handshakes_refused.inc();
    tracing::debug!(
        instance = %shared.instance,
        remote = %peer,
        max_handshakes = shared.config.max_handshakes,
        "refusing connection: too many handshakes in progress"
    );
    if shared.device_tls.is_some() {
        return;
    }
    let frame = Frame::json(
        Frame::Error,
        &ErrorBody {
            code: ErrorCode::Overloaded,
            message: "gateway has too many connections logging in; reconnect later".into(),
        },
    );
    let mut buf = bytes::BytesMut::new();
    if tokio_util::codec::Encoder::encode(&mut FrameCodec::default(), frame, &mut buf).is_ok() {
        shared
            .metrics
            .frame_out(crate::codec::kind::ERROR, buf.len());
        let _ = stream.try_write(&buf);
    }
}

async fn refuse_overloaded(stream: tokio::net::TcpStream) {
    let mut conn = crate::conn::Conn::new(
        crate::conn::DeviceStream::plain(stream),
        FrameCodec::default(),
        bytes::BytesMut::new(),
    );
    let frame = Frame::json(
        Frame::Error,
        &ErrorBody {
            code: ErrorCode::Overloaded,
            message: "gateway at its connection limit; reconnect later".into(),
        },
    );
    conn.close_with(Some(frame), Duration::from_secs(1)).await;
}
