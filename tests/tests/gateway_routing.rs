//! End-to-end routing through real nats-server and gateways: downlink by publish and request,
//! every ack mode, offline devices, and uplink with acknowledgements.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use devgate_gateway::contract::DeviceId;
use devgate_gateway::contract::{DeliveryReply, DeliveryStatus, headers, subjects};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{device, start};
use futures::StreamExt;

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_plain_publish_reaches_the_device_on_whichever_gateway_holds_it() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let (mut d1, w1) = device(&gw1, "dev-1").await;
    let (mut d2, w2) = device(&gw2, "dev-2").await;
    assert_eq!(w1.gateway, "gw-1");
    assert_eq!(w2.gateway, "gw-2");

    let service = nats.client().await;
    service
        .publish(subjects::down(&id("dev-2")), Bytes::from_static(b"to two"))
        .await
        .expect("publish");
    service
        .publish(subjects::down(&id("dev-1")), Bytes::from_static(b"to one"))
        .await
        .expect("publish");
    let (seq, payload) = tokio::time::timeout(WAIT, d2.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!((seq, &payload[..]), (0, &b"to two"[..]));
    let (_, payload) = tokio::time::timeout(WAIT, d1.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"to one");
}

#[tokio::test]
async fn a_request_is_answered_sent_once_the_frame_is_written() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    let service = nats.client().await;
    let reply = service
        .request(subjects::down(&id("dev-1")), Bytes::from_static(b"hello"))
        .await
        .expect("answered");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json reply");
    assert_eq!(reply.status, DeliveryStatus::Sent);
    assert_eq!(reply.gateway, "gw-1");
    assert_eq!(reply.session, welcome.session);
    let (seq, payload) = dev.recv_down().await.expect("down");
    assert_eq!((seq, &payload[..]), (0, &b"hello"[..]));
}

#[tokio::test]
async fn ack_device_waits_for_the_devices_ack() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    let service = nats.client().await;
    let mut h = HeaderMap::new();
    h.insert(headers::ACK, headers::ACK_DEVICE);
    let request = service.request_with_headers(
        subjects::down(&id("dev-1")),
        h,
        Bytes::from_static(b"confirm me"),
    );
    let device_side = async {
        let (seq, payload) = dev.recv_down().await.expect("down");
        assert_ne!(seq, 0, "an ack=device DOWN carries a sequence number");
        assert_eq!(&payload[..], b"confirm me");
        dev.ack(seq).await.expect("ack");
        seq
    };
    let (reply, seq) = tokio::join!(request, device_side);
    let reply: DeliveryReply =
        serde_json::from_slice(&reply.expect("answered").payload).expect("json");
    assert_eq!(reply.status, DeliveryStatus::Acked);
    assert_eq!(reply.seq, seq);
}

#[tokio::test]
async fn a_device_that_never_acks_gets_timeout_from_the_gateway() {
    let nats = NatsServer::start();
    let mut config = devgate_tests::gateway::config(&nats, "gw-1");
    config.ack_timeout_ms = 300;
    let gw = devgate_tests::gateway::start_with(config).await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    let service = nats.client().await;
    let mut h = HeaderMap::new();
    h.insert(headers::ACK, headers::ACK_DEVICE);
    let started = Instant::now();
    let reply = service
        .request_with_headers(subjects::down(&id("dev-1")), h, Bytes::from_static(b"x"))
        .await
        .expect("answered");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(reply.status, DeliveryStatus::Timeout);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The frame itself was delivered; only the ack is missing.
    let (seq, _) = dev.recv_down().await.expect("down");
    assert_eq!(seq, reply.seq);
}

#[tokio::test]
async fn an_offline_device_is_reported_at_once_by_no_responders() {
    let nats = NatsServer::start();
    let _gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let started = Instant::now();
    let err = service
        .request(subjects::down(&id("nobody")), Bytes::from_static(b"x"))
        .await
        .expect_err("nobody holds it");
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no-responders must not wait for a timeout"
    );
}

#[tokio::test]
async fn uplink_reaches_services_with_headers_and_is_acked_after_nats_accepts_it() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut ups = service.subscribe(subjects::ALL_UP).await.expect("sub");
    devgate_tests::nats::processed(&service).await;
    let (mut dev, welcome) = device(&gw, "dev-7").await;
    dev.send_up(0, Bytes::from_static(b"fire and forget"))
        .await
        .expect("up");
    dev.send_up(41, Bytes::from_static(b"please ack"))
        .await
        .expect("up");
    let m1 = tokio::time::timeout(WAIT, ups.next())
        .await
        .expect("in time")
        .expect("msg");
    let m2 = tokio::time::timeout(WAIT, ups.next())
        .await
        .expect("in time")
        .expect("msg");
    assert_eq!(m1.subject.as_str(), "device.dev-7.up");
    assert_eq!(&m1.payload[..], b"fire and forget");
    assert_eq!(&m2.payload[..], b"please ack");
    let h = m2.headers.expect("headers");
    assert_eq!(h.get(headers::DEVICE).map(|v| v.as_str()), Some("dev-7"));
    assert_eq!(
        h.get(headers::SESSION).map(|v| v.as_str()),
        Some(welcome.session.as_str())
    );
    assert_eq!(h.get(headers::GATEWAY).map(|v| v.as_str()), Some("gw-1"));
    assert_eq!(h.get(headers::SEQ).map(|v| v.as_str()), Some("41"));
    // seq 0 asks for no ACK, and its message carries no Devgate-Seq (the device is still named).
    let h1 = m1.headers.expect("headers");
    assert_eq!(h1.get(headers::SEQ), None);
    assert_eq!(h1.get(headers::DEVICE).map(|v| v.as_str()), Some("dev-7"));
    let acked = tokio::time::timeout(WAIT, dev.recv_ack())
        .await
        .expect("in time")
        .expect("ack");
    assert_eq!(acked, 41, "only the seq != 0 frame is acknowledged");
}

#[tokio::test]
async fn every_request_in_flight_when_a_device_hangs_up_is_answered() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    let service = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(3)))
        .connect(nats.url())
        .await
        .expect("service");
    let mut presence = service
        .subscribe(subjects::presence_events(&id("dev-1")))
        .await
        .expect("presence");
    service.flush().await.expect("flush");
    // A service keeps sending requests while the device hangs up, so some are on their way
    // to the gateway at the moment the session stops its subscription.
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = tokio::spawn({
        let (service, stop) = (service.clone(), stop.clone());
        async move {
            let mut requests = tokio::task::JoinSet::new();
            while !stop.is_cancelled() {
                let service = service.clone();
                requests.spawn(async move {
                    service
                        .request(subjects::down(&id("dev-1")), Bytes::from_static(b"r"))
                        .await
                });
                tokio::task::yield_now().await;
            }
            requests.join_all().await
        }
    });
    for _ in 0..20 {
        tokio::time::timeout(WAIT, dev.recv_down())
            .await
            .expect("in time")
            .expect("down");
    }
    drop(dev);
    let event = tokio::time::timeout(WAIT, presence.next())
        .await
        .expect("disconnect in time")
        .expect("event");
    assert!(
        String::from_utf8_lossy(&event.payload).contains("disconnected"),
        "{event:?}"
    );
    // Requests published after the server dropped the interest hear "no responders".
    let mut no_responders = 0;
    while no_responders < 20 {
        let late = service
            .request(subjects::down(&id("dev-1")), Bytes::from_static(b"late"))
            .await;
        if matches!(&late, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders)
        {
            no_responders += 1;
        }
    }
    stop.cancel();
    let results = sender.await.expect("sender");
    let (mut sent, mut failed, mut unrouted, mut timed_out) = (0, 0, 0, 0);
    for result in &results {
        match result {
            Ok(reply) => {
                let reply: DeliveryReply =
                    serde_json::from_slice(&reply.payload).expect("json reply");
                match reply.status {
                    DeliveryStatus::Sent => sent += 1,
                    DeliveryStatus::Failed => {
                        assert_eq!(reply.reason.as_deref(), Some("session_closed"), "{reply:?}");
                        failed += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                unrouted += 1
            }
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::TimedOut => timed_out += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent >= 20, "{sent} sent");
    assert_eq!(
        timed_out,
        0,
        "every request routed to the session is answered ({sent} sent, {failed} failed, \
         {unrouted} unrouted, of {})",
        results.len()
    );
}

#[tokio::test]
async fn a_backlog_bigger_than_the_session_queue_routed_during_a_login_is_all_delivered() {
    use devgate_gateway::config::Config;
    use devgate_tests::gateway::{HeldLogin, config, start_with};

    let nats = NatsServer::start();
    let settings = Config {
        claim_timeout_ms: 1_000,
        ..config(&nats, "gw-1")
    };
    let queue_bytes = settings.session_queue_bytes;
    let gw = start_with(settings).await;
    // Held in its confirm round (subscribed) by a holder that never answers.
    let held = HeldLogin::start(&nats, &gw, "dev-1", 2).await;
    let service = held.holder.clone();
    // Twice the session queue, routed while the login decides.
    let count = 2 * queue_bytes / 1024;
    for n in 0..count {
        let mut payload = format!("{n:06}").into_bytes();
        payload.resize(1024, b'.');
        service
            .publish(subjects::down(&id("dev-1")), payload.into())
            .await
            .expect("publish");
    }
    devgate_tests::nats::processed(&service).await;
    let (mut dev, _) = held.outcome().await.expect("welcomed");
    for n in 0..count {
        let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
            .await
            .unwrap_or_else(|_| panic!("message {n} of {count} in time"))
            .unwrap_or_else(|e| panic!("message {n} of {count}: {e}"));
        assert_eq!(&payload[..6], format!("{n:06}").as_bytes(), "in order");
    }
}

#[tokio::test]
async fn a_kick_among_messages_routed_during_a_login_is_handled_in_order() {
    use devgate_gateway::codec::GoAwayReason;
    use devgate_gateway::config::Config;
    use devgate_tests::gateway::{HeldLogin, config, downs_until_goaway, start_with};
    use devgate_tests::nats::{answer, processed, send_request};

    let nats = NatsServer::start();
    let gw = start_with(Config {
        claim_timeout_ms: 1_000,
        ..config(&nats, "gw-1")
    })
    .await;
    let service = nats.client().await;
    let held = HeldLogin::start(&nats, &gw, "dev-1", 2).await;
    // While the login decides: a request, a kick, and a request behind the kick.
    let down = || subjects::down(&id("dev-1"));
    let mut before = send_request(&service, down(), HeaderMap::new(), "before".into()).await;
    let mut kick = send_request(
        &service,
        down(),
        headers::control(subjects::ControlOp::Kick),
        Bytes::new(),
    )
    .await;
    let mut after = send_request(&service, down(), HeaderMap::new(), "after".into()).await;
    processed(&service).await;
    let (mut dev, _) = held.outcome().await.expect("welcomed");
    // As in a live session: the kick's release still writes what was routed before it let go,
    // in order, then GOAWAY kicked; every request is answered.
    let (downs, reason) = downs_until_goaway(&mut dev).await;
    assert_eq!(downs, ["before", "after"]);
    assert_eq!(reason, GoAwayReason::Kicked);
    for (what, answers) in [("before", &mut before), ("after", &mut after)] {
        let reply: DeliveryReply =
            serde_json::from_slice(&answer(answers, WAIT).await.payload).expect("delivery reply");
        assert_eq!(reply.status, DeliveryStatus::Sent, "{what}: {reply:?}");
    }
    let kicked = answer(&mut kick, WAIT).await;
    assert!(
        String::from_utf8_lossy(&kicked.payload).contains("kicked"),
        "{kicked:?}"
    );
}
