//! The wire contract between devgate components and the services around them.
//!
//! Everything another process relies on lives here: NATS subject names, header names and the
//! JSON envelopes exchanged on those subjects. The gateway, bridge-api, lb-sync, devsim and the
//! tests all build subjects and parse replies through this one module, so they cannot drift
//! apart; `docs/nats-subjects.md` is the prose version of this file.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted device id. A device id becomes one NATS subject token and a Prometheus-safe
/// log field, so it is kept short and plain.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// Why a device id (or instance id) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty ids would produce subjects like `device..down`, which NATS rejects.
    #[error("id is empty")]
    Empty,
    /// Bounded so one id cannot bloat every subject and log line it appears in.
    #[error("id is {0} bytes long, the limit is {MAX_DEVICE_ID_LEN}")]
    TooLong(usize),
    /// Anything outside `[A-Za-z0-9_-]` could split or wildcard a NATS subject (`.`, `*`, `>`,
    /// whitespace), so it is refused rather than escaped.
    #[error("id contains {0:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed")]
    BadChar(char),
}

fn validate_token(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_DEVICE_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

/// A validated device id: safe to splice into a NATS subject as exactly one token.
///
/// Constructing one is the only way to build a device subject, so an unvalidated id can never
/// reach NATS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `s` as a device id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        validate_token(s).map(|()| DeviceId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Validates a gateway instance id. Instance ids appear in subjects too
/// (`devgate.gateway.<instance>.sessions`), so they follow the device id rules.
pub fn validate_instance_id(s: &str) -> Result<(), IdError> {
    validate_token(s)
}

/// NATS subject names. Functions rather than format strings scattered around, so a subject is
/// spelled in exactly one place.
pub mod subjects {
    use super::DeviceId;

    /// Services publish (or request) here to reach one device; only the gateway holding the
    /// device subscribes, which makes NATS interest the device->gateway registry.
    pub fn down(id: &DeviceId) -> String {
        format!("device.{id}.down")
    }

    /// The gateway publishes every UP frame of the device here.
    pub fn up(id: &DeviceId) -> String {
        format!("device.{id}.up")
    }

    /// Every device's uplink, for services that consume all of it.
    pub const ALL_UP: &str = "device.*.up";

    /// The device id of `device.<id>.<kind>` (`kind` such as `"up"` or `"down"`), if `subject`
    /// is one: a subject read back from NATS (an error naming it) is recognised here, where
    /// the subjects are spelled.
    pub fn device_in<'s>(subject: &'s str, kind: &str) -> Option<&'s str> {
        let id = subject
            .strip_prefix("device.")?
            .strip_suffix(kind)?
            .strip_suffix('.')?;
        (!id.is_empty() && !id.contains('.')).then_some(id)
    }

    /// Connected / disconnected events of one device.
    pub fn presence_events(id: &DeviceId) -> String {
        format!("device.{id}.presence")
    }

    /// Every device's presence events.
    pub const ALL_PRESENCE_EVENTS: &str = "device.*.presence";

    /// Control operations. They travel on `device.<id>.down` itself, marked by the
    /// [`super::headers::CONTROL`] header, so the one subscription that routes downlink also
    /// answers control and "no responders" keeps meaning "offline".
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ControlOp {
        /// Gateway-to-gateway takeover claim of a new login (services are not allowed to
        /// publish it). A welcomed holder always yields: the claimant logged in after it.
        Claim,
        /// Gateway-to-gateway re-check of a *welcomed* session after its gateway reconnected
        /// to NATS: while it was away another login may have won the device, and now both are
        /// subscribed. Unlike [`ControlOp::Claim`] the claimant is not necessarily newer, so
        /// the holder compares [`super::ClaimKey`]s and the older session yields.
        Reclaim,
        /// "Who holds this device, since when, from where?"
        Presence,
        /// Disconnect the device with `GOAWAY kicked`.
        Kick,
    }

    impl ControlOp {
        /// The header value for this operation.
        pub fn token(self) -> &'static str {
            match self {
                ControlOp::Claim => "claim",
                ControlOp::Reclaim => "reclaim",
                ControlOp::Presence => "presence",
                ControlOp::Kick => "kick",
            }
        }

        /// Parses a [`super::headers::CONTROL`] header value.
        pub fn from_token(t: &str) -> Option<Self> {
            match t {
                "claim" => Some(ControlOp::Claim),
                "reclaim" => Some(ControlOp::Reclaim),
                "presence" => Some(ControlOp::Presence),
                "kick" => Some(ControlOp::Kick),
                _ => None,
            }
        }
    }

    /// Every gateway instance publishes an [`super::Announce`] here on a heartbeat and on every
    /// readiness change; lb-sync and bridge-api discover instances from it.
    pub const ANNOUNCE: &str = "devgate.gateway.announce";

    /// Scatter request: every instance answers with its [`super::GatewayStats`].
    pub const STATS: &str = "devgate.gateways.stats";

    /// Request to one instance for a page of its sessions ([`super::SessionListRequest`]).
    pub fn sessions(instance: &str) -> String {
        format!("devgate.gateway.{instance}.sessions")
    }

    /// Where replies to a gateway's own requests (its claims) arrive: `<prefix><random>.<n>`.
    /// Not the usual `_INBOX.`, so the gateway user needs no subscribe permission on
    /// `_INBOX.>`, where it could read every reply meant for services.
    pub const GATEWAY_INBOX_PREFIX: &str = "devgate.inbox.";

    /// A subject nobody subscribes to. A request there is answered by the NATS server itself
    /// ("no responders") after it has processed everything the gateway published before, which
    /// makes it a round-trip barrier proving earlier publishes were accepted.
    pub fn barrier(instance: &str) -> String {
        format!("devgate.barrier.{instance}")
    }
}

/// NATS header names used by devgate.
pub mod headers {
    use super::subjects::ControlOp;

    /// On a request to `device.<id>.down`: marks a control request (`claim`, `presence`,
    /// `kick`) instead of a message for the device.
    pub const CONTROL: &str = "Devgate-Control";

    /// Headers of a control request for `op`.
    pub fn control(op: ControlOp) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(CONTROL, op.token());
        h
    }

    /// On a request to `device.<id>.down`: `device` waits for the device's ACK frame, anything
    /// else (or absent) is answered once the frame is written to the device socket.
    pub const ACK: &str = "Devgate-Ack";
    /// The value of [`ACK`] that asks for an end-to-end device acknowledgement.
    pub const ACK_DEVICE: &str = "device";
    /// On uplink and presence messages: the device id.
    pub const DEVICE: &str = "Devgate-Device";
    /// On uplink and presence messages: the session id.
    pub const SESSION: &str = "Devgate-Session";
    /// On uplink and presence messages: the gateway instance id.
    pub const GATEWAY: &str = "Devgate-Gateway";
    /// On uplink messages: the device's frame sequence number; present only when non-zero
    /// (the device asked for an ACK).
    pub const SEQ: &str = "Devgate-Seq";
    /// On downlink messages from bridge-api: the HTTP `Content-Type` of the body, so a service
    /// tapping `device.<id>.down` knows how to read the opaque payload.
    pub const CONTENT_TYPE: &str = "Content-Type";
}

/// What happened to a downlink request; the body of every reply on `device.<id>.down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// The DOWN frame was written to the device's socket.
    Sent,
    /// The device confirmed the DOWN frame with an ACK.
    Acked,
    /// The session's bounded queue is full: nothing was written, retry later.
    Busy,
    /// The device did not ACK within the gateway's ack timeout.
    Timeout,
    /// The frame could not be delivered (the session ended, the payload was too large, ...).
    Failed,
}

/// Reply to a request on `device.<id>.down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReply {
    /// The outcome.
    pub status: DeliveryStatus,
    /// Gateway instance that handled the request.
    pub gateway: String,
    /// Session that handled the request.
    pub session: String,
    /// DOWN sequence number given to the frame (0 when no device ack was asked for).
    #[serde(default)]
    pub seq: u32,
    /// Machine-readable reason for `busy`, `timeout` and `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Reply to a presence control request on `device.<id>.down`, answered by the holder itself so it cannot be stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceInfo {
    /// The device.
    pub device_id: DeviceId,
    /// Holding gateway instance.
    pub gateway: String,
    /// Holding session.
    pub session: String,
    /// When the session was welcomed, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The device's address (the real one when the PROXY protocol is on).
    pub remote_addr: String,
    /// Extra HELLO fields the device sent, passed on as session metadata.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Presence event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEventKind {
    /// The session was welcomed.
    Connected,
    /// The session ended.
    Disconnected,
}

/// Published on `device.<id>.presence` when a session starts or ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// Connected or disconnected.
    pub event: PresenceEventKind,
    /// The device.
    pub device_id: DeviceId,
    /// Gateway instance.
    pub gateway: String,
    /// Session id.
    pub session: String,
    /// Event time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The device's address.
    pub remote_addr: String,
    /// Why the session ended (`replaced`, `kicked`, `draining`, `closed`, an error code...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Reply to a kick control request on `device.<id>.down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KickReply {
    /// Always `kicked`: a request nobody holds gets "no responders" from NATS instead.
    pub status: String,
    /// Gateway instance that held the device.
    pub gateway: String,
    /// Session that was closed.
    pub session: String,
}

/// Total order over logins of the same device, used to pick a winner when two logins race.
/// Compared field by field: later login time wins, then instance id, then session id, so two
/// gateways always agree on the winner without talking to each other again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClaimKey {
    /// Login time at the claiming gateway, nanoseconds since the Unix epoch.
    pub login_ns: u64,
    /// Claiming gateway instance.
    pub gateway: String,
    /// Claiming session.
    pub session: String,
}

/// Body of a gateway-to-gateway takeover claim (control request `claim` or `reclaim` on
/// `device.<id>.down`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// Who is claiming.
    pub key: ClaimKey,
    /// The claimant already subscribed to `device.<id>.down` (a login's confirm round, a
    /// reclaim): a login that yields to it need not hand back what reaches it after this claim,
    /// since the claimant receives that too. Absent (older gateways): `false`, hand back all.
    #[serde(default)]
    pub subscribed: bool,
}

/// Answer of the current holder (or a competing claimant) to a [`ClaimRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimReply {
    /// The responder gave the device up: it unsubscribed, flushed what it had and closed.
    Released {
        /// The session that let go.
        key: ClaimKey,
        /// It held the device (a welcomed session) until this claim, so the claimant's login
        /// replaces it. `false` (and absent, from gateways before this field): it held nothing
        /// live, such as a rival login that never got WELCOME or a session that had already
        /// ended; the claimant only counts a takeover on `true`.
        #[serde(default)]
        held: bool,
    },
    /// The responder's own claim is newer; the claimant must give up.
    Superseded {
        /// The newer claim.
        key: ClaimKey,
    },
}

/// Heartbeat of one gateway instance on [`subjects::ANNOUNCE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Instance id.
    pub instance: String,
    /// Where devices (or the load balancer) reach this instance's device port.
    pub advertise_addr: String,
    /// Ready to take new devices (NATS connected, not draining).
    pub ready: bool,
    /// Shutting down: must leave the load balancer's rotation.
    pub draining: bool,
    /// Live device sessions.
    pub sessions: u64,
    /// The announce period; listeners expire the instance after a few missed beats.
    pub heartbeat_ms: u64,
    /// Process start, milliseconds since the Unix epoch (tells restarts apart).
    pub started_ms: u64,
    /// The instance's last announce: it is stopping and answers nothing more, so listeners can
    /// forget it now rather than after missed beats. Absent (older gateways): `false`.
    #[serde(default)]
    pub stopped: bool,
    /// How many announcements of this process the NATS server confirmed before this one (the
    /// next one repeats the number of one not yet confirmed). A skip tells listeners that
    /// announcements the server took were lost on the way (a partition between NATS nodes),
    /// not merely late. Absent (older gateways): 0.
    #[serde(default)]
    pub seq: u64,
    /// The announcer's NATS connection generation. Absent (older gateways): 0.
    #[serde(default)]
    pub conn: u64,
    /// The `seq` of the announcer's first announcement on this connection: with the last one
    /// heard on the previous connection, it tells what was lost before the announcer's own
    /// outage (a cut then) from what its outage explains. Absent: 0.
    #[serde(default)]
    pub conn_seq: u64,
}

/// Reply of every instance to a [`subjects::STATS`] scatter request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStats {
    /// Instance id.
    pub instance: String,
    /// Where devices reach this instance.
    pub advertise_addr: String,
    /// Ready to take new devices.
    pub ready: bool,
    /// Shutting down.
    pub draining: bool,
    /// Live device sessions.
    pub sessions: u64,
    /// Process start, milliseconds since the Unix epoch.
    pub started_ms: u64,
}

/// Request body for `devgate.gateway.<instance>.sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionListRequest {
    /// Return devices whose id sorts strictly after this one (pagination cursor).
    #[serde(default)]
    pub after: Option<String>,
    /// Page size; the gateway caps it at [`MAX_SESSION_PAGE`].
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Largest page a gateway returns for one sessions request, whatever was asked.
pub const MAX_SESSION_PAGE: usize = 1000;

/// One session in a [`SessionList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The device.
    pub device_id: DeviceId,
    /// Session id.
    pub session: String,
    /// When it was welcomed, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The device's address.
    pub remote_addr: String,
}

/// Reply to `devgate.gateway.<instance>.sessions`: one page, sorted by device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// Instance id.
    pub instance: String,
    /// All sessions on the instance (not just this page).
    pub total: u64,
    /// This page.
    pub sessions: Vec<SessionSummary>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Error reply to a malformed control request, so the caller gets a reason rather than a
/// timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    /// Machine-readable code (`bad_request`).
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_subjects_are_recognised_by_kind() {
        assert_eq!(subjects::device_in("device.a-1.up", "up"), Some("a-1"));
        assert_eq!(subjects::device_in("device.a.down", "down"), Some("a"));
        for not_it in [
            "device.a.down",
            "device.a.up.more",
            "device..up",
            "devices.a.up",
            "_INBOX.x.up",
            "device.a.b.up",
        ] {
            assert_eq!(subjects::device_in(not_it, "up"), None, "{not_it}");
        }
    }

    #[test]
    fn device_ids_follow_the_subject_token_rules() {
        assert!(DeviceId::parse("sensor-01_A").is_ok());
        assert!(DeviceId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(DeviceId::parse(""), Err(IdError::Empty));
        assert_eq!(
            DeviceId::parse(&"a".repeat(129)),
            Err(IdError::TooLong(129))
        );
        for bad in ["a.b", "a*", ">", "a b", "dev\n", "é"] {
            assert!(
                matches!(DeviceId::parse(bad), Err(IdError::BadChar(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn subjects_are_spelled_once() {
        let id = DeviceId::parse("d1").expect("valid");
        assert_eq!(subjects::down(&id), "device.d1.down");
        assert_eq!(subjects::up(&id), "device.d1.up");
        for op in [
            subjects::ControlOp::Claim,
            subjects::ControlOp::Reclaim,
            subjects::ControlOp::Presence,
            subjects::ControlOp::Kick,
        ] {
            assert_eq!(subjects::ControlOp::from_token(op.token()), Some(op));
        }
    }

    #[test]
    fn device_id_deserialization_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"no.dots\"").is_err());
    }

    #[test]
    fn claim_keys_order_by_time_then_ids() {
        let k = |t, g: &str, s: &str| ClaimKey {
            login_ns: t,
            gateway: g.into(),
            session: s.into(),
        };
        assert!(k(2, "a", "a") > k(1, "z", "z"));
        assert!(k(1, "b", "a") > k(1, "a", "z"));
        assert!(k(1, "a", "b") > k(1, "a", "a"));
    }

    #[test]
    fn claim_reply_is_tagged() {
        let r = ClaimReply::Released {
            key: ClaimKey {
                login_ns: 1,
                gateway: "g".into(),
                session: "s".into(),
            },
            held: true,
        };
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["outcome"], "released");
        assert_eq!(v["held"], true);
        // From a gateway that does not send `held` yet: nothing live was replaced.
        let old: ClaimReply = serde_json::from_value(serde_json::json!({
            "outcome": "released",
            "key": {"login_ns": 1, "gateway": "g", "session": "s"},
        }))
        .expect("parses");
        assert!(matches!(old, ClaimReply::Released { held: false, .. }));
    }
}
