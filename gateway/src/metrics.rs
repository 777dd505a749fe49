//! Prometheus metrics of the gateway.
//!
//! Handles for every label combination are resolved once at start-up, so the per-frame hot path
//! only bumps an atomic and never hashes labels or takes a lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::codec::{ErrorCode, kind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameLabels {
    direction: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

const FRAME_TYPES: [(u8, &str); 9] = [
    (kind::HELLO, "hello"),
    (kind::WELCOME, "welcome"),
    (kind::UP, "up"),
    (kind::DOWN, "down"),
    (kind::ACK, "ack"),
    (kind::PING, "ping"),
    (kind::PONG, "pong"),
    (kind::GOAWAY, "goaway"),
    (kind::ERROR, "error"),
];

const ERROR_CODES: [ErrorCode; 13] = [
    ErrorCode::FrameTooLarge,
    ErrorCode::UnknownFrameType,
    ErrorCode::MalformedFrame,
    ErrorCode::BadHello,
    ErrorCode::BadDeviceId,
    ErrorCode::Unauthorized,
    ErrorCode::ProtocolViolation,
    ErrorCode::HelloTimeout,
    ErrorCode::IdleTimeout,
    ErrorCode::SlowConsumer,
    ErrorCode::Unavailable,
    ErrorCode::Overloaded,
    ErrorCode::Internal,
];

/// What happened to one downlink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downlink {
    /// A request: written to the device socket. A plain publish: queued for it (nobody waits
    /// on it, so it is not tracked further; one still queued when the session ends is not
    /// counted again as `Dropped`).
    Sent,
    /// Confirmed by the device.
    Acked,
    /// Refused because the session queue was full.
    Busy,
    /// The device did not ACK in time.
    Timeout,
    /// Could not be delivered (session ended, payload too large).
    Failed,
    /// A plain publish (nobody to tell) that could not be delivered.
    Dropped,
}

/// What happened to one uplink message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    /// Handed to NATS.
    Published,
    /// Confirmed to the device after NATS accepted it.
    Acked,
    /// An UP with a `seq` whose acceptance by NATS could not be proven (reconnect, timeout, or
    /// not handed over at all): not ACKed, the device resends it. Nothing is lost.
    Unconfirmed,
    /// A plain UP (no `seq`) not handed to NATS because the connection dropped at that moment:
    /// lost (at-most-once). Kept apart from `Unconfirmed` so that an alert on it means loss.
    Dropped,
}

/// How the re-check of one session after a NATS reconnect ended (`reclaim.rs`): the split
/// brain it heals is invisible otherwise, and an operator needs to see it happen, or see that
/// a mixed-version cluster could not take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaim {
    /// Nobody else held the device.
    Clear,
    /// A session elsewhere held it and let go (it was older).
    TookBack,
    /// A newer session elsewhere held it: this one was released.
    Lost,
    /// The holder's answer was not a claim reply (a gateway without `reclaim`): kept as is.
    Unreadable,
    /// No answer in time (NATS went away again): kept, the next reconnect re-checks.
    Unanswered,
    /// The session ended or was replaced before its re-check.
    Ended,
}

/// All gateway metrics, cheap to clone (every handle is an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    /// Live (welcomed) sessions.
    pub sessions: Gauge,
    /// Open TCP connections, welcomed or not.
    pub connections: Gauge,
    /// Connections in their handshake (PROXY header + HELLO), bounded by `max_handshakes`.
    pub handshakes: Gauge,
    /// Connections refused at accept because `max_handshakes` were in progress.
    pub handshakes_refused: Counter,
    /// Connections refused because their peer may not send a PROXY header
    /// (`proxy_trusted_cidrs`).
    pub proxy_untrusted: Counter,
    /// Requests left unanswered because their reply subject was a devgate subject (a forged
    /// reply would make the gateway publish there with its own permissions).
    pub replies_refused: Counter,
    /// UPs that left their session's allowance (`up_rate_*`) used up, each pausing reading
    /// until it refills: a steadily flooding device adds about `up_rate_msgs` per second.
    pub uplink_throttled: Counter,
    /// Successful logins.
    pub logins: Counter,
    /// Logins whose token was valid only under the previous fleet secret: while this still
    /// rises, a rotation is not finished and the previous secret must stay.
    pub logins_previous_secret: Counter,
    /// Device ids in the denylist now (`denied_devices_file`).
    pub denied_devices: Gauge,
    /// Logins refused because the device id is on the denylist.
    pub denied_logins: Counter,
    /// Logins refused because the device id used up its `max_logins_per_id`.
    pub logins_throttled: Counter,
    /// Sessions closed because their device id was added to the denylist.
    pub revoked_sessions: Counter,
    /// Denylist changes that could not be applied (unreadable file, invalid id): the previous
    /// list stays in force, so an alert on this matters more than the log line.
    pub denylist_errors: Counter,
    /// 1 while the denylist file cannot be read or holds an invalid list, 0 once it applies
    /// again. The error counter rises once per broken content, so only this tells an alert
    /// that the list in force is still not the one the operator wrote.
    pub denylist_stale: Gauge,
    /// TLS handshakes with devices that failed (`device_tls_*`): a device without a trusted
    /// certificate, a plaintext device on the TLS port, a scanner. Counted, not logged one
    /// by one, since any peer can cause them.
    pub tls_handshake_failures: Counter,
    /// Logins refused because the device's certificate names another device id.
    pub tls_identity_mismatches: Counter,
    /// 1 while the device TLS files cannot be read or do not make a valid configuration, so
    /// the previous certificate stays in use (a renewal that is not being served).
    pub tls_stale: Gauge,
    /// When the device TLS certificate in use expires (Unix seconds): what an alert on a
    /// renewal that never happened watches.
    pub tls_certificate_expiry: Gauge,
    /// Logins that displaced an older session of the same device.
    pub takeovers: Counter,
    /// Sessions released because a reclaim (sent after a gateway's NATS reconnect) found a
    /// newer session of the device elsewhere: a healed split brain, counted on the gateway
    /// whose session yielded, whichever side sent the reclaim.
    pub reclaims_lost: Counter,
    /// Other gateways heard announcing within their last 3 beats (at least 2 s): fewer here than
    /// on the other gateways means this one is cut off from part of the NATS cluster.
    pub peers_visible: Gauge,
    /// Sweeps started because another gateway's announcements show a NATS partition that
    /// healed (lost on the way, heard late or first heard late): each re-checks every session.
    pub partition_sweeps: Counter,
    /// 1 while the NATS connection is up.
    pub nats_connected: Gauge,
    /// NATS connection losses.
    pub nats_disconnects: Counter,
    /// Messages async-nats dropped because a session did not drain its subscription in time.
    pub nats_slow_consumers: Counter,
    /// `SUB`s the NATS server refused (the gateway user's permissions, or `max_subs`): a
    /// device's ends its login or session, the gateway's own (stats, sessions, announcements)
    /// stay deaf until the next connection. A healthy install never has one.
    pub nats_subscriptions_refused: Counter,
    frames_in: [Counter; 9],
    frames_out: [Counter; 9],
    bytes_in: Counter,
    bytes_out: Counter,
    errors: [Counter; 13],
    downlink: [Counter; 6],
    uplink: [Counter; 4],
    reclaims: [Counter; 6],
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under `devgate_gateway_*`.
    pub fn new(registry: &mut Registry) -> Self {
        let reg = registry.sub_registry_with_prefix("devgate_gateway");
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            reg.register(name, help, g.clone());
            g
        };
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            reg.register(name, help, c.clone());
            c
        };
        let sessions = gauge(reg, "sessions", "Live device sessions (welcomed)");
        let connections = gauge(reg, "connections", "Open device TCP connections");
        let handshakes = gauge(
            reg,
            "handshakes",
            "Device connections in their handshake (PROXY header and HELLO)",
        );
        let handshakes_refused = counter(
            reg,
            "handshakes_refused",
            "Connections refused at accept because max_handshakes were in progress",
        );
        let proxy_untrusted = counter(
            reg,
            "proxy_untrusted",
            "Connections refused because the peer is not in proxy_trusted_cidrs",
        );
        let replies_refused = counter(
            reg,
            "replies_refused",
            "Requests not answered because their reply subject is under device. or devgate.",
        );
        let uplink_throttled = counter(
            reg,
            "uplink_throttled",
            "UPs that used up their session's uplink allowance; reading pauses after each",
        );
        let logins = counter(reg, "logins", "Successful device logins");
        let logins_previous_secret = counter(
            reg,
            "logins_previous_secret",
            "Logins with a token valid only under the previous fleet secret (rotation in progress)",
        );
        let denied_devices = gauge(reg, "denied_devices", "Device ids on the denylist");
        let denied_logins = counter(
            reg,
            "denied_logins",
            "Logins refused because the device id is on the denylist",
        );
        let logins_throttled = counter(
            reg,
            "logins_throttled",
            "Logins refused because the device id logged in max_logins_per_id times in its window",
        );
        let revoked_sessions = counter(
            reg,
            "revoked_sessions",
            "Sessions closed because their device id was added to the denylist",
        );
        let denylist_errors = counter(
            reg,
            "denylist_errors",
            "Denylist changes not applied (unreadable file or invalid id); the previous list stays",
        );
        let denylist_stale = gauge(
            reg,
            "denylist_stale",
            "1 while the denylist file is unreadable or invalid and the previous list stays in force",
        );
        let tls_handshake_failures = counter(
            reg,
            "tls_handshake_failures",
            "Device TLS handshakes that failed (untrusted or missing certificate, not TLS)",
        );
        let tls_identity_mismatches = counter(
            reg,
            "tls_identity_mismatches",
            "Logins refused because the client certificate names another device id",
        );
        let tls_stale = gauge(
            reg,
            "tls_stale",
            "1 while the device TLS files are unreadable or invalid and the previous ones stay in use",
        );
        let tls_certificate_expiry = gauge(
            reg,
            "tls_certificate_expiry_timestamp_seconds",
            "Expiry of the device TLS certificate in use, in Unix seconds (0 without device TLS)",
        );
        let takeovers = counter(reg, "takeovers", "Logins that replaced an older session");
        let reclaims_lost = counter(
            reg,
            "reclaims_lost",
            "Sessions released because a reclaim after a NATS reconnect found a newer one elsewhere",
        );
        let peers_visible = gauge(
            reg,
            "peers_visible",
            "Other gateways heard announcing within their last 3 beats",
        );
        let partition_sweeps = counter(
            reg,
            "partition_sweeps",
            "Re-checks of every session started because another gateway's announcements show a NATS partition that healed",
        );
        let nats_connected = gauge(reg, "nats_connected", "1 while connected to NATS");
        let nats_disconnects = counter(reg, "nats_disconnects", "NATS connection losses");
        let nats_slow_consumers = counter(
            reg,
            "nats_slow_consumers",
            "Messages the NATS client dropped for a session that did not keep up",
        );

        let nats_subscriptions_refused = counter(
            reg,
            "nats_subscriptions_refused",
            "Subscriptions the NATS server refused (permissions or max_subs); a device's ends its login or session",
        );

        let frames = Family::<FrameLabels, Counter>::default();
        reg.register(
            "frames",
            "Protocol frames by direction and type",
            frames.clone(),
        );
        let frame_handles = |direction: &'static str| {
            FRAME_TYPES.map(|(_, name)| {
                frames
                    .get_or_create(&FrameLabels {
                        direction,
                        r#type: name,
                    })
                    .clone()
            })
        };
        let frames_in = frame_handles("in");
        let frames_out = frame_handles("out");

        let bytes = Family::<DirectionLabels, Counter>::default();
        reg.register("bytes", "Device socket bytes by direction", bytes.clone());
        let bytes_in = bytes
            .get_or_create(&DirectionLabels { direction: "in" })
            .clone();
        let bytes_out = bytes
            .get_or_create(&DirectionLabels { direction: "out" })
            .clone();

        let errors_family = Family::<CodeLabels, Counter>::default();
        reg.register(
            "errors",
            "ERROR frames sent to devices, by code",
            errors_family.clone(),
        );
        let errors = ERROR_CODES.map(|code| {
            errors_family
                .get_or_create(&CodeLabels {
                    code: code.as_str(),
                })
                .clone()
        });

        let outcome_family =
            |reg: &mut Registry, name: &str, help: &str, outcomes: &[&'static str]| {
                let fam = Family::<OutcomeLabels, Counter>::default();
                reg.register(name, help, fam.clone());
                outcomes
                    .iter()
                    .map(|o| fam.get_or_create(&OutcomeLabels { outcome: o }).clone())
                    .collect::<Vec<_>>()
            };
        let down = outcome_family(
            reg,
            "downlink_messages",
            "Downlink messages by outcome",
            &["sent", "acked", "busy", "timeout", "failed", "dropped"],
        );
        let up = outcome_family(
            reg,
            "uplink_messages",
            "Uplink messages by outcome",
            &["published", "acked", "unconfirmed", "dropped"],
        );
        let reclaim_outcomes = outcome_family(
            reg,
            "reclaims",
            "Sessions re-checked after a NATS reconnect, by outcome",
            &[
                "clear",
                "took_back",
                "lost",
                "unreadable",
                "unanswered",
                "ended",
            ],
        );
        let reclaims: [Counter; 6] = std::array::from_fn(|i| reclaim_outcomes[i].clone());
        let downlink: [Counter; 6] = std::array::from_fn(|i| down[i].clone());
        let uplink: [Counter; 4] = std::array::from_fn(|i| up[i].clone());

        Metrics {
            sessions,
            connections,
            handshakes,
            handshakes_refused,
            proxy_untrusted,
            replies_refused,
            uplink_throttled,
            logins,
            logins_previous_secret,
            denied_devices,
            denied_logins,
            logins_throttled,
            revoked_sessions,
            denylist_errors,
            denylist_stale,
            tls_handshake_failures,
            tls_identity_mismatches,
            tls_stale,
            tls_certificate_expiry,
            takeovers,
            reclaims_lost,
            peers_visible,
            partition_sweeps,
            nats_connected,
            nats_disconnects,
            nats_slow_consumers,
            nats_subscriptions_refused,
            frames_in,
            frames_out,
            bytes_in,
            bytes_out,
            errors,
            downlink,
            uplink,
            reclaims,
        }
    }

    /// A frame arrived from a device.
    pub fn frame_in(&self, frame_kind: u8, wire_len: usize) {
        if let Some(c) = self.frames_in.get(usize::from(frame_kind).wrapping_sub(1)) {
            c.inc();
        }
        self.bytes_in.inc_by(wire_len as u64);
    }

    /// A frame was queued to a device.
    pub fn frame_out(&self, frame_kind: u8, wire_len: usize) {
        if let Some(c) = self.frames_out.get(usize::from(frame_kind).wrapping_sub(1)) {
            c.inc();
        }
        self.bytes_out.inc_by(wire_len as u64);
    }

    /// An ERROR frame with `code` was sent.
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
            self.errors[i].inc();
        }
    }

    /// Counts one downlink outcome.
    pub fn downlink(&self, outcome: Downlink) {
        self.downlink[outcome as usize].inc();
    }

    /// Counts one uplink outcome.
    pub fn uplink(&self, outcome: Uplink) {
        self.uplink[outcome as usize].inc();
    }

    /// Counts how one session's re-check after a NATS reconnect ended.
    pub fn reclaim(&self, outcome: Reclaim) {
        self.reclaims[outcome as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_land_under_their_labels() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.frame_in(kind::UP, 10);
        m.frame_out(kind::DOWN, 7);
        m.error(ErrorCode::Unauthorized);
        m.downlink(Downlink::Busy);
        m.uplink(Uplink::Unconfirmed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "devgate_gateway_frames_total{direction=\"in\",type=\"up\"} 1",
            "devgate_gateway_frames_total{direction=\"out\",type=\"down\"} 1",
            "devgate_gateway_bytes_total{direction=\"in\"} 10",
            "devgate_gateway_errors_total{code=\"unauthorized\"} 1",
            "devgate_gateway_downlink_messages_total{outcome=\"busy\"} 1",
            "devgate_gateway_uplink_messages_total{outcome=\"unconfirmed\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
