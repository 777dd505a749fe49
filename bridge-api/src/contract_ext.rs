//! NATS contract additions bridge-api needs that `devgate_gateway::contract` does not (yet)
//! define. This is the ONE place they live; each should move into the shared contract, after
//! which this module re-exports or disappears.

/// NATS header carrying the HTTP `Content-Type` of a downlink body, so the receiving side (or a
/// service tapping `device.<id>.down`) knows how to read the opaque payload.
/// Proposed addition: `devgate_gateway::contract::headers::CONTENT_TYPE`.
pub const CONTENT_TYPE: &str = "Content-Type";

/// Bytes a DOWN frame adds around the payload within `max_frame_len`: the type byte and the
/// 4-byte sequence number. Proposed addition: `devgate_gateway::codec::max_down_payload_len`.
pub use crate::config::DOWN_FRAME_OVERHEAD;
