//! Every kind of bad input gets a clear ERROR code, closes only the offending connection, and
//! leaves other devices working.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{ErrorBody, ErrorCode, Frame, Hello, kind};
use devgate_gateway::contract::{DeviceId, subjects};
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::gateway::{config, device, read_error, start, start_with, token};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Sends raw bytes, then returns the ERROR the gateway answers with (and checks it closes).
async fn error_for(gw: &Gateway, bytes: &[u8]) -> ErrorBody {
    let mut stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_error(stream).await
}

fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(1 + body.len() as u32);
    b.put_u8(ty);
    b.put_slice(body);
    b.to_vec()
}

fn hello(id: &str, token: &str) -> Vec<u8> {
    frame(
        kind::HELLO,
        format!(r#"{{"device_id":"{id}","token":"{token}"}}"#).as_bytes(),
    )
}

/// A healthy device on the same gateway still round-trips a message.
async fn still_works(nats: &NatsServer, bystander: &mut DeviceClient, id: &str) {
    let service = nats.client().await;
    let reply = service
        .request(
            subjects::down(&DeviceId::parse(id).expect("id")),
            Bytes::from_static(b"still here?"),
        )
        .await
        .expect("bystander reachable");
    assert!(
        std::str::from_utf8(&reply.payload)
            .expect("utf8")
            .contains("\"sent\"")
    );
    let (_, p) = tokio::time::timeout(WAIT, bystander.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&p[..], b"still here?");
}

#[tokio::test]
async fn malformed_frames_are_refused_with_specific_codes_and_bystanders_are_unaffected() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut bystander, _) = device(&gw, "bystander").await;

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("zero length", vec![0, 0, 0, 0], ErrorCode::MalformedFrame),
        (
            "length over the limit",
            vec![0, 0x10, 0, 0, 1],
            ErrorCode::FrameTooLarge,
        ),
        (
            "4 GiB length",
            vec![0xff, 0xff, 0xff, 0xff],
            ErrorCode::FrameTooLarge,
        ),
        (
            "unknown type",
            frame(0x42, b""),
            ErrorCode::UnknownFrameType,
        ),
        (
            "HELLO not JSON",
            frame(kind::HELLO, b"{nope"),
            ErrorCode::BadHello,
        ),
        (
            "HELLO without device_id",
            frame(kind::HELLO, br#"{"token":"x"}"#),
            ErrorCode::BadHello,
        ),
        ("dots in the id", hello("a.b", "x"), ErrorCode::BadDeviceId),
        ("wildcard id", hello("*", "x"), ErrorCode::BadDeviceId),
        ("empty id", hello("", "x"), ErrorCode::BadDeviceId),
        (
            "129-char id",
            hello(&"a".repeat(129), "x"),
            ErrorCode::BadDeviceId,
        ),
        (
            // 2,000 quotes: 4 kB escaped in the HELLO (just under its 4 KiB limit), and twice
            // that if the ERROR quoted the whole id back; it quotes a short prefix.
            "an id of 2,000 quotes",
            hello(&r#"\""#.repeat(2_000), "x"),
            ErrorCode::BadDeviceId,
        ),
        (
            // Over max_hello_len (4 KiB), though far under max_frame_len.
            "a 40 kB HELLO",
            hello(&r#"\""#.repeat(20_000), "x"),
            ErrorCode::FrameTooLarge,
        ),
        (
            "wrong token",
            hello("dev-1", &token("dev-2")),
            ErrorCode::Unauthorized,
        ),
        (
            "missing token",
            frame(kind::HELLO, br#"{"device_id":"dev-1"}"#),
            ErrorCode::Unauthorized,
        ),
        (
            "UP before HELLO",
            frame(kind::UP, &[0, 0, 0, 1, b'x']),
            ErrorCode::ProtocolViolation,
        ),
        (
            "PING before HELLO",
            frame(kind::PING, b""),
            ErrorCode::ProtocolViolation,
        ),
    ];
    for (what, bytes, code) in cases {
        let err = error_for(&gw, &bytes).await;
        assert_eq!(err.code, code, "{what}: {}", err.message);
    }
    still_works(&nats, &mut bystander, "bystander").await;
}

#[tokio::test]
async fn protocol_violations_after_login_close_only_that_session() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    let after_login: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "second HELLO",
            hello("dev-1", &token("dev-1")),
            ErrorCode::ProtocolViolation,
        ),
        (
            "DOWN from a device",
            frame(kind::DOWN, &[0, 0, 0, 0]),
            ErrorCode::ProtocolViolation,
        ),
        (
            "short UP",
            frame(kind::UP, &[0, 0]),
            ErrorCode::MalformedFrame,
        ),
        (
            "ACK with a long body",
            frame(kind::ACK, &[0, 0, 0, 0, 0]),
            ErrorCode::MalformedFrame,
        ),
        (
            "oversize UP",
            {
                let mut v = vec![0, 1, 0, 5, kind::UP];
                v.extend(std::iter::repeat_n(0u8, 0x10004));
                v
            },
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (what, bytes, code) in after_login {
        let mut stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
        stream
            .write_all(&hello("dev-1", &token("dev-1")))
            .await
            .expect("hello");
        stream.write_all(&bytes).await.expect("bad frame");
        let err = read_error(stream).await;
        assert_eq!(err.code, code, "{what}: {}", err.message);
    }
    still_works(&nats, &mut bystander, "bystander").await;
}

#[tokio::test]
async fn a_silent_connection_gets_hello_timeout() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.hello_timeout_ms = 200;
    let gw = start_with(c).await;
    let stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    assert_eq!(read_error(stream).await.code, ErrorCode::HelloTimeout);
}

#[tokio::test]
async fn a_session_silent_for_three_heartbeats_gets_idle_timeout() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.heartbeat_s = 1;
    let gw = start_with(c).await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    assert_eq!(welcome.heartbeat_s, 1);
    let started = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), dev.recv_down())
        .await
        .expect("closed in time")
    {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::IdleTimeout),
        other => panic!("expected idle_timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(2900));
}

#[tokio::test]
async fn pings_keep_a_session_alive_and_are_echoed() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.heartbeat_s = 1;
    let gw = start_with(c).await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    for i in 0..5u8 {
        tokio::time::sleep(Duration::from_millis(800)).await; // the device's heartbeat period
        dev.send(Frame::Ping(Bytes::from(vec![i])))
            .await
            .expect("ping");
        match dev.next_frame().await.expect("frame") {
            Some(Frame::Pong(body)) => assert_eq!(&body[..], &[i]),
            other => panic!("expected PONG, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn without_insecure_mode_every_device_needs_the_right_token() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let err = DeviceClient::connect(gw.device_addr(), "dev-1", "")
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, ClientError::Refused(ref e) if e.code == ErrorCode::Unauthorized),
        "{err}"
    );

    let mut insecure = config(&nats, "gw-2");
    insecure.auth_secret = None;
    insecure.insecure_no_auth = true;
    let gw2 = start_with(insecure).await;
    DeviceClient::connect(gw2.device_addr(), "dev-1", "")
        .await
        .expect("insecure mode accepts");
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_as_overloaded() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.max_connections = 2;
    let gw = start_with(c).await;
    let (_a, _) = device(&gw, "a").await;
    let (_b, _) = device(&gw, "b").await;
    let stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    assert_eq!(read_error(stream).await.code, ErrorCode::Overloaded);
}

#[tokio::test]
async fn hello_metadata_is_kept_and_bad_json_in_hello_is_explained() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let mut stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    stream
        .write_all(&frame(kind::HELLO, b"[1,2]"))
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("bad_hello"), "{text}");

    let hello = Hello {
        device_id: "dev-m".into(),
        token: token("dev-m"),
        metadata: serde_json::from_str(r#"{"fw":"2.1","model":"x9"}"#).expect("json"),
    };
    let (_dev, _) = DeviceClient::connect_with(
        TcpStream::connect(gw.device_addr()).await.expect("c"),
        &hello,
    )
    .await
    .expect("login with metadata");
}

#[tokio::test]
async fn a_configured_frame_limit_is_announced_and_enforced_both_ways() {
    let nats = NatsServer::start();
    let gw = start_with(devgate_gateway::config::Config {
        max_frame_len: 1024,
        ..config(&nats, "gw-small")
    })
    .await;
    let (mut bystander, welcome) = device(&gw, "bystander").await;
    assert_eq!(
        welcome.max_frame_len, 1024,
        "WELCOME tells the device the limit"
    );
    let service = nats.client().await;
    let mut ups = service.subscribe("device.*.up").await.expect("sub");
    devgate_tests::nats::processed(&service).await;

    // Downlink: a payload that fills the limit (1 type byte + 4 seq bytes + payload) is sent,
    // one byte more is refused `too_large` before anything is written.
    let down = subjects::down(&DeviceId::parse("bystander").expect("id"));
    for (len, status, reason) in [
        (1019, "\"sent\"", None),
        (1020, "\"failed\"", Some("too_large")),
    ] {
        let reply = service
            .request(down.clone(), Bytes::from(vec![b'd'; len]))
            .await
            .expect("answered");
        let text = String::from_utf8_lossy(&reply.payload).into_owned();
        assert!(text.contains(status), "{len} bytes: {text}");
        if let Some(reason) = reason {
            assert!(text.contains(reason), "{len} bytes: {text}");
        }
    }
    let (_, payload) = tokio::time::timeout(WAIT, bystander.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(
        payload.len(),
        1019,
        "only the frame within the limit reached the device"
    );

    // Uplink: the same limit. A full-size UP is published; one byte over ends that session.
    let mut stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    stream
        .write_all(&hello("dev-1", &token("dev-1")))
        .await
        .expect("hello");
    let mut up = frame(kind::UP, &[0, 0, 0, 0]);
    up.extend(std::iter::repeat_n(b'u', 1019));
    up[..4].copy_from_slice(&1024u32.to_be_bytes());
    stream.write_all(&up).await.expect("full-size UP");
    let published = tokio::time::timeout(WAIT, ups.next())
        .await
        .expect("in time")
        .expect("msg");
    assert_eq!(published.payload.len(), 1019);
    let mut over = frame(kind::UP, &[0, 0, 0, 0]);
    over.extend(std::iter::repeat_n(b'u', 1020));
    over[..4].copy_from_slice(&1025u32.to_be_bytes());
    stream.write_all(&over).await.expect("oversize UP");
    assert_eq!(read_error(stream).await.code, ErrorCode::FrameTooLarge);
    still_works(&nats, &mut bystander, "bystander").await;
}
