//! Plumbing every devgate binary shares: configuration layering, secrets, logging, shutdown and
//! the health/readiness/metrics HTTP surface. Kept in one place so the three services behave
//! the same way to an operator.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A secret string (auth secret, API token, NATS password). `Debug` and `Display` never show it,
/// so a config dump in a log cannot leak it.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; call sites that need it are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable, not TOML, has unknown keys or wrongly typed values.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// Values parse but do not make sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Builds a typed config from, lowest precedence first: the struct's defaults, an optional TOML
/// file, then `overrides` (the command line, whose flags also read `DEVGATE_*` env vars).
///
/// `C` should be `#[serde(default, deny_unknown_fields)]` so a typo in the file is an error
/// instead of a silently ignored key; `overrides` serializes only the flags that were given.
pub fn load_config<C, O>(file: Option<&Path>, overrides: &O) -> Result<C, ConfigError>
where
    C: DeserializeOwned,
    O: Serialize,
{
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(config::Config::try_from(overrides)?);
    Ok(builder.build()?.try_deserialize()?)
}

/// A configuration that can check itself after parsing (cross-field rules, ranges).
pub trait Validate {
    /// Reports every problem at once, as [`ConfigError::Invalid`].
    fn validate(&self) -> Result<(), ConfigError>;
}

/// [`load_config`], then [`Validate::validate`]: what every binary's `Cli::into_config` does.
pub fn load_validated<C, O>(file: Option<&Path>, overrides: &O) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Validate,
    O: Serialize,
{
    let config: C = load_config(file, overrides)?;
    config.validate()?;
    Ok(config)
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global `tracing` subscriber. `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A token cancelled on SIGTERM or SIGINT: the root of every binary's shutdown tree.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
                        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the process");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        trigger.cancel();
    });
    token
}

/// Answers "is this process ready for traffic?" for `/readyz`; `Err` carries the reason shown.
pub type ReadinessProbe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// `/healthz` (process alive), `/readyz` (ready for traffic) and `/metrics` (Prometheus text).
pub fn ops_router(registry: Arc<Registry>, ready: ReadinessProbe) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { render_metrics(&registry) }
            }),
        )
}

fn render_metrics(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {error}\n"),
        )
            .into_response(),
    }
}

/// Longest a client may take to send a request's headers, counted from when the server starts
/// waiting for a request (on a new connection, and on a keep-alive connection between two):
/// what stops slow or silent clients from holding connections, and file descriptors, before
/// any authentication can run. hyper's own default, which it applies only when given a timer.
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest an HTTP connection may stay open once shutdown has begun, on top of what its server
/// needs to produce a response (nothing for the ops endpoints, which answer at once): ample to
/// write out a response to a client that reads it, while a client that stopped reading (a zero
/// TCP window under an SSE stream or a large response) cannot keep the process from exiting
/// until it is killed. Hyper's graceful shutdown alone waits for the response to be written,
/// however long that takes.
pub const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The time bounds of [`serve_http_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Longest a client may take to send a request's headers ([`HTTP_HEADER_TIMEOUT`]).
    pub header: Duration,
    /// How long after `shutdown` a connection may take to finish the request it is serving
    /// before it is dropped (closed): [`HTTP_DRAIN_TIMEOUT`] for servers whose handlers answer
    /// at once; a server whose requests may wait longer for their answer adds that wait.
    pub drain: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            header: HTTP_HEADER_TIMEOUT,
            drain: HTTP_DRAIN_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, letting in-flight requests finish, with the
/// default [`HttpTimeouts`].
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_http_with(listener, router, shutdown, HttpTimeouts::default()).await
}

/// [`serve_http`] with given time bounds.
///
/// HTTP/1.1 through hyper directly rather than `axum::serve`, which gives hyper no timer, so
/// hyper's header read timeout never fires there. `TCP_NODELAY` is set on every connection: a
/// small response written in two segments would otherwise wait for the client's delayed ACK
/// (~40 ms per request). On `shutdown` the listener closes, each connection finishes the
/// request it is serving (an SSE stream ends on the same signal) and closes; one still open
/// `timeouts.drain` later is dropped, so a client that does not read cannot hold up the exit.
pub async fn serve_http_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
    timeouts: HttpTimeouts,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::{Service, ServiceExt};

    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning, as axum does.
                    tracing::warn!(%error, "accepting an HTTP connection failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an HTTP connection");
        }
        let Ok(service) = make_service.call(remote).await;
        let service = hyper_util::service::TowerToHyperService::new(service.map_request(
            |request: axum::extract::Request<hyper::body::Incoming>| {
                request.map(axum::body::Body::new)
            },
        ));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(timeouts.drain, connection.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => {
                            // Dropping the connection closes the socket and whatever response
                            // it was still writing.
                            let drain_ms =
                                u64::try_from(timeouts.drain.as_millis()).unwrap_or(u64::MAX);
                            tracing::warn!(
                                %remote,
                                drain_ms,
                                "HTTP connection still busy after the shutdown drain; closing it"
                            );
                            return;
                        }
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%remote, %error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An error followed by each of its causes, for logs: "client error (Connect): invalid peer
/// certificate: UnknownIssuer". Client libraries (kube, hyper) keep what an operator needs, a
/// refused TLS handshake or connection, in the source chain, and their `Display` shows only the
/// top ("client error (Connect)"). A cause whose text the message already holds is skipped.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let next = error.to_string();
            if !text.contains(&next) {
                text.push_str(": ");
                text.push_str(&next);
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}
/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the server closes; what was read.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
        let mut text = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut text));
        match read.await {
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("the server kept the connection open for 5 s"),
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    #[tokio::test]
    async fn slow_or_silent_http_clients_are_cut_at_the_header_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/ok", get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        let timeout = Duration::from_millis(300);
        let timeouts = HttpTimeouts {
            header: timeout,
            ..HttpTimeouts::default()
        };
        let server = tokio::spawn(serve_http_with(
            listener,
            router,
            shutdown.clone(),
            timeouts,
        ));

        // Headers that never end (slowloris), and a connection that says nothing.
        let start = tokio::time::Instant::now();
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")
            .await
            .expect("write");
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // A normal request on a keep-alive connection is served, then the idle wait for the
        // next request is bounded the same way.
        let mut normal = tokio::net::TcpStream::connect(addr).await.expect("connect");
        normal
            .write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        for (what, stream) in [("slow", &mut slow), ("silent", &mut silent)] {
            let text = until_closed(stream).await;
            let waited = start.elapsed();
            assert!(waited >= timeout, "{what}: closed after {waited:?}");
            assert!(!text.contains("200 OK"), "{what}: {text}");
        }
        let text = until_closed(&mut normal).await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("ok"), "{text}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .expect("task")
            .expect("serve");
    }

    /// Reads a response head (through the blank line), and nothing of the body.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
            match read.await {
                Ok(Ok(1)) => head.push(byte[0]),
                other => panic!("no complete response head: {other:?}"),
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    #[tokio::test]
    async fn after_shutdown_connections_get_the_drain_period_then_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let started = Arc::new(tokio::sync::Notify::new());
        let release = CancellationToken::new();
        let router = Router::new()
            // A response whose body never ends, as a stream whose client stopped reading never
            // finishes being written.
            .route(
                "/endless",
                get(|| async {
                    axum::body::Body::from_stream(futures::stream::pending::<
                        Result<bytes::Bytes, std::io::Error>,
                    >())
                }),
            )
            .route(
                "/slow",
                get({
                    let (started, release) = (started.clone(), release.clone());
                    move || async move {
                        started.notify_one();
                        release.cancelled().await;
                        "slow"
                    }
                }),
            );
        let shutdown = CancellationToken::new();
        let drain = Duration::from_millis(500);
        let timeouts = HttpTimeouts {
            drain,
            ..HttpTimeouts::default()
        };
        let server = tokio::spawn(serve_http_with(
            listener,
            router,
            shutdown.clone(),
            timeouts,
        ));

        let mut endless = tokio::net::TcpStream::connect(addr).await.expect("connect");
        endless
            .write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let head = read_head(&mut endless).await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        started.notified().await;

        shutdown.cancel();
        let cancelled = tokio::time::Instant::now();
        // A request in flight at shutdown still gets its answer.
        release.cancel();
        let text = until_closed(&mut slow).await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("slow"), "{text}");
        // The response that never ends is cut at the drain bound, and the server stops.
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops despite a response that never ends")
            .expect("task")
            .expect("serve");
        let waited = cancelled.elapsed();
        assert!(waited >= drain, "cut after {waited:?}, before the drain");
        until_closed(&mut endless).await;
    }

    #[derive(Debug, thiserror::Error)]
    enum Layer {
        #[error("client error (Connect)")]
        Connect(#[source] std::io::Error),
        #[error("apply failed: {0}")]
        Repeats(#[source] std::io::Error),
    }

    #[test]
    fn an_error_chain_shows_every_cause_once() {
        let tls = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            ErrorChain(&Layer::Connect(tls)).to_string(),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        // A cause the message already quotes is not repeated.
        let refused = std::io::Error::other("connection refused");
        assert_eq!(
            ErrorChain(&Layer::Repeats(refused)).to_string(),
            "apply failed: connection refused"
        );
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        port: u16,
        name: String,
        secret: Option<Secret>,
    }

    impl Default for Demo {
        fn default() -> Self {
            Demo {
                port: 1,
                name: "default".into(),
                secret: None,
            }
        }
    }

    #[derive(Serialize, Default)]
    struct DemoFlags {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    }

    fn file(text: &str) -> tempfile_path::TempToml {
        tempfile_path::TempToml::new(text)
    }

    /// Tiny temp-file helper so these tests need no extra crate.
    mod tempfile_path {
        pub struct TempToml(pub std::path::PathBuf);
        impl TempToml {
            pub fn new(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "devgate-config-test-{}-{}.toml",
                    std::process::id(),
                    super::unix_ns()
                ));
                std::fs::write(&path, text).expect("write temp config");
                TempToml(path)
            }
        }
        impl Drop for TempToml {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let f = file("port = 5\nname = \"from-file\"\n");
        let c: Demo = load_config(Some(&f.0), &DemoFlags { port: Some(9) }).expect("loads");
        assert_eq!(c.port, 9);
        assert_eq!(c.name, "from-file");
        let c: Demo = load_config(None, &DemoFlags::default()).expect("loads");
        assert_eq!(c, Demo::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let f = file("prot = 5\n");
        let err =
            load_config::<Demo, _>(Some(&f.0), &DemoFlags::default()).expect_err("typo must fail");
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load_config::<Demo, _>(
            Some(Path::new("/nonexistent/devgate.toml")),
            &DemoFlags::default(),
        )
        .expect_err("missing file must fail");
        assert!(err.to_string().contains("devgate.toml"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let f = file("secret = \"hunter2\"\n");
        let c: Demo = load_config(Some(&f.0), &DemoFlags::default()).expect("loads");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(c.secret.as_ref().map(Secret::expose), Some("hunter2"));
    }
}
