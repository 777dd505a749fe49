//! TLS that the gateway terminates itself (`--device-tls-*`), against a real nats-server:
//! devices log in and route both ways over it, a client certificate must name the device id
//! when a client CA is configured, whatever fails the handshake is counted without
//! disturbing other devices, a PROXY header may precede the ClientHello, and a renewed
//! certificate reaches new connections. Fixtures: `tests/fixtures/tls/`.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::bus::tls::{TlsFiles, client_config_named};
use devgate_gateway::client::{ClientError, DeviceClient, DeviceTls};
use devgate_gateway::codec::{ErrorCode, GoAwayReason, Hello};
use devgate_gateway::config::Config;
use devgate_gateway::contract::subjects::ControlOp;
use devgate_gateway::contract::{DeviceId, PresenceInfo, subjects};
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::gateway::{
    config, control, downs_until_goaway, metric_reaches, start_with, token,
};
use devgate_tests::nats::tls_fixture;
use futures::StreamExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// A gateway terminating TLS with the test server certificate; with `client_ca`, devices
/// need a certificate from the test CA naming their id.
fn tls_config(nats: &NatsServer, instance: &str, client_ca: bool) -> Config {
    Config {
        device_tls_cert: Some(tls_fixture("server.pem")),
        device_tls_key: Some(tls_fixture("server.key")),
        device_tls_client_ca: client_ca.then(|| tls_fixture("ca.pem")),
        ..config(nats, instance)
    }
}

/// A device's TLS settings: trusts the test CA, presents `cert` (fixture name, key beside it).
fn device_tls(cert: Option<&str>) -> DeviceTls {
    let client = cert.map(|c| {
        (
            tls_fixture(&format!("{c}.pem")),
            tls_fixture(&format!("{c}.key")),
        )
    });
    DeviceTls::new(
        &TlsFiles {
            ca: Some(tls_fixture("ca.pem")),
            client,
        },
        "localhost",
    )
    .expect("device TLS settings")
}

/// A device's TLS settings that trust another CA than the gateway's: its handshake fails.
fn distrusting_device_tls() -> DeviceTls {
    DeviceTls::new(
        &TlsFiles {
            ca: Some(tls_fixture("other-ca.pem")),
            client: None,
        },
        "localhost",
    )
    .expect("settings")
}

async fn login(
    gw: &Gateway,
    tls: &DeviceTls,
    id: &str,
) -> Result<(DeviceClient, devgate_gateway::codec::Welcome), ClientError> {
    tokio::time::timeout(
        WAIT,
        DeviceClient::connect_over(gw.device_addr(), Some(tls), id, &token(id)),
    )
    .await
    .expect("login answered in time")
}

/// The gateway's refusal of a login, checked to carry `code`; its message is returned.
fn refused<T>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, code, "{}", e.message);
            e.message
        }
        Err(other) => panic!("expected a refusal ({}), got {other}", code.as_str()),
        Ok(_) => panic!("expected a refusal ({}), got a login", code.as_str()),
    }
}

fn down(id: &str) -> String {
    subjects::down(&DeviceId::parse(id).expect("id"))
}

/// A service request reaches `dev` over its TLS session, which acknowledges it, and the
/// service hears `device`.
async fn reaches(
    service: &async_nats::Client,
    dev: &mut DeviceClient,
    id: &str,
    body: &'static [u8],
) {
    let request = service.request(down(id), Bytes::from_static(body));
    let device = async {
        let (seq, payload) = tokio::time::timeout(WAIT, dev.recv_down())
            .await
            .expect("DOWN in time")
            .expect("DOWN");
        assert_eq!(&payload[..], body);
        dev.ack(seq).await.expect("ack");
    };
    let (reply, ()) = tokio::join!(request, device);
    let reply = reply.expect("the request is answered");
    let text = std::str::from_utf8(&reply.payload).expect("utf8");
    assert!(
        text.contains("\"sent\"") || text.contains("\"delivered\""),
        "{text}"
    );
}

#[tokio::test]
async fn devices_log_in_over_tls_the_gateway_terminates_and_messages_flow_both_ways() {
    let nats = NatsServer::start();
    let gw = start_with(tls_config(&nats, "gw-tls", false)).await;
    let service = nats.client().await;
    let mut uplink = service
        .subscribe("device.dev-a.up")
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(&service).await;

    let (mut dev, welcome) = login(&gw, &device_tls(None), "dev-a").await.expect("login");
    assert_eq!(welcome.gateway, "gw-tls");
    reaches(&service, &mut dev, "dev-a", b"hello over tls").await;

    dev.send_up(7, Bytes::from_static(b"reading 42"))
        .await
        .expect("up");
    let msg = tokio::time::timeout(WAIT, uplink.next())
        .await
        .expect("uplink in time")
        .expect("uplink");
    assert_eq!(&msg.payload[..], b"reading 42");
    assert_eq!(
        tokio::time::timeout(WAIT, dev.recv_ack())
            .await
            .expect("in time")
            .expect("ACK"),
        7
    );

    // A burst bigger than the socket buffers, sent while the device does not read: rustls
    // holds what the socket refuses, and every message arrives, in order, once it reads.
    const BURST: usize = 120;
    let payload = |i: usize| Bytes::from(format!("{i:04}-{}", "x".repeat(2000)));
    for i in 0..BURST {
        service
            .publish(down("dev-a"), payload(i))
            .await
            .expect("publish");
    }
    service.flush().await.expect("flush");
    for i in 0..BURST {
        let (_, got) = tokio::time::timeout(WAIT, dev.recv_down())
            .await
            .expect("DOWN in time")
            .expect("DOWN");
        assert_eq!(got, payload(i), "message {i}");
    }

    // Draining says GOAWAY inside TLS, and closes it properly.
    let stopping = tokio::spawn(gw.shutdown());
    let (_, reason) = downs_until_goaway(&mut dev).await;
    assert_eq!(reason, GoAwayReason::Draining);
    assert!(
        matches!(
            tokio::time::timeout(WAIT, dev.next_frame()).await,
            Ok(Ok(None))
        ),
        "the session ends with a clean TLS close"
    );
    stopping.await.expect("joined").expect("stopped cleanly");
}

#[tokio::test]
async fn a_plaintext_device_on_the_tls_port_is_counted_and_closed_and_tls_devices_carry_on() {
    let nats = NatsServer::start();
    let gw = start_with(tls_config(&nats, "gw-tls", false)).await;
    let service = nats.client().await;
    let (mut dev, _) = login(&gw, &device_tls(None), "dev-a").await.expect("login");

    // TCP health checks (connect, then close or reset) are not failed handshakes; a plaintext
    // device is.
    drop(TcpStream::connect(gw.device_addr()).await.expect("connect"));
    let reset = TcpStream::connect(gw.device_addr()).await.expect("connect");
    reset
        .set_zero_linger()
        .expect("linger 0: close with a reset");
    drop(reset);
    let plain = tokio::time::timeout(
        WAIT,
        DeviceClient::connect(gw.device_addr(), "dev-b", &token("dev-b")),
    )
    .await
    .expect("answered in time");
    assert!(
        plain.is_err(),
        "a plaintext HELLO must not log in over a TLS port"
    );
    // Once both connections are over, the count is final: the probe did not add to it.
    metric_reaches(&gw, "devgate_gateway_connections 1").await;
    metric_reaches(&gw, "devgate_gateway_tls_handshake_failures_total 1").await;

    // A device that does not trust the gateway's certificate gives up itself.
    let wrong_ca = distrusting_device_tls();
    match login(&gw, &wrong_ca, "dev-c").await {
        Err(ClientError::Tls(e)) => assert!(e.to_string().contains("certificate"), "{e}"),
        other => panic!("expected a TLS failure, got {:?}", other.map(|(_, w)| w)),
    }
    metric_reaches(&gw, "devgate_gateway_tls_handshake_failures_total 2").await;
    reaches(&service, &mut dev, "dev-a", b"still here").await;
}

#[tokio::test]
async fn with_a_client_ca_a_device_certificate_must_name_the_device_id() {
    let nats = NatsServer::start();
    let gw = start_with(tls_config(&nats, "gw-mtls", true)).await;
    let service = nats.client().await;

    // device.pem is issued to CN dev-1.
    let dev1 = device_tls(Some("device"));
    let (mut first, _) = login(&gw, &dev1, "dev-1")
        .await
        .expect("its own id logs in");

    // The same certificate with another device's valid token: the token alone is not enough.
    let why = refused(login(&gw, &dev1, "dev-3").await, ErrorCode::Unauthorized);
    assert!(
        why.contains("issued to \"dev-1\"") && why.contains("\"dev-3\""),
        "{why}"
    );
    metric_reaches(&gw, "devgate_gateway_tls_identity_mismatches_total 1").await;

    // A wrong token still fails as a wrong token, certificate or not.
    let wrong_token = tokio::time::timeout(
        WAIT,
        DeviceClient::connect_over(gw.device_addr(), Some(&dev1), "dev-1", &token("dev-9")),
    )
    .await
    .expect("in time");
    refused(wrong_token, ErrorCode::Unauthorized);

    // No certificate, or one the CA did not issue: the handshake fails (TLS 1.3 reports it
    // at the client's first read), nobody is welcomed.
    for (name, tls) in [
        ("no certificate", device_tls(None)),
        ("self-signed", device_tls(Some("untrusted-device"))),
    ] {
        match login(&gw, &tls, "dev-1").await {
            Err(ClientError::Tls(_) | ClientError::Codec(_) | ClientError::Closed) => {}
            other => panic!(
                "{name}: expected a TLS failure, got {:?}",
                other.map(|(_, w)| w)
            ),
        }
    }
    metric_reaches(&gw, "devgate_gateway_tls_handshake_failures_total 2").await;

    // A certificate naming dev-5 in its SAN and something else in its CN: the SAN counts,
    // the CN beside it does not (RFC 6125).
    let san = device_tls(Some("device-san"));
    let (mut fifth, _) = login(&gw, &san, "dev-5")
        .await
        .expect("the SAN's id logs in");
    let why = refused(
        login(&gw, &san, "not-the-id").await,
        ErrorCode::Unauthorized,
    );
    assert!(why.contains("issued to \"dev-5\""), "{why}");
    metric_reaches(&gw, "devgate_gateway_tls_identity_mismatches_total 2").await;
    reaches(&service, &mut fifth, "dev-5", b"five").await;

    // A certificate under two intermediate CAs, sent with its chain.
    let (mut second, _) = login(&gw, &device_tls(Some("device-chained")), "dev-2")
        .await
        .expect("a chained certificate naming dev-2 logs in as dev-2");

    // The first device kept its session through all of it (no takeover by the refused
    // logins), and both are reachable.
    reaches(&service, &mut first, "dev-1", b"one").await;
    reaches(&service, &mut second, "dev-2", b"two").await;
    metric_reaches(&gw, "devgate_gateway_takeovers_total 0").await;
}

#[tokio::test]
async fn with_certificate_authentication_the_certificate_alone_logs_a_device_in() {
    use devgate_gateway::config::DeviceAuthMode;
    let nats = NatsServer::start();
    let gw = start_with(Config {
        auth_secret: None,
        device_auth: DeviceAuthMode::Certificate,
        ..tls_config(&nats, "gw-cert", true)
    })
    .await;
    let service = nats.client().await;
    let dev1 = device_tls(Some("device"));
    let login_without_token = |id: &'static str| {
        let dev1 = dev1.clone();
        let addr = gw.device_addr();
        async move {
            tokio::time::timeout(WAIT, DeviceClient::connect_over(addr, Some(&dev1), id, ""))
                .await
                .expect("answered in time")
        }
    };
    let (mut dev, _) = login_without_token("dev-1")
        .await
        .expect("the certificate naming dev-1 is enough");
    reaches(&service, &mut dev, "dev-1", b"no token needed").await;
    let why = refused(login_without_token("dev-3").await, ErrorCode::Unauthorized);
    assert!(why.contains("issued to \"dev-1\""), "{why}");
    match login(&gw, &device_tls(None), "dev-1").await {
        Err(ClientError::Tls(_) | ClientError::Codec(_) | ClientError::Closed) => {}
        other => panic!("expected a TLS failure, got {:?}", other.map(|(_, w)| w)),
    }
    reaches(&service, &mut dev, "dev-1", b"still the only dev-1").await;
}

/// Certificate authentication fails closed: a gateway started (past validation, as a library
/// user could) without TLS admits nobody, rather than everybody.
#[tokio::test]
async fn certificate_authentication_without_tls_admits_nobody() {
    use devgate_gateway::config::DeviceAuthMode;
    let nats = NatsServer::start();
    let config = Config {
        auth_secret: None,
        device_auth: DeviceAuthMode::Certificate,
        ..config(&nats, "gw-misconfigured")
    };
    let gw = Gateway::start(config).await.expect("starts");
    tokio::time::timeout(Duration::from_secs(10), gw.wait_connected())
        .await
        .expect("connected to NATS");
    let plain = tokio::time::timeout(WAIT, DeviceClient::connect(gw.device_addr(), "dev-1", ""))
        .await
        .expect("answered in time");
    let why = refused(plain, ErrorCode::Unauthorized);
    assert!(why.contains("not a TLS connection"), "{why}");
}

/// A client socket that sends `prefix` in the same write as the first bytes written to it
/// (the ClientHello): how nginx forwards a PROXY header and the data behind it in one segment,
/// so the gateway reads the start of the handshake along with the header.
struct PrefixFirstWrite {
    inner: TcpStream,
    prefix: Option<Vec<u8>>,
}

impl AsyncRead for PrefixFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PrefixFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let Some(prefix) = self.prefix.take() else {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        };
        let mut all = prefix;
        all.extend_from_slice(buf);
        // A fresh loopback socket takes a few hundred bytes at once.
        if let Err(e) = ready!(self.inner.poll_write_ready(cx)) {
            return Poll::Ready(Err(e));
        }
        match self.inner.try_write(&all) {
            Ok(n) if n == all.len() => Poll::Ready(Ok(buf.len())),
            Ok(n) => Poll::Ready(Err(std::io::Error::other(format!("short write {n}")))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS client configuration that trusts the test CA and presents no certificate.
fn trusting_client() -> Arc<rustls::ClientConfig> {
    client_config_named(
        &TlsFiles {
            ca: Some(tls_fixture("ca.pem")),
            client: None,
        },
        "tls",
    )
    .expect("client config")
}

async fn proxied_tls_login(
    gw: &Gateway,
    header: &[u8],
    id: &str,
) -> Result<(DeviceClient, devgate_gateway::codec::Welcome), ClientError> {
    let config = trusting_client();
    let tcp = TcpStream::connect(gw.device_addr()).await.expect("connect");
    let io = PrefixFirstWrite {
        inner: tcp,
        prefix: (!header.is_empty()).then(|| header.to_vec()),
    };
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(name, io)
        .await
        .map_err(ClientError::Tls)?;
    let hello = Hello {
        device_id: id.to_owned(),
        token: token(id),
        metadata: Default::default(),
    };
    tokio::time::timeout(WAIT, DeviceClient::login_over(Box::new(tls), &hello))
        .await
        .expect("login answered in time")
}

#[tokio::test]
async fn a_proxy_header_may_precede_the_client_hello_in_the_same_segment() {
    let nats = NatsServer::start();
    let mut c = tls_config(&nats, "gw-proxied", false);
    c.proxy_protocol = true;
    c.proxy_trusted_cidrs = vec!["127.0.0.0/8".parse().expect("cidr")];
    let gw = start_with(c).await;
    let service = nats.client().await;

    let (mut dev, _) = proxied_tls_login(
        &gw,
        b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 7000\r\n",
        "dev-p",
    )
    .await
    .expect("TLS after a PROXY header logs in");
    let info: PresenceInfo = control(&service, "dev-p", ControlOp::Presence).await;
    assert_eq!(info.remote_addr, "203.0.113.7:40000");
    reaches(&service, &mut dev, "dev-p", b"through the balancer").await;

    // A device dialling the gateway directly (no PROXY header) hears why, inside TLS.
    let why = refused(
        proxied_tls_login(&gw, b"", "dev-q").await,
        ErrorCode::ProtocolViolation,
    );
    assert!(why.contains("PROXY"), "{why}");
    reaches(&service, &mut dev, "dev-p", b"unaffected").await;

    // Dialled directly by a device that then fails the handshake (it does not trust the
    // gateway): one refusal, counted once as the missing PROXY header, not also as a failed
    // handshake (which is counted before the refusal, so it would show by now).
    let wrong_ca = distrusting_device_tls();
    assert!(matches!(
        login(&gw, &wrong_ca, "dev-r").await,
        Err(ClientError::Tls(_))
    ));
    metric_reaches(
        &gw,
        "devgate_gateway_errors_total{code=\"protocol_violation\"} 2",
    )
    .await;
    metric_reaches(&gw, "devgate_gateway_tls_handshake_failures_total 0").await;
}

#[tokio::test]
async fn a_peer_outside_the_trusted_cidrs_is_closed_at_once_not_after_the_hello_timeout() {
    let nats = NatsServer::start();
    let mut c = tls_config(&nats, "gw-far", false);
    c.proxy_protocol = true;
    c.proxy_trusted_cidrs = vec!["10.0.0.0/8".parse().expect("cidr")];
    // Far beyond WAIT: only an immediate close passes.
    c.hello_timeout_ms = 60_000;
    let gw = start_with(c).await;
    let mut silent = TcpStream::connect(gw.device_addr()).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut silent, &mut byte))
        .await
        .expect("closed at once, not held for the HELLO timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    metric_reaches(&gw, "devgate_gateway_proxy_untrusted_total 1").await;
    metric_reaches(&gw, "devgate_gateway_handshakes 0").await;
}

/// The DER certificate a new TLS connection to `gw` is served.
async fn served_certificate(gw: &Gateway) -> Vec<u8> {
    let config = trusting_client();
    let tcp = TcpStream::connect(gw.device_addr()).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a server certificate")
        .to_vec()
}

fn der(pem: &PathBuf) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pem)
        .expect("certificate")
        .to_vec()
}

/// Replaces `to` with a copy of `from` in one step (as a Secret volume's symlink swap does),
/// so the gateway never reads a half-written file.
fn replace(from: &std::path::Path, to: &std::path::Path) {
    let staging = to.with_extension("new");
    std::fs::copy(from, &staging).expect("copy");
    std::fs::rename(&staging, to).expect("rename");
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_and_live_sessions_stay() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::copy(tls_fixture("server.pem"), &cert).expect("copy");
    std::fs::copy(tls_fixture("server.key"), &key).expect("copy");
    let gw = start_with(Config {
        device_tls_cert: Some(cert.clone()),
        device_tls_key: Some(key.clone()),
        device_tls_check_ms: 50,
        ..config(&nats, "gw-renew")
    })
    .await;
    let service = nats.client().await;
    assert_eq!(
        served_certificate(&gw).await,
        der(&tls_fixture("server.pem"))
    );
    let (mut dev, _) = login(&gw, &device_tls(None), "dev-r").await.expect("login");

    let expiry = |pem: &str| {
        format!(
            "devgate_gateway_tls_certificate_expiry_timestamp_seconds {}",
            devgate_gateway::device_tls::not_after_pem(
                &std::fs::read(tls_fixture(pem)).expect("read")
            )
            .expect("expiry")
        )
    };
    metric_reaches(&gw, &expiry("server.pem")).await;

    // Half a renewal (the new certificate, the old key) is refused and flagged; the old
    // certificate stays in use.
    replace(&tls_fixture("server-rotated.pem"), &cert);
    metric_reaches(&gw, "devgate_gateway_tls_stale 1").await;
    assert_eq!(
        served_certificate(&gw).await,
        der(&tls_fixture("server.pem"))
    );

    replace(&tls_fixture("server-rotated.key"), &key);
    metric_reaches(&gw, "devgate_gateway_tls_stale 0").await;
    metric_reaches(&gw, &expiry("server-rotated.pem")).await;
    assert_eq!(
        served_certificate(&gw).await,
        der(&tls_fixture("server-rotated.pem"))
    );
    let (_new, _) = login(&gw, &device_tls(None), "dev-s")
        .await
        .expect("login after renewal");
    reaches(&service, &mut dev, "dev-r", b"old session, still up").await;
}
