//! `GET /v1/devices/{id}/messages`: a live tail of a device's uplink as Server-Sent Events
//! (`-` as the id tails every device), for debugging with `curl -N`.
//!
//! NATS must never wait for a slow HTTP client: a forwarding task moves messages from the
//! subscription into a bounded buffer with `try_send`; when the buffer is full the newest
//! message is dropped and counted, and the client gets a `lagged` event saying how many it
//! missed. The subscription ends when the client disconnects or the server shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Message, Subscriber};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use devgate_gateway::contract::{headers, subjects};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Metrics;
use crate::routes::{bus_error, device_id};

/// The path id meaning "every device".
pub const ALL_DEVICES: &str = "-";

/// How often an idle stream sends a keep-alive comment, so proxies do not cut it.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The data of one `up` (UTF-8 payload) or `up_base64` (binary payload) event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UplinkEvent {
    /// The device (from the subject).
    pub device_id: String,
    /// Gateway instance that received it (`Devgate-Gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Session that received it (`Devgate-Session`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The device's frame sequence number (`Devgate-Seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// `utf8` or `base64`.
    pub encoding: String,
    /// The payload, as text or base64.
    pub payload: String,
}

/// The data of a `lagged` event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Lagged {
    /// Uplink messages dropped because this client read too slowly.
    pub dropped: u64,
}

/// Streams a device's uplink (or every device's, with id `-`) as Server-Sent Events:
/// `event: up` (UTF-8 payload) or `event: up_base64`, with `UplinkEvent` JSON as data, and
/// `event: lagged` when events were dropped for a slow client.
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/messages",
    tag = "messages",
    params(("id" = String, Path, description = "Device id, or `-` for every device")),
    responses(
        (status = 200, description = "An endless SSE stream of uplink events", content_type = "text/event-stream", body = UplinkEvent),
        (status = 400, description = "Bad device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 500, description = "`internal`: the subscription could not be made", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`: NATS did not confirm the subscription within the default timeout, or `request_timeout`: no response head within --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn tail_device(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Path(id) = id?;
    let subject = if id == ALL_DEVICES {
        subjects::ALL_UP.to_owned()
    } else {
        subjects::up(&device_id(&id)?)
    };
    let subscriber = state
        .bus
        .subscribe(subject.clone())
        .await
        .map_err(bus_error)?;
    // Answer only once the subscription is live, so everything published after the response
    // head reaches the client.
    state
        .bus
        .barrier(state.config.default_timeout())
        .await
        .map_err(bus_error)?;
    tracing::info!(%subject, "SSE tail started");
    let (tx, rx) = mpsc::channel(state.config.sse_buffer);
    let dropped = Arc::new(AtomicU64::new(0));
    tokio::spawn(forward(
        subscriber,
        tx,
        dropped.clone(),
        state.metrics.clone(),
        state.shutdown.clone(),
    ));
    let events = futures::stream::unfold((rx, dropped), |(mut rx, dropped)| async move {
        let message = rx.recv().await?;
        let mut out = Vec::with_capacity(2);
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            out.push(json_event("lagged", &Lagged { dropped: lost }));
        }
        out.push(uplink_event(&message));
        Some((futures::stream::iter(out), (rx, dropped)))
    })
    .flatten()
    .map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Moves messages from NATS to the client's buffer until the client leaves (the receiver is
/// dropped) or shutdown; then unsubscribes, which also ends the SSE stream.
async fn forward(
    mut subscriber: Subscriber,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            m = subscriber.next() => m,
            () = tx.closed() => break,
            () = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        match tx.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // Drop the newest: NATS is never made to wait for an HTTP client.
                dropped.fetch_add(1, Ordering::Relaxed);
                metrics.sse_dropped(1);
            }
            Err(TrySendError::Closed(_)) => break,
        }
    }
    let _ = subscriber.unsubscribe().await;
    tracing::info!("SSE tail ended");
}

fn json_event<T: Serialize>(name: &str, data: &T) -> Event {
    match Event::default().event(name).json_data(data) {
        Ok(event) => event,
        // Plain structs always serialize; keep the stream alive regardless.
        Err(error) => Event::default().comment(format!("unserializable event: {error}")),
    }
}

fn header(message: &Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
}

fn uplink_event(message: &Message) -> Event {
    // device.<id>.up: the id is the middle token.
    let device_id = message
        .subject
        .as_str()
        .split('.')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (name, encoding, payload) = match std::str::from_utf8(&message.payload) {
        Ok(text) => ("up", "utf8", text.to_owned()),
        Err(_) => (
            "up_base64",
            "base64",
            base64::engine::general_purpose::STANDARD.encode(&message.payload),
        ),
    };
    json_event(
        name,
        &UplinkEvent {
            device_id,
            gateway: header(message, headers::GATEWAY),
            session: header(message, headers::SESSION),
            seq: header(message, headers::SEQ).and_then(|s| s.parse().ok()),
            encoding: encoding.to_owned(),
            payload,
        },
    )
}
