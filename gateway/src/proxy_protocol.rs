//! PROXY protocol v1 and v2 (HAProxy spec), so the gateway knows a device's real address when
//! it sits behind nginx's `proxy_protocol on`.
//!
//! Parsing is a pure function over the bytes received so far; the async reader only feeds it.
//! Whatever follows the header (the device's HELLO, possibly in the same segment) is kept.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec section 2.1).
const V1_MAX: usize = 107;
/// Largest v2 address block we accept (TLVs included); nginx sends far less.
const V2_MAX_LEN: usize = 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Neither signature: the peer is not a PROXY-speaking balancer (or proxying is off there).
    #[error("connection does not start with a PROXY protocol header")]
    Missing,
    /// A header that breaks the spec.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The peer closed or the socket failed before a full header arrived.
    #[error("connection ended inside the PROXY header")]
    Truncated,
    /// Socket error.
    #[error("i/o error reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes; `source` is the original client, `None` for LOCAL /
    /// UNKNOWN headers (health checks), where the socket's own peer address applies.
    Header {
        /// Header length in bytes.
        len: usize,
        /// The original client address.
        source: Option<SocketAddr>,
    },
}

/// Parses a PROXY v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let probe = buf.len().min(V2_SIGNATURE.len());
    if buf[..probe] == V2_SIGNATURE[..probe] {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let probe = buf.len().min(6);
    if buf[..probe] == b"PROXY "[..probe] {
        return if buf.len() < 6 {
            Ok(Parsed::Incomplete)
        } else {
            parse_v1(buf)
        };
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed("v1 header longer than 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProxyError::Malformed("v1 header is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let source = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 address family mismatch"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 header fields")),
    };
    Ok(Parsed::Header {
        len: end + 2,
        source,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version is not 2"));
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::Malformed("v2 address block too long"));
    }
    if buf.len() < 16 + len {
        return Ok(Parsed::Incomplete);
    }
    let addr = &buf[16..16 + len];
    let source = match (ver_cmd & 0x0f, family) {
        (0x0, _) => None, // LOCAL: a health check from the balancer
        (0x1, 0x11) if len >= 12 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
            u16::from_be_bytes([addr[8], addr[9]]),
        )),
        (0x1, 0x21) if len >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&addr[..16]);
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([addr[32], addr[33]]),
            ))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError::Malformed("v2 address block too short")),
        (0x1, _) => None, // UNSPEC / unix sockets: no usable IP
        _ => {
            return Err(ProxyError::Malformed(
                "v2 command is neither LOCAL nor PROXY",
            ));
        }
    };
    Ok(Parsed::Header {
        len: 16 + len,
        source,
    })
}

/// Reads a PROXY header from `stream`. Bytes after the header stay in `buf` for the frame
/// decoder. The caller bounds the time this may take.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<SocketAddr>, ProxyError> {
    loop {
        if !buf.is_empty() {
            match parse(buf)? {
                Parsed::Header { len, source } => {
                    buf.advance(len);
                    return Ok(source);
                }
                Parsed::Incomplete => {}
            }
        }
        buf.reserve(256);
        if stream.read_buf(buf).await? == 0 {
            return Err(ProxyError::Truncated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        v.extend_from_slice(addr);
        v
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\nrest";
        assert_eq!(
            parse(h).expect("valid"),
            Parsed::Header {
                len: h.len() - 4,
                source: Some("192.0.2.7:51000".parse().expect("addr"))
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 ::1 4000 7000\r\n";
        assert!(matches!(
            parse(h).expect("valid"),
            Parsed::Header {
                source: Some(SocketAddr::V6(_)),
                ..
            }
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").expect("valid"),
            Parsed::Header {
                len: 15,
                source: None
            }
        );
    }

    #[test]
    fn v1_incomplete_and_bad() {
        assert_eq!(parse(b"PRO").expect("prefix"), Parsed::Incomplete);
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4").expect("prefix"),
            Parsed::Incomplete
        );
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 1\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 1\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyError::Malformed(_))),
                "{bad:?}"
            );
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&long), Err(ProxyError::Malformed(_))));
    }

    #[test]
    fn not_proxy_at_all() {
        assert!(matches!(parse(&[0, 0, 0, 5, 1]), Err(ProxyError::Missing)));
        assert!(matches!(parse(b"GET / HTTP/1.1"), Err(ProxyError::Missing)));
    }

    #[test]
    fn v2_ipv4_ipv6_local() {
        let h = v2(
            1,
            0x11,
            &[203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x1b, 0x58],
        );
        assert_eq!(
            parse(&h).expect("valid"),
            Parsed::Header {
                len: 28,
                source: Some("203.0.113.9:8080".parse().expect("addr"))
            }
        );
        let mut a6 = vec![0u8; 36];
        a6[15] = 1;
        a6[32] = 0x12;
        a6[33] = 0x34;
        assert_eq!(
            parse(&v2(1, 0x21, &a6)).expect("valid"),
            Parsed::Header {
                len: 52,
                source: Some("[::1]:4660".parse().expect("addr"))
            }
        );
        assert_eq!(
            parse(&v2(0, 0, &[])).expect("valid"),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
        assert_eq!(parse(&h[..20]).expect("partial"), Parsed::Incomplete);
        assert!(matches!(
            parse(&v2(1, 0x11, &[1, 2])),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse(&v2(7, 0x11, &[0; 12])),
            Err(ProxyError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn reader_keeps_the_bytes_after_the_header() {
        let mut data: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\n\x00\x00\x00\x01\x06";
        let mut buf = BytesMut::new();
        let src = read_header(&mut data, &mut buf).await.expect("header");
        assert_eq!(src, Some("192.0.2.7:51000".parse().expect("addr")));
        assert_eq!(&buf[..], &[0, 0, 0, 1, 6]);
        let mut truncated: &[u8] = b"PROXY TCP4";
        assert!(matches!(
            read_header(&mut truncated, &mut BytesMut::new()).await,
            Err(ProxyError::Truncated)
        ));
    }
}
