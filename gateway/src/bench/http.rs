//! A minimal HTTP/1.1 keep-alive client: enough to drive bridge-api and poll `/readyz`.
//!
//! The gateway crate has no HTTP client dependency, and a load generator wants exactly one
//! connection per worker with no pooling surprises, so it speaks the protocol directly:
//! request line, a few headers, `Content-Length` body; responses with `Content-Length` or
//! chunked bodies.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bench::BenchError;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// One keep-alive connection.
pub struct HttpConn {
    stream: TcpStream,
    buf: BytesMut,
    host: String,
}

impl HttpConn {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> Result<Self, BenchError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: BytesMut::with_capacity(8192),
            host: addr.to_string(),
        })
    }

    /// Sends one request and reads the whole response: `(status, body)`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Bytes), BenchError> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.host,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out).await?;
        self.read_response().await
    }

    async fn fill(&mut self) -> Result<(), BenchError> {
        self.buf.reserve(8192);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(BenchError::Protocol(
                "HTTP server closed the connection".into(),
            ));
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<(u16, Bytes), BenchError> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(BenchError::Protocol("HTTP response head too large".into()));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.advance(head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BenchError::Protocol(format!("bad HTTP status line in {head:?}")))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        if chunked {
            let mut body = BytesMut::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    self.fill().await?;
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| {
                            BenchError::Protocol(format!("bad chunk size {size_text:?}"))
                        })?;
                self.buf.advance(line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill().await?;
                }
                body.extend_from_slice(&self.buf[..size]);
                self.buf.advance(size + 2);
                if size == 0 {
                    return Ok((status, body.freeze()));
                }
            }
        }
        let length = length.unwrap_or(0);
        while self.buf.len() < length {
            self.fill().await?;
        }
        Ok((status, self.buf.split_to(length).freeze()))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
