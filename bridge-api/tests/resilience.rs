//! bridge-api when things go wrong: NATS unreachable, NATS dying mid-request, a device whose
//! queue is full, the request time cap, and graceful shutdown with requests and SSE in flight.

mod common;

use std::time::{Duration, Instant};

use common::{Bridge, SseReader, WAIT, assert_error, bridge_config, send};
use devgate_gateway::contract::{GatewayStats, subjects};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{config as gw_config, device, start, start_with};
use futures::StreamExt;
use reqwest::Method;

#[tokio::test]
async fn nats_unreachable_is_503_and_recovers() {
    let mut nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (_dev, _) = device(&gw, "dev-1").await;

    nats.stop();
    bridge.wait_ready(false).await;
    let started = Instant::now();
    for (method, path) in [
        (Method::POST, "/v1/devices/dev-1/messages"),
        (Method::POST, "/v1/devices/dev-1/messages?ack=none"),
        (Method::GET, "/v1/devices/dev-1"),
        (Method::DELETE, "/v1/devices/dev-1/session"),
        (Method::GET, "/v1/devices"),
        (Method::GET, "/v1/gateways"),
        (Method::GET, "/v1/devices/dev-1/messages"),
    ] {
        let response = bridge
            .req(method.clone(), path)
            .body("x")
            .send()
            .await
            .expect("HTTP request");
        // Clients are told when to come back, as the docs promise.
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "{method} {path}"
        );
        let got = (
            response.status().as_u16(),
            response.json().await.unwrap_or(serde_json::Value::Null),
        );
        assert_error(&got, 503, "nats_unavailable");
    }
    let got = send(
        bridge
            .req(Method::POST, "/v1/messages")
            .json(&serde_json::json!({"device_ids": ["dev-1"], "payload": "x"})),
    )
    .await;
    assert_error(&got, 503, "nats_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 must be immediate"
    );
    let readyz = bridge
        .http
        .get(bridge.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 503);

    nats.restart();
    bridge.wait_ready(true).await;
    let got = send(bridge.req(Method::GET, "/v1/gateways")).await;
    assert_eq!(got.0, 200, "{}", got.1);
}

#[tokio::test]
async fn nats_going_away_mid_request_is_a_clean_503() {
    let mut nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "mute").await;

    let pending = tokio::spawn(send(
        bridge
            .req(
                Method::POST,
                "/v1/devices/mute/messages?ack=device&timeout_ms=20000",
            )
            .body("x"),
    ));
    // The request is in flight once the device holds the frame (and does not ACK it).
    let (seq, _) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_ne!(seq, 0);
    let killed = Instant::now();
    nats.stop();
    let got = tokio::time::timeout(WAIT, pending)
        .await
        .expect("no hang")
        .expect("joined");
    assert_error(&got, 503, "nats_unavailable");
    assert!(
        got.1["message"].as_str().unwrap_or("").contains("unknown"),
        "the caller must learn the outcome is unknown: {}",
        got.1
    );
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn a_busy_device_is_429_with_retry_after() {
    let nats = NatsServer::start();
    let gw = start_with(devgate_gateway::config::Config {
        max_inflight: 1,
        ..gw_config(&nats, "gw-1")
    })
    .await;
    let bridge = Bridge::start(&nats).await;
    let (mut mute, _) = device(&gw, "mute").await;
    // One DOWN awaits the device's ACK: the gateway allows no second one.
    let first = tokio::spawn(send(
        bridge
            .req(
                Method::POST,
                "/v1/devices/mute/messages?ack=device&timeout_ms=5000",
            )
            .body("1"),
    ));
    let (seq, _) = tokio::time::timeout(WAIT, mute.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    let response = bridge
        .req(
            Method::POST,
            "/v1/devices/mute/messages?ack=device&timeout_ms=5000",
        )
        .body("2")
        .send()
        .await
        .expect("http");
    assert_eq!(response.status(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "device_busy");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("too_many_unacked"),
        "{body}"
    );
    mute.ack(seq).await.expect("ack");
    let got = first.await.expect("joined");
    assert_eq!(got.1["status"], "acked", "{}", got.1);
}

#[tokio::test]
async fn the_request_time_cap_answers_504() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        default_timeout_ms: 100,
        request_timeout_ms: 400,
        ..bridge_config(&nats)
    })
    .await;
    let (_mute, _) = device(&gw, "mute").await;
    let started = Instant::now();
    let got = send(
        bridge
            .req(
                Method::POST,
                "/v1/devices/mute/messages?ack=device&timeout_ms=30000",
            )
            .body("x"),
    )
    .await;
    assert_error(&got, 504, "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn shutdown_finishes_inflight_requests_and_ends_sse() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "slow").await;

    let sse = bridge
        .req(Method::GET, "/v1/devices/-/messages")
        .send()
        .await
        .expect("sse");
    let mut sse = SseReader::new(sse);
    let pending = tokio::spawn(send(
        bridge
            .req(
                Method::POST,
                "/v1/devices/slow/messages?ack=device&timeout_ms=10000",
            )
            .body("x"),
    ));
    let (seq, _) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");

    bridge.shutdown.cancel();
    // The SSE stream ends by itself.
    assert!(
        tokio::time::timeout(WAIT, sse.next_event())
            .await
            .expect("SSE must end on shutdown")
            .is_none()
    );
    // The in-flight request still gets its real answer.
    dev.ack(seq).await.expect("ack");
    let got = tokio::time::timeout(WAIT, pending)
        .await
        .expect("no hang")
        .expect("joined");
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["status"], "acked");
    bridge.stop().await;
}

#[tokio::test]
async fn a_slow_sse_client_gets_a_lagged_event_instead_of_blocking_nats() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        sse_buffer: 1,
        ..bridge_config(&nats)
    })
    .await;
    let (mut dev, _) = device(&gw, "chatty").await;
    let sse = bridge
        .req(Method::GET, "/v1/devices/chatty/messages")
        .send()
        .await
        .expect("sse");
    let mut sse = SseReader::new(sse);

    // Far more than the socket buffers hold, while the client reads nothing.
    let chunk = "z".repeat(60_000);
    let deadline = Instant::now() + WAIT;
    let mut sent = 0u32;
    loop {
        for _ in 0..50 {
            sent += 1;
            dev.send_up(0, chunk.clone()).await.expect("up");
        }
        let metrics = bridge.metrics_text().await;
        let dropped = metrics
            .lines()
            .find_map(|l| l.strip_prefix("devgate_bridge_sse_dropped_events_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if dropped > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing dropped after {sent} uplinks"
        );
    }
    // Uplink kept flowing meanwhile: the device is still served.
    dev.send_up(0, "last").await.expect("up");
    loop {
        let (name, data) = sse.next_json().await;
        if name == "lagged" {
            assert!(data["dropped"].as_u64().is_some_and(|n| n > 0), "{data}");
            break;
        }
        assert_eq!(name, "up");
    }
}

#[tokio::test]
async fn after_a_late_nats_connection_gateway_lists_wait_for_instances_not_yet_announced() {
    let mut nats = NatsServer::start();
    nats.stop();
    let bridge = Bridge::launch(devgate_bridge_api::config::Config {
        scatter_window_ms: 400,
        ..bridge_config(&nats)
    })
    .await;
    // The scenario itself, not synchronisation: NATS becomes reachable only after bridge-api
    // has run longer than its announce warm-up (two default announce periods, 2 s).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    nats.restart();
    bridge.wait_ready(true).await;
    let connected = Instant::now();

    let _gw = start(&nats, "gw-1").await;
    // "gw-2" connected a moment later: its first announce is not out yet, and it answers the
    // stats scatter 50 ms late (well inside the window).
    let late = nats.client().await;
    let mut stats = late.subscribe(subjects::STATS).await.expect("subscribe");
    devgate_tests::nats::processed(&late).await;
    let responder = tokio::spawn(async move {
        let body = serde_json::to_vec(&GatewayStats {
            instance: "gw-2".into(),
            advertise_addr: "127.0.0.1:9".into(),
            ready: true,
            draining: false,
            sessions: 0,
            started_ms: 1,
        })
        .expect("json");
        while let Some(msg) = stats.next().await {
            let Some(reply) = msg.reply else { continue };
            let client = late.clone();
            let body = bytes::Bytes::from(body.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = client.publish(reply, body).await;
            });
        }
    });

    // gw-1 announces every 200 ms, so by the second request bridge-api knows it. Both requests
    // start within the 2 s after the connection, while gw-2 could still announce: bridge-api
    // must wait for it rather than take gw-1 for the whole fleet.
    for attempt in 0..2 {
        assert!(
            connected.elapsed() < Duration::from_millis(1_800),
            "request {attempt} starts {:?} after the connection, past the warm-up: too slow to \
             test anything",
            connected.elapsed()
        );
        let (status, body) = bridge.get("/v1/gateways").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["count"], 2, "request {attempt} stopped early: {body}");
        assert_eq!(body["gateways"][0]["instance"], "gw-1", "{body}");
        assert_eq!(body["gateways"][1]["instance"], "gw-2", "{body}");
    }
    responder.abort();
}

#[tokio::test]
async fn shutdown_does_not_wait_for_ever_on_a_tail_client_that_stopped_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ROUND: u64 = 20;
    let nats = NatsServer::start();
    let mut bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        // The drain after shutdown is the request cap plus a few seconds: a small cap here, so
        // the test does not wait the default 65 s.
        default_timeout_ms: 500,
        request_timeout_ms: 1_000,
        ..bridge_config(&nats)
    })
    .await;
    let addr = bridge
        .server
        .as_ref()
        .map(|s| s.addr())
        .expect("bridge-api running");

    // A raw client that reads the response head and then nothing more: its TCP window closes
    // once the socket buffers are full (a small receive buffer makes that sooner).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut client = socket.connect(addr).await.expect("connect");
    client
        .write_all(
            format!(
                "GET /v1/devices/-/messages HTTP/1.1\r\nHost: bridge\r\n\
                 Authorization: Bearer {}\r\n\r\n",
                common::TOKEN
            )
            .as_bytes(),
        )
        .await
        .expect("write request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, client.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        assert_eq!(n, 1, "closed before the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    // The head comes once the subscription is live: every uplink from now on reaches the tail.
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Uplink until the stream takes nothing more: every message of several rounds in a row is
    // dropped, so bridge-api can write no more to the client, whose socket buffers are full.
    // (A drop alone does not show it: a burst can outrun a socket that still has room.)
    let publisher = nats.client().await;
    let subject = subjects::up(&devgate_gateway::contract::DeviceId::parse("chatty").expect("id"));
    let chunk = bytes::Bytes::from("z".repeat(60_000));
    let deadline = Instant::now() + WAIT;
    let (mut sent, mut passed, mut stalled) = (0u64, None, 0);
    while stalled < 3 {
        for _ in 0..ROUND {
            publisher
                .publish(subject.clone(), chunk.clone())
                .await
                .expect("publish");
        }
        sent += ROUND;
        publisher.flush().await.expect("flush");
        let metrics = bridge.metrics_text().await;
        let dropped = metrics
            .lines()
            .find_map(|l| l.strip_prefix("devgate_bridge_sse_dropped_events_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        // Messages not dropped: taken by the stream, or still on their way to the tail.
        let now = sent.saturating_sub(dropped);
        stalled = if passed.is_some_and(|before| now <= before) {
            stalled + 1
        } else {
            0
        };
        passed = Some(now);
        assert!(
            Instant::now() < deadline,
            "the tail still took uplink after {sent} messages of 60 KB ({dropped} dropped)"
        );
    }

    bridge.shutdown.cancel();
    let server = bridge.server.take().expect("bridge-api running");
    let started = Instant::now();
    tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("shutdown must not wait for ever on a client that stopped reading")
        .expect("server ends cleanly");
    // Not cut at once either: the drain lasts at least the request cap, so that requests in
    // flight at the signal get their answers.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the connection was closed after {:?}, before the request cap",
        started.elapsed()
    );
    // The connection was closed: what the client reads now ends.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the server kept the connection open");
}
