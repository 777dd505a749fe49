//! Devices: presence (`GET /v1/devices/{id}`), the online list (`GET /v1/devices`) and
//! disconnecting (`DELETE /v1/devices/{id}/session`).
//!
//! Presence and kick are control requests on `device.<id>.down`, answered by the holding
//! gateway itself, so there is no second registry that could go stale. The list is gathered
//! from every live instance at request time.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use base64::Engine;
use bytes::Bytes;
use devgate_gateway::contract::{
    DeviceId, KickReply, MAX_SESSION_PAGE, PresenceInfo, SessionList, SessionListRequest, headers,
    subjects,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::bus::{BusError, ControlReply};
use crate::error::{ApiError, ErrorBody};
use crate::routes::{bus_error, device_error, device_id};

/// Presence of one device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Presence {
    /// The device.
    pub device_id: String,
    /// Whether a gateway holds the device right now.
    pub online: bool,
    /// Holding gateway instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Holding session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// When the session started, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// The device's address as the gateway sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// Extra HELLO fields the device sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Tells whether a device is online, and where.
#[utoipa::path(
    get,
    path = "/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "Presence (`online: false` when no gateway holds the device)", body = Presence),
        (status = 400, description = "Bad device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected NATS failure", body = ErrorBody),
        (status = 502, description = "`bad_gateway_reply`: the holder's answer does not follow the contract", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`: the holder did not answer, or `request_timeout`: the request exceeded --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn presence(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Presence>, ApiError> {
    let Path(id) = id?;
    let device = device_id(&id)?;
    let reply = state
        .bus
        .request_control::<PresenceInfo>(
            subjects::down(&device),
            headers::control(subjects::ControlOp::Presence),
            state.config.default_timeout(),
        )
        .await;
    match reply {
        Ok(ControlReply::Answered(info)) => Ok(Json(Presence {
            device_id: info.device_id.to_string(),
            online: true,
            gateway: Some(info.gateway),
            session: Some(info.session),
            since_ms: Some(info.since_ms),
            remote_addr: Some(info.remote_addr),
            metadata: Some(info.metadata),
        })),
        // Nobody holds the device, or its session ended with this request still queued: either
        // way no gateway holds it now, and a disconnect racing the question is not a failure.
        Ok(ControlReply::SessionClosed) | Err(BusError::NoResponders) => Ok(Json(Presence {
            device_id: device.to_string(),
            online: false,
            gateway: None,
            session: None,
            since_ms: None,
            remote_addr: None,
            metadata: None,
        })),
        Err(e) => Err(bus_error(e)),
    }
}

/// Answer of a kick.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Kicked {
    /// Always `kicked`.
    pub status: String,
    /// Gateway instance that held the device.
    pub gateway: String,
    /// Session that was closed.
    pub session: String,
}

/// Disconnects a device: its gateway sends `GOAWAY kicked` and closes the session. The device
/// may reconnect; revoke its credentials to keep it out.
#[utoipa::path(
    delete,
    path = "/v1/devices/{id}/session",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The session was closed", body = Kicked),
        (status = 400, description = "Bad device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "`forbidden`: a read-only token (--api-read-token) may only GET", body = ErrorBody),
        (status = 404, description = "`device_offline`", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected NATS failure", body = ErrorBody),
        (status = 502, description = "`bad_gateway_reply`: the holder's answer does not follow the contract", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`: the holder did not answer, or `request_timeout`: the request exceeded --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn kick(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Kicked>, ApiError> {
    let Path(id) = id?;
    let device = device_id(&id)?;
    let reply = state
        .bus
        .request_control::<KickReply>(
            subjects::down(&device),
            headers::control(subjects::ControlOp::Kick),
            state.config.default_timeout(),
        )
        .await
        .map_err(|e| device_error(e, &device))?;
    let reply = match reply {
        ControlReply::Answered(reply) => reply,
        // The session was gone before it could act on the kick: the device is offline, which is
        // what a kick of a device nobody holds answers too.
        ControlReply::SessionClosed => return Err(ApiError::DeviceOffline(device.to_string())),
    };
    tracing::info!(device_id = %device, gateway = %reply.gateway, session = %reply.session, "device kicked");
    Ok(Json(Kicked {
        status: reply.status,
        gateway: reply.gateway,
        session: reply.session,
    }))
}

/// Default page size of `GET /v1/devices`.
pub const DEFAULT_PAGE: usize = 100;

/// Query of `GET /v1/devices`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One online device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceEntry {
    /// The device.
    pub device_id: String,
    /// Holding gateway instance.
    pub gateway: String,
    /// Holding session.
    pub session: String,
    /// When the session started, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The device's address.
    pub remote_addr: String,
}

/// A page of online devices, sorted by device id.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    /// Sessions held by the instances that answered, summed over them (not just this page).
    /// Each instance reports its own total, so a device caught mid-takeover, briefly held by two
    /// instances, counts twice here while `devices` lists it once; devices of
    /// `unavailable_gateways` are not counted. An exact count of distinct devices would need
    /// every instance's whole session list on every page.
    pub count: u64,
    /// This page.
    pub devices: Vec<DeviceEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Instances that were announced but did not answer (the stats request or the session
    /// list request), sorted: the list may miss their devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable_gateways: Vec<String>,
}

fn encode_cursor(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}

fn decode_cursor(cursor: &str) -> Result<DeviceId, ApiError> {
    let bad = || ApiError::BadRequest(format!("cursor {cursor:?} is not a cursor from this API"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    DeviceId::parse(&text).map_err(|_| bad())
}

/// Lists online devices from every gateway instance, merged and sorted by device id.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of online devices", body = DeviceList),
        (status = 400, description = "Bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected NATS failure", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`request_timeout`: the request exceeded --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn list_devices(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeviceList>, ApiError> {
    let Query(query) = query?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_SESSION_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is outside 1..={MAX_SESSION_PAGE}"
        )));
    }
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let scatter = state
        .bus
        .gateway_stats(state.config.scatter_window())
        .await
        .map_err(bus_error)?;
    let instances = scatter.answered;
    let page_request = SessionListRequest {
        after: after.map(|a| a.to_string()),
        limit: Some(limit),
    };
    let body = Bytes::from(
        serde_json::to_vec(&page_request).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    let pages = futures::future::join_all(instances.iter().map(|stats| {
        state.bus.request_json::<SessionList>(
            subjects::sessions(&stats.instance),
            async_nats::HeaderMap::new(),
            body.clone(),
            state.config.default_timeout(),
        )
    }))
    .await;

    let mut count = 0;
    let mut more = false;
    // Announced instances that did not even answer the stats request hold devices too, as far
    // as anyone knows: name them, or the page would look complete.
    let mut unavailable = scatter.silent;
    // Keyed by device id: sorted, and a device caught mid-takeover on two instances appears once
    // (the newer session wins).
    let mut merged: BTreeMap<DeviceId, DeviceEntry> = BTreeMap::new();
    for (stats, page) in instances.iter().zip(pages) {
        let page = match page {
            Ok(page) => page,
            Err(BusError::Unavailable | BusError::LostMidRequest) => {
                return Err(bus_error(BusError::LostMidRequest));
            }
            Err(error) => {
                tracing::warn!(instance = %stats.instance, %error, "instance did not list its sessions");
                unavailable.push(stats.instance.clone());
                continue;
            }
        };
        // The instance's own total, not deduplicated across instances (see `DeviceList::count`):
        // exactness would cost every instance's whole list on every page.
        count += page.total;
        more |= page.next_after.is_some();
        for s in page.sessions {
            let entry = DeviceEntry {
                device_id: s.device_id.to_string(),
                gateway: page.instance.clone(),
                session: s.session,
                since_ms: s.since_ms,
                remote_addr: s.remote_addr,
            };
            match merged.get(&s.device_id) {
                Some(existing) if existing.since_ms >= entry.since_ms => {}
                _ => {
                    merged.insert(s.device_id, entry);
                }
            }
        }
    }
    if merged.len() > limit {
        more = true;
    }
    unavailable.sort_unstable();
    unavailable.dedup();
    let devices: Vec<DeviceEntry> = merged.into_values().take(limit).collect();
    let next_cursor = if more {
        devices.last().map(|d| encode_cursor(&d.device_id))
    } else {
        None
    };
    Ok(Json(DeviceList {
        count,
        devices,
        next_cursor,
        unavailable_gateways: unavailable,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("dev-42");
        assert_eq!(decode_cursor(&c).expect("valid").as_str(), "dev-42");
        assert!(decode_cursor("!!!").is_err());
        assert!(decode_cursor(&encode_cursor("a.b")).is_err());
    }
}
