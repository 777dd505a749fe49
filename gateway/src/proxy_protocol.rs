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

/// An IP prefix (`10.0.0.0/8`, `fd00::/8`, or a bare address meaning `/32` or `/128`): the
/// peers allowed to send a PROXY header. Matching is a plain prefix compare; an IPv4-mapped
/// IPv6 peer (`::ffff:10.1.2.3`, from a dual-stack listener) matches IPv4 prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8): {why}")]
pub struct CidrError {
    input: String,
    why: &'static str,
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let fail = |why| CidrError {
            input: s.to_owned(),
            why,
        };
        let s = s.trim();
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| fail("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| fail("prefix length out of range"))?,
        };
        // Host bits are masked off, so `10.1.2.3/8` means `10.0.0.0/8` (as in most tools).
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Self, CidrError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

/// `ip` with every bit after the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & keep))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & keep))
        }
    }
}

/// Whether `peer` may send a PROXY header: an empty list trusts everyone (see
/// `Config::proxy_trusted_cidrs`).
pub fn trusted(cidrs: &[Cidr], peer: IpAddr) -> bool {
    cidrs.is_empty() || cidrs.iter().any(|c| c.contains(peer))
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

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidrs_parse_and_match_v4_and_v6() {
        let c: Cidr = "10.0.0.0/8".parse().expect("v4");
        assert!(c.contains(ip("10.255.1.2")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("fd00::1")), "families never match");
        assert!(
            c.contains(ip("::ffff:10.1.2.3")),
            "an IPv4-mapped peer is IPv4"
        );
        let host: Cidr = "10.1.2.3/8".parse().expect("host bits");
        assert_eq!(host, c, "host bits are masked off");
        assert_eq!(host.to_string(), "10.0.0.0/8");
        let single: Cidr = "192.0.2.7".parse().expect("bare address");
        assert!(single.contains(ip("192.0.2.7")) && !single.contains(ip("192.0.2.8")));
        let all: Cidr = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains(ip("203.0.113.1")));
        let v6: Cidr = "fd00:1::/32".parse().expect("v6");
        assert!(v6.contains(ip("fd00:1:ffff::9")) && !v6.contains(ip("fd00:2::1")));
        let all6: Cidr = "::/0".parse().expect("v6 everything");
        assert!(all6.contains(ip("2001:db8::1")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert!(trusted(&[], ip("198.51.100.1")), "empty list trusts all");
        assert!(!trusted(&[c], ip("127.0.0.1")));
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
