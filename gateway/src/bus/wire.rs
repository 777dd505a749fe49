//! The NATS client protocol, as far as the gateway speaks it: encoding of what it sends and an
//! incremental decoder of what the server sends. Pure functions over byte buffers, so every
//! corner (split reads, headers, status replies) is unit-tested without a socket.
//!
//! Reference: <https://docs.nats.io/reference/reference-protocols/nats-protocol>.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest control line accepted from the server. Real lines are a few hundred bytes (`INFO`
/// with a cluster's connect URLs can reach a few KiB); anything longer is a broken stream.
const MAX_CONTROL_LINE: usize = 64 * 1024;

/// The version line every header block starts with.
const HEADER_VERSION: &[u8] = b"NATS/1.0";

/// Payloads up to this size are copied out of the read buffer by [`Msg::detach`]: a small
/// message held for long (a queued DOWN, a reply subject kept until the device ACKs) must not
/// keep a whole read block of 64 KiB or more alive. Larger payloads keep sharing the block,
/// which they fill a good part of anyway.
pub const INLINE_PAYLOAD: usize = 4 * 1024;

/// The server broke the protocol; the connection cannot be trusted any more.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A control line longer than [`MAX_CONTROL_LINE`].
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    /// A line that is not one of the server's operations, or with bad arguments.
    #[error("unexpected protocol line from the server: {0:?}")]
    BadLine(String),
    /// A `MSG`/`HMSG` announcing more bytes than the server may send: buffering it would let
    /// one line reserve any amount of memory.
    #[error("message of {size} bytes announced, more than the limit of {limit}")]
    TooLarge {
        /// The announced header + payload size.
        size: usize,
        /// The most this decoder accepts.
        limit: usize,
    },
    /// The bytes after a message body are not `CRLF`: the announced size was wrong, so
    /// everything after it would be misread.
    #[error("message body not followed by CRLF")]
    MissingCrlf,
}

/// A message delivered by the server. As decoded, subject, reply, headers and payload are
/// slices of the read buffer (no copies); [`Msg::detach`] makes one fit to be held.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The subject it was published on.
    pub subject: Bytes,
    /// Where the publisher expects an answer (requests only).
    pub reply: Option<Bytes>,
    /// The raw header block (`NATS/1.0...\r\n\r\n`), if any.
    headers: Option<Bytes>,
    /// The message body.
    pub payload: Bytes,
}

impl Msg {
    /// The bytes it holds (subject, reply, headers, payload), for queue limits.
    pub fn size(&self) -> usize {
        self.subject.len()
            + self.reply.as_ref().map_or(0, Bytes::len)
            + self.headers.as_ref().map_or(0, Bytes::len)
            + self.payload.len()
    }

    /// A message built locally (tests, and replies synthesised by the client).
    pub fn new(
        subject: Bytes,
        reply: Option<Bytes>,
        headers: Option<Bytes>,
        payload: Bytes,
    ) -> Msg {
        Msg {
            subject,
            reply,
            headers,
            payload,
        }
    }

    /// The message in a buffer of its own, for keeping: subject, reply and headers are copied
    /// (a reply is kept until the device ACKs, up to `ack_timeout`), and so is a payload up to
    /// [`INLINE_PAYLOAD`]. A decoded message otherwise pins its whole read block, which no
    /// session byte limit accounts for. One allocation (plus the shared header `Bytes` needs to
    /// split it).
    pub fn detach(self) -> Msg {
        let inline = self.payload.len() <= INLINE_PAYLOAD;
        let reply_len = self.reply.as_ref().map_or(0, Bytes::len);
        let headers_len = self.headers.as_ref().map_or(0, Bytes::len);
        let payload_len = if inline { self.payload.len() } else { 0 };
        let mut own =
            BytesMut::with_capacity(self.subject.len() + reply_len + headers_len + payload_len);
        own.put_slice(&self.subject);
        if let Some(reply) = &self.reply {
            own.put_slice(reply);
        }
        if let Some(headers) = &self.headers {
            own.put_slice(headers);
        }
        if inline {
            own.put_slice(&self.payload);
        }
        let mut own = own.freeze();
        let subject = own.split_to(self.subject.len());
        let reply = self.reply.as_ref().map(|_| own.split_to(reply_len));
        let headers = self.headers.as_ref().map(|_| own.split_to(headers_len));
        Msg {
            subject,
            reply,
            headers,
            payload: if inline { own } else { self.payload },
        }
    }

    /// The raw header block, to republish the message unchanged.
    pub fn raw_headers(&self) -> Option<&[u8]> {
        self.headers.as_deref()
    }

    /// The first value of header `name` (names compare case-insensitively, as HTTP's do).
    pub fn header(&self, name: &str) -> Option<&str> {
        let block = self.headers.as_deref()?;
        let mut lines = block.split(|&b| b == b'\n').skip(1);
        lines.find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = memchr::memchr(b':', line)?;
            let (key, value) = line.split_at(colon);
            if !key.eq_ignore_ascii_case(name.as_bytes()) {
                return None;
            }
            std::str::from_utf8(&value[1..]).ok().map(str::trim)
        })
    }

    /// The status code of a server-generated reply (`NATS/1.0 503` = no responders).
    pub fn status(&self) -> Option<u16> {
        let block = self.headers.as_deref()?;
        let first = block.split(|&b| b == b'\r').next()?;
        let rest = first.strip_prefix(HEADER_VERSION)?;
        let code = rest.trim_ascii_start().split(|&b| b == b' ').next()?;
        std::str::from_utf8(code).ok()?.parse().ok()
    }

    /// The reply subject as text (subjects are ASCII).
    pub fn reply_str(&self) -> Option<&str> {
        self.reply
            .as_deref()
            .and_then(|r| std::str::from_utf8(r).ok())
    }
}

/// What the server sends.
#[derive(Debug)]
pub enum ServerOp {
    /// Server information (JSON), at connect and whenever the cluster changes.
    Info(Bytes),
    /// A message for subscription `sid`.
    Msg {
        /// The subscription id the client chose in `SUB`.
        sid: u64,
        /// The message.
        msg: Msg,
    },
    /// Keep-alive probe; must be answered with `PONG`.
    Ping,
    /// Answer to one of our `PING`s, in order: proof the server processed everything before it.
    Pong,
    /// Acknowledgement in verbose mode (not used, tolerated).
    Ok,
    /// A protocol error; most are followed by the server closing the connection.
    Err(String),
}

/// Decodes one operation from the front of `buf`, or `None` if more bytes are needed. A message
/// announcing more than `max_body` header + payload bytes is an error (the server's
/// `max_payload` bounds what it may send, headers included).
pub fn decode(buf: &mut BytesMut, max_body: usize) -> Result<Option<ServerOp>, WireError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > MAX_CONTROL_LINE {
            Err(WireError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    if nl > MAX_CONTROL_LINE {
        return Err(WireError::LineTooLong);
    }
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let line = &buf[..line_end];
    let (verb, args) = match memchr::memchr2(b' ', b'\t', line) {
        Some(i) => (&line[..i], line[i + 1..].trim_ascii()),
        None => (line, &line[line_end..]),
    };
    let op = if verb.eq_ignore_ascii_case(b"MSG") || verb.eq_ignore_ascii_case(b"HMSG") {
        let with_headers = verb.len() == 4;
        let header = parse_msg_args(line, with_headers).ok_or_else(|| bad_line(line))?;
        if header.total > max_body {
            return Err(WireError::TooLarge {
                size: header.total,
                limit: max_body,
            });
        }
        // Cannot overflow (nl < MAX_CONTROL_LINE, total <= max_body), checked all the same.
        let need = (nl + 3)
            .checked_add(header.total)
            .ok_or(WireError::TooLarge {
                size: header.total,
                limit: max_body,
            })?;
        if buf.len() < need {
            buf.reserve(need - buf.len());
            return Ok(None);
        }
        if &buf[need - 2..need] != b"\r\n" {
            return Err(WireError::MissingCrlf);
        }
        let control = buf.split_to(nl + 1).freeze();
        let mut body = buf.split_to(header.total).freeze();
        buf.advance(2);
        let headers = (header.header_len > 0).then(|| body.split_to(header.header_len));
        let subject = control.slice(header.subject.0..header.subject.1);
        let reply = header.reply.map(|(a, b)| control.slice(a..b));
        return Ok(Some(ServerOp::Msg {
            sid: header.sid,
            msg: Msg {
                subject,
                reply,
                headers,
                payload: body,
            },
        }));
    } else if verb.eq_ignore_ascii_case(b"PING") {
        ServerOp::Ping
    } else if verb.eq_ignore_ascii_case(b"PONG") {
        ServerOp::Pong
    } else if verb.eq_ignore_ascii_case(b"+OK") {
        ServerOp::Ok
    } else if verb.eq_ignore_ascii_case(b"-ERR") {
        let text = String::from_utf8_lossy(args);
        ServerOp::Err(text.trim_matches('\'').to_owned())
    } else if verb.eq_ignore_ascii_case(b"INFO") {
        let start = args.as_ptr() as usize - line.as_ptr() as usize;
        let end = start + args.len();
        let info = buf.split_to(nl + 1).freeze().slice(start..end);
        return Ok(Some(ServerOp::Info(info)));
    } else {
        return Err(bad_line(line));
    };
    buf.advance(nl + 1);
    Ok(Some(op))
}

fn bad_line(line: &[u8]) -> WireError {
    let shown = &line[..line.len().min(120)];
    WireError::BadLine(String::from_utf8_lossy(shown).into_owned())
}

/// The arguments of a `MSG`/`HMSG` line; ranges index the line.
struct MsgArgs {
    subject: (usize, usize),
    sid: u64,
    reply: Option<(usize, usize)>,
    header_len: usize,
    total: usize,
}

fn parse_msg_args(line: &[u8], with_headers: bool) -> Option<MsgArgs> {
    // Fields: verb, subject, sid, [reply], [header bytes], total bytes. Ranges index `line`.
    let mut fields: [(usize, usize); 6] = [(0, 0); 6];
    let mut n = 0;
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
            i += 1;
        }
        if start < i {
            if n == fields.len() {
                return None;
            }
            fields[n] = (start, i);
            n += 1;
        }
    }
    let number = |(a, b): (usize, usize)| -> Option<usize> {
        std::str::from_utf8(&line[a..b]).ok()?.parse().ok()
    };
    let (reply, sizes) = match (with_headers, n) {
        (false, 4) => (None, &fields[3..4]),
        (false, 5) => (Some(fields[3]), &fields[4..5]),
        (true, 5) => (None, &fields[3..5]),
        (true, 6) => (Some(fields[3]), &fields[4..6]),
        _ => return None,
    };
    let sid = number(fields[2])? as u64;
    let (header_len, total) = match sizes {
        [total] => (0, number(*total)?),
        [h, total] => (number(*h)?, number(*total)?),
        _ => return None,
    };
    if header_len > total {
        return None;
    }
    Some(MsgArgs {
        subject: fields[1],
        sid,
        reply,
        header_len,
        total,
    })
}

/// Headers of an outgoing message.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    /// No headers: a plain `PUB`.
    None,
    /// Name/value pairs (names and values must not contain CR, LF or, in names, ':').
    Pairs(&'a [(&'a str, &'a str)]),
    /// A header block received earlier, passed on unchanged.
    Raw(&'a [u8]),
}

impl Headers<'_> {
    /// Encoded length of the header block (0 for none).
    pub fn encoded_len(&self) -> usize {
        match self {
            Headers::None => 0,
            Headers::Raw(raw) => raw.len(),
            Headers::Pairs(pairs) => {
                HEADER_VERSION.len()
                    + 4
                    + pairs
                        .iter()
                        .map(|(k, v)| k.len() + 2 + v.len() + 2)
                        .sum::<usize>()
            }
        }
    }

    fn write(&self, out: &mut BytesMut) {
        match self {
            Headers::None => {}
            Headers::Raw(raw) => out.put_slice(raw),
            Headers::Pairs(pairs) => {
                out.put_slice(HEADER_VERSION);
                out.put_slice(b"\r\n");
                for (k, v) in pairs.iter() {
                    out.put_slice(k.as_bytes());
                    out.put_slice(b": ");
                    out.put_slice(v.as_bytes());
                    out.put_slice(b"\r\n");
                }
                out.put_slice(b"\r\n");
            }
        }
    }
}

fn put_number(out: &mut BytesMut, n: u64) {
    let mut buf = itoa::Buffer::new();
    out.put_slice(buf.format(n).as_bytes());
}

/// Appends `PUB`/`HPUB`.
pub fn publish(
    out: &mut BytesMut,
    subject: &[u8],
    reply: Option<&[u8]>,
    headers: Headers<'_>,
    payload: &[u8],
) {
    let header_len = headers.encoded_len();
    out.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + header_len + payload.len() + 48);
    out.put_slice(if header_len > 0 { b"HPUB " } else { b"PUB " });
    out.put_slice(subject);
    out.put_u8(b' ');
    if let Some(reply) = reply {
        out.put_slice(reply);
        out.put_u8(b' ');
    }
    if header_len > 0 {
        put_number(out, header_len as u64);
        out.put_u8(b' ');
    }
    put_number(out, (header_len + payload.len()) as u64);
    out.put_slice(b"\r\n");
    headers.write(out);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// Appends `SUB <subject> <sid>`.
pub fn subscribe(out: &mut BytesMut, subject: &str, sid: u64) {
    out.put_slice(b"SUB ");
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    put_number(out, sid);
    out.put_slice(b"\r\n");
}

/// Appends `UNSUB <sid>`.
pub fn unsubscribe(out: &mut BytesMut, sid: u64) {
    out.put_slice(b"UNSUB ");
    put_number(out, sid);
    out.put_slice(b"\r\n");
}

/// Appends `PING`.
pub fn ping(out: &mut BytesMut) {
    out.put_slice(b"PING\r\n");
}

/// Appends `PONG`.
pub fn pong(out: &mut BytesMut) {
    out.put_slice(b"PONG\r\n");
}

/// Appends `CONNECT <json>`.
pub fn connect(out: &mut BytesMut, options: &serde_json::Value) {
    out.put_slice(b"CONNECT ");
    out.put_slice(options.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `max_payload` of nats-server.
    const LIMIT: usize = 1024 * 1024;

    fn decode_all(input: &[u8]) -> Vec<ServerOp> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = decode(&mut buf, LIMIT).expect("valid stream") {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        ops
    }

    #[test]
    fn control_operations_decode() {
        let ops = decode_all(b"INFO {\"max_payload\":1048576}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Authorization Violation'\r\n");
        assert!(matches!(&ops[0], ServerOp::Info(j) if &j[..] == b"{\"max_payload\":1048576}"));
        assert!(matches!(ops[1], ServerOp::Ping));
        assert!(matches!(ops[2], ServerOp::Pong));
        assert!(matches!(ops[3], ServerOp::Ok));
        assert!(matches!(&ops[4], ServerOp::Err(e) if e == "Authorization Violation"));
    }

    #[test]
    fn messages_with_and_without_reply_and_headers() {
        let ops = decode_all(
            b"MSG device.a.down 7 5\r\nhello\r\n\
              MSG device.a.down 7 _INBOX.x.1 0\r\n\r\n\
              HMSG device.a.down 9 _INBOX.x.2 35 38\r\nNATS/1.0\r\nDevgate-Control: kick\r\n\r\nabc\r\n\
              HMSG _INBOX.x.3 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
        );
        let ServerOp::Msg { sid, msg } = &ops[0] else {
            panic!("msg")
        };
        assert_eq!(
            (*sid, &msg.subject[..], &msg.payload[..]),
            (7, &b"device.a.down"[..], &b"hello"[..])
        );
        assert!(msg.reply.is_none() && msg.raw_headers().is_none());
        let ServerOp::Msg { msg, .. } = &ops[1] else {
            panic!("msg")
        };
        assert_eq!(msg.reply_str(), Some("_INBOX.x.1"));
        assert!(msg.payload.is_empty());
        let ServerOp::Msg { sid, msg } = &ops[2] else {
            panic!("hmsg")
        };
        assert_eq!(*sid, 9);
        assert_eq!(msg.header("devgate-control"), Some("kick"));
        assert_eq!(msg.header("Devgate-Ack"), None);
        assert_eq!(msg.status(), None);
        assert_eq!(&msg.payload[..], b"abc");
        let ServerOp::Msg { msg, .. } = &ops[3] else {
            panic!("status")
        };
        assert_eq!(msg.status(), Some(503));
    }

    #[test]
    fn a_message_split_anywhere_waits_for_the_rest() {
        let whole: &[u8] = b"HMSG s 1 r 24 27\r\nNATS/1.0\r\nA: b\r\nC: d\r\n\r\nxyz\r\nPING\r\n";
        for cut in 0..whole.len() - b"PING\r\n".len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let first = decode(&mut buf, LIMIT).expect("no error on a prefix");
            assert!(first.is_none(), "cut at {cut} decoded early");
            buf.extend_from_slice(&whole[cut..]);
            let ServerOp::Msg { msg, .. } = decode(&mut buf, LIMIT).expect("ok").expect("complete")
            else {
                panic!("msg")
            };
            assert_eq!(
                (msg.header("C"), &msg.payload[..]),
                (Some("d"), &b"xyz"[..])
            );
            assert!(matches!(decode(&mut buf, LIMIT), Ok(Some(ServerOp::Ping))));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        for bad in [
            &b"BOGUS\r\n"[..],
            b"MSG only-subject\r\n",
            b"MSG s notanumber 3\r\n",
            b"HMSG s 1 9 3\r\nabc\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(decode(&mut buf, LIMIT).is_err(), "{bad:?}");
        }
        let mut long = BytesMut::from(&vec![b'x'; MAX_CONTROL_LINE + 1][..]);
        assert!(matches!(
            decode(&mut long, LIMIT),
            Err(WireError::LineTooLong)
        ));
    }

    #[test]
    fn publish_encodes_what_decode_reads_back() {
        let mut out = BytesMut::new();
        publish(&mut out, b"device.a.up", None, Headers::None, b"hi");
        assert_eq!(&out[..], b"PUB device.a.up 2\r\nhi\r\n");
        out.clear();
        let pairs = [("Devgate-Device", "a"), ("Devgate-Seq", "7")];
        publish(
            &mut out,
            b"device.a.up",
            Some(b"_INBOX.r"),
            Headers::Pairs(&pairs),
            b"hi",
        );
        let text = std::str::from_utf8(&out).expect("ascii");
        assert_eq!(
            text,
            "HPUB device.a.up _INBOX.r 47 49\r\nNATS/1.0\r\nDevgate-Device: a\r\nDevgate-Seq: 7\r\n\r\nhi\r\n"
        );
        // The server would deliver exactly these bytes back as HMSG: decode them as such.
        let delivered = text.replacen("HPUB device.a.up", "HMSG device.a.up 3", 1);
        let ops = decode_all(delivered.as_bytes());
        let ServerOp::Msg { msg, .. } = &ops[0] else {
            panic!("msg")
        };
        assert_eq!(msg.header("Devgate-Seq"), Some("7"));
        assert_eq!(Headers::Pairs(&pairs).encoded_len(), 47);
        // A received block republished verbatim keeps its length.
        out.clear();
        let raw = msg.raw_headers().expect("headers");
        publish(&mut out, b"x", None, Headers::Raw(raw), b"");
        assert!(out.starts_with(b"HPUB x 47 47\r\nNATS/1.0\r\n"));
    }

    #[test]
    fn subscription_and_keepalive_lines() {
        let mut out = BytesMut::new();
        subscribe(&mut out, "device.a.down", 42);
        unsubscribe(&mut out, 42);
        ping(&mut out);
        pong(&mut out);
        assert_eq!(
            &out[..],
            b"SUB device.a.down 42\r\nUNSUB 42\r\nPING\r\nPONG\r\n"
        );
    }

    #[test]
    fn an_announced_size_above_the_limit_is_refused_before_buffering() {
        for line in [
            // ~100 GB: reserving it would abort the process.
            &b"MSG device.a.down 7 100000000000\r\n"[..],
            // u64::MAX: `line + total + 2` overflows.
            b"MSG device.a.down 7 18446744073709551615\r\n",
            b"HMSG device.a.down 7 12 18446744073709551615\r\n",
            b"MSG device.a.down 7 1048577\r\n",
        ] {
            let mut buf = BytesMut::from(line);
            let before = buf.capacity();
            let err = decode(&mut buf, LIMIT).expect_err("too large");
            assert!(
                matches!(err, WireError::TooLarge { limit: LIMIT, .. }),
                "{err}"
            );
            assert_eq!(buf.capacity(), before, "nothing reserved for {line:?}");
        }
        // Exactly the limit is fine (and waits for its body).
        let mut buf = BytesMut::from(&b"MSG device.a.down 7 1048576\r\n"[..]);
        assert!(decode(&mut buf, LIMIT).expect("within the limit").is_none());
        // A size that does not even fit a u64 is a bad line.
        let mut buf = BytesMut::from(&b"MSG s 7 99999999999999999999999\r\n"[..]);
        assert!(matches!(
            decode(&mut buf, LIMIT),
            Err(WireError::BadLine(_))
        ));
    }

    #[test]
    fn a_body_not_followed_by_crlf_is_refused() {
        for bad in [
            &b"MSG s 1 3\r\nabcdePING\r\n"[..],
            b"MSG s 1 3\r\nabc\n\rPING\r\n",
            b"HMSG s 1 12 14\r\nNATS/1.0\r\n\r\nxyzz\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(
                matches!(decode(&mut buf, LIMIT), Err(WireError::MissingCrlf)),
                "{bad:?}"
            );
        }
    }

    /// Whether `part` lies inside the memory `[start, start + len)`.
    fn inside(part: &[u8], start: *const u8, len: usize) -> bool {
        let (p, s) = (part.as_ptr() as usize, start as usize);
        !part.is_empty() && p >= s && p + part.len() <= s + len
    }

    #[test]
    fn a_detached_message_does_not_pin_the_read_buffer() {
        let big = vec![b'x'; INLINE_PAYLOAD + 1];
        let mut input = BytesMut::with_capacity(256 * 1024);
        input.extend_from_slice(
            b"HMSG device.a.down 7 _INBOX.r 18 23\r\nNATS/1.0\r\nA: b\r\n\r\nhello\r\n",
        );
        input.extend_from_slice(format!("MSG device.a.down 7 {}\r\n", big.len()).as_bytes());
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\r\n");
        let (start, cap) = (input.as_ptr(), input.capacity());
        let mut decoded = Vec::new();
        while let Some(op) = decode(&mut input, LIMIT).expect("valid") {
            let ServerOp::Msg { msg, .. } = op else {
                panic!("msg")
            };
            assert!(inside(&msg.subject, start, cap), "decoded: a slice");
            decoded.push(msg.detach());
        }
        let [small, large] = &decoded[..] else {
            panic!("two messages")
        };
        let reply = small.reply.as_deref().expect("reply");
        let headers = small.raw_headers().expect("headers");
        for part in [&small.subject[..], reply, headers, &small.payload[..]] {
            assert!(
                !inside(part, start, cap),
                "{part:?} still in the read buffer"
            );
        }
        assert_eq!(
            (
                &small.subject[..],
                reply,
                small.header("A"),
                &small.payload[..]
            ),
            (
                &b"device.a.down"[..],
                &b"_INBOX.r"[..],
                Some("b"),
                &b"hello"[..]
            )
        );
        // A large payload may keep sharing; its subject does not.
        assert!(!inside(&large.subject, start, cap));
        assert!(inside(&large.payload, start, cap));
        assert_eq!(&large.payload[..], &big[..]);
    }
}
