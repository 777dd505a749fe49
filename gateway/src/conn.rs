//! Framed I/O on one device socket, shaped for many mostly-idle connections.
//!
//! Read and write buffers are allocated only while there is something in them and released
//! when they empty, so an idle session holds no buffer memory at all (tokio-util's `Framed`
//! keeps 8 KiB per direction for the life of the connection). All waiting is readiness
//! polling (`poll_read_ready` / `poll_write_ready`), which makes both operations cancel-safe
//! inside `select!` and adds no per-session future state.
//!
//! A connection is either plaintext or TLS that the gateway terminates itself
//! ([`crate::device_tls`]). TLS is driven here by hand with rustls over the same readiness
//! polling, instead of through an `AsyncRead` wrapper, so both kinds keep the properties above.

use std::io::{self, BufRead, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{CodecError, Frame, FrameCodec};

/// How much to read per syscall while a device is sending.
const READ_CHUNK: usize = 4096;

/// Most plaintext handed to rustls at once: one TLS record.
const TLS_BATCH: usize = 16 * 1024;

/// The byte stream of one device: the socket, and the TLS state when the gateway terminates
/// TLS. Shared by a session's reader and writer (`&self` everywhere), so the TLS state sits
/// behind a mutex that is only ever taken inside one poll, never across an await.
pub struct DeviceStream {
    tcp: TcpStream,
    /// Boxed: a plaintext session pays one pointer for it.
    tls: Option<Box<Mutex<rustls::ServerConnection>>>,
}

/// `std::io` on a non-blocking tokio socket: `try_read`/`try_write` clear the socket's
/// readiness on `WouldBlock`, so the next `poll_*_ready` waits for real.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl DeviceStream {
    /// A plaintext connection.
    pub fn plain(tcp: TcpStream) -> Self {
        DeviceStream { tcp, tls: None }
    }

    /// A connection whose TLS handshake is complete ([`crate::device_tls::accept`]).
    pub fn tls(tcp: TcpStream, tls: rustls::ServerConnection) -> Self {
        DeviceStream {
            tcp,
            tls: Some(Box::new(Mutex::new(tls))),
        }
    }

    /// Whether the gateway terminates TLS on this connection.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Runs `f` on the TLS state (the peer's certificate, after the handshake); `None` for
    /// a plaintext connection.
    pub fn with_tls<R>(&self, f: impl FnOnce(&rustls::ServerConnection) -> R) -> Option<R> {
        self.tls.as_deref().map(|tls| f(&Self::lock(tls)))
    }

    fn lock(tls: &Mutex<rustls::ServerConnection>) -> MutexGuard<'_, rustls::ServerConnection> {
        // A panic while holding the lock leaves rustls' state as consistent as rustls left it;
        // the connection's own error handling decides what happens next.
        tls.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads what is available into `buf` (`Ok(0)`: the peer closed). Waits for readiness.
    /// An empty `buf` is released while waiting, so an idle session keeps no read buffer.
    pub fn poll_read_buf(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let Some(state) = self.tls.as_deref() else {
            return self.poll_read_plain(buf, cx);
        };
        loop {
            let mut tls = Self::lock(state);
            // Plaintext rustls already holds comes first: it may have arrived with the
            // handshake, and the socket will not signal it again.
            let mut reader = tls.reader();
            match reader.fill_buf() {
                Ok(chunk) => {
                    let n = chunk.len();
                    buf.extend_from_slice(chunk);
                    reader.consume(n);
                    // 0: the peer's close_notify, after everything it sent.
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the TCP connection without a TLS close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
            drop(tls);
            ready!(self.tcp.poll_read_ready(cx))?;
            let mut tls = Self::lock(state);
            match tls.read_tls(&mut SocketIo(&self.tcp)) {
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = tls.process_new_packets() {
                // Tell the peer why (rustls queued an alert), as far as the socket takes it.
                let _ = flush_tls(&mut tls, &self.tcp);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            // Records rustls queued while reading (alerts) go out while here; what the socket
            // does not take goes with the next write (rustls answers a key update then too).
            let _ = flush_tls(&mut tls, &self.tcp);
        }
    }

    fn poll_read_plain(&self, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            buf.reserve(READ_CHUNK);
            match self.tcp.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness was stale (now cleared, so the next poll waits): give the
                    // reserved chunk back first, or every idle session would keep READ_CHUNK.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Writes what the connection takes right now: `Err(WouldBlock)` when it takes nothing.
    /// With TLS, "taken" means encrypted and queued in rustls, which sends it as the socket
    /// allows ([`DeviceStream::has_unsent`] says when some is left).
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.tcp.try_write(data);
        };
        let mut tls = Self::lock(tls);
        // Older records first, and no new plaintext while the socket is full: what rustls
        // holds stays bounded by what the socket refused once.
        if !flush_tls(&mut tls, &self.tcp)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // One record's worth at a time: what rustls holds for a stalled device stays one
        // record, not its 64 KiB buffer.
        let n = tls.writer().write(&data[..data.len().min(TLS_BATCH)])?;
        if n == 0 {
            // rustls took nothing although its output was empty: an error, not a WouldBlock,
            // because the socket's readiness was not cleared and a retry would spin.
            return Err(io::ErrorKind::WriteZero.into());
        }
        flush_tls(&mut tls, &self.tcp)?;
        Ok(n)
    }

    /// Sends what rustls holds without waiting: `Ok(true)` once it holds nothing (always for
    /// plaintext), `Ok(false)` when the socket is full.
    pub fn try_flush(&self) -> io::Result<bool> {
        match &self.tls {
            None => Ok(true),
            Some(tls) => flush_tls(&mut Self::lock(tls), &self.tcp),
        }
    }

    /// Waits until the socket may take more.
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_write_ready(cx)
    }

    /// TLS records encrypted but not yet on the socket.
    pub fn has_unsent(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|tls| Self::lock(tls).wants_write())
    }

    /// Sends what rustls holds, waiting for the socket as needed.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(tls) = &self.tls else {
            return Poll::Ready(Ok(()));
        };
        loop {
            if flush_tls(&mut Self::lock(tls), &self.tcp)? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    /// Closes the write side: a TLS `close_notify` first, then the TCP FIN.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if let Some(tls) = &self.tls {
            Self::lock(tls).send_close_notify();
            std::future::poll_fn(|cx| self.poll_flush(cx)).await?;
        }
        self.tcp.shutdown().await
    }

    /// The plaintext socket, for what happens before any frame (refusing an overloaded
    /// connection without TLS).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

/// Writes rustls' pending records to the socket until it has none (`Ok(true)`) or the socket
/// is full (`Ok(false)`).
pub(crate) fn flush_tls(tls: &mut rustls::ServerConnection, tcp: &TcpStream) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut SocketIo(tcp)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads TLS records from the socket into rustls (`Ok(0)`: the peer closed). For the handshake.
pub(crate) fn read_tls(tls: &mut rustls::ServerConnection, tcp: &TcpStream) -> io::Result<usize> {
    tls.read_tls(&mut SocketIo(tcp))
}

/// One device connection: the stream plus independent read and write halves, so a session can
/// wait on both at once in one `select!` (they borrow disjoint fields; the stream is shared).
pub struct Conn {
    /// The byte stream (every operation on it takes `&self`).
    pub stream: DeviceStream,
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
    /// Bytes on the socket: what `sent` answers and the write-stall clock go by.
    written: u64,
    /// Bytes handed to TLS whose records are not all on the socket yet. They count as
    /// pending, not written: a `sent` answered for them could be lost with the connection,
    /// and the session queue limit must include them.
    in_tls: u64,
    queued: u64,
}

impl Conn {
    /// Wraps an accepted connection; `leftover` holds bytes already read (after a PROXY
    /// header or with the HELLO).
    pub fn new(stream: DeviceStream, codec: FrameCodec, leftover: BytesMut) -> Self {
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
                in_tls: 0,
                queued: 0,
            },
        }
    }

    /// The next frame from the device; `None` when it closed the connection. Cancel-safe.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        self.reader.read_frame(&self.stream).await
    }

    /// Something queued has not reached the socket yet: frames, or TLS records.
    pub fn write_pending(&self) -> bool {
        self.writer.pending() > 0 || self.stream.has_unsent()
    }

    /// Writes everything queued (used before closing, bounded by the caller's timeout).
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.writer.pending() > 0 {
            if self.writer.write_some(&self.stream).await? == 0 && self.writer.pending() > 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        std::future::poll_fn(|cx| self.stream.poll_flush(cx)).await
    }

    /// Queues `frame`, writes everything within `limit`, then closes the write side: the last
    /// words of a session (`GOAWAY`, `ERROR`).
    pub async fn close_with(&mut self, frame: Option<Frame>, limit: std::time::Duration) {
        if let Some(frame) = frame {
            let _ = self.writer.queue(frame);
        }
        let _ = tokio::time::timeout(limit, self.flush()).await;
        let _ = tokio::time::timeout(limit, self.stream.shutdown()).await;
    }
}

impl FrameReader {
    /// The next frame from `stream`; `None` when the peer closed. Cancel-safe: partial frames
    /// stay in the buffer.
    pub async fn read_frame(&mut self, stream: &DeviceStream) -> Result<Option<Frame>, CodecError> {
        std::future::poll_fn(|cx| self.poll_frame(stream, cx)).await
    }

    /// Poll form of [`FrameReader::read_frame`]. A session waits on it through `poll_fn`,
    /// which keeps no state of its own: an async read future would add its readiness waiter
    /// (~200 bytes) to every idle session's task.
    pub fn poll_frame(
        &mut self,
        stream: &DeviceStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Frame>, CodecError>> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(Some(frame)));
            }
            if ready!(stream.poll_read_buf(&mut self.buf, cx))? == 0 {
                return Poll::Ready(Ok(None));
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

    /// Bytes queued but not yet on the socket (with TLS: including what rustls holds).
    pub fn pending(&self) -> usize {
        self.buf.len() + self.in_tls as usize
    }

    /// Total bytes on the socket so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes as much of the queue as the stream takes, waiting until it takes something.
    /// Cancel-safe.
    pub async fn write_some(&mut self, stream: &DeviceStream) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write_some(stream, cx)).await
    }

    /// Writes as much of the queue as the stream takes right now, without waiting: `Ok(0)`
    /// when it takes nothing (the caller then waits on [`FrameWriter::poll_write_some`]).
    /// A session calls this right after queueing, because the socket almost always has room
    /// and another turn of its event loop would cost a wakeup per message.
    /// With TLS the count includes bytes handed over earlier that have just reached the socket.
    pub fn try_write_some(&mut self, stream: &DeviceStream) -> io::Result<usize> {
        let mut settled = 0;
        if stream.is_tls() {
            // Earlier records first: once they are all out, the bytes they carry are written,
            // whatever happens to the next batch (which may fill the socket again).
            if !stream.try_flush()? {
                return Ok(0);
            }
            settled = self.settle(stream);
        }
        if self.buf.is_empty() {
            return Ok(settled);
        }
        match stream.try_write(&self.buf) {
            Ok(n) => {
                self.buf.advance(n);
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                if stream.is_tls() {
                    self.in_tls += n as u64;
                    settled += self.settle(stream);
                } else {
                    self.written += n as u64;
                }
                Ok(n.max(settled))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(settled),
            Err(e) => Err(e),
        }
    }

    /// Counts what TLS handed to the socket as written once rustls holds nothing more;
    /// returns how many bytes that was.
    fn settle(&mut self, stream: &DeviceStream) -> usize {
        if self.in_tls == 0 || stream.has_unsent() {
            return 0;
        }
        let n = std::mem::take(&mut self.in_tls);
        self.written += n;
        n as usize
    }

    /// Poll form of [`FrameWriter::write_some`] (stateless, like
    /// [`FrameReader::poll_frame`]). With no frame left to hand over it sends what TLS still
    /// holds, answering how many bytes of it thereby reached the socket.
    pub fn poll_write_some(
        &mut self,
        stream: &DeviceStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.buf.is_empty() {
                ready!(stream.poll_flush(cx))?;
                return Poll::Ready(Ok(self.settle(stream)));
            }
            match self.try_write_some(stream)? {
                0 => ready!(stream.poll_write_ready(cx))?,
                n => return Poll::Ready(Ok(n)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Frame;
    use crate::device_tls::fixture;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    /// A TLS connection over loopback whose client reads nothing yet, with small socket
    /// buffers so that the server's writes stall early: the server side as a `Conn`.
    async fn stalled_tls_pair() -> (Conn, tokio_rustls::client::TlsStream<TcpStream>) {
        let server_config = crate::device_tls::DeviceTls::load(crate::device_tls::DeviceTlsFiles {
            cert: fixture("server.pem"),
            key: fixture("server.key"),
            client_ca: None,
        })
        .expect("server TLS")
        .config();
        let client_config = crate::bus::tls::client_config_named(
            &crate::bus::tls::TlsFiles {
                ca: Some(fixture("ca.pem")),
                client: None,
            },
            "tls",
        )
        .expect("client TLS");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let dial = async {
            let tcp = socket.connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(client_config)
                .connect(name, tcp)
                .await
                .expect("client handshake")
        };
        let serve = async {
            let (tcp, _) = listener.accept().await.expect("accept");
            // A small send buffer, as on a slow link: room comes back a little at a time, so
            // a batch often fits only in part.
            #[cfg(target_os = "linux")]
            nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::SndBuf, &4096)
                .expect("sndbuf");
            let tls = crate::device_tls::accept(&tcp, server_config, &mut BytesMut::new())
                .await
                .expect("server handshake");
            DeviceStream::tls(tcp, tls)
        };
        let (client, stream) = tokio::join!(dial, serve);
        (
            Conn::new(stream, FrameCodec::default(), BytesMut::new()),
            client,
        )
    }

    #[tokio::test]
    async fn bytes_rustls_still_holds_are_pending_not_written() {
        let (mut conn, mut client) = stalled_tls_pair().await;
        let frame = || Frame::Down {
            seq: 0,
            payload: Bytes::from(vec![b'x'; 8000]),
        };
        let mut queued = 0;
        // Hand frames over until the socket refuses more (loopback send buffers grow to
        // 4 MiB by default); rustls then holds records too.
        for _ in 0..2000 {
            queued = conn.writer.queue(frame()).expect("queue");
            conn.writer.try_write_some(&conn.stream).expect("write");
            if conn.stream.has_unsent() {
                break;
            }
        }
        assert!(
            conn.stream.has_unsent(),
            "the stall never reached rustls: written {} pending {} queued {queued}",
            conn.writer.written(),
            conn.writer.pending()
        );
        // Whatever rustls holds is pending: `sent` must not be answered for it.
        assert!(conn.writer.pending() > 0);
        assert!(
            conn.writer.written() < queued,
            "{} of {queued}",
            conn.writer.written()
        );
        assert_eq!(conn.writer.written() + conn.writer.pending() as u64, queued);

        // The device reads slowly while more keeps coming, so the socket stays full: what it
        // has read can never be more than what counts as written plus the one batch rustls
        // may hold. (Counting only after rustls empties completely would hold `written` back
        // for as long as the congestion lasts.)
        let mut already = 0u64;
        let mut chunk = vec![0u8; 4096];
        let congested = async {
            while already < 4 << 20 {
                if conn.writer.pending() < 256 * 1024 {
                    queued = conn.writer.queue(frame()).expect("queue");
                }
                tokio::select! {
                    read = client.read(&mut chunk) => {
                        let n = read.expect("read");
                        assert!(n > 0, "closed early");
                        already += n as u64;
                    }
                    wrote = conn.writer.write_some(&conn.stream) => {
                        wrote.expect("write");
                    }
                }
                assert!(
                    already <= conn.writer.written() + TLS_BATCH as u64,
                    "the device read {already} bytes, but only {} count as written",
                    conn.writer.written()
                );
                assert_eq!(conn.writer.written() + conn.writer.pending() as u64, queued);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), congested)
            .await
            .expect("4 MiB through a congested socket in time");

        // Once the device reads, everything reaches the socket and counts as written.
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = already;
            while total < queued {
                let n = client.read(&mut sink).await.expect("read");
                assert!(n > 0, "closed early");
                total += n as u64;
            }
            total
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), conn.flush())
            .await
            .expect("flushed in time")
            .expect("flush");
        assert_eq!(conn.writer.written(), queued);
        assert_eq!(conn.writer.pending(), 0);
        assert!(!conn.stream.has_unsent());
        assert_eq!(reader.await.expect("reader"), queued);
    }
}
