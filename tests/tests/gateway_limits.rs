//! Bounds on what an unauthenticated or misbehaving peer can cost the gateway: handshakes in
//! progress, the size of HELLO and its metadata, and (per session) the uplink rate. Each test
//! also shows that a device already connected is unaffected.

use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{ErrorCode, Frame, Hello};
use devgate_gateway::contract::{DeviceId, subjects};
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::gateway::{
    config, device, metric_reaches, read_error, start_with, token, try_device,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// A device connected before the test's abuse still round-trips a request.
async fn still_works(nats: &NatsServer, bystander: &mut DeviceClient, id: &str) {
    let service = nats.client().await;
    let reply = tokio::time::timeout(
        WAIT,
        service.request(
            subjects::down(&DeviceId::parse(id).expect("id")),
            Bytes::from_static(b"still here?"),
        ),
    )
    .await
    .expect("answer in time")
    .expect("bystander reachable");
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("\"sent\""),
        "{:?}",
        reply.payload
    );
    let (_, p) = tokio::time::timeout(WAIT, bystander.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&p[..], b"still here?");
}

async fn refused_code(
    result: Result<(DeviceClient, devgate_gateway::codec::Welcome), ClientError>,
) -> ErrorCode {
    match result {
        Err(ClientError::Refused(e)) => e.code,
        Err(other) => panic!("expected an ERROR, got {other}"),
        Ok((_, w)) => panic!("expected a refusal, got WELCOME {w:?}"),
    }
}

#[tokio::test]
async fn silent_connections_beyond_the_handshake_limit_are_closed_at_once_and_sessions_do_not_count()
 {
    let nats = NatsServer::start();
    let hello_timeout_ms = 3_000;
    let gw = start_with(devgate_gateway::config::Config {
        max_handshakes: 2,
        hello_timeout_ms,
        ..config(&nats, "gw-1")
    })
    .await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    // Welcomed sessions give their slot back: three logins in a row with a limit of 2.
    let mut live = Vec::new();
    for id in ["d1", "d2", "d3"] {
        live.push(device(&gw, id).await);
    }

    // Two silent sockets fill the handshake pool.
    let _silent_1 = TcpStream::connect(gw.device_addr()).await.expect("connect");
    let silent_2 = TcpStream::connect(gw.device_addr()).await.expect("connect");
    metric_reaches(&gw, "devgate_gateway_handshakes 2").await;

    // Policy: a third is refused at once (not after the HELLO deadline), and so is a real
    // device while the pool is full.
    let started = Instant::now();
    let third = TcpStream::connect(gw.device_addr()).await.expect("connect");
    assert_eq!(read_error(third).await.code, ErrorCode::Overloaded);
    assert!(
        started.elapsed() < Duration::from_millis(hello_timeout_ms / 2),
        "refused after {:?}",
        started.elapsed()
    );
    assert_eq!(
        refused_code(try_device(&gw, "late").await).await,
        ErrorCode::Overloaded
    );
    metric_reaches(&gw, "devgate_gateway_handshakes_refused_total 2").await;

    // A silent socket that leaves frees its slot: the device gets in.
    drop(_silent_1);
    metric_reaches(&gw, "devgate_gateway_handshakes 1").await;
    let (_late, _) = device(&gw, "late").await;
    // One that times out frees its slot too.
    assert_eq!(read_error(silent_2).await.code, ErrorCode::HelloTimeout);
    metric_reaches(&gw, "devgate_gateway_handshakes 0").await;

    still_works(&nats, &mut bystander, "bystander").await;
    for (mut dev, _) in live {
        dev.send(Frame::Ping(Bytes::from_static(b"p")))
            .await
            .expect("ping");
        assert!(matches!(
            tokio::time::timeout(WAIT, dev.next_frame()).await,
            Ok(Ok(Some(Frame::Pong(_))))
        ));
    }
}

#[tokio::test]
async fn an_oversize_hello_is_refused_from_its_length_alone() {
    let nats = NatsServer::start();
    let gw = start_with(config(&nats, "gw-1")).await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    // 5000 bytes announced (over the 4 KiB HELLO limit, well under max_frame_len), none sent:
    // the answer comes without the gateway waiting for them (its HELLO deadline is 10 s).
    let mut stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    stream
        .write_all(&[0, 0, 0x13, 0x88, 0x01])
        .await
        .expect("write");
    let err = read_error(stream).await;
    assert_eq!(err.code, ErrorCode::FrameTooLarge, "{}", err.message);
    assert!(err.message.contains("4096"), "{}", err.message);
    still_works(&nats, &mut bystander, "bystander").await;
}

fn hello_with(id: &str, token: String, metadata: &str) -> Hello {
    Hello {
        device_id: id.into(),
        token,
        metadata: serde_json::from_str(metadata).expect("metadata json"),
    }
}

async fn login(
    gw: &Gateway,
    hello: &Hello,
) -> Result<(DeviceClient, devgate_gateway::codec::Welcome), ClientError> {
    let stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    DeviceClient::connect_with(stream, hello).await
}

#[tokio::test]
async fn hello_metadata_over_its_bounds_is_bad_hello() {
    let nats = NatsServer::start();
    let gw = start_with(config(&nats, "gw-1")).await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    let zeros = format!(r#"{{"zeros":[{}]}}"#, vec!["0"; 1000].join(","));
    let many_keys = format!(
        "{{{}}}",
        (0..17)
            .map(|i| format!(r#""k{i}":1"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let long_value = format!(r#"{{"fw":"{}"}}"#, "x".repeat(2000));
    for (what, metadata) in [
        ("nested array", zeros.as_str()),
        ("nested object", r#"{"o":{"a":1}}"#),
        ("17 keys", many_keys.as_str()),
        ("over 1 KiB", long_value.as_str()),
    ] {
        let result = login(&gw, &hello_with("dev-m", token("dev-m"), metadata)).await;
        match result {
            Err(ClientError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::BadHello, "{what}: {}", e.message);
                assert!(e.message.contains("metadata"), "{what}: {}", e.message);
            }
            Err(other) => panic!("{what}: expected bad_hello, got {other}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    // The token is checked before metadata is even looked at.
    assert_eq!(
        refused_code(login(&gw, &hello_with("dev-m", "00".repeat(32), &zeros)).await).await,
        ErrorCode::Unauthorized
    );
    // Within the bounds, scalars of every kind are kept.
    login(
        &gw,
        &hello_with(
            "dev-m",
            token("dev-m"),
            r#"{"fw":"2.1","n":3,"ok":true,"none":null}"#,
        ),
    )
    .await
    .expect("metadata within bounds");
    still_works(&nats, &mut bystander, "bystander").await;
}

#[tokio::test]
async fn a_flooding_device_is_paced_to_its_uplink_rate_and_others_are_not() {
    let nats = NatsServer::start();
    let (rate, burst_ms) = (40u64, 500u64);
    let gw = start_with(devgate_gateway::config::Config {
        up_rate_msgs: rate,
        up_burst_ms: burst_ms,
        ..config(&nats, "gw-1")
    })
    .await;
    let service = nats.client().await;
    let mut flood_up = service
        .subscribe(subjects::up(&DeviceId::parse("flood").expect("id")))
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(&service).await;
    let (mut flood, _) = device(&gw, "flood").await;
    let (mut other, _) = device(&gw, "other").await;

    // 100 UPs without seq (not bounded by max_inflight), written as fast as the socket takes.
    let total = 100usize;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for i in 0..total {
            flood
                .send_up(0, Bytes::from(format!("m{i}")))
                .await
                .expect("send");
        }
        flood
    });
    // Within a window W after the flood started, at most burst + rate × W + 1 can have been
    // published (the gateway's clock starts no earlier than ours).
    let window = Duration::from_millis(500);
    let mut seen = 0usize;
    while let Ok(Some(_)) = tokio::time::timeout_at(started + window, flood_up.next()).await {
        seen += 1;
    }
    let burst = (rate * burst_ms / 1000) as usize;
    let bound = burst + (rate as f64 * window.as_secs_f64()) as usize + 1;
    assert!(
        seen >= burst,
        "only {seen} UPs in the window; the burst is {burst}"
    );
    assert!(
        seen <= bound,
        "{seen} UPs in {window:?}; the bound is {bound}"
    );

    // Meanwhile another device's UP with a seq is ACKed promptly.
    let acked_in = Instant::now();
    other
        .send_up(7, Bytes::from_static(b"urgent"))
        .await
        .expect("send");
    let seq = tokio::time::timeout(Duration::from_millis(500), other.recv_ack())
        .await
        .expect("ACK while the other device is throttled")
        .expect("ack");
    assert_eq!(seq, 7);
    assert!(acked_in.elapsed() < Duration::from_millis(500));

    // Paced, not dropped: every UP arrives in the end.
    while seen < total {
        tokio::time::timeout(WAIT, flood_up.next())
            .await
            .unwrap_or_else(|_| panic!("UP {seen} of {total} never arrived"))
            .expect("subscription open");
        seen += 1;
    }
    let _flood = writer.await.expect("writer");
    let metrics = reqwest::get(format!("http://{}/metrics", gw.http_addr()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let throttled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("devgate_gateway_uplink_throttled_total "))
        .and_then(|v| v.parse().ok())
        .expect("throttle counter");
    assert!(throttled > 0, "pauses are counted");
}

#[tokio::test]
async fn an_id_logging_in_too_often_is_refused_while_its_session_and_other_devices_carry_on() {
    let nats = NatsServer::start();
    let gw = start_with(devgate_gateway::config::Config {
        max_logins_per_id: 3,
        login_window_s: 600,
        ..config(&nats, "gw-1")
    })
    .await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    // Two clients sharing an id replace each other: three logins are allowed in the window.
    let mut held = None;
    for _ in 0..3 {
        held = Some(device(&gw, "flappy").await.0);
    }
    let mut holder = held.expect("logged in");
    let err = match try_device(&gw, "flappy").await {
        Err(ClientError::Refused(e)) => e,
        Err(other) => panic!("expected an ERROR, got {other}"),
        Ok((_, w)) => panic!("expected a refusal, got WELCOME {w:?}"),
    };
    assert_eq!(err.code, ErrorCode::Overloaded);
    assert!(
        err.message.contains("3 times within 600 s") && err.message.contains("retry in"),
        "{}",
        err.message
    );
    metric_reaches(&gw, "devgate_gateway_logins_throttled_total 1").await;
    // The refused login displaced nobody: the last session still holds the id.
    still_works(&nats, &mut holder, "flappy").await;
    still_works(&nats, &mut bystander, "bystander").await;
    device(&gw, "another").await;
}
