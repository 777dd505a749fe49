//! devgate bridge-api: the HTTP door for services that cannot speak NATS.
//!
//! Every HTTP call becomes the NATS traffic the gateways already understand (a request on
//! `device.<id>.down`, a control request, a scatter request, a subscription), so bridge-api holds
//! no state of its own and any number of replicas can run side by side. The modules, top-down:
//! [`config`] says what it is told, [`auth`] who may call, [`bus`] how it talks to NATS,
//! [`routes`] what each endpoint does, [`error`] how failures look, [`openapi`] and
//! [`metrics`] how it describes and measures itself.

pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use devgate_gateway::common::{HTTP_DRAIN_TIMEOUT, HttpTimeouts, ReadinessProbe, ops_router};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::ApiAuth;
use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes::tail::TailLimits;

/// What every handler shares: the validated config, the NATS connection, the callers' auth,
/// the metrics, the SSE tail limits and the shutdown token (which ends SSE streams).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// Validated configuration.
    pub config: Config,
    /// The NATS connection.
    pub bus: Bus,
    /// Who may call `/v1`.
    pub auth: ApiAuth,
    /// Metric handles.
    pub metrics: Metrics,
    /// Slots for concurrent SSE tails (`max_tails`, `max_wildcard_tails`).
    pub tails: TailLimits,
    /// Cancelled on shutdown; long-lived responses (SSE) end with it.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Bundles the parts every handler needs.
    pub fn new(config: Config, bus: Bus, shutdown: CancellationToken) -> Self {
        let auth = ApiAuth::new(
            &config.api_tokens,
            &config.api_read_tokens,
            config.insecure_no_auth,
        );
        let tails = TailLimits::new(&config);
        AppState(Arc::new(Shared {
            config,
            bus,
            auth,
            metrics: Metrics::new(),
            tails,
            shutdown,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The documented `/v1` API, before state and cross-cutting layers: the single source of both
/// the routes and the OpenAPI document, so the two cannot disagree.
fn api_routes(config: &Config) -> OpenApiRouter<AppState> {
    let payload = config.max_payload_len();
    // A bulk body carries the payload (base64 grows it by 4/3) plus the ids.
    let bulk_body = config.bulk_body_limit();
    let single = OpenApiRouter::new()
        .routes(routes!(
            routes::messages::send_to_device,
            routes::tail::tail_device
        ))
        .layer(DefaultBodyLimit::max(payload));
    let bulk = OpenApiRouter::new()
        .routes(routes!(routes::messages::send_bulk))
        .layer(DefaultBodyLimit::max(bulk_body));
    OpenApiRouter::with_openapi(openapi::base())
        .merge(single)
        .merge(bulk)
        .routes(routes!(routes::devices::presence))
        .routes(routes!(routes::devices::list_devices))
        .routes(routes!(routes::devices::kick))
        .routes(routes!(routes::gateways::list_gateways))
}

/// The OpenAPI document of the `/v1` API, as served at `/v1/openapi.json` and committed at
/// `bridge-api/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes(&Config::default()).into_openapi()
}

/// The whole HTTP surface: `/v1` behind bearer auth and the request timeout, the public
/// `/v1/openapi.json`, and the unauthenticated `/healthz`, `/readyz`, `/metrics`, all measured
/// and with JSON errors for unknown routes.
pub fn app(state: AppState) -> Router {
    let (api, document) = api_routes(&state.config).split_for_parts();
    // The 405 handler is set before the auth layer so that it is wrapped by it like the routes:
    // a wrong method on a `/v1` route is a 401 to a caller without a token (set after, on the
    // whole router, it would replace the auth-wrapped default fallback of every route and tell
    // anyone which methods exist without asking for a token).
    let api = api
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_token,
        ))
        .with_state(state.clone());
    let document = Arc::new(document);
    let openapi = Router::new().route(
        "/v1/openapi.json",
        axum::routing::get(move || {
            let document = document.clone();
            async move { axum::Json(document.as_ref().clone()) }
        }),
    );
    let bus = state.bus.clone();
    let ready: ReadinessProbe = Arc::new(move || {
        if bus.is_connected() {
            Ok(())
        } else {
            Err("not connected to NATS".to_owned())
        }
    });
    api.merge(openapi)
        .merge(ops_router(state.metrics.registry(), ready))
        .fallback(not_found)
        // For the unauthenticated routes only: the `/v1` ones have theirs behind auth already.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(request.uri().path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// When the current request's time cap runs out, as a request extension: a handler that works
/// in parts (the bulk send) stops in time to answer with what it has, instead of being cut off
/// with a bare 504 after part of the work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDeadline(pub tokio::time::Instant);

/// Caps the time to a response head, so no request can hold a connection for ever whatever its
/// `timeout_ms` (SSE bodies stream on after the head and are not cut).
async fn request_timeout(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let deadline = tokio::time::Instant::now() + state.config.request_timeout();
    request.extensions_mut().insert(RequestDeadline(deadline));
    match tokio::time::timeout_at(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(state.config.request_timeout_ms).into_response(),
    }
}

/// Why bridge-api could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The NATS client could not be set up (bad URL, credentials).
    #[error("NATS: {0}")]
    Nats(#[from] BusError),
}

/// The HTTP server's time bounds. After shutdown a connection may take the request cap plus
/// [`HTTP_DRAIN_TIMEOUT`] to finish: a request waiting for a device's ACK when the signal came
/// still gets its real answer (the cap bounds the wait for it, and the drain writing it out),
/// while a client that stopped reading a tail or a large response is cut then instead of
/// holding the process until it is killed.
fn http_timeouts(config: &Config) -> HttpTimeouts {
    HttpTimeouts {
        drain: config.request_timeout() + HTTP_DRAIN_TIMEOUT,
        ..HttpTimeouts::default()
    }
}

/// A running bridge-api: its bound address and the task serving it.
pub struct BridgeApi {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl BridgeApi {
    /// Connects to NATS (in the background if the server is not up yet), binds the listener and
    /// starts serving until `shutdown` is cancelled.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let bus = Bus::connect(&config, shutdown.clone()).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(%addr, nats_url = %config.nats_url, "bridge-api listening");
        let timeouts = http_timeouts(&config);
        let router = app(AppState::new(config, bus, shutdown.clone()));
        let task = tokio::spawn(devgate_gateway::common::serve_http_with(
            listener, router, shutdown, timeouts,
        ));
        Ok(BridgeApi { addr, task })
    }

    /// The bound HTTP address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the server has shut down and every in-flight request has finished.
    pub async fn wait(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }
}

/// Runs bridge-api until `shutdown` is cancelled, then lets in-flight requests finish.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let server = BridgeApi::start(config, shutdown).await?;
    server.wait().await.map_err(RunError::Serve)
}

/// Why [`run`] ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Start-up failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Serving failed.
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}
