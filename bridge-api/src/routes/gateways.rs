//! `GET /v1/gateways`: the live gateway instances, asked at request time with the
//! `devgate.gateways.stats` scatter request.

use axum::Json;
use axum::extract::State;
use devgate_gateway::contract::GatewayStats;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::routes::bus_error;

/// One live gateway instance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GatewayInfo {
    /// Instance id.
    pub instance: String,
    /// Where devices reach it.
    pub advertise_addr: String,
    /// Taking new devices.
    pub ready: bool,
    /// Shutting down.
    pub draining: bool,
    /// Live device sessions.
    pub sessions: u64,
    /// Process start, milliseconds since the Unix epoch.
    pub started_ms: u64,
}

impl From<GatewayStats> for GatewayInfo {
    fn from(s: GatewayStats) -> Self {
        GatewayInfo {
            instance: s.instance,
            advertise_addr: s.advertise_addr,
            ready: s.ready,
            draining: s.draining,
            sessions: s.sessions,
            started_ms: s.started_ms,
        }
    }
}

/// The gateway instances that answered, sorted by instance id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GatewayList {
    /// Instances that answered.
    pub count: usize,
    /// Sum of their sessions.
    pub sessions: u64,
    /// The instances.
    pub gateways: Vec<GatewayInfo>,
    /// Instances that announced themselves recently but did not answer within the scatter
    /// window, sorted: without them the list would pass for the whole fleet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable_gateways: Vec<String>,
}

/// Lists the live gateway instances with their session counts.
#[utoipa::path(
    get,
    path = "/v1/gateways",
    tag = "gateways",
    responses(
        (status = 200, description = "Instances that answered within the scatter window, and those announced that did not", body = GatewayList),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected NATS failure", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`request_timeout`: the request exceeded --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn list_gateways(State(state): State<AppState>) -> Result<Json<GatewayList>, ApiError> {
    let scatter = state
        .bus
        .gateway_stats(state.config.scatter_window())
        .await
        .map_err(bus_error)?;
    let gateways: Vec<GatewayInfo> = scatter
        .answered
        .into_iter()
        .map(GatewayInfo::from)
        .collect();
    Ok(Json(GatewayList {
        count: gateways.len(),
        sessions: gateways.iter().map(|g| g.sessions).sum(),
        gateways,
        unavailable_gateways: scatter.silent,
    }))
}
