//! Control over NATS (presence, kick, stats, session lists, announcements), slow consumers,
//! the PROXY protocol and the operations endpoints.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use devgate_gateway::client::ClientError;
use devgate_gateway::codec::{ErrorCode, GoAwayReason, Hello};
use devgate_gateway::contract::subjects::ControlOp;
use devgate_gateway::contract::{
    Announce, DeliveryReply, DeliveryStatus, DeviceId, GatewayStats, KickReply, PresenceEvent,
    PresenceEventKind, PresenceInfo, SessionList, SessionListRequest, headers, subjects,
};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{config, device, start, start_with, token};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// The next presence event on `events`, parsed.
async fn next_event(events: &mut async_nats::Subscriber) -> PresenceEvent {
    let msg = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("presence event in time")
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).expect("presence event JSON")
}

fn down(s: &str) -> String {
    subjects::down(&DeviceId::parse(s).expect("id"))
}

async fn control<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    id: &str,
    op: ControlOp,
) -> Result<T, async_nats::RequestError> {
    let reply = client
        .request_with_headers(down(id), headers::control(op), Bytes::new())
        .await?;
    Ok(serde_json::from_slice(&reply.payload).expect("json reply"))
}

#[tokio::test]
async fn the_holder_answers_presence_and_kick() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut events = devgate_tests::nats::presence_events(&service).await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    let connected: PresenceEvent = next_event(&mut events).await;
    assert_eq!(connected.event, PresenceEventKind::Connected);

    let info: PresenceInfo = control(&service, "dev-1", ControlOp::Presence)
        .await
        .expect("online");
    assert_eq!(
        (info.gateway.as_str(), info.session.as_str()),
        ("gw-1", welcome.session.as_str())
    );
    assert!(
        info.remote_addr.starts_with("127.0.0.1:"),
        "{}",
        info.remote_addr
    );
    assert!(info.since_ms > 0);
    let offline = control::<PresenceInfo>(&service, "dev-2", ControlOp::Presence)
        .await
        .expect_err("offline");
    assert_eq!(offline.kind(), async_nats::RequestErrorKind::NoResponders);

    let kicked: KickReply = control(&service, "dev-1", ControlOp::Kick)
        .await
        .expect("kicked");
    assert_eq!(kicked.session, welcome.session);
    match tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
    {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Kicked),
        other => panic!("expected GOAWAY kicked, got {other:?}"),
    }
    let gone: PresenceEvent = next_event(&mut events).await;
    assert_eq!(gone.event, PresenceEventKind::Disconnected);
    assert_eq!(gone.reason.as_deref(), Some("kicked"));
    let after = control::<PresenceInfo>(&service, "dev-1", ControlOp::Presence)
        .await
        .expect_err("gone");
    assert_eq!(after.kind(), async_nats::RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn every_instance_answers_stats_lists_its_sessions_and_announces_itself() {
    let nats = NatsServer::start();
    let service = nats.client().await;
    let mut announces = service.subscribe(subjects::ANNOUNCE).await.expect("sub");
    devgate_tests::nats::processed(&service).await;
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(device(&gw1, &format!("a-{i}")).await);
    }
    devices.push(device(&gw2, "b-0").await);

    // Announcements: both instances, with their device address and readiness.
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(WAIT, announces.next())
            .await
            .expect("announce")
            .expect("msg");
        let a: Announce = serde_json::from_slice(&msg.payload).expect("json");
        if a.ready && a.sessions > 0 {
            seen.insert(a.instance.clone(), a);
        }
    }
    assert_eq!(seen["gw-1"].advertise_addr, gw1.device_addr().to_string());
    assert_eq!(seen["gw-2"].heartbeat_ms, 200);

    // Scatter stats: one reply per instance.
    let inbox = service.new_inbox();
    let mut replies = service.subscribe(inbox.clone()).await.expect("sub");
    service
        .publish_with_reply(subjects::STATS, inbox, Bytes::new())
        .await
        .expect("pub");
    let mut stats = Vec::new();
    while stats.len() < 2 {
        let m = tokio::time::timeout(WAIT, replies.next())
            .await
            .expect("stats")
            .expect("msg");
        stats.push(serde_json::from_slice::<GatewayStats>(&m.payload).expect("json"));
    }
    stats.sort_by(|a, b| a.instance.cmp(&b.instance));
    assert_eq!((stats[0].sessions, stats[1].sessions), (5, 1));

    // Paginated session list of one instance.
    let ask = |after: Option<String>| {
        let service = service.clone();
        async move {
            let req = SessionListRequest {
                after,
                limit: Some(2),
            };
            let r = service
                .request(
                    subjects::sessions("gw-1"),
                    Bytes::from(serde_json::to_vec(&req).expect("json")),
                )
                .await
                .expect("answered");
            serde_json::from_slice::<SessionList>(&r.payload).expect("json")
        }
    };
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = ask(after).await;
        assert_eq!(page.total, 5);
        ids.extend(page.sessions.iter().map(|s| s.device_id.to_string()));
        match page.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(ids, ["a-0", "a-1", "a-2", "a-3", "a-4"]);
    let bad = service
        .request(
            subjects::sessions("gw-1"),
            Bytes::from_static(b"{\"limit\":\"many\"}"),
        )
        .await
        .expect("answered");
    assert!(String::from_utf8_lossy(&bad.payload).contains("bad_request"));
    let bad_cursor = service
        .request(
            subjects::sessions("gw-1"),
            Bytes::from_static(b"{\"after\":\"not a device\"}"),
        )
        .await
        .expect("answered");
    let text = String::from_utf8_lossy(&bad_cursor.payload);
    assert!(
        text.contains("bad_request") && text.contains("cursor"),
        "{text}"
    );
}

/// Fires `n` concurrent requests of `chunk` at `id` and returns every reply.
async fn flood(
    service: &async_nats::Client,
    id: &str,
    chunk: Bytes,
    n: usize,
) -> Vec<DeliveryReply> {
    futures::stream::iter(0..n)
        .map(|_| {
            let service = service.clone();
            let chunk = chunk.clone();
            let subject = down(id);
            async move {
                let r = service
                    .request(subject, chunk)
                    .await
                    .expect("every request is answered");
                serde_json::from_slice::<DeliveryReply>(&r.payload).expect("json")
            }
        })
        .buffer_unordered(n)
        .collect()
        .await
}

#[tokio::test]
async fn a_device_that_does_not_read_gets_busy_then_slow_consumer_and_every_request_is_answered() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.session_queue_bytes = 200_000;
    c.write_timeout_ms = 1_500;
    let gw = start_with(c).await;
    let (stalled, _) = device(&gw, "stalled").await; // never reads
    let (mut healthy, _) = device(&gw, "healthy").await;
    let service = nats.client().await;
    let mut events = service
        .subscribe(subjects::presence_events(
            &DeviceId::parse("stalled").expect("id"),
        ))
        .await
        .expect("sub");
    devgate_tests::nats::processed(&service).await;

    let replies = flood(&service, "stalled", Bytes::from(vec![7u8; 60_000]), 300).await;
    let count = |s: DeliveryStatus| replies.iter().filter(|r| r.status == s).count();
    let (sent, busy, failed) = (
        count(DeliveryStatus::Sent),
        count(DeliveryStatus::Busy),
        count(DeliveryStatus::Failed),
    );
    assert_eq!(
        sent + busy + failed,
        300,
        "only sent, busy or failed: {replies:?}"
    );
    assert!(busy > 0, "a full queue answers busy instead of growing");
    assert!(
        replies
            .iter()
            .filter(|r| r.status == DeliveryStatus::Busy)
            .all(|r| r.reason.as_deref() == Some("queue_full"))
    );
    assert!(
        failed > 0,
        "frames still queued when the stall closes the session are answered failed"
    );
    assert!(
        replies
            .iter()
            .filter(|r| r.status == DeliveryStatus::Failed)
            .all(|r| r.reason.as_deref() == Some("session_closed"))
    );

    let gone: PresenceEvent = next_event(&mut events).await;
    assert_eq!(gone.event, PresenceEventKind::Disconnected);
    assert_eq!(gone.reason.as_deref(), Some("slow_consumer"));

    // The healthy device never noticed.
    let r = service
        .request(down("healthy"), Bytes::from_static(b"ok?"))
        .await
        .expect("answered");
    assert!(String::from_utf8_lossy(&r.payload).contains("\"sent\""));
    assert_eq!(&healthy.recv_down().await.expect("down").1[..], b"ok?");
    drop(stalled);
}

#[tokio::test]
async fn plain_publishes_that_overflow_the_queue_close_the_session_as_slow_consumer() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.session_queue_bytes = 200_000;
    let gw = start_with(c).await;
    let (stalled, _) = device(&gw, "stalled").await;
    let service = nats.client().await;
    let mut events = service
        .subscribe(subjects::presence_events(
            &DeviceId::parse("stalled").expect("id"),
        ))
        .await
        .expect("sub");
    devgate_tests::nats::processed(&service).await;
    let chunk = Bytes::from(vec![1u8; 60_000]);
    let mut gone = None;
    for _ in 0..400 {
        service
            .publish(down("stalled"), chunk.clone())
            .await
            .expect("pub");
        if let Some(Some(m)) = futures::FutureExt::now_or_never(events.next()) {
            gone = Some(m);
            break;
        }
        tokio::task::yield_now().await;
    }
    let gone = match gone {
        Some(m) => m,
        None => tokio::time::timeout(WAIT, events.next())
            .await
            .expect("closed in time")
            .expect("msg"),
    };
    let gone: PresenceEvent = serde_json::from_slice(&gone.payload).expect("json");
    assert_eq!(gone.reason.as_deref(), Some("slow_consumer"));
    let metrics = reqwest::get(format!("http://{}/metrics", gw.http_addr()))
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("devgate_gateway_errors_total{code=\"slow_consumer\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("devgate_gateway_downlink_messages_total{outcome=\"dropped\"} 0"),
        "drops are counted"
    );
    drop(stalled);
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_give_the_devices_real_address() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.proxy_protocol = true;
    let gw = start_with(c).await;
    let service = nats.client().await;

    let login = |header: Vec<u8>, id: &'static str| {
        let addr = gw.device_addr();
        async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(&header).await.expect("header");
            let hello = Hello {
                device_id: id.into(),
                token: token(id),
                metadata: Default::default(),
            };
            devgate_gateway::client::DeviceClient::connect_with(stream, &hello).await
        }
    };
    let (_d1, _) = login(
        b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 7000\r\n".to_vec(),
        "v1",
    )
    .await
    .expect("v1 login");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x40, 0x1b, 0x58,
    ]);
    let (_d2, _) = login(v2, "v2").await.expect("v2 login");
    let p1: PresenceInfo = control(&service, "v1", ControlOp::Presence)
        .await
        .expect("presence");
    let p2: PresenceInfo = control(&service, "v2", ControlOp::Presence)
        .await
        .expect("presence");
    assert_eq!(p1.remote_addr, "203.0.113.7:40000");
    assert_eq!(p2.remote_addr, "198.51.100.9:40000");

    // Without a header the connection is refused with a clear reason.
    match login(Vec::new(), "nohdr").await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::ProtocolViolation),
        other => panic!("expected a refusal, got {:?}", other.map(|(_, w)| w)),
    }
}

#[tokio::test]
async fn readiness_follows_nats_and_metrics_count_traffic() {
    let mut nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", gw.http_addr());
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    assert_eq!(get("/readyz").await.expect("readyz").status(), 200);

    let (mut dev, _) = device(&gw, "dev-1").await;
    dev.send_up(1, Bytes::from_static(b"x")).await.expect("up");
    dev.recv_ack().await.expect("ack");
    let _ = devgate_gateway::client::DeviceClient::connect(gw.device_addr(), "dev-2", "bad").await;
    let text = get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for needle in [
        "devgate_gateway_sessions 1",
        "devgate_gateway_frames_total{direction=\"in\",type=\"up\"} 1",
        "devgate_gateway_errors_total{code=\"unauthorized\"} 1",
        "devgate_gateway_uplink_messages_total{outcome=\"acked\"} 1",
        "devgate_gateway_nats_connected 1",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }

    nats.stop();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = get("/readyz").await.expect("readyz").status();
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status} with NATS down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // no event to await from outside
    }
    let text = get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(text.contains("devgate_gateway_nats_connected 0"));
    assert!(text.contains("devgate_gateway_nats_disconnects_total 1"));
    let _ = HeaderMap::new();
}

#[tokio::test]
async fn a_quiet_session_is_not_mistaken_for_a_slow_consumer() {
    let nats = NatsServer::start();
    let mut c = config(&nats, "gw-1");
    c.write_timeout_ms = 200;
    let gw = start_with(c).await;
    let (mut dev, _) = device(&gw, "quiet").await;
    let service = nats.client().await;
    for round in 0..8 {
        // Stay quiet for longer than the write timeout; the next DOWN must still go out.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = service
            .request(down("quiet"), Bytes::from(format!("r{round}")))
            .await
            .expect("answered");
        let r: DeliveryReply = serde_json::from_slice(&r.payload).expect("json");
        assert_eq!(r.status, DeliveryStatus::Sent, "round {round}: {r:?}");
        let (_, p) = dev.recv_down().await.expect("down");
        assert_eq!(p, Bytes::from(format!("r{round}")));
    }
}

#[tokio::test]
async fn requests_whose_reply_subject_is_a_devgate_subject_are_not_answered() {
    use futures::FutureExt;
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, _) = device(&gw, "dev-2").await;
    let (_victim, _) = device(&gw, "victim").await;
    let service = nats.client().await;
    let mut victim_up = service
        .subscribe(subjects::up(&DeviceId::parse("victim").expect("id")))
        .await
        .expect("subscribe");
    let mut announce = service
        .subscribe(subjects::ANNOUNCE)
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(&service).await;
    let forged = || subjects::up(&DeviceId::parse("victim").expect("id"));

    // A presence request, a downlink request and a stats request, each asking for its answer
    // on the victim's uplink subject; and a session list answered on the announce subject.
    service
        .publish_with_reply_and_headers(
            down("dev-2"),
            forged(),
            headers::control(ControlOp::Presence),
            Bytes::new(),
        )
        .await
        .expect("publish");
    service
        .publish_with_reply(down("dev-2"), forged(), Bytes::from_static(b"forged"))
        .await
        .expect("publish");
    service
        .publish_with_reply(subjects::STATS, forged(), Bytes::new())
        .await
        .expect("publish");
    service
        .publish_with_reply(subjects::sessions("gw-1"), subjects::ANNOUNCE, Bytes::new())
        .await
        .expect("publish");

    // Requests with ordinary inboxes, through the same two queues (the session's and the
    // control task's), are answered; once they are, the forged ones were handled before them.
    let info: PresenceInfo = control(&service, "dev-2", ControlOp::Presence)
        .await
        .expect("presence answered");
    assert_eq!(info.device_id.as_str(), "dev-2");
    let stats = service
        .request(subjects::STATS, Bytes::new())
        .await
        .expect("stats answered");
    let _: GatewayStats = serde_json::from_slice(&stats.payload).expect("stats json");
    let list = service
        .request(subjects::sessions("gw-1"), Bytes::new())
        .await
        .expect("sessions answered");
    let _: SessionList = serde_json::from_slice(&list.payload).expect("list json");

    // The forged downlink still reached the device (only its answer is withheld).
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"forged");
    // The gateway publishes in order on one connection, so anything it had sent to the victim's
    // uplink would have arrived before the answers above.
    assert!(
        victim_up.next().now_or_never().is_none(),
        "the gateway published on the victim's uplink"
    );
    while let Some(Some(msg)) = announce.next().now_or_never() {
        let _: Announce = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
            panic!("a non-announcement on the announce subject ({e}): {msg:?}")
        });
    }
    devgate_tests::gateway::metric_reaches(&gw, "devgate_gateway_replies_refused_total 4").await;
}

#[tokio::test]
async fn a_proxy_header_from_outside_the_trusted_cidrs_is_refused() {
    let nats = NatsServer::start();
    let proxied_login = |gw: std::net::SocketAddr| async move {
        let mut stream = TcpStream::connect(gw).await.expect("connect");
        stream
            .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 7000\r\n")
            .await
            .expect("header");
        let hello = Hello {
            device_id: "dev-p".into(),
            token: token("dev-p"),
            metadata: Default::default(),
        };
        devgate_gateway::client::DeviceClient::connect_with(stream, &hello).await
    };

    let mut c = config(&nats, "gw-far");
    c.proxy_protocol = true;
    c.proxy_trusted_cidrs = vec!["10.0.0.0/8".parse().expect("cidr")];
    let far = start_with(c).await;
    match proxied_login(far.device_addr()).await {
        Err(ClientError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::ProtocolViolation);
            assert!(e.message.contains("proxy_trusted_cidrs"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {:?}", other.map(|(_, w)| w)),
    }
    devgate_tests::gateway::metric_reaches(&far, "devgate_gateway_proxy_untrusted_total 1").await;

    let mut c = config(&nats, "gw-near");
    c.proxy_protocol = true;
    c.proxy_trusted_cidrs = vec!["127.0.0.0/8".parse().expect("cidr")];
    let near = start_with(c).await;
    let (_dev, _) = proxied_login(near.device_addr())
        .await
        .expect("a trusted balancer's PROXY header is accepted");
    let service = nats.client().await;
    let info: PresenceInfo = control(&service, "dev-p", ControlOp::Presence)
        .await
        .expect("presence");
    assert_eq!(info.remote_addr, "203.0.113.7:40000");
}
