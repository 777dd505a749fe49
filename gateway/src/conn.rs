//! Framed I/O on one device socket, shaped for many mostly-idle connections.
//!
//! Read and write buffers are allocated only while there is something in them and released
//! when they empty, so an idle session holds no buffer memory at all (tokio-util's `Framed`
//! keeps 8 KiB per direction for the life of the connection). All waiting is readiness
//! polling (`poll_read_ready` / `poll_write_ready`), which makes both operations cancel-safe
//! inside `select!` and adds no per-session future state.

use std::io;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{CodecError, Frame, FrameCodec};

/// How much to read per syscall while a device is sending.
const READ_CHUNK: usize = 4096;

/// One device connection: the socket plus independent read and write halves, so a session can
/// wait on both at once in one `select!` (they borrow disjoint fields; the socket is shared).
pub struct Conn {
    /// The socket (`readable`/`writable`/`try_*` only need `&TcpStream`).
    pub stream: TcpStream,
    /// Incoming frames.
    pub reader: FrameReader,
    /// Outgoing frames.
    pub writer: FrameWriter,
}

/// Decodes frames from a socket into a buffer that exists only while it holds bytes.
pub struct FrameReader {
    codec: FrameCodec,
    buf: BytesMut,
}

/// Queues encoded frames and writes them out, tracking offsets so callers learn when a given
/// frame has reached the socket.
pub struct FrameWriter {
    codec: FrameCodec,
    buf: BytesMut,
    written: u64,
    queued: u64,
}

impl Conn {
    /// Wraps an accepted socket; `leftover` holds bytes already read (after a PROXY header).
    pub fn new(stream: TcpStream, codec: FrameCodec, leftover: BytesMut) -> Self {
        Conn {
            stream,
            reader: FrameReader {
                codec,
                buf: leftover,
            },
            writer: FrameWriter {
                codec,
                buf: BytesMut::new(),
                written: 0,
                queued: 0,
            },
        }
    }

    /// The next frame from the device; `None` when it closed the connection. Cancel-safe.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        self.reader.read_frame(&self.stream).await
    }

    /// Writes everything queued (used before closing, bounded by the caller's timeout).
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.writer.pending() > 0 {
            if self.writer.write_some(&self.stream).await? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Queues `frame`, writes everything within `limit`, then closes the write side: the last
    /// words of a session (`GOAWAY`, `ERROR`).
    pub async fn close_with(&mut self, frame: Option<Frame>, limit: std::time::Duration) {
        if let Some(frame) = frame {
            let _ = self.writer.queue(frame);
        }
        let _ = tokio::time::timeout(limit, self.flush()).await;
        let _ = tokio::time::timeout(limit, async {
            use tokio::io::AsyncWriteExt;
            self.stream.shutdown().await
        })
        .await;
    }
}

impl FrameReader {
    /// The next frame from `stream`; `None` when the peer closed. Cancel-safe: partial frames
    /// stay in the buffer.
    pub async fn read_frame(&mut self, stream: &TcpStream) -> Result<Option<Frame>, CodecError> {
        std::future::poll_fn(|cx| self.poll_frame(stream, cx)).await
    }

    /// Poll form of [`FrameReader::read_frame`]. A session waits on it through `poll_fn`,
    /// which keeps no state of its own: an async read future would add its readiness waiter
    /// (~200 bytes) to every idle session's task.
    pub fn poll_frame(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Frame>, CodecError>> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(Some(frame)));
            }
            ready!(stream.poll_read_ready(cx))?;
            self.buf.reserve(READ_CHUNK);
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness was stale (now cleared, so the next poll waits): give the
                    // reserved chunk back first, or every idle session would keep READ_CHUNK.
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl FrameWriter {
    /// Appends a frame and returns the stream offset at which it ends (compare with
    /// [`FrameWriter::written`]).
    pub fn queue(&mut self, frame: Frame) -> Result<u64, CodecError> {
        let before = self.buf.len();
        self.codec.encode(frame, &mut self.buf)?;
        self.queued += (self.buf.len() - before) as u64;
        Ok(self.queued)
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Total bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes as much of the queue as the socket takes, waiting until it takes something.
    /// Cancel-safe.
    pub async fn write_some(&mut self, stream: &TcpStream) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write_some(stream, cx)).await
    }

    /// Writes as much of the queue as the socket takes right now, without waiting: `Ok(0)`
    /// when it takes nothing (the caller then waits on [`FrameWriter::poll_write_some`]).
    /// A session calls this right after queueing, because the socket almost always has room
    /// and another turn of its event loop would cost a wakeup per message.
    pub fn try_write_some(&mut self, stream: &TcpStream) -> io::Result<usize> {
        match stream.try_write(&self.buf) {
            Ok(n) => {
                self.advance(n);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn advance(&mut self, n: usize) {
        self.buf.advance(n);
        self.written += n as u64;
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Poll form of [`FrameWriter::write_some`] (stateless, like
    /// [`FrameReader::poll_frame`]).
    pub fn poll_write_some(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write_some(stream)? {
                0 if self.pending() > 0 => ready!(stream.poll_write_ready(cx))?,
                n => return Poll::Ready(Ok(n)),
            }
        }
    }
}
