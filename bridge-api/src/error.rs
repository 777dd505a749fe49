//! Every way a request can fail, and the one JSON shape and status code each becomes.
//!
//! Callers script against the `error` code, so the codes are stable strings; the message is for
//! humans. Keeping all mappings in one enum is what makes "every outcome is one of these" true.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use devgate_gateway::contract::IdError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Seconds a caller should wait before retrying a `device_busy` answer.
pub const BUSY_RETRY_AFTER_S: u64 = 1;

/// Seconds a caller should wait before retrying a `too_many_tails` answer: a slot frees only when
/// another tail's client leaves, typically after minutes of debugging, so a tight retry loop would
/// only add load.
pub const TAILS_RETRY_AFTER_S: u64 = 5;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `device_offline`.
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

/// A failed request. Each variant has one status code and one `error` code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization: Bearer` header, or a token that is not configured.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A read-only token (`--api-read-token`) on a request that would change something
    /// (send, kick): dashboards and monitoring get to look, not to act.
    #[error(
        "this token may only read (GET); sending to or disconnecting devices needs an --api-token"
    )]
    Forbidden,
    /// The device id in the path or body cannot be a device id.
    #[error("bad device id {id:?}: {source}")]
    BadDeviceId {
        /// The offending id.
        id: String,
        /// Why it was refused.
        source: IdError,
    },
    /// Malformed query, JSON body or parameter value.
    #[error("{0}")]
    BadRequest(String),
    /// The payload cannot fit one DOWN frame (or the body exceeds the request limit).
    #[error("payload of {} bytes exceeds the {max}-byte frame payload limit", len.map_or_else(|| format!("more than {max}"), |l| l.to_string()))]
    PayloadTooLarge {
        /// Payload length, when known (a body cut off while reading is only known to be longer).
        len: Option<usize>,
        /// Largest accepted payload.
        max: usize,
    },
    /// A bulk request body exceeds its length limit (the base64 of the largest payload plus the
    /// most ids): the same `payload_too_large` a single send's oversized body gets.
    #[error(
        "request body exceeds the {0}-byte limit of a bulk send (the base64 of a max_frame_len - 5 \
         payload plus bulk_max_devices ids)"
    )]
    BodyTooLarge(usize),
    /// No gateway holds the device (NATS answered "no responders").
    #[error("device {0} is not connected to any gateway")]
    DeviceOffline(String),
    /// The device's downlink queue is full.
    #[error("device is busy ({reason}); retry after {BUSY_RETRY_AFTER_S}s")]
    DeviceBusy {
        /// Gateway's reason.
        reason: String,
    },
    /// Opening one more SSE tail would exceed `max_tails`, or for a `-` tail `max_wildcard_tails`.
    #[error(
        "too many {} tails are open (at most {limit}); retry after {TAILS_RETRY_AFTER_S}s",
        if *read_only { "read-only token" } else if *every_device { "every-device (`-`)" } else { "uplink" }
    )]
    TooManyTails {
        /// The limit that was reached.
        limit: usize,
        /// Whether it was the limit of `-` tails.
        every_device: bool,
        /// Whether it was the share of read-only tokens (half of `max_tails`).
        read_only: bool,
    },
    /// The gateway wrote the frame but the device did not ACK in the gateway's ack timeout.
    #[error("the device did not acknowledge in time ({reason})")]
    DeviceTimeout {
        /// Gateway's reason.
        reason: String,
    },
    /// Nobody answered within `timeout_ms`.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The gateway could not deliver the frame.
    #[error("delivery failed: {reason}")]
    DeliveryFailed {
        /// Gateway's reason (`session_closed`, ...).
        reason: String,
    },
    /// The gateway's answer did not follow the contract.
    #[error("unreadable gateway reply: {0}")]
    BadGatewayReply(String),
    /// Not connected to NATS (before sending, or the connection dropped mid-request).
    #[error("NATS is unavailable: {0}")]
    NatsUnavailable(String),
    /// The whole request took longer than the server's request timeout.
    #[error("request exceeded the server's {0} ms limit")]
    RequestTimeout(u64),
    /// One device of a bulk send was still waiting for its answer when the bulk send had to
    /// stop to answer within the request cap. Code `timeout`, as a single send whose wait ran
    /// out: the message may have been delivered.
    #[error(
        "no answer before the bulk send's deadline (kept inside the server's {0} ms request \
         limit); the message may have been delivered"
    )]
    BulkInFlight(u64),
    /// One device of a bulk send had not had its turn when the bulk send had to stop to answer
    /// within the request cap. Code `request_timeout`; nothing was sent, so a retry is safe.
    #[error(
        "not sent: the bulk send reached its deadline (kept inside the server's {0} ms request \
         limit) before this device's turn; retrying it is safe"
    )]
    BulkNotSent(u64),
    /// No such route.
    #[error("no route for {0}")]
    NotFound(String),
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A bug or an unexpected NATS failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::BadDeviceId { .. } | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } | ApiError::BodyTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::DeviceOffline(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::DeviceBusy { .. } | ApiError::TooManyTails { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::DeviceTimeout { .. }
            | ApiError::Timeout(_)
            | ApiError::RequestTimeout(_)
            | ApiError::BulkInFlight(_)
            | ApiError::BulkNotSent(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::DeliveryFailed { .. } | ApiError::BadGatewayReply(_) => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::NatsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `error` code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::BadDeviceId { .. } => "bad_device_id",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::PayloadTooLarge { .. } | ApiError::BodyTooLarge(_) => "payload_too_large",
            ApiError::DeviceOffline(_) => "device_offline",
            ApiError::DeviceBusy { .. } => "device_busy",
            ApiError::TooManyTails { .. } => "too_many_tails",
            ApiError::DeviceTimeout { .. } => "device_timeout",
            ApiError::Timeout(_) | ApiError::BulkInFlight(_) => "timeout",
            ApiError::DeliveryFailed { .. } => "delivery_failed",
            ApiError::BadGatewayReply(_) => "bad_gateway_reply",
            ApiError::NatsUnavailable(_) => "nats_unavailable",
            ApiError::RequestTimeout(_) | ApiError::BulkNotSent(_) => "request_timeout",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code().to_owned(),
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, ApiError::NatsUnavailable(_)) {
            tracing::warn!(error = %self, code = self.code(), "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        match self {
            ApiError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"devgate\""),
                );
            }
            ApiError::DeviceBusy { .. } | ApiError::NatsUnavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(BUSY_RETRY_AFTER_S));
            }
            ApiError::TooManyTails { .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(TAILS_RETRY_AFTER_S));
            }
            _ => {}
        }
        response
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(format!("bad query: {}", r.body_text()))
    }
}

/// Turns a JSON body failure into an error; `max` is the body limit reported on 413 (an
/// oversized body is `payload_too_large`, as documented, not a malformed request).
pub fn json_error(r: JsonRejection, max: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(max)
    } else {
        ApiError::BadRequest(format!("bad JSON body: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(format!("bad path: {}", r.body_text()))
    }
}

/// Turns a body-reading failure into an error; `max` is the payload limit reported on 413.
pub fn body_error(r: BytesRejection, max: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { len: None, max }
    } else {
        ApiError::BadRequest(format!("cannot read the request body: {}", r.body_text()))
    }
}

/// A handler result whose error renders as the JSON error body.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_are_stable() {
        let cases = [
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::Forbidden, 403, "forbidden"),
            (ApiError::DeviceOffline("d".into()), 404, "device_offline"),
            (
                ApiError::DeviceBusy {
                    reason: "queue_full".into(),
                },
                429,
                "device_busy",
            ),
            (
                ApiError::TooManyTails {
                    limit: 4,
                    every_device: true,
                    read_only: false,
                },
                429,
                "too_many_tails",
            ),
            (ApiError::Timeout(5), 504, "timeout"),
            (
                ApiError::DeliveryFailed {
                    reason: "session_closed".into(),
                },
                502,
                "delivery_failed",
            ),
            (
                ApiError::NatsUnavailable("x".into()),
                503,
                "nats_unavailable",
            ),
            (
                ApiError::PayloadTooLarge {
                    len: Some(2),
                    max: 1,
                },
                413,
                "payload_too_large",
            ),
            (ApiError::BodyTooLarge(1), 413, "payload_too_large"),
            (ApiError::RequestTimeout(5), 504, "request_timeout"),
            (ApiError::BulkInFlight(5), 504, "timeout"),
            (ApiError::BulkNotSent(5), 504, "request_timeout"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.code(), code);
        }
    }
}
