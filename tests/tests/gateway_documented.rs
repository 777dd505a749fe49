//! Behaviour promised by docs/protocol.md, docs/nats-subjects.md and the README that no other
//! test pins down: presence events and their headers, HELLO metadata, unknown and plain-publish
//! control requests, stray device frames, and the login/takeover metrics.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{ErrorCode, Frame, GoAwayReason, Hello};
use devgate_gateway::contract::{
    ControlError, DeliveryReply, DeliveryStatus, DeviceId, PresenceEvent, PresenceEventKind,
    PresenceInfo, headers, subjects, subjects::ControlOp,
};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{
    control, device, downs_until_goaway, metric_reaches, next_frame, start, token,
};
use futures::StreamExt;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

fn down(s: &str) -> String {
    subjects::down(&DeviceId::parse(s).expect("valid id"))
}

/// The next presence message on `events`: its parsed body and its headers.
async fn next_event(events: &mut async_nats::Subscriber) -> (PresenceEvent, HeaderMap) {
    let msg = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("presence event in time")
        .expect("subscription open");
    let event = serde_json::from_slice(&msg.payload).expect("presence event JSON");
    (event, msg.headers.unwrap_or_default())
}

/// Asserts the documented identity headers of a presence event match its body.
fn assert_identity_headers(event: &PresenceEvent, h: &HeaderMap) {
    let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        get(headers::DEVICE).as_deref(),
        Some(event.device_id.as_str())
    );
    assert_eq!(
        get(headers::SESSION).as_deref(),
        Some(event.session.as_str())
    );
    assert_eq!(
        get(headers::GATEWAY).as_deref(),
        Some(event.gateway.as_str())
    );
}

/// A data request to `id`, its DeliveryReply.
async fn request(service: &async_nats::Client, id: &str, payload: &'static [u8]) -> DeliveryReply {
    let reply = tokio::time::timeout(WAIT, service.request(down(id), Bytes::from_static(payload)))
        .await
        .expect("answered in time")
        .expect("answered");
    serde_json::from_slice(&reply.payload).expect("json reply")
}

#[tokio::test]
async fn presence_events_cover_login_close_and_takeover_but_not_refused_hellos() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut events = devgate_tests::nats::presence_events(&service).await;

    // Login: `connected`, no reason, headers naming device, session and gateway.
    let (dev, welcome) = device(&gw, "dev-1").await;
    let (up, h) = next_event(&mut events).await;
    assert_eq!(up.event, PresenceEventKind::Connected);
    assert_eq!(
        (
            up.device_id.as_str(),
            up.gateway.as_str(),
            up.session.as_str()
        ),
        ("dev-1", "gw-1", welcome.session.as_str())
    );
    assert_eq!(up.reason, None);
    assert!(up.at_ms > 0);
    assert!(
        up.remote_addr.starts_with("127.0.0.1:"),
        "{}",
        up.remote_addr
    );
    assert_identity_headers(&up, &h);

    // The device closes its socket: `disconnected` / `closed`.
    drop(dev);
    let (gone, h) = next_event(&mut events).await;
    assert_eq!(gone.event, PresenceEventKind::Disconnected);
    assert_eq!(gone.session, welcome.session);
    assert_eq!(gone.reason.as_deref(), Some("closed"));
    assert_identity_headers(&gone, &h);

    // A takeover: the old session ends `replaced`, the new one is `connected`. The docs allow
    // either order, so the two events are matched by session.
    let (mut old, old_welcome) = device(&gw, "dev-1").await;
    let (first, _) = next_event(&mut events).await;
    assert_eq!(
        (first.event, first.session.as_str()),
        (PresenceEventKind::Connected, old_welcome.session.as_str())
    );
    let (_new, new_welcome) = device(&gw, "dev-1").await;
    assert_eq!(
        downs_until_goaway(&mut old).await,
        (Vec::new(), GoAwayReason::Replaced)
    );
    let mut takeover = vec![next_event(&mut events).await, next_event(&mut events).await];
    takeover.sort_by_key(|(e, _)| e.session != old_welcome.session);
    let [(replaced, rh), (connected, ch)] = <[_; 2]>::try_from(takeover).expect("two events");
    assert_eq!(
        (replaced.event, replaced.session.as_str()),
        (
            PresenceEventKind::Disconnected,
            old_welcome.session.as_str()
        )
    );
    assert_eq!(replaced.reason.as_deref(), Some("replaced"));
    assert_identity_headers(&replaced, &rh);
    assert_eq!(
        (connected.event, connected.session.as_str()),
        (PresenceEventKind::Connected, new_welcome.session.as_str())
    );
    assert_identity_headers(&connected, &ch);

    // A HELLO refused for a bad token (another device's, well-formed) produces no event.
    match DeviceClient::connect(gw.device_addr(), "dev-2", &token("dev-3")).await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!(
            "expected ERROR unauthorized, got {:?}",
            other.map(|(_, w)| w)
        ),
    }
    // Nothing to await for an event that must not exist: a short bounded wait.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err(),
        "a refused HELLO published a presence event"
    );
    // The subscription still works (so the silence above meant something), and the next event
    // the gateway published after the refusal is the probe's own.
    let (_probe, probe_welcome) = device(&gw, "probe").await;
    let (probe, _) = next_event(&mut events).await;
    assert_eq!(
        (probe.event, probe.session.as_str()),
        (PresenceEventKind::Connected, probe_welcome.session.as_str())
    );
}

#[tokio::test]
async fn hello_metadata_is_returned_by_the_presence_control_request_only() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut events = service
        .subscribe(subjects::presence_events(
            &DeviceId::parse("dev-1").expect("id"),
        ))
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(&service).await;

    let mut metadata = serde_json::Map::new();
    metadata.insert("fw".into(), "2.1".into());
    metadata.insert("model".into(), "x9".into());
    let hello = Hello {
        device_id: "dev-1".into(),
        token: token("dev-1"),
        metadata: metadata.clone(),
    };
    let stream = TcpStream::connect(gw.device_addr()).await.expect("connect");
    let (_dev, welcome) = DeviceClient::connect_with(stream, &hello)
        .await
        .expect("login with metadata");

    let info: PresenceInfo = control(&service, "dev-1", ControlOp::Presence).await;
    assert_eq!(info.session, welcome.session);
    assert_eq!(info.metadata["fw"], "2.1");
    // Exactly the extra fields: neither the id nor, above all, the token.
    assert_eq!(info.metadata, metadata);

    // Not in presence events.
    let msg = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("connected event")
        .expect("subscription open");
    let raw: serde_json::Value = serde_json::from_slice(&msg.payload).expect("json");
    assert_eq!(raw["event"], "connected");
    assert!(
        raw.get("metadata").is_none() && raw.get("fw").is_none(),
        "{raw}"
    );
}

#[tokio::test]
async fn unknown_control_is_refused_and_a_plain_kick_still_kicks() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;

    // An unknown operation is answered `bad_request` and never reaches the device.
    let mut reboot = HeaderMap::new();
    reboot.insert(headers::CONTROL, "reboot");
    let answer = tokio::time::timeout(
        WAIT,
        service.request_with_headers(down("dev-1"), reboot, Bytes::from_static(b"reboot-body")),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    let refused: ControlError = serde_json::from_slice(&answer.payload).expect("ControlError");
    assert_eq!(refused.error, "bad_request");
    assert!(refused.message.contains("reboot"), "{}", refused.message);

    // The session is still usable, and the next DOWN is the normal request's.
    let reply = request(&service, "dev-1", b"still here").await;
    assert_eq!(
        (reply.status, reply.session.as_str()),
        (DeliveryStatus::Sent, welcome.session.as_str())
    );
    match next_frame(&mut dev).await {
        Frame::Down { seq, payload } => assert_eq!((seq, &payload[..]), (0, &b"still here"[..])),
        other => panic!("expected the request's DOWN, got {other:?}"),
    }

    // A kick sent as a plain publish (no reply subject) takes effect all the same.
    service
        .publish_with_headers(
            down("dev-1"),
            headers::control(ControlOp::Kick),
            Bytes::new(),
        )
        .await
        .expect("publish");
    assert_eq!(
        downs_until_goaway(&mut dev).await,
        (Vec::new(), GoAwayReason::Kicked)
    );
}

#[tokio::test]
async fn stray_pongs_and_acks_from_a_device_are_ignored() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;

    // A PONG nobody asked for, and an ACK for a DOWN seq the gateway never sent.
    dev.send(Frame::Pong(Bytes::from_static(b"unsolicited")))
        .await
        .expect("pong");
    dev.ack(77).await.expect("ack");

    // The same session still routes downlink, and the gateway answered the strays with
    // nothing: the very next frame is the DOWN (an ERROR would come first otherwise).
    let reply = request(&service, "dev-1", b"after strays").await;
    assert_eq!(
        (reply.status, reply.session.as_str()),
        (DeliveryStatus::Sent, welcome.session.as_str())
    );
    match next_frame(&mut dev).await {
        Frame::Down { seq, payload } => {
            assert_eq!((seq, &payload[..]), (0, &b"after strays"[..]));
        }
        other => panic!("expected the request's DOWN, got {other:?}"),
    }
}

#[tokio::test]
async fn metrics_count_logins_takeovers_and_connections() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut old, _) = device(&gw, "dev-1").await;
    let (_new, _) = device(&gw, "dev-1").await;
    assert_eq!(
        downs_until_goaway(&mut old).await,
        (Vec::new(), GoAwayReason::Replaced)
    );

    metric_reaches(&gw, "devgate_gateway_logins_total 2").await;
    metric_reaches(&gw, "devgate_gateway_takeovers_total 1").await;
    metric_reaches(&gw, "devgate_gateway_sessions 1").await;
    // The replaced connection is closed by the gateway; only the new one stays open.
    metric_reaches(&gw, "devgate_gateway_connections 1").await;
}
