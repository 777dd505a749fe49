//! `GET /v1/devices/{id}/messages`: a live tail of a device's uplink as Server-Sent Events
//! (`-` as the id tails every device), for debugging with `curl -N`.
//!
//! NATS must never wait for a slow HTTP client: a forwarding task moves messages from the
//! subscription into a buffer bounded in messages (`sse_buffer`) and in bytes
//! (`tail_buffer_bytes`) without ever waiting; when either bound is reached the newest message is
//! dropped and counted, and the client gets a `lagged` event saying how many it missed. The
//! subscription ends when the client disconnects or the server shuts down.
//!
//! Each tail holds a buffer and a subscription, and a `-` tail carries the whole fleet's uplink,
//! so their number is bounded too: at most `max_tails` at once, of which at most
//! `max_wildcard_tails` `-` tails; one more is refused with 429 `too_many_tails`. The slot is
//! held by the response stream, so it is freed when that stream is dropped: the client left,
//! the server shut down, or the handler gave up before answering.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{Message, Subscriber};
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use devgate_gateway::contract::{headers, subjects};
use futures::{Stream, StreamExt};
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Grant;
use crate::config::Config;
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
    /// Uplink messages dropped because this client read too slowly (its buffer was full, in
    /// messages or bytes).
    pub dropped: u64,
}

/// The slots for concurrent tails: every tail takes one of `max_tails`, a `-` tail also one of
/// `max_wildcard_tails`, and a read-only token's tail also one of half of `max_tails`, so that
/// a dashboard credential (the kind that sits in a browser) cannot take every slot from the
/// services holding full tokens. Refusing at once (never queueing) keeps a burst of tails from
/// holding requests open.
pub struct TailLimits {
    all: Arc<Semaphore>,
    every_device: Arc<Semaphore>,
    read_only: Arc<Semaphore>,
    max_tails: usize,
    max_wildcard_tails: usize,
    max_read_only_tails: usize,
}

impl TailLimits {
    /// The slots `config` allows.
    pub fn new(config: &Config) -> Self {
        // Validation keeps both far below the semaphore's maximum; the `min` only makes an
        // unvalidated config unable to panic here.
        let permits = |n: usize| n.min(Semaphore::MAX_PERMITS);
        // Half, rounded down, but at least one: with `max_tails` 1 a read token may still tail.
        let max_read_only_tails = (config.max_tails / 2).max(1);
        TailLimits {
            all: Arc::new(Semaphore::new(permits(config.max_tails))),
            every_device: Arc::new(Semaphore::new(permits(config.max_wildcard_tails))),
            read_only: Arc::new(Semaphore::new(permits(max_read_only_tails))),
            max_tails: config.max_tails,
            max_wildcard_tails: config.max_wildcard_tails,
            max_read_only_tails,
        }
    }

    /// Takes a slot for one tail, or says which limit is reached.
    fn acquire(
        &self,
        every_device: bool,
        grant: Grant,
        metrics: &Metrics,
    ) -> Result<TailSlot, ApiError> {
        // The semaphores are never closed, so a failure always means "no permit left".
        let read_only =
            if grant == Grant::ReadOnly {
                let permit = self.read_only.clone().try_acquire_owned().map_err(|_| {
                    ApiError::TooManyTails {
                        limit: self.max_read_only_tails,
                        every_device: false,
                        read_only: true,
                    }
                })?;
                Some(permit)
            } else {
                None
            };
        let wildcard = if every_device {
            let permit = self.every_device.clone().try_acquire_owned().map_err(|_| {
                ApiError::TooManyTails {
                    limit: self.max_wildcard_tails,
                    every_device: true,
                    read_only: false,
                }
            })?;
            Some(permit)
        } else {
            None
        };
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyTails {
                limit: self.max_tails,
                every_device: false,
                read_only: false,
            })?;
        let open = metrics.sse_tails(every_device);
        open.inc();
        Ok(TailSlot {
            _all: all,
            _wildcard: wildcard,
            _read_only: read_only,
            _open: OpenTail(open),
        })
    }
}

/// One open tail's slot. Owned by the response stream, so dropping the stream (client gone,
/// shutdown) frees the permits and lowers the `sse_tails` gauge. Fields drop in declaration
/// order: the permits are free before the gauge says so, so whoever waits on the gauge can open
/// a tail at once.
struct TailSlot {
    _all: OwnedSemaphorePermit,
    _wildcard: Option<OwnedSemaphorePermit>,
    _read_only: Option<OwnedSemaphorePermit>,
    _open: OpenTail,
}

/// Counts one tail in the `sse_tails` gauge while it lives.
struct OpenTail(Gauge);

impl Drop for OpenTail {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the forwarding task and the response stream of one tail share besides the channel.
#[derive(Default)]
struct Backlog {
    /// Bytes of the messages in the channel ([`cost`] each). Only the forwarding task adds
    /// (before sending) and only the stream subtracts (after receiving), so the count never
    /// underflows and a check that passed stays true until the add.
    bytes: AtomicUsize,
    /// Messages dropped since the last `lagged` event.
    dropped: AtomicU64,
}

/// What a buffered message counts against `tail_buffer_bytes`: its NATS wire size (payload,
/// headers, subject), which its memory is close to.
fn cost(message: &Message) -> usize {
    message.length
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
        (status = 429, description = "`too_many_tails`: --max-tails tails are already open, or for `-` --max-wildcard-tails every-device tails, or for a read-only token half of --max-tails (rounded down, at least 1) read-only tails; see Retry-After", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "`internal`: the subscription could not be made", body = ErrorBody),
        (status = 503, description = "`nats_unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`: NATS did not confirm the subscription within the default timeout, or `request_timeout`: no response head within --request-timeout-ms", body = ErrorBody),
    )
)]
pub async fn tail_device(
    State(state): State<AppState>,
    grant: Option<Extension<Grant>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Path(id) = id?;
    let every_device = id == ALL_DEVICES;
    let subject = if every_device {
        subjects::ALL_UP.to_owned()
    } else {
        subjects::up(&device_id(&id)?)
    };
    // Before subscribing: a refused tail costs NATS nothing.
    // Every `/v1` route is behind `require_token`, which sets it; were one ever mounted outside,
    // the tail would count as a read-only one (fail closed), not escape that share.
    let grant = grant.map_or(Grant::ReadOnly, |Extension(g)| g);
    let slot = state.tails.acquire(every_device, grant, &state.metrics)?;
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
    let backlog = Arc::new(Backlog::default());
    tokio::spawn(forward(
        subscriber,
        tx,
        backlog.clone(),
        state.config.tail_buffer_bytes,
        state.metrics.clone(),
        state.shutdown.clone(),
    ));
    // The slot lives in the stream's state: it is freed exactly when the stream is dropped.
    let events =
        futures::stream::unfold((rx, backlog, slot), |(mut rx, backlog, slot)| async move {
            let message = rx.recv().await?;
            backlog.bytes.fetch_sub(cost(&message), Ordering::AcqRel);
            let mut out = Vec::with_capacity(2);
            let lost = backlog.dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                out.push(json_event("lagged", &Lagged { dropped: lost }));
            }
            out.push(uplink_event(&message));
            Some((futures::stream::iter(out), (rx, backlog, slot)))
        })
        .flatten()
        .map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Moves messages from NATS to the client's buffer until the client leaves (the receiver is
/// dropped) or shutdown; then unsubscribes, which also ends the SSE stream. A message that would
/// take the buffer past `max_bytes` is dropped like one that finds it full of messages (so one
/// larger than `max_bytes` is always dropped; validation keeps gateway uplinks below it).
async fn forward(
    mut subscriber: Subscriber,
    tx: mpsc::Sender<Message>,
    backlog: Arc<Backlog>,
    max_bytes: usize,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let lose = |metrics: &Metrics| {
        backlog.dropped.fetch_add(1, Ordering::Relaxed);
        metrics.sse_dropped(1);
    };
    loop {
        let message = tokio::select! {
            m = subscriber.next() => m,
            () = tx.closed() => break,
            () = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        // Drop the newest: NATS is never made to wait for an HTTP client.
        let size = cost(&message);
        let buffered = backlog.bytes.load(Ordering::Acquire);
        if buffered.saturating_add(size) > max_bytes {
            lose(&metrics);
            continue;
        }
        // Counted before sending, so the stream never subtracts what was not yet added.
        backlog.bytes.fetch_add(size, Ordering::AcqRel);
        match tx.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                backlog.bytes.fetch_sub(size, Ordering::AcqRel);
                lose(&metrics);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_tokens_get_half_the_tails_and_at_least_one() {
        let metrics = Metrics::new();
        for (max_tails, read_only) in [(64, 32), (3, 1), (1, 1)] {
            let limits = TailLimits::new(&Config {
                max_tails,
                max_wildcard_tails: 1,
                ..Config::default()
            });
            let held: Vec<TailSlot> = (0..read_only)
                .map(|_| {
                    limits
                        .acquire(false, Grant::ReadOnly, &metrics)
                        .unwrap_or_else(|e| panic!("{max_tails}: {e}"))
                })
                .collect();
            let refused = limits.acquire(false, Grant::ReadOnly, &metrics);
            assert!(
                matches!(
                    refused,
                    Err(ApiError::TooManyTails {
                        read_only: true,
                        ..
                    })
                ),
                "{max_tails}: a read-only tail beyond {read_only}"
            );
            // The rest is the full tokens', all at once.
            let full: Vec<TailSlot> = (read_only..max_tails)
                .map(|_| {
                    limits
                        .acquire(false, Grant::Full, &metrics)
                        .unwrap_or_else(|e| panic!("{max_tails}: {e}"))
                })
                .collect();
            drop(full);
            drop(held);
        }
    }
}
