//! A device speaking protocol v1: the library under `devsim`, the tests and the load tool.
//!
//! It is deliberately strict: anything but `WELCOME` in answer to `HELLO` is an error carrying
//! what the gateway said, so a test or an operator sees the gateway's own reason.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::bus::tls::{TlsError, TlsFiles, client_config_named};
use crate::codec::{CodecError, ErrorBody, Frame, FrameCodec, GoAway, Hello, Welcome};

/// What can go wrong for a device.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket or framing failure.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The gateway refused with an `ERROR` frame.
    #[error("gateway error {}: {}", .0.code.as_str(), .0.message)]
    Refused(ErrorBody),
    /// The gateway sent `GOAWAY`.
    #[error("gateway sent GOAWAY {}", .0.reason.as_str())]
    GoAway(GoAway),
    /// The gateway closed the connection.
    #[error("connection closed by the gateway")]
    Closed,
    /// The TLS handshake with the balancer failed (untrusted or wrong-name certificate, a
    /// client certificate it refused, or a peer that does not speak TLS).
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// A frame that makes no sense at this point.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// A JSON body that does not parse.
    #[error("bad JSON in {frame} frame: {source}")]
    Json {
        /// Frame name.
        frame: &'static str,
        /// Parse error.
        source: serde_json::Error,
    },
}

/// The byte stream under a device connection: plain TCP, or TLS to a balancer that terminates
/// it. One boxed type keeps `DeviceClient` free of a type parameter its users would all carry.
pub trait DeviceIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> DeviceIo for T {}

/// TLS towards the address devices dial, for deployments where the balancer (nginx, see
/// lb-sync's `--tls-cert`) or the gateway (`--device-tls-cert`) terminates TLS: the CAs that
/// vouch for its certificate, the name to check it against, and optionally the device's own
/// certificate for those that verify devices.
#[derive(Clone)]
pub struct DeviceTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl DeviceTls {
    /// Reads the files once (errors name the `tls_ca`, `tls_cert` and `tls_key` settings);
    /// `server_name` is a DNS name or an IP address in the balancer's certificate.
    pub fn new(files: &TlsFiles, server_name: &str) -> Result<Self, TlsError> {
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|e| TlsError::ServerName {
                name: server_name.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(DeviceTls {
            config: client_config_named(files, "tls")?,
            server_name,
        })
    }

    /// The same settings without TLS session resumption: every connection makes a full
    /// handshake. rustls resumes by default (from one cache per configuration), which a load
    /// tool sharing one configuration across thousands of devices must not do when it
    /// measures full handshakes.
    pub fn without_resumption(mut self) -> Self {
        let mut config = (*self.config).clone();
        config.resumption = rustls::client::Resumption::disabled();
        self.config = Arc::new(config);
        self
    }

    /// Runs the handshake over a connected socket (the load tool uses it for its own
    /// connections too).
    pub async fn wrap(&self, stream: TcpStream) -> Result<Box<dyn DeviceIo>, ClientError> {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(self.server_name.clone(), stream)
            .await
            .map_err(ClientError::Tls)?;
        Ok(Box::new(tls))
    }
}

/// A logged-in (or logging-in) device connection.
pub struct DeviceClient {
    framed: Framed<Box<dyn DeviceIo>, FrameCodec>,
}

impl DeviceClient {
    /// Connects and logs in with `device_id` and `token`.
    pub async fn connect(
        addr: SocketAddr,
        device_id: &str,
        token: &str,
    ) -> Result<(DeviceClient, Welcome), ClientError> {
        Self::connect_over(addr, None, device_id, token).await
    }

    /// Connects (over TLS when `tls` is given) and logs in with `device_id` and `token`.
    pub async fn connect_over(
        addr: SocketAddr,
        tls: Option<&DeviceTls>,
        device_id: &str,
        token: &str,
    ) -> Result<(DeviceClient, Welcome), ClientError> {
        let hello = Hello {
            device_id: device_id.to_owned(),
            token: token.to_owned(),
            metadata: Default::default(),
        };
        let stream = TcpStream::connect(addr).await.map_err(CodecError::from)?;
        let _ = stream.set_nodelay(true);
        let io = match tls {
            Some(tls) => tls.wrap(stream).await?,
            None => Box::new(stream),
        };
        Self::login_over(io, &hello).await
    }

    /// Logs in over an existing stream (e.g. one that already sent a PROXY header).
    pub async fn connect_with(
        stream: TcpStream,
        hello: &Hello,
    ) -> Result<(DeviceClient, Welcome), ClientError> {
        let _ = stream.set_nodelay(true);
        Self::login_over(Box::new(stream), hello).await
    }

    /// Logs in over any byte stream: a TLS session the caller set up itself (after a PROXY
    /// header, with its own verifier), or plain TCP.
    pub async fn login_over(
        io: Box<dyn DeviceIo>,
        hello: &Hello,
    ) -> Result<(DeviceClient, Welcome), ClientError> {
        let mut client = DeviceClient {
            framed: Framed::new(io, FrameCodec::new(16 << 20)),
        };
        client.send(Frame::json(Frame::Hello, hello)).await?;
        match client.next_frame().await? {
            Some(Frame::Welcome(body)) => {
                let welcome = parse_json("WELCOME", &body)?;
                Ok((client, welcome))
            }
            Some(other) => Err(into_error(other)),
            None => Err(ClientError::Closed),
        }
    }

    /// Sends any frame (tests use this for protocol violations).
    pub async fn send(&mut self, frame: Frame) -> Result<(), ClientError> {
        self.framed.send(frame).await.map_err(ClientError::from)
    }

    /// Sends `UP(seq, payload)`; `seq` 0 asks for no ACK.
    pub async fn send_up(
        &mut self,
        seq: u32,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.send(Frame::Up {
            seq,
            payload: payload.into(),
        })
        .await
    }

    /// Acknowledges a DOWN.
    pub async fn ack(&mut self, seq: u32) -> Result<(), ClientError> {
        self.send(Frame::Ack(seq)).await
    }

    /// The next frame, or `None` when the gateway closed the connection.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        match self.framed.next().await {
            Some(Ok(frame)) => Ok(Some(frame)),
            Some(Err(e)) => Err(e.into()),
            None => Ok(None),
        }
    }

    /// The next DOWN `(seq, payload)`, answering nothing itself; PONGs and ACKs are skipped,
    /// GOAWAY and ERROR become errors.
    pub async fn recv_down(&mut self) -> Result<(u32, Bytes), ClientError> {
        loop {
            match self.next_frame().await? {
                Some(Frame::Down { seq, payload }) => return Ok((seq, payload)),
                Some(Frame::Pong(_)) | Some(Frame::Ack(_)) => continue,
                Some(other) => return Err(into_error(other)),
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// The next ACK's seq (the gateway confirming an UP); DOWNs in between are an error.
    pub async fn recv_ack(&mut self) -> Result<u32, ClientError> {
        loop {
            match self.next_frame().await? {
                Some(Frame::Ack(seq)) => return Ok(seq),
                Some(Frame::Pong(_)) => continue,
                Some(other) => return Err(into_error(other)),
                None => return Err(ClientError::Closed),
            }
        }
    }
}

/// Turns a frame that ends or breaks the conversation into the matching error.
pub fn into_error(frame: Frame) -> ClientError {
    match frame {
        Frame::Error(body) => match parse_json::<ErrorBody>("ERROR", &body) {
            Ok(e) => ClientError::Refused(e),
            Err(e) => e,
        },
        Frame::GoAway(body) => match parse_json::<GoAway>("GOAWAY", &body) {
            Ok(g) => ClientError::GoAway(g),
            Err(e) => e,
        },
        other => ClientError::Unexpected(other.name()),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    frame: &'static str,
    body: &[u8],
) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Json { frame, source })
}
