//! Downlink: `POST /v1/devices/{id}/messages` (one device) and `POST /v1/messages` (many).
//!
//! Both become a NATS request on `device.<id>.down`, answered by the gateway holding the device
//! with a `DeliveryReply`; "no responders" means nobody holds it and is answered at once. Every
//! accepted request ends in exactly one of the documented statuses, never silently.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{HeaderMap, HeaderValue};
use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use devgate_gateway::contract::{DeliveryReply, DeliveryStatus, DeviceId, headers, subjects};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::config::MAX_TIMEOUT_MS;
use crate::error::{ApiError, ErrorBody, body_error, json_error};
use crate::routes::{device_error, device_id};
use crate::{AppState, RequestDeadline};

/// How far a caller wants delivery confirmed before being answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Publish and answer `202` at once. Nothing tells whether any gateway held the device: a
    /// message to an offline device vanishes. Use only for telemetry-like fire-and-forget.
    None,
    /// Answer once the holding gateway wrote the frame to the device socket (default): an
    /// offline device is reported as `404` instead of being lost silently.
    #[default]
    Sent,
    /// Answer once the device acknowledged the frame.
    Device,
}

/// Query parameters of both send endpoints.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SendQuery {
    /// `none`, `sent` (default) or `device`.
    #[param(inline)]
    pub ack: Option<AckMode>,
    /// How long to wait for the gateway's answer, 1..=60000 ms (default 5000).
    pub timeout_ms: Option<u64>,
}

impl SendQuery {
    fn timeout(&self, default: Duration) -> Result<Duration, ApiError> {
        match self.timeout_ms {
            None => Ok(default),
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
            Some(ms) => Err(ApiError::BadRequest(format!(
                "timeout_ms {ms} is outside 1..={MAX_TIMEOUT_MS}"
            ))),
        }
    }
}

/// Answer to a successful send.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SendResult {
    /// `sent` (written to the device socket), `acked` (device confirmed) or `published`
    /// (`ack=none`: handed to NATS, delivery unknown).
    pub status: String,
    /// Gateway instance that delivered (absent for `published`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Session that delivered (absent for `published`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// DOWN sequence number (0 unless `ack=device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
}

impl SendResult {
    fn published() -> Self {
        SendResult {
            status: "published".into(),
            gateway: None,
            session: None,
            seq: None,
        }
    }
}

/// One delivery: what the endpoints share.
struct Delivery<'a> {
    device: &'a DeviceId,
    payload: Bytes,
    content_type: Option<&'a HeaderValue>,
    ack: AckMode,
    timeout: Duration,
}

/// A content type as the NATS `Content-Type` header value. Checked here rather than left to
/// async-nats, whose `&str` conversion panics on CR/LF (a header injection as well): only visible
/// ASCII, spaces and tabs pass, as in an HTTP header.
fn nats_content_type(raw: &str) -> Result<HeaderValue, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "content_type {raw:?} is not a valid header value: only visible ASCII characters, \
             spaces and tabs are allowed"
        ))
    };
    if !raw
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err(bad());
    }
    raw.parse().map_err(|_| bad())
}

/// A single send's `Content-Type` header as the NATS header value. HTTP lets a header carry
/// bytes 0x80 and above (obs-text), which [`nats_content_type`] does not pass; such a value is
/// refused with 400, as a bulk send's `content_type` is, rather than the message going out
/// silently without its content type.
fn request_content_type(value: &axum::http::HeaderValue) -> Result<HeaderValue, ApiError> {
    let raw = value.to_str().map_err(|_| {
        ApiError::BadRequest(format!(
            "the Content-Type header {value:?} is not a valid NATS header value: only visible \
             ASCII characters, spaces and tabs are allowed"
        ))
    })?;
    nats_content_type(raw)
}

/// Delivers one message and interprets the gateway's answer. With `ack=none` the message is only
/// published; flushing is left to the caller so a bulk send flushes once.
async fn deliver(state: &AppState, d: Delivery<'_>) -> Result<(StatusCode, SendResult), ApiError> {
    let mut nats_headers = HeaderMap::new();
    if let Some(ct) = d.content_type {
        nats_headers.insert(devgate_gateway::contract::headers::CONTENT_TYPE, ct.clone());
    }
    let subject = subjects::down(d.device);
    let len = d.payload.len();
    if d.ack == AckMode::None {
        state
            .bus
            .publish(subject, nats_headers, d.payload)
            .await
            .map_err(|e| device_error(e, d.device))?;
        return Ok((StatusCode::ACCEPTED, SendResult::published()));
    }
    if d.ack == AckMode::Device {
        nats_headers.insert(headers::ACK, headers::ACK_DEVICE);
    }
    let reply: DeliveryReply = state
        .bus
        .request_json(subject, nats_headers, d.payload, d.timeout)
        .await
        .map_err(|e| device_error(e, d.device))?;
    let reason = || reply.reason.clone().unwrap_or_else(|| "unspecified".into());
    match reply.status {
        DeliveryStatus::Sent | DeliveryStatus::Acked => Ok((
            StatusCode::OK,
            SendResult {
                status: if reply.status == DeliveryStatus::Sent {
                    "sent".into()
                } else {
                    "acked".into()
                },
                seq: Some(reply.seq),
                gateway: Some(reply.gateway),
                session: Some(reply.session),
            },
        )),
        DeliveryStatus::Busy => Err(ApiError::DeviceBusy { reason: reason() }),
        DeliveryStatus::Timeout => Err(ApiError::DeviceTimeout { reason: reason() }),
        DeliveryStatus::Failed if reply.reason.as_deref() == Some("too_large") => {
            // Only reachable when --max-frame-len is larger than the gateway's.
            Err(ApiError::PayloadTooLarge {
                len: Some(len),
                max: state.config.max_payload_len(),
            })
        }
        DeliveryStatus::Failed => Err(ApiError::DeliveryFailed { reason: reason() }),
    }
}

fn check_payload(state: &AppState, len: usize) -> Result<(), ApiError> {
    let max = state.config.max_payload_len();
    if len > max {
        Err(ApiError::PayloadTooLarge {
            len: Some(len),
            max,
        })
    } else {
        Ok(())
    }
}

async fn flush(state: &AppState, timeout: Duration) -> Result<(), ApiError> {
    state
        .bus
        .flush(timeout)
        .await
        .map_err(crate::routes::bus_error)
}

/// Sends the request body to one device.
#[utoipa::path(
    post,
    path = "/v1/devices/{id}/messages",
    tag = "messages",
    params(("id" = String, Path, description = "Device id ([A-Za-z0-9_-], at most 128)"), SendQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Any bytes, at most max_frame_len - 5; Content-Type travels as a NATS header (visible ASCII, spaces and tabs only)"),
    responses(
        (status = 200, description = "Written to the device (`sent`) or acknowledged by it (`acked`)", body = SendResult),
        (status = 202, description = "`ack=none`: published, delivery unknown", body = SendResult),
        (status = 400, description = "Bad device id, query, or a Content-Type with anything but visible ASCII, spaces and tabs", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "`forbidden`: a read-only token (--api-read-token) may only GET", body = ErrorBody),
        (status = 404, description = "`device_offline`: no gateway holds the device", body = ErrorBody),
        (status = 413, description = "Payload does not fit one DOWN frame", body = ErrorBody),
        (status = 429, description = "`device_busy`: the device's queue is full; see Retry-After", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected NATS failure", body = ErrorBody),
        (status = 502, description = "`delivery_failed`: the gateway could not deliver, or `bad_gateway_reply`: its answer does not follow the contract", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`: NATS unreachable or lost mid-request", body = ErrorBody),
        (status = 504, description = "`timeout` (no answer within timeout_ms), `device_timeout` (no device ACK) or `request_timeout` (the request exceeded --request-timeout-ms)", body = ErrorBody),
    )
)]
pub async fn send_to_device(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<SendQuery>, QueryRejection>,
    http_headers: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let device = device_id(&id)?;
    let Query(query) = query?;
    let timeout = query.timeout(state.config.default_timeout())?;
    let payload = body.map_err(|r| body_error(r, state.config.max_payload_len()))?;
    check_payload(&state, payload.len())?;
    let content_type = http_headers
        .get(header::CONTENT_TYPE)
        .map(request_content_type)
        .transpose()?;
    let ack = query.ack.unwrap_or_default();
    let (status, result) = deliver(
        &state,
        Delivery {
            device: &device,
            payload,
            content_type: content_type.as_ref(),
            ack,
            timeout,
        },
    )
    .await?;
    if ack == AckMode::None {
        flush(&state, timeout).await?;
    }
    tracing::debug!(device_id = %device, status = %result.status, "delivered");
    Ok((status, Json(result)).into_response())
}

/// Body of `POST /v1/messages`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// Target devices (distinct, at most `bulk_max_devices`, 1000 by default).
    pub device_ids: Vec<String>,
    /// Payload as UTF-8 text. Exactly one of `payload` and `payload_base64`.
    #[serde(default)]
    pub payload: Option<String>,
    /// Payload as standard base64, for bytes.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Passed on as the NATS `Content-Type` header: visible ASCII, spaces and tabs only.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// The outcome for one device of a bulk send.
///
/// When the bulk send reaches its deadline (shortly before `--request-timeout-ms`), devices still
/// waiting for an answer get `http_status` 504 and `error` `timeout` (the message may have been
/// delivered), and devices whose turn had not come get 504 `request_timeout` (nothing was sent).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BulkItem {
    /// The device.
    pub device_id: String,
    /// The status a single send would have answered.
    pub http_status: u16,
    /// On success: `sent`, `acked` or `published`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// On failure: the error code (`device_offline`, `timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On failure: a human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Gateway instance that delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Session that delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// Answer of `POST /v1/messages`: one entry per device, in request order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BulkResult {
    /// Devices answered 2xx.
    pub succeeded: usize,
    /// Devices answered anything else.
    pub failed: usize,
    /// Per-device outcomes, in the order of `device_ids`.
    pub results: Vec<BulkItem>,
}

impl BulkRequest {
    fn decode_payload(&self) -> Result<Bytes, ApiError> {
        match (&self.payload, &self.payload_base64) {
            (Some(text), None) => Ok(Bytes::from(text.clone().into_bytes())),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Bytes::from)
                .map_err(|e| ApiError::BadRequest(format!("payload_base64 is not base64: {e}"))),
            _ => Err(ApiError::BadRequest(
                "give exactly one of payload and payload_base64".into(),
            )),
        }
    }

    fn devices(&self, max: usize) -> Result<Vec<DeviceId>, ApiError> {
        if self.device_ids.is_empty() {
            return Err(ApiError::BadRequest("device_ids is empty".into()));
        }
        if self.device_ids.len() > max {
            return Err(ApiError::BadRequest(format!(
                "{} device ids; at most {max} per request",
                self.device_ids.len()
            )));
        }
        let mut seen = HashSet::with_capacity(self.device_ids.len());
        let mut devices = Vec::with_capacity(self.device_ids.len());
        for raw in &self.device_ids {
            let id = device_id(raw)?;
            if !seen.insert(id.clone()) {
                return Err(ApiError::BadRequest(format!(
                    "device id {raw:?} appears twice"
                )));
            }
            devices.push(id);
        }
        Ok(devices)
    }
}

/// Sends one payload to many devices. The request as a whole answers 200 whenever it was
/// processed; each device's outcome (with the status a single send would have given) is in
/// `results`.
///
/// The deliveries run at most `bulk_concurrency` at a time, each finishing on its own (a slow
/// device holds one slot, not the devices behind it), and all of them stop at a deadline safely
/// inside the request cap: the caller always learns what was delivered, where a bare 504 would
/// make it retry (and duplicate) every message.
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    params(SendQuery),
    request_body = BulkRequest,
    responses(
        (status = 200, description = "Processed; per-device outcomes inside, in request order. Devices not finished when the bulk send reached its deadline (just inside --request-timeout-ms) are reported with http_status 504: `timeout` (in flight, may have been delivered) or `request_timeout` (not sent)", body = BulkResult),
        (status = 400, description = "Bad JSON, bad or duplicate device id, too many ids, bad content_type, bad query", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "`forbidden`: a read-only token (--api-read-token) may only GET", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the payload does not fit one DOWN frame, or the body exceeds the bulk body limit", body = ErrorBody),
        (status = 503, description = "`nats_unavailable` before anything was sent", body = ErrorBody),
        (status = 504, description = "`request_timeout`: the request exceeded --request-timeout-ms before the deliveries began (e.g. a slow upload)", body = ErrorBody),
    )
)]
pub async fn send_bulk(
    State(state): State<AppState>,
    request_deadline: Option<Extension<RequestDeadline>>,
    query: Result<Query<SendQuery>, QueryRejection>,
    body: Result<Json<BulkRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // Without the request-timeout layer (not in this app, but a router built differently), the
    // cap counts from here.
    let request_deadline = request_deadline.map_or_else(
        || tokio::time::Instant::now() + state.config.request_timeout(),
        |Extension(RequestDeadline(d))| d,
    );
    let margin = state.config.bulk_answer_margin();
    // Deliveries stop here; the flush (ack=none) may use half the margin left after it.
    let deadline = request_deadline - margin;
    let flush_deadline = request_deadline - margin / 2;
    let Query(query) = query?;
    let timeout = query.timeout(state.config.default_timeout())?;
    let Json(request) = body.map_err(|r| json_error(r, state.config.bulk_body_limit()))?;
    let devices = request.devices(state.config.bulk_max_devices)?;
    let payload = request.decode_payload()?;
    check_payload(&state, payload.len())?;
    let content_type = request
        .content_type
        .as_deref()
        .map(nats_content_type)
        .transpose()?;
    state
        .bus
        .ensure_connected()
        .map_err(crate::routes::bus_error)?;
    let ack = query.ack.unwrap_or_default();
    let content_type = content_type.as_ref();
    let state = &state;
    let count = devices.len();
    // How many devices have had their turn (were handed to `deliver`), in request order.
    let dispatched = AtomicUsize::new(0);
    let dispatched = &dispatched;
    let mut results: Vec<Option<BulkItem>> = vec![None; count];
    let devices = &devices;
    let mut deliveries = futures::stream::iter(0..count)
        .map(|index| {
            dispatched.fetch_add(1, Ordering::Relaxed);
            let device = &devices[index];
            let payload = payload.clone();
            async move {
                let outcome = deliver(
                    state,
                    Delivery {
                        device,
                        payload,
                        content_type,
                        ack,
                        timeout,
                    },
                )
                .await;
                (index, bulk_item(device, outcome))
            }
        })
        .buffer_unordered(state.config.bulk_concurrency);
    let cut_off = tokio::time::sleep_until(deadline);
    tokio::pin!(cut_off);
    loop {
        tokio::select! {
            // The deadline first: past it, no further device is handed to `deliver`.
            biased;
            () = &mut cut_off => break,
            next = deliveries.next() => match next {
                Some((index, item)) => results[index] = Some(item),
                None => break,
            },
        }
    }
    // Dropping the stream abandons the deliveries still waiting for their answer.
    drop(deliveries);
    let started = dispatched.load(Ordering::Relaxed);
    let limit_ms = state.config.request_timeout_ms;
    let mut unfinished = 0usize;
    let mut results: Vec<BulkItem> = results
        .into_iter()
        .zip(devices)
        .enumerate()
        .map(|(index, (item, device))| {
            item.unwrap_or_else(|| {
                unfinished += 1;
                let e = if index < started {
                    ApiError::BulkInFlight(limit_ms)
                } else {
                    ApiError::BulkNotSent(limit_ms)
                };
                bulk_error(device.as_str(), &e)
            })
        })
        .collect();
    if unfinished > 0 {
        tracing::warn!(
            devices = count,
            unfinished,
            "bulk send reached its deadline inside the request cap; unfinished devices are reported as such"
        );
    }
    let flush_timeout =
        timeout.min(flush_deadline.saturating_duration_since(tokio::time::Instant::now()));
    if ack == AckMode::None
        && let Err(e) = flush(state, flush_timeout).await
    {
        // Nothing is known to have left: every "published" becomes the flush error.
        for item in results.iter_mut().filter(|i| i.error.is_none()) {
            *item = bulk_error(&item.device_id, &e);
        }
    }
    let succeeded = results.iter().filter(|i| i.error.is_none()).count();
    let failed = results.len() - succeeded;
    Ok(Json(BulkResult {
        succeeded,
        failed,
        results,
    })
    .into_response())
}

fn bulk_item(device: &DeviceId, outcome: Result<(StatusCode, SendResult), ApiError>) -> BulkItem {
    match outcome {
        Ok((status, r)) => BulkItem {
            device_id: device.to_string(),
            http_status: status.as_u16(),
            status: Some(r.status),
            error: None,
            message: None,
            gateway: r.gateway,
            session: r.session,
        },
        Err(e) => bulk_error(device.as_str(), &e),
    }
}

fn bulk_error(device: &str, e: &ApiError) -> BulkItem {
    BulkItem {
        device_id: device.to_owned(),
        http_status: e.status().as_u16(),
        status: None,
        error: Some(e.code().to_owned()),
        message: Some(e.to_string()),
        gateway: None,
        session: None,
    }
}
