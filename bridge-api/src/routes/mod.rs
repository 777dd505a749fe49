//! The `/v1` endpoints, one module per resource, plus the pieces they share: parsing ids and
//! turning NATS outcomes into HTTP errors.

pub mod devices;
pub mod gateways;
pub mod messages;
pub mod tail;

use devgate_gateway::contract::DeviceId;

use crate::bus::BusError;
use crate::error::ApiError;

/// Validates a device id from the path or a body.
pub fn device_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|source| ApiError::BadDeviceId {
        id: raw.to_owned(),
        source,
    })
}

/// The HTTP error for a NATS failure of a request addressed to `device` (where "no responders"
/// means "nobody holds the device").
pub fn device_error(e: BusError, device: &DeviceId) -> ApiError {
    match e {
        BusError::NoResponders => ApiError::DeviceOffline(device.to_string()),
        other => bus_error(other),
    }
}

/// The HTTP error for any other NATS failure.
pub fn bus_error(e: BusError) -> ApiError {
    match e {
        BusError::Unavailable | BusError::LostMidRequest => {
            ApiError::NatsUnavailable(e.to_string())
        }
        BusError::TimedOut(ms) => ApiError::Timeout(ms),
        BusError::BadReply(why) => ApiError::BadGatewayReply(why),
        BusError::TooLarge => ApiError::Internal(
            "the message exceeds the NATS server's max_payload; lower --max-frame-len".into(),
        ),
        BusError::NoResponders => ApiError::Internal("no responders".into()),
        BusError::Other(why) => ApiError::Internal(why),
    }
}
