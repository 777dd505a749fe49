//! The subset of MQTT 3.1.1 the peer benchmark needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK,
//! PUBLISH at QoS 0 and 1 with PUBACK, PINGREQ/PINGRESP.
//!
//! Written here rather than pulled in as a client crate so both sides of the comparison run the
//! same kind of hand-rolled, batch-writing load code: neither is slowed by a general-purpose
//! client's abstractions.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Packet types (high nibble of the first byte).
mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
}

/// Largest packet accepted from the broker (the benchmark never sends more than a few KiB).
const MAX_PACKET: usize = 1 << 20;

/// What went wrong decoding the broker's bytes.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The remaining-length varint is longer than 4 bytes or the packet is too big.
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    /// CONNACK with a non-zero return code.
    #[error("broker refused the connection (CONNACK code {0})")]
    Refused(u8),
}

/// A packet from the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK with its return code.
    ConnAck(u8),
    /// SUBACK for a packet id.
    SubAck(u16),
    /// An application message.
    Publish {
        /// Topic name.
        topic: Bytes,
        /// Packet id (QoS > 0 only).
        pid: Option<u16>,
        /// Payload.
        payload: Bytes,
    },
    /// PUBACK for a packet id.
    PubAck(u16),
    /// PINGRESP.
    PingResp,
    /// Anything else (type nibble).
    Other(u8),
}

fn put_len(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// Appends CONNECT with a clean session and `keepalive_s`.
pub fn connect(buf: &mut BytesMut, client_id: &str, keepalive_s: u16) {
    let body = 10 + 2 + client_id.len();
    buf.put_u8(kind::CONNECT << 4);
    put_len(buf, body);
    put_str(buf, b"MQTT");
    buf.put_u8(4); // protocol level 3.1.1
    buf.put_u8(0x02); // clean session
    buf.put_u16(keepalive_s);
    put_str(buf, client_id.as_bytes());
}

/// Appends SUBSCRIBE for one topic filter.
pub fn subscribe(buf: &mut BytesMut, pid: u16, filter: &str, qos: u8) {
    buf.put_u8((kind::SUBSCRIBE << 4) | 0x02);
    put_len(buf, 2 + 2 + filter.len() + 1);
    buf.put_u16(pid);
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos);
}

/// Appends PUBLISH; `pid` given means QoS 1.
pub fn publish(buf: &mut BytesMut, topic: &[u8], pid: Option<u16>, payload: &[u8]) {
    let qos_bits = if pid.is_some() { 0x02 } else { 0 };
    buf.put_u8((kind::PUBLISH << 4) | qos_bits);
    put_len(
        buf,
        2 + topic.len() + if pid.is_some() { 2 } else { 0 } + payload.len(),
    );
    put_str(buf, topic);
    if let Some(pid) = pid {
        buf.put_u16(pid);
    }
    buf.put_slice(payload);
}

/// Appends PUBACK.
pub fn puback(buf: &mut BytesMut, pid: u16) {
    buf.put_u8(kind::PUBACK << 4);
    buf.put_u8(2);
    buf.put_u16(pid);
}

/// Appends PINGREQ.
pub fn pingreq(buf: &mut BytesMut) {
    buf.put_u8(kind::PINGREQ << 4);
    buf.put_u8(0);
}

/// Takes one complete packet off the front of `buf`, or `None` if more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut header = 1;
    loop {
        let Some(&byte) = buf.get(header) else {
            return Ok(None);
        };
        len += usize::from(byte & 0x7f) * mult;
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if header > 4 {
            return Err(MqttError::Malformed("remaining length longer than 4 bytes"));
        }
    }
    if len > MAX_PACKET {
        return Err(MqttError::Malformed("packet too large"));
    }
    if buf.len() < header + len {
        return Ok(None);
    }
    let first = buf[0];
    buf.advance(header);
    let mut body = buf.split_to(len).freeze();
    let short = MqttError::Malformed("body too short");
    let packet = match first >> 4 {
        kind::CONNACK => {
            if body.len() < 2 {
                return Err(short);
            }
            Packet::ConnAck(body[1])
        }
        kind::SUBACK => {
            if body.len() < 2 {
                return Err(short);
            }
            Packet::SubAck(body.get_u16())
        }
        kind::PUBACK => {
            if body.len() < 2 {
                return Err(short);
            }
            Packet::PubAck(body.get_u16())
        }
        kind::PINGRESP => Packet::PingResp,
        kind::PUBLISH => {
            if body.len() < 2 {
                return Err(short);
            }
            let tlen = usize::from(body.get_u16());
            let qos = (first >> 1) & 0x03;
            let need = tlen + if qos > 0 { 2 } else { 0 };
            if body.len() < need {
                return Err(short);
            }
            let topic = body.split_to(tlen);
            let pid = (qos > 0).then(|| body.get_u16());
            Packet::Publish {
                topic,
                pid,
                payload: body,
            }
        }
        other => Packet::Other(other),
    };
    Ok(Some(packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_at_both_qos() {
        let mut buf = BytesMut::new();
        publish(&mut buf, b"device/d1/down", None, b"hello");
        publish(&mut buf, b"t", Some(7), &vec![9u8; 300]);
        let p = decode(&mut buf).expect("ok").expect("complete");
        assert_eq!(
            p,
            Packet::Publish {
                topic: Bytes::from_static(b"device/d1/down"),
                pid: None,
                payload: Bytes::from_static(b"hello"),
            }
        );
        match decode(&mut buf).expect("ok").expect("complete") {
            Packet::Publish { pid, payload, .. } => {
                assert_eq!(pid, Some(7));
                assert_eq!(payload.len(), 300, "two-byte remaining length");
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_packets_wait_and_bad_lengths_fail() {
        let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00][..]);
        assert_eq!(decode(&mut buf).expect("ok"), None);
        buf.put_u8(0x05);
        assert_eq!(decode(&mut buf).expect("ok"), Some(Packet::ConnAck(5)));
        let mut bad = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(decode(&mut bad).is_err());
    }
}
