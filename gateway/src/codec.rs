//! The native device protocol v1: framing and frame bodies (`docs/protocol.md`).
//!
//! Every frame is a 4-byte big-endian length `L`, then `L` bytes: one type byte and the body.
//! The decoder checks `L` against the configured limit *before* buffering anything, and commits
//! memory only as bytes arrive (at most [`GROW_STEP`] ahead of them), so a hostile length field
//! costs the gateway nothing: a peer that announces 64 KiB and then goes quiet holds only what it
//! actually sent.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// Default maximum frame length (type byte + body), 64 KiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Length of the frame header (the big-endian `L`).
pub const HEADER_LEN: usize = 4;

/// Default limit of the first frame (HELLO), 4 KiB: a device id, a token and at most
/// [`MAX_METADATA_BYTES`] of metadata fit with room to spare, while an unauthenticated peer can
/// make the gateway buffer no more than this.
pub const DEFAULT_MAX_HELLO_LEN: usize = 4 * 1024;

/// HELLO metadata limits: at most this many bytes as compact JSON...
pub const MAX_METADATA_BYTES: usize = 1024;
/// ...and at most this many keys. Metadata lives as long as the session, on every session.
pub const MAX_METADATA_KEYS: usize = 16;

/// How far ahead of the bytes received the decoder reserves buffer space for a partial frame.
/// A frame up to this size is still reserved whole (one allocation, read in as few syscalls
/// as the socket allows: the fast path for typical frames); a longer one grows in steps as its
/// bytes arrive, so an announced length is never a reason to allocate.
pub const GROW_STEP: usize = 16 * 1024;

/// Largest downlink payload that fits a DOWN frame under `max_frame_len` (type byte and 4-byte
/// seq come off). The gateway and bridge-api both size-check with this, so they agree exactly.
pub fn max_down_payload_len(max_frame_len: usize) -> usize {
    max_frame_len.saturating_sub(1 + 4)
}

/// Frame type bytes.
pub mod kind {
    /// device->gateway, first frame: JSON [`super::Hello`].
    pub const HELLO: u8 = 0x01;
    /// gateway->device: JSON [`super::Welcome`].
    pub const WELCOME: u8 = 0x02;
    /// device->gateway: 4-byte seq + payload.
    pub const UP: u8 = 0x03;
    /// gateway->device: 4-byte seq + payload.
    pub const DOWN: u8 = 0x04;
    /// either way: 4-byte seq.
    pub const ACK: u8 = 0x05;
    /// either way: body echoed in the PONG.
    pub const PING: u8 = 0x06;
    /// either way: the PING's body.
    pub const PONG: u8 = 0x07;
    /// gateway->device: JSON [`super::GoAway`], then close.
    pub const GOAWAY: u8 = 0x08;
    /// gateway->device: JSON [`super::ErrorBody`], then close.
    pub const ERROR: u8 = 0x09;
}

/// One protocol frame. JSON bodies stay raw bytes here; the session parses them where it needs
/// to, so the codec never fails on (and never allocates for) JSON it does not look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Login request (JSON [`Hello`]).
    Hello(Bytes),
    /// Login accepted (JSON [`Welcome`]).
    Welcome(Bytes),
    /// Uplink message; `seq` 0 asks for no ACK.
    Up {
        /// Device-chosen sequence number, echoed in the gateway's ACK.
        seq: u32,
        /// Application payload, opaque to devgate.
        payload: Bytes,
    },
    /// Downlink message; `seq` 0 means the gateway does not expect an ACK.
    Down {
        /// Gateway-chosen sequence number the device echoes in its ACK.
        seq: u32,
        /// Application payload, opaque to devgate.
        payload: Bytes,
    },
    /// Acknowledges an UP (gateway->device) or a DOWN (device->gateway).
    Ack(u32),
    /// Liveness probe; the body is echoed.
    Ping(Bytes),
    /// Answer to a PING.
    Pong(Bytes),
    /// The gateway is closing the session; JSON [`GoAway`].
    GoAway(Bytes),
    /// The gateway refuses something and closes; JSON [`ErrorBody`].
    Error(Bytes),
}

impl Frame {
    /// The type byte of this frame.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Welcome(_) => kind::WELCOME,
            Frame::Up { .. } => kind::UP,
            Frame::Down { .. } => kind::DOWN,
            Frame::Ack(_) => kind::ACK,
            Frame::Ping(_) => kind::PING,
            Frame::Pong(_) => kind::PONG,
            Frame::GoAway(_) => kind::GOAWAY,
            Frame::Error(_) => kind::ERROR,
        }
    }

    /// Short name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Welcome(_) => "welcome",
            Frame::Up { .. } => "up",
            Frame::Down { .. } => "down",
            Frame::Ack(_) => "ack",
            Frame::Ping(_) => "ping",
            Frame::Pong(_) => "pong",
            Frame::GoAway(_) => "goaway",
            Frame::Error(_) => "error",
        }
    }

    /// Length of the body (without header and type byte).
    fn body_len(&self) -> usize {
        match self {
            Frame::Hello(b)
            | Frame::Welcome(b)
            | Frame::Ping(b)
            | Frame::Pong(b)
            | Frame::GoAway(b)
            | Frame::Error(b) => b.len(),
            Frame::Up { payload, .. } | Frame::Down { payload, .. } => 4 + payload.len(),
            Frame::Ack(_) => 4,
        }
    }

    /// Bytes this frame occupies on the wire, header included.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + 1 + self.body_len()
    }

    /// Builds a JSON-bodied frame (`WELCOME`, `GOAWAY`, `ERROR`, `HELLO`).
    pub fn json<T: Serialize>(make: fn(Bytes) -> Frame, body: &T) -> Frame {
        // Serializing these plain structs cannot fail (no maps with non-string keys).
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        make(Bytes::from(bytes))
    }
}

/// Why bytes from a peer could not be decoded. Each maps to an `ERROR` code the device sees.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length field announced more than the configured limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The type byte is not one of protocol v1's.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The frame is structurally wrong (empty, or a body shorter than its fixed fields).
    #[error("malformed {frame} frame: {why}")]
    Malformed {
        /// Frame type name.
        frame: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

impl CodecError {
    /// The `ERROR` code sent to the device for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::Io(_) => ErrorCode::Internal,
            CodecError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            CodecError::UnknownType(_) => ErrorCode::UnknownFrameType,
            CodecError::Malformed { .. } => ErrorCode::MalformedFrame,
        }
    }
}

/// Length-prefixed frame codec with a maximum frame length.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame_len` (type byte + body).
    pub fn new(max_frame_len: usize) -> Self {
        FrameCodec { max_frame_len }
    }

    /// The configured limit.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

fn seq_body(frame: &'static str, mut body: Bytes) -> Result<(u32, Bytes), CodecError> {
    if body.len() < 4 {
        return Err(CodecError::Malformed {
            frame,
            why: "body shorter than the 4-byte sequence number",
        });
    }
    let seq = body.get_u32();
    Ok((seq, body))
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if len == 0 {
            return Err(CodecError::Malformed {
                frame: "empty",
                why: "length 0 leaves no room for the type byte",
            });
        }
        if src.len() < HEADER_LEN + len {
            // Room for what is still missing, but never more than one step ahead of the bytes
            // that actually arrived (see `GROW_STEP`).
            src.reserve((HEADER_LEN + len - src.len()).min(GROW_STEP));
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let ty = src.get_u8();
        let body = src.split_to(len - 1).freeze();
        let frame = match ty {
            kind::HELLO => Frame::Hello(body),
            kind::WELCOME => Frame::Welcome(body),
            kind::UP => {
                let (seq, payload) = seq_body("UP", body)?;
                Frame::Up { seq, payload }
            }
            kind::DOWN => {
                let (seq, payload) = seq_body("DOWN", body)?;
                Frame::Down { seq, payload }
            }
            kind::ACK => {
                if body.len() != 4 {
                    return Err(CodecError::Malformed {
                        frame: "ACK",
                        why: "body must be exactly the 4-byte sequence number",
                    });
                }
                let (seq, _) = seq_body("ACK", body)?;
                Frame::Ack(seq)
            }
            kind::PING => Frame::Ping(body),
            kind::PONG => Frame::Pong(body),
            kind::GOAWAY => Frame::GoAway(body),
            kind::ERROR => Frame::Error(body),
            other => return Err(CodecError::UnknownType(other)),
        };
        Ok(Some(frame))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = 1 + frame.body_len();
        if len > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        dst.reserve(HEADER_LEN + len);
        // `len` <= max_frame_len, which config validation keeps below u32::MAX.
        dst.put_u32(len as u32);
        dst.put_u8(frame.kind());
        match frame {
            Frame::Hello(b)
            | Frame::Welcome(b)
            | Frame::Ping(b)
            | Frame::Pong(b)
            | Frame::GoAway(b)
            | Frame::Error(b) => dst.put_slice(&b),
            Frame::Up { seq, payload } | Frame::Down { seq, payload } => {
                dst.put_u32(seq);
                dst.put_slice(&payload);
            }
            Frame::Ack(seq) => dst.put_u32(seq),
        }
        Ok(())
    }
}

/// The fields of `HELLO` the gateway checks before it trusts the peer. Deserializing into this
/// skips every other field without building a value for it, so an unauthenticated peer's
/// metadata is never materialised (see [`Hello::check_metadata`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HelloLogin {
    /// The device id (validated by the gateway, not here).
    pub device_id: String,
    /// Authentication token.
    #[serde(default)]
    pub token: String,
}

/// Why HELLO metadata is refused (`bad_hello`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    /// More keys than [`MAX_METADATA_KEYS`].
    #[error("metadata has {0} keys; at most {MAX_METADATA_KEYS} are allowed")]
    TooManyKeys(usize),
    /// A value that is an object or an array.
    #[error(
        "metadata value {0:?} is not a string, number, boolean or null (nested values are not allowed)"
    )]
    NotScalar(String),
    /// Larger than [`MAX_METADATA_BYTES`] as compact JSON.
    #[error("metadata is {0} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed")]
    TooLarge(usize),
}

/// Body of `HELLO`. Unknown fields are kept and become session metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The device id (validated by the gateway, not here).
    pub device_id: String,
    /// Authentication token (lowercase hex HMAC-SHA256 of the device id by default).
    #[serde(default)]
    pub token: String,
    /// Every other field, passed on as session metadata.
    #[serde(flatten)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl Hello {
    /// Checks the metadata against the documented bounds: at most [`MAX_METADATA_KEYS`] keys,
    /// scalar values only, at most [`MAX_METADATA_BYTES`] as compact JSON. It is kept for the
    /// whole session, so unbounded metadata would be unbounded memory per device.
    pub fn check_metadata(&self) -> Result<(), MetadataError> {
        if self.metadata.len() > MAX_METADATA_KEYS {
            return Err(MetadataError::TooManyKeys(self.metadata.len()));
        }
        if let Some((key, _)) = self
            .metadata
            .iter()
            .find(|(_, v)| v.is_object() || v.is_array())
        {
            let shown: String = key.chars().take(64).collect();
            return Err(MetadataError::NotScalar(shown));
        }
        let len = serde_json::to_vec(&self.metadata).map_or(usize::MAX, |v| v.len());
        if len > MAX_METADATA_BYTES {
            return Err(MetadataError::TooLarge(len));
        }
        Ok(())
    }
}

/// Body of `WELCOME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Session id, unique across gateways.
    pub session: String,
    /// Gateway instance id.
    pub gateway: String,
    /// The device should send a PING at least this often; the gateway closes a session that
    /// stays silent for three periods.
    pub heartbeat_s: u64,
    /// Largest frame the gateway accepts.
    pub max_frame_len: usize,
}

/// Why the gateway sends `GOAWAY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoAwayReason {
    /// A newer session for the same device was welcomed (on this or another gateway).
    Replaced,
    /// The gateway is shutting down; reconnect (through the load balancer) after the delay.
    Draining,
    /// The operator moves devices to even out load.
    Rebalance,
    /// An operator or service disconnected the device.
    Kicked,
}

impl GoAwayReason {
    /// The reason as its wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            GoAwayReason::Replaced => "replaced",
            GoAwayReason::Draining => "draining",
            GoAwayReason::Rebalance => "rebalance",
            GoAwayReason::Kicked => "kicked",
        }
    }
}

/// Body of `GOAWAY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoAway {
    /// Why.
    pub reason: GoAwayReason,
    /// Wait this long before reconnecting (spreads reconnect storms).
    pub reconnect_after_ms: u64,
}

/// `ERROR` codes. Stable strings: devices and dashboards match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame's length field exceeds the limit.
    FrameTooLarge,
    /// A type byte outside protocol v1.
    UnknownFrameType,
    /// A frame with a structurally invalid body.
    MalformedFrame,
    /// HELLO body is not the expected JSON.
    BadHello,
    /// The device id breaks the id rules.
    BadDeviceId,
    /// Wrong or missing token.
    Unauthorized,
    /// A frame that is not allowed in the current state (UP before HELLO, a second HELLO, a
    /// gateway-only frame from a device).
    ProtocolViolation,
    /// No HELLO within the deadline.
    HelloTimeout,
    /// No frame at all for three heartbeat periods.
    IdleTimeout,
    /// The device does not read fast enough; its bounded queue overflowed.
    SlowConsumer,
    /// The message bus is unreachable; retry later.
    Unavailable,
    /// The gateway is at its session limit.
    Overloaded,
    /// Something failed inside the gateway.
    Internal,
}

impl ErrorCode {
    /// The code as its wire string (also the `code` label of the errors metric).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownFrameType => "unknown_frame_type",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::BadHello => "bad_hello",
            ErrorCode::BadDeviceId => "bad_device_id",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Body of `ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: Frame) {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(frame.clone(), &mut buf).expect("encode");
        assert_eq!(buf.len(), frame.wire_len());
        let decoded = codec.decode(&mut buf).expect("decode").expect("complete");
        assert_eq!(decoded, frame);
        assert!(buf.is_empty());
    }

    #[test]
    fn every_frame_type_roundtrips() {
        roundtrip(Frame::Hello(Bytes::from_static(b"{\"device_id\":\"a\"}")));
        roundtrip(Frame::Welcome(Bytes::from_static(b"{}")));
        roundtrip(Frame::Up {
            seq: 7,
            payload: Bytes::from_static(b"hi"),
        });
        roundtrip(Frame::Down {
            seq: u32::MAX,
            payload: Bytes::new(),
        });
        roundtrip(Frame::Ack(42));
        roundtrip(Frame::Ping(Bytes::from_static(b"x")));
        roundtrip(Frame::Pong(Bytes::new()));
        roundtrip(Frame::GoAway(Bytes::from_static(b"{}")));
        roundtrip(Frame::Error(Bytes::from_static(b"{}")));
    }

    #[test]
    fn wire_layout_matches_the_spec() {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(
                Frame::Up {
                    seq: 1,
                    payload: Bytes::from_static(b"ab"),
                },
                &mut buf,
            )
            .expect("encode");
        assert_eq!(&buf[..], &[0, 0, 0, 7, 0x03, 0, 0, 0, 1, b'a', b'b']);
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 0x05, 0, 0][..]);
        assert!(codec.decode(&mut buf).expect("ok").is_none());
        buf.extend_from_slice(&[0, 9]);
        assert_eq!(codec.decode(&mut buf).expect("ok"), Some(Frame::Ack(9)));
    }

    #[test]
    fn oversize_length_is_refused_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(
            buf.capacity(),
            cap_before,
            "no allocation from the length field"
        );
    }

    #[test]
    fn an_announced_length_reserves_at_most_one_step() {
        let mut codec = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(codec.decode(&mut buf).expect("ok").is_none());
        assert!(
            buf.capacity() <= HEADER_LEN + GROW_STEP,
            "reserved {} bytes for a frame that has not arrived",
            buf.capacity()
        );
        // A small frame is still reserved whole: one allocation for its body.
        let mut buf = BytesMut::from(&[0u8, 0, 0x04, 0x00, kind::PING][..]);
        assert!(codec.decode(&mut buf).expect("ok").is_none());
        assert!(buf.capacity() >= HEADER_LEN + 1024, "{}", buf.capacity());
    }

    #[test]
    fn metadata_is_bounded() {
        let hello = |json: &str| -> Hello { serde_json::from_str(json).expect("json") };
        assert!(
            hello(r#"{"device_id":"a","fw":"2.1","n":3,"ok":true,"x":null}"#)
                .check_metadata()
                .is_ok()
        );
        assert!(matches!(
            hello(r#"{"device_id":"a","zeros":[0,0,0]}"#).check_metadata(),
            Err(MetadataError::NotScalar(k)) if k == "zeros"
        ));
        assert!(matches!(
            hello(r#"{"device_id":"a","o":{"b":1}}"#).check_metadata(),
            Err(MetadataError::NotScalar(_))
        ));
        let many: String = (0..=MAX_METADATA_KEYS)
            .map(|i| format!(r#","k{i}":1"#))
            .collect();
        assert_eq!(
            hello(&format!(r#"{{"device_id":"a"{many}}}"#)).check_metadata(),
            Err(MetadataError::TooManyKeys(MAX_METADATA_KEYS + 1))
        );
        let big = "x".repeat(MAX_METADATA_BYTES);
        assert!(matches!(
            hello(&format!(r#"{{"device_id":"a","fw":"{big}"}}"#)).check_metadata(),
            Err(MetadataError::TooLarge(_))
        ));
    }

    #[test]
    fn bad_frames_get_specific_errors() {
        let mut codec = FrameCodec::default();
        let cases: [(&[u8], ErrorCode); 4] = [
            (&[0, 0, 0, 0], ErrorCode::MalformedFrame),
            (&[0, 0, 0, 1, 0x42], ErrorCode::UnknownFrameType),
            (&[0, 0, 0, 3, kind::UP, 0, 0], ErrorCode::MalformedFrame),
            (&[0, 0, 0, 2, kind::ACK, 0], ErrorCode::MalformedFrame),
        ];
        for (bytes, code) in cases {
            let err = codec
                .decode(&mut BytesMut::from(bytes))
                .expect_err("must fail");
            assert_eq!(err.code(), code, "{bytes:?}");
        }
    }

    #[test]
    fn encoder_refuses_oversize_frames() {
        let mut codec = FrameCodec::new(8);
        let err = codec
            .encode(
                Frame::Down {
                    seq: 1,
                    payload: Bytes::from_static(b"too long"),
                },
                &mut BytesMut::new(),
            )
            .expect_err("must fail");
        assert!(matches!(err, CodecError::FrameTooLarge { len: 13, max: 8 }));
    }

    #[test]
    fn hello_keeps_extra_fields_as_metadata() {
        let h: Hello =
            serde_json::from_str(r#"{"device_id":"d","token":"t","fw":"1.2"}"#).expect("parse");
        assert_eq!(h.device_id, "d");
        assert_eq!(h.metadata.get("fw").and_then(|v| v.as_str()), Some("1.2"));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and it never holds more than one maximum
        /// frame (plus the header) however the length fields are chosen.
        #[test]
        fn decoder_survives_arbitrary_input(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let max = 256;
            let mut codec = FrameCodec::new(max);
            let mut buf = BytesMut::new();
            'outer: for chunk in chunks {
                buf.extend_from_slice(&chunk);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                // At most ~6 KB of input was pushed; a decoder trusting a random u32 length would
                // have reserved up to 4 GiB here.
                prop_assert!(buf.capacity() <= 16 * 1024, "capacity {}", buf.capacity());
            }
        }

        /// Whatever frames are encoded back to back, decoding returns exactly them.
        #[test]
        fn stream_of_frames_roundtrips(frames in proptest::collection::vec(
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..100)), 0..30)) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let frames: Vec<Frame> = frames.into_iter()
                .map(|(seq, p)| Frame::Up { seq, payload: Bytes::from(p) })
                .collect();
            for f in &frames {
                codec.encode(f.clone(), &mut buf).expect("encode");
            }
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut buf).expect("decode") {
                out.push(f);
            }
            prop_assert_eq!(out, frames);
        }
    }
}
